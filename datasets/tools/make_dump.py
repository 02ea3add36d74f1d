#!/usr/bin/env python3
"""Train a small Llama-style model on English text and dump its KV cache.

Subcommands
-----------
train   Train a byte-level BPE tokenizer and a small LlamaForCausalLM on a text
        corpus (time-boxed), save both with save_pretrained.
dump    Load any Hugging Face causal LM directory + tokenizer, run one forward
        pass over held-out text and write a packkv KV dump (safetensors):
          layers.{i}.key    [kv_heads, tokens,   head_dim]  fp16, post-RoPE
          layers.{i}.value  [kv_heads, tokens,   head_dim]  fp16
          layers.{i}.query  [heads,    q_tokens, head_dim]  fp16, post-RoPE,
                            the queries of the LAST q_tokens positions
        plus string __metadata__ (model, shapes, text source, loss, command).

Requires torch, transformers (4.4x or 5.x), tokenizers, safetensors.
See datasets/README.md for how the embedded default dump was produced.
"""
from __future__ import annotations

import argparse
import inspect
import json
import lzma
import math
import os
import random
import shlex
import sys
import time


def log(*a):
    print(*a, flush=True)


def read_text(path: str) -> str:
    if path.endswith(".xz"):
        with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read()


def text_chunks(text: str, chunk_chars: int = 1 << 16):
    """Split text at newline boundaries into chunks of roughly chunk_chars."""
    out = []
    i, n = 0, len(text)
    while i < n:
        j = min(n, i + chunk_chars)
        if j < n:
            k = text.rfind("\n", i, j)
            if k > i:
                j = k + 1
        out.append(text[i:j])
        i = j
    return out


# --------------------------------------------------------------------------
# tokenizer helpers
# --------------------------------------------------------------------------

EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int, max_chars: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = text_chunks(text)
    if max_chars and len(text) > max_chars:  # evenly strided subset of chunks
        stride = max(1, math.ceil(len(text) / max_chars))
        chunks = chunks[::stride]
    tok.train_from_iterator(chunks, trainer=trainer)
    return tok


def encode_all(tok, text: str):
    """tokenizers.Tokenizer -> flat list of ids for a long text."""
    ids = []
    for enc in tok.encode_batch(text_chunks(text), add_special_tokens=False):
        ids.extend(enc.ids)
    return ids


def save_hf_tokenizer(tok, out_dir: str):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    hf = None
    try:
        from transformers import PreTrainedTokenizerFast as _Fast  # 4.x and 5.x alias
    except Exception:  # pragma: no cover
        _Fast = None
        try:
            from transformers import TokenizersBackend as _Fast  # 5.x
        except Exception:
            pass
    if _Fast is not None:
        try:
            hf = _Fast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None,
                       model_max_length=2048)
            hf.save_pretrained(out_dir)
        except Exception as e:  # keep tokenizer.json; write a minimal config
            log(f"warning: HF tokenizer wrapper failed ({e!r}); writing minimal tokenizer_config.json")
            hf = None
    if hf is None:
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS,
                       "eos_token": EOS, "model_max_length": 2048}, f, indent=1)


class TextEncoder:
    """Text -> ids for any model dir: AutoTokenizer, else a raw tokenizer.json."""

    def __init__(self, path: str):
        self.name = None
        self.hf = None
        self.raw = None
        try:
            from transformers import AutoTokenizer
            self.hf = AutoTokenizer.from_pretrained(path)
            self.name = type(self.hf).__name__
        except Exception as e:
            tj = os.path.join(path, "tokenizer.json")
            if not os.path.exists(tj):
                raise
            log(f"warning: AutoTokenizer failed ({e!r}); using {tj} directly")
            from tokenizers import Tokenizer
            self.raw = Tokenizer.from_file(tj)
            self.name = "tokenizers.Tokenizer"

    def encode(self, text: str, limit: int | None = None):
        # Encode chunk by chunk so that a huge text file does not need to be
        # tokenized in full when only `limit` tokens are wanted.
        ids = []
        for ch in text_chunks(text, 1 << 15):
            if self.hf is not None:
                ids.extend(self.hf(ch, add_special_tokens=False)["input_ids"])
            else:
                ids.extend(self.raw.encode(ch, add_special_tokens=False).ids)
            if limit is not None and len(ids) >= limit + 64:
                break
        return ids


# --------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------

def make_llama_config(args, vocab_size: int):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=args.tie,
        bos_token_id=0,
        eos_token_id=0,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
    )
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    else:
        kw["rope_theta"] = float(args.rope_theta)
    cfg = LlamaConfig(**kw)
    # sanity: head_dim honoured, theta honoured
    assert getattr(cfg, "head_dim", args.head_dim) == args.head_dim, cfg
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    assert theta is not None and abs(float(theta) - args.rope_theta) < 1e-6, f"rope theta {theta}"
    return cfg


def load_causal_lm(path: str, dtype, device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    return model.to(device).eval()


def cache_layer_kv(cache, i):
    """(key, value) of layer i for DynamicCache (4.x/5.x) or legacy tuples."""
    if hasattr(cache, "layers") and not isinstance(cache, (tuple, list)):
        layer = cache.layers[i]
        k = getattr(layer, "keys", None)
        v = getattr(layer, "values", None)
        if k is not None and v is not None and not callable(k):
            return k, v
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    if hasattr(cache, "to_legacy_cache"):
        c = cache.to_legacy_cache()
        return c[i][0], c[i][1]
    return cache[i][0], cache[i][1]


def cache_num_layers(cache):
    if hasattr(cache, "layers") and not isinstance(cache, (tuple, list)):
        return len(cache.layers)
    if hasattr(cache, "key_cache"):
        return len(cache.key_cache)
    return len(cache)


class QueryCapture:
    """Record post-RoPE q (and k, for a cross-check) per attention layer by
    wrapping the module-level apply_rotary_pos_emb of the attention module's
    Python module, with a forward pre-hook setting the current layer index."""

    def __init__(self, model):
        self.model = model
        self.attn = []  # (layer_idx, module)
        for m in model.modules():
            if "attention" in type(m).__name__.lower() and hasattr(m, "layer_idx") \
                    and any(hasattr(m, p) for p in ("q_proj", "qkv_proj", "query_key_value", "c_attn")):
                self.attn.append((int(m.layer_idx), m))
        if not self.attn:  # fallback: model.model.layers[i].self_attn in order
            layers = getattr(getattr(model, "model", model), "layers", [])
            self.attn = [(i, l.self_attn) for i, l in enumerate(layers) if hasattr(l, "self_attn")]
        self.current = None
        self.q = {}
        self.k = {}
        self.patched = []
        self.hooks = []

    def __enter__(self):
        mods = {}
        for _, m in self.attn:
            mod = sys.modules.get(type(m).__module__)
            if mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None)):
                mods[id(mod)] = mod
        for mod in mods.values():
            orig = mod.apply_rotary_pos_emb
            cap = self

            def wrapped(*a, _orig=orig, **kw):
                out = _orig(*a, **kw)
                if cap.current is not None and isinstance(out, (tuple, list)) and len(out) >= 2:
                    cap.q[cap.current] = out[0].detach()
                    cap.k[cap.current] = out[1].detach()
                return out

            mod.apply_rotary_pos_emb = wrapped
            self.patched.append((mod, orig))
        for idx, m in self.attn:
            def pre(_m, _a, _idx=idx):
                self.current = _idx
            def post(_m, _a, _o):
                self.current = None
            self.hooks.append(m.register_forward_pre_hook(pre))
            self.hooks.append(m.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for mod, orig in self.patched:
            mod.apply_rotary_pos_emb = orig
        for h in self.hooks:
            h.remove()
        return False

    @property
    def active(self):
        return bool(self.patched)


def dump_kv(model_path: str, text_path: str, out_path: str, tokens: int = 1024, queries: int = 16,
            layers=None, start: int = 0, model_dtype: str = "float32", device: str = "cuda",
            model_name: str | None = None, command: str | None = None, stats_json: str | None = None,
            text_name: str | None = None, add_bos: bool = False):
    import torch
    from safetensors.torch import save_file

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model_dtype]
    enc = TextEncoder(model_path)
    text = read_text(text_path)
    ids = enc.encode(text, limit=start + tokens)
    if len(ids) < start + tokens:
        log(f"warning: text has only {len(ids)} tokens; dumping {len(ids) - start}")
        tokens = len(ids) - start
    ids = ids[start:start + tokens]
    bos = getattr(enc.hf, "bos_token_id", None) if enc.hf is not None else None
    if add_bos and bos is not None:
        ids = [bos] + ids[:-1]
    T = len(ids)
    assert T >= 2 and queries <= T
    model = load_causal_lm(model_path, dt, device)
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    maxpos = getattr(cfg, "max_position_embeddings", None)
    if maxpos and T > maxpos:
        log(f"warning: {T} tokens > max_position_embeddings {maxpos}")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad(), QueryCapture(model) as cap:
        out = model(input_ids=input_ids, labels=input_ids, use_cache=True)
    loss = float(out.loss)
    cache = out.past_key_values
    assert cache is not None, "model returned no cache"
    nl = cache_num_layers(cache)
    assert nl == n_layers, (nl, n_layers)
    sel = list(range(n_layers)) if layers is None else list(layers)
    if not cap.active:
        log("warning: no module-level apply_rotary_pos_emb found; queries not captured")
    tensors, stats = {}, []
    max_err = 0.0
    for i in sel:
        k, v = cache_layer_kv(cache, i)
        assert k.shape == (1, kv_heads, T, head_dim), (i, tuple(k.shape))
        assert v.shape == (1, kv_heads, T, head_dim), (i, tuple(v.shape))
        k = k[0].float()
        v = v[0].float()
        if i in cap.k:  # cached keys must equal the rotated keys we saw
            kk = cap.k[i][0].float()
            if kk.shape == k.shape:
                max_err = max(max_err, float((kk - k).abs().max()))
        for name, t in (("key", k), ("value", v)):
            am = float(t.abs().max())
            if am > 65504:
                log(f"warning: layer {i} {name} absmax {am} exceeds fp16 range; clamping")
        tensors[f"layers.{i}.key"] = k.clamp(-65504, 65504).half().contiguous().cpu()
        tensors[f"layers.{i}.value"] = v.clamp(-65504, 65504).half().contiguous().cpu()
        if i in cap.q and queries > 0:
            q = cap.q[i]
            assert q.shape == (1, heads, T, head_dim), (i, tuple(q.shape))
            tensors[f"layers.{i}.query"] = q[0, :, T - queries:, :].float().clamp(-65504, 65504) \
                .half().contiguous().cpu()
        ch = k.abs().amax(dim=1).flatten()  # per (kv_head, channel) absmax
        med = float(ch.median())
        stats.append({
            "layer": i,
            "key_absmax": float(k.abs().max()),
            "value_absmax": float(v.abs().max()),
            "key_rms": float(k.pow(2).mean().sqrt()),
            "value_rms": float(v.pow(2).mean().sqrt()),
            "key_channel_absmax_max_over_median": float(ch.max()) / med if med > 0 else float("inf"),
            "key_channel_absmax_median": med,
        })
    if cap.k:
        log(f"check: max |cached key - rotated key| = {max_err:.3g}")
        assert max_err < 1e-2 * max(1.0, max(s["key_absmax"] for s in stats)), \
            "cache keys are not the post-RoPE keys"
    q_tokens = queries if any(n.endswith(".query") for n in tensors) else 0
    meta = {
        "format": "packkv-kv-dump",
        "model": model_name or os.path.abspath(model_path),
        "model_type": str(getattr(cfg, "model_type", "")),
        "n_layers": str(len(sel)),
        "model_layers": str(n_layers),
        "layers": ",".join(str(i) for i in sel),
        "heads": str(heads),
        "kv_heads": str(kv_heads),
        "head_dim": str(head_dim),
        "tokens": str(T),
        "q_tokens": str(q_tokens),
        "q_positions": f"{T - q_tokens}..{T - 1}" if q_tokens else "",
        "rope": "post-rope",
        "rope_theta": str(getattr(cfg, "rope_theta", None)
                          or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", "")),
        "text": text_name or text_path,
        "bos_prepended": str(bool(add_bos and bos is not None)).lower(),
        "text_token_offset": str(start),
        "tokenizer": enc.name or "",
        "dtype": "F16",
        "model_dtype": model_dtype,
        "command": command or "",
        "heldout_loss": f"{loss:.4f}",
        "heldout_perplexity": f"{math.exp(loss):.3f}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except Exception:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(tensors, out_path, metadata=meta)
    size = os.path.getsize(out_path)
    log(f"wrote {out_path}: {size} bytes, {len(tensors)} tensors")
    log(f"model {meta['model']} ({meta['model_type']}): layers {n_layers}, heads {heads}, "
        f"kv_heads {kv_heads}, head_dim {head_dim}; tokens {T}, q_tokens {q_tokens}")
    log(f"loss on dumped text {loss:.4f}  perplexity {math.exp(loss):.3f}")
    for n in sorted(tensors, key=lambda s: (int(s.split('.')[1]), s)):
        t = tensors[n]
        log(f"  {n:20s} {str(list(t.shape)):20s} {str(t.dtype):14s} {t.numel() * 2} B")
    log("layer  key_absmax  value_absmax  key_rms  value_rms  key_ch_absmax_max/median")
    for s in stats:
        log(f"{s['layer']:5d}  {s['key_absmax']:10.3f}  {s['value_absmax']:12.3f}  {s['key_rms']:7.3f}  "
            f"{s['value_rms']:9.3f}  {s['key_channel_absmax_max_over_median']:8.2f}")
    if stats_json:
        with open(stats_json, "w") as f:
            json.dump({"metadata": meta, "bytes": size, "layers": stats}, f, indent=1)
    return meta, stats


# --------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------

def cmd_train(args):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = args.device
    t0 = time.time()
    train_text = read_text(args.train)
    held_text = read_text(args.heldout)
    if args.train_chars:
        train_text = train_text[:args.train_chars]
    log(f"train text {len(train_text)} chars, held-out text {len(held_text)} chars ({time.time() - t0:.1f}s)")
    tok = train_tokenizer(train_text, args.vocab, args.tok_chars)
    V = tok.get_vocab_size()
    log(f"tokenizer: byte-level BPE, vocab {V} ({time.time() - t0:.1f}s)")
    train_ids = encode_all(tok, train_text)
    held_ids = encode_all(tok, held_text)
    log(f"tokens: train {len(train_ids)}, held-out {len(held_ids)}; "
        f"{len(train_text) / len(train_ids):.2f} chars/token ({time.time() - t0:.1f}s)")
    del train_text
    os.makedirs(args.out, exist_ok=True)
    save_hf_tokenizer(tok, args.out)

    cfg = make_llama_config(args, V)
    model = LlamaForCausalLM(cfg).to(dev)
    nparam = sum(p.numel() for p in model.parameters())
    nemb = model.get_input_embeddings().weight.numel()
    log(f"model: {nparam / 1e6:.2f}M params ({(nparam - nemb) / 1e6:.2f}M non-embedding); "
        f"attn={getattr(cfg, '_attn_implementation', '?')}")

    if args.selftest:  # exercise the dump path on the untrained model before spending minutes
        st = os.path.join(args.out, "_selftest")
        model.save_pretrained(st)
        save_hf_tokenizer(tok, st)
        dump_kv(st, args.heldout, os.path.join(st, "selftest.safetensors"), tokens=128, queries=4,
                layers=[0, cfg.num_hidden_layers - 1], device=dev, model_dtype="float32")
        import shutil
        shutil.rmtree(st, ignore_errors=True)
        log("selftest ok")

    T, B = args.seq, args.batch
    tr = torch.tensor(train_ids, dtype=torch.long, device=dev)
    he = torch.tensor(held_ids, dtype=torch.long, device=dev)
    n_eval = min(args.eval_windows, (len(held_ids) - 1) // T)
    eval_starts = [j * T for j in range(n_eval)]
    n_all = (len(held_ids) - 1) // T

    def batch():
        ix = torch.randint(0, len(tr) - T - 1, (B,), device=dev)
        off = torch.arange(T + 1, device=dev)
        x = tr[ix[:, None] + off[None, :]]
        return x[:, :-1], x[:, 1:]

    @torch.no_grad()
    def evaluate(starts):
        model.eval()
        tot, n = 0.0, 0
        for s in range(0, len(starts), B):
            idx = torch.tensor(starts[s:s + B], device=dev)
            off = torch.arange(T + 1, device=dev)
            x = he[idx[:, None] + off[None, :]]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=x[:, :-1], use_cache=False).logits
            l = F.cross_entropy(logits.float().reshape(-1, V), x[:, 1:].reshape(-1), reduction="sum")
            tot += float(l)
            n += x[:, 1:].numel()
        model.train()
        return tot / n

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    budget = args.minutes * 60.0
    model.train()
    step, tokens_seen = 0, 0
    t_start = time.time()
    last_eval = t_start
    ema = None
    history = []
    while True:
        el = time.time() - t_start
        if el >= budget:
            break
        frac = el / budget
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        if step % 25 == 0 or step == 1:
            lv = float(loss.detach())
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            if step % 100 == 0 or step == 1:
                log(f"step {step:5d}  t {el:6.1f}s  lr {lr:.2e}  train_loss {lv:.4f} (ema {ema:.4f})  "
                    f"gnorm {float(gn):.2f}  tok/s {tokens_seen / max(el, 1e-9):,.0f}")
        if time.time() - last_eval >= args.eval_every:
            hl = evaluate(eval_starts)
            last_eval = time.time()
            history.append((step, round(time.time() - t_start, 1), ema, hl))
            log(f"== eval step {step}  held-out loss {hl:.4f}  ppl {math.exp(hl):.2f}")
    train_s = time.time() - t_start
    final = evaluate(list(range(0, n_all * T, T)))
    log(f"done: {step} steps, {tokens_seen:,} tokens ({tokens_seen / len(train_ids):.2f} epochs) "
        f"in {train_s:.1f}s; final train loss ema {ema:.4f}; held-out loss (all {n_all} windows of {T}) "
        f"{final:.4f}  ppl {math.exp(final):.2f}")
    model = model.to(torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32)
    model.save_pretrained(args.out)
    info = {
        "params": nparam, "non_embedding_params": nparam - nemb, "steps": step, "tokens_seen": tokens_seen,
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids), "train_seconds": round(train_s, 1),
        "final_train_loss_ema": ema, "heldout_loss": final, "heldout_ppl": math.exp(final),
        "seq": T, "batch": B, "lr": args.lr, "history": history, "vocab": V,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
    with open(os.path.join(args.out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"saved model + tokenizer to {args.out} (total {time.time() - t0:.1f}s)")


def command_line(out_path):
    """argv as a shell command, with the output path shortened to its file name."""
    a = ["make_dump.py"] + [os.path.basename(x) if x == out_path else x for x in sys.argv[1:]]
    return " ".join(shlex.quote(x) for x in a)


def cmd_dump(args):
    layers = None
    if args.layers:
        layers = [int(s) for s in args.layers.split(",") if s.strip() != ""]
    tokens = args.tokens
    if args.max_tokens is not None:
        tokens = min(tokens, args.max_tokens)
    dump_kv(args.model, args.text, args.out, tokens=tokens, queries=args.queries, layers=layers,
            start=args.start, model_dtype=args.model_dtype, device=args.device,
            model_name=args.model_name, command=command_line(args.out),
            stats_json=args.stats_json, text_name=args.text_name, add_bos=args.add_bos)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train tokenizer + small Llama model (time-boxed)")
    t.add_argument("--train", required=True, help="training text (.txt or .txt.xz)")
    t.add_argument("--heldout", required=True, help="held-out text (.txt or .txt.xz)")
    t.add_argument("--out", required=True, help="output model directory")
    t.add_argument("--minutes", type=float, default=1.5,
                   help="wall-clock training budget (the docs corpus is ~10M tokens; an H100 sees one "
                        "epoch every ~14 s, and held-out loss rises after ~5-6 epochs)")
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--hidden", type=int, default=512)
    t.add_argument("--intermediate", type=int, default=1408)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=128)
    t.add_argument("--max-positions", type=int, default=2048)
    t.add_argument("--rope-theta", type=float, default=10000.0)
    t.add_argument("--tie", action="store_true", help="tie input/output embeddings")
    t.add_argument("--seq", type=int, default=1024)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr-frac", type=float, default=0.1)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=150)
    t.add_argument("--eval-every", type=float, default=30.0, help="seconds between held-out evals")
    t.add_argument("--eval-windows", type=int, default=64)
    t.add_argument("--tok-chars", type=int, default=12_000_000,
                   help="train the tokenizer on an evenly strided subset of about N chars (0 = all)")
    t.add_argument("--train-chars", type=int, default=0, help="use only the first N chars (0 = all)")
    t.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    t.add_argument("--selftest", action="store_true", help="run the dump path on the untrained model first")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--device", default="cuda")

    d = sub.add_parser("dump", help="dump the KV cache of a HF causal LM over a text")
    d.add_argument("--model", required=True, help="HF causal LM directory (or hub id if cached)")
    d.add_argument("--text", required=True, help="text file (.txt or .xz)")
    d.add_argument("--out", required=True, help="output .safetensors")
    d.add_argument("--tokens", type=int, default=1024)
    d.add_argument("--max-tokens", type=int, default=None, help="upper bound on --tokens")
    d.add_argument("--queries", type=int, default=16, help="post-RoPE queries of the last N positions")
    d.add_argument("--layers", default="", help="comma-separated layer subset, e.g. 0,2,4")
    d.add_argument("--start", type=int, default=0, help="token offset into the text")
    d.add_argument("--model-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the model runs in (float32 avoids bf16-rounded K/V in the fp16 dump)")
    d.add_argument("--model-name", default=None, help="name recorded in metadata")
    d.add_argument("--text-name", default=None, help="text source recorded in metadata")
    d.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token")
    d.add_argument("--stats-json", default=None, help="also write per-layer statistics as JSON")
    d.add_argument("--device", default="cuda")

    args = ap.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_dump(args)


if __name__ == "__main__":
    main()
