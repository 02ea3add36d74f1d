// PackKV through the native addon: the stream read back by hand (kernels/packkv/format.h), error
// bound, byte counts, repacking, pack widths, fused products. Longer than 400 lines because the
// independent stream reader lives here, next to the checks that use it.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { f16ToF32, f32ToF16 } from '../cli/io/dtype.js';
import { loadLayer, openDump } from '../cli/io/dump.js';
import { native, type EncodedTensor, type KvShape, type TensorKind } from '../cli/native.js';
import { filled, lcg, relDiff, streamBody } from './helpers.js';
import { realistic, expectProducts } from './codec-helpers.js';

const nat = native();

const half = (bits: number) => f16ToF32(new Uint16Array([bits]))[0];
/** Round to fp16 so a tensor is exactly what an fp16 dump holds. */
const asF16 = (x: Float32Array) => f16ToF32(f32ToF16(x));
const bitLength = (v: number) => (v === 0 ? 0 : 32 - Math.clz32(v));
const roundHalfEven = (x: number) => (Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : Math.round(x));

/** LSB-first bit reader over bytes, as the codec's BitReader. */
class Bits {
  private acc = 0;
  private n = 0;
  constructor(private bytes: Uint8Array, public at: number) {}
  get(bits: number): number {
    while (this.n < bits) (this.acc += this.bytes[this.at++] * 2 ** this.n), (this.n += 8);
    const v = this.acc % 2 ** bits;
    this.acc = Math.floor(this.acc / 2 ** bits);
    this.n -= bits;
    return v;
  }
}

interface Segment { minBits: number; widths: number[]; mins: number[]; packs: number[][] }

/** A packkv stream parsed independently of the C++ reader. */
interface Parsed {
  block: number; pack: number; hp: boolean; rel: number;
  blocks: number; compressed: number; buffered: number;
  scales: number[]; zeros: number[];  // per stored slot
  origin: number[];                   // stored slot -> original token
  perms: number[][];                  // per block, when stored
  segments: Segment[];                // [block][head]
  codes: Int32Array;                  // [slot][head][dim]: pack value + pack min
  payloadBytes: number; metadataBytes: number; bufferAt: number; bodyBytes: number;
}

function parse(e: EncodedTensor): Parsed {
  const body = streamBody(e.stream);
  const bytes = new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  const p = Object.fromEntries(e.params.split(',').map((kv) => kv.split('=')));
  const [B, P, R] = [+p.block, +p.pack, +p.buffer];
  const hp = p.zp === 'hp';
  const { kvHeads: H, tokens: T, headDim: D } = e.shape;
  const moved = T + B - (T % B) - R;
  const blocks = moved > 0 ? Math.floor(moved / B) : 0;
  const Tc = blocks * B;
  const nPacks = (B / P) * D;
  let at = 0;
  const scales: number[] = [], zeros: number[] = [], offsets: number[] = [];
  for (let s = 0; s < Tc; s++, at += 2) scales.push(half(body.getUint16(at, true)));
  for (let s = 0; s < Tc; s++, at += hp ? 2 : 4) zeros.push(hp ? half(body.getUint16(at, true)) : body.getInt32(at, true));
  for (let i = 0; i < blocks * H; i++, at += 4) offsets.push(body.getUint32(at, true));
  let metadataBytes = 4 * blocks * H, payloadBytes = 0;
  const segStart = at;
  const segments: Segment[] = [];
  const codes = new Int32Array(Tc * H * D);
  for (let i = 0; i < blocks * H; i++) {
    expect(offsets[i]).toBe(at - segStart);
    const minBits = bytes[at];
    const wr = new Bits(bytes, at + 1);
    const widths = Array.from({ length: nPacks }, () => wr.get(4));
    const mr = new Bits(bytes, at + 1 + Math.ceil(nPacks / 2));
    const mins = Array.from({ length: nPacks }, () => mr.get(minBits));
    at += 1 + Math.ceil(nPacks / 2) + Math.ceil((nPacks * minBits) / 8);
    metadataBytes += 1 + Math.ceil(nPacks / 2) + Math.ceil((nPacks * minBits) / 8);
    const packs = widths.map((w) => {
      const r = new Bits(bytes, at);
      at += (P * w) / 8;
      payloadBytes += (P * w) / 8;
      return Array.from({ length: P }, () => r.get(w));
    });
    const [b, h] = [Math.floor(i / H), i % H];
    packs.forEach((vals, j) => {
      const [g, d] = [Math.floor(j / D), j % D];
      vals.forEach((v, k) => (codes[((b * B + g * P + k) * H + h) * D + d] = v + mins[j]));
    });
    segments.push({ minBits, widths, mins, packs });
  }
  const pb = p.repack === 'none' ? 0 : bitLength(B - 1);
  const perms: number[][] = [];
  const origin = Array.from({ length: Tc }, (_, s) => s);
  for (let b = 0; b < blocks && pb > 0; b++) {
    const r = new Bits(bytes, at + b * Math.ceil((B * pb) / 8));
    perms.push(Array.from({ length: B }, () => r.get(pb)));
    perms[b].forEach((t, j) => (origin[b * B + j] = b * B + t));
  }
  at += blocks * Math.ceil((B * pb) / 8);
  metadataBytes += blocks * Math.ceil((B * pb) / 8);
  expect(bytes.length - at).toBe(2 * H * (T - Tc) * D); // what is left is exactly the fp16 buffer
  const rel = +(e.kind === 'K' ? p.k_rel : p.v_rel);
  return { block: B, pack: P, hp, rel, blocks, compressed: Tc, buffered: T - Tc, scales, zeros, origin, perms, segments,
    codes, payloadBytes, metadataBytes, bufferAt: at, bodyBytes: bytes.length };
}

/**
 * Checks, per element, code = the spec's rounding with the stream's scale and zero, x̂ = the spec's
 * formula, |x − x̂| ≤ scale/2 (+ f32 rounding of x̂), and fp16 buffer tokens exact; returns the worst
 * err / (scale/2). Mismatches are collected (a per-element expect is too slow for a real layer).
 */
async function expectBound(spec: string, kind: TensorKind, x: Float32Array, s: KvShape): Promise<number> {
  const e = await nat.encode(spec, kind, x, s);
  const y = await nat.decode(e.stream);
  const ps = parse(e);
  const { kvHeads: H, tokens: T, headDim: D } = s;
  const bad: string[] = [];
  const report = (what: string) => bad.length < 5 && bad.push(what);
  let worst = 0;
  for (let slot = 0; slot < ps.compressed; slot++) {
    const t = ps.origin[slot], sc = ps.scales[slot], z = ps.zeros[slot];
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < H * D; i++) {
      const v = x[(Math.floor(i / D) * T + t) * D + (i % D)];
      (lo = Math.min(lo, v)), (hi = Math.max(hi, v));
    }
    const step = (hi - (ps.hp ? z : lo)) * ps.rel; // the spec's scale, before rounding up to fp16
    if (hi > lo && !(sc >= step && sc <= step * (1 + 2 ** -10) + 2 ** -24)) report(`token ${t}: scale ${sc} for step ${step}`);
    for (let h = 0; h < H; h++)
      for (let d = 0; d < D; d++) {
        const i = (h * T + t) * D + d;
        const code = ps.codes[(slot * H + h) * D + d];
        const want = ps.hp ? roundHalfEven((x[i] - z) / sc) : roundHalfEven(x[i] / sc) - z;
        if (code !== want) report(`[${h},${t},${d}]: code ${code}, want ${want}`);
        if (y[i] !== Math.fround(ps.hp ? code * sc + z : (code + z) * sc)) report(`[${h},${t},${d}]: x̂ ${y[i]} off formula`);
        const err = Math.abs(x[i] - y[i]);
        if (err > sc / 2 + 1.2e-7 * (Math.abs(x[i]) + sc)) report(`[${h},${t},${d}]: error ${err} > scale/2 = ${sc / 2}`);
        worst = Math.max(worst, err / (sc / 2));
      }
  }
  for (let i = 0; i < x.length; i++)
    if (i % (T * D) >= ps.compressed * D && y[i] !== x[i]) report(`buffer element ${i}: ${y[i]} != ${x[i]}`);
  expect(bad).toEqual([]);
  return worst;
}

describe('byte accounting, counted by hand', () => {
  // 64 tokens × 1 head × 4 channels: ch0 = 0, ch1 = 8 (so every token spans [0, 8] and scale =
  // 8·0.125 = 1, zp = 0, codes = values), ch2 = t mod 4, ch3 = 5 for t < 32 else 1 + t mod 8.
  const s = { kvHeads: 1, tokens: 64, headDim: 4 };
  const x = filled(256, (i) => [0, 8, (i >> 2) % 4, i >> 2 < 32 ? 5 : 1 + ((i >> 2) % 8)][i % 4]);
  const base = 'packkv:k_rel=0.125,v_rel=0.125,block=64,buffer=64,pack=16';

  it('zp=int, repack=none: widths 0/0/2/0|0/0/2/0|0/0/2/3|0/0/2/3, 433 B, ratio 512/433', async () => {
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const e = await nat.encode(`${base},repack=none,zp=int`, kind, x, s);
      const ps = parse(e);
      expect(ps.segments[0].widths).toEqual([0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 3, 0, 0, 2, 3]);
      expect(ps.segments[0].mins).toEqual([0, 8, 0, 5, 0, 8, 0, 5, 0, 8, 0, 1, 0, 8, 0, 1]);
      expect(ps.segments[0].minBits).toBe(4);
      // payload: 4 packs at 2 bits + 2 at 3 bits, 16 codes each = 4·4 + 2·6 = 28 B; scales 64 × f16;
      // zeros 64 × i32; metadata: offset 4 + segment header 1 + 16 widths × 4 bits + 16 mins × 4 bits
      expect(e.breakdown).toEqual({ payload: 28, scales: 128, zeros: 256, residual: 0, metadata: 4 + 1 + 8 + 8, host: 0 });
      expect(e.deviceBytes).toBe(433);
      expect(ps.bodyBytes).toBe(433);
      expect((64 * 4 * 2) / e.deviceBytes).toBeCloseTo(1.18245, 5); // fp16 bytes / stored bytes
      expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(x)); // step 1 on integers: exact
    }
  });

  it('zp=hp stores fp16 lo (2 B per token); repack adds 6 bits per token of permutation', async () => {
    const hp = await nat.encode(`${base},repack=none,zp=hp`, 'K', x, s);
    expect(hp.breakdown).toEqual({ payload: 28, scales: 128, zeros: 128, residual: 0, metadata: 21, host: 0 });
    const med = await nat.encode(`${base},repack=median,zp=int`, 'K', x, s);
    const ps = parse(med);
    expect(med.breakdown.metadata).toBe(21 + 48); // 64 tokens × 6 bits
    expect(med.breakdown.payload).toBe(ps.segments[0].widths.reduce((a, w) => a + 2 * w, 0));
    expect(med.breakdown.payload).toBeLessThanOrEqual(28);
  });

  it('the recent buffer keeps buffer − block … buffer − 1 tokens; shorter dumps stay fp16', async () => {
    const cases: [number, number][] = [[1000, 168], [1024, 128], [200, 136], [192, 128], [191, 191], [1, 1]];
    for (const [tokens, kept] of cases) {
      const sh = { kvHeads: 2, tokens, headDim: 64 };
      const e = await nat.encode('packkv', 'V', realistic(sh, tokens), sh);
      expect(e.breakdown.residual).toBe(2 * 2 * kept * 64);
      expect(parse(e).buffered).toBe(kept);
    }
  });

  it('payload + scales + zeros + residual + metadata + host = body bytes, for every setting and head_dim', async () => {
    for (const headDim of [64, 96, 128, 256])
      for (const opt of ['repack=none,zp=int', 'repack=median,zp=hp', 'repack=greedy,pack=8,block=32,buffer=48', 'pack=32,block=128,buffer=128']) {
        const sh = { kvHeads: 2, tokens: 333, headDim };
        for (const kind of ['K', 'V'] as TensorKind[]) {
          const e = await nat.encode(`packkv:${opt}`, kind, realistic(sh, headDim), sh);
          const b = e.breakdown;
          const ps = parse(e);
          expect(b.payload + b.scales + b.zeros + b.residual + b.metadata + b.host).toBe(ps.bodyBytes);
          expect([b.payload, b.metadata, b.host]).toEqual([ps.payloadBytes, ps.metadataBytes, 0]);
          expect(b.scales).toBe(2 * ps.compressed);
          expect(b.zeros).toBe((ps.hp ? 2 : 4) * ps.compressed);
        }
      }
  });
});

describe('error bound: |x − x̂| ≤ scale/2 with the scale read from the stream', () => {
  const s = { kvHeads: 2, tokens: 300, headDim: 128 };
  for (const kind of ['K', 'V'] as TensorKind[])
    for (const opt of ['zp=int,repack=none', 'zp=hp,repack=median', 'zp=int,repack=greedy,buffer=64'])
      it(`${kind}, ${opt}, 300 tokens (not a multiple of the block)`, async () => {
        const worst = await expectBound(`packkv:${opt}`, kind, realistic(s, kind === 'K' ? 1 : 2), s);
        expect(worst).toBeGreaterThan(0.9); // the bound is tight
      });

  it('head_dim 64, 96, 128, 256 with small steps', async () => {
    for (const headDim of [64, 96, 128, 256]) {
      const sh = { kvHeads: 2, tokens: 129, headDim };
      await expectBound('packkv:k_rel=0.01,v_rel=0.005,buffer=64,repack=greedy', 'K', realistic(sh, headDim), sh);
      await expectBound('packkv:k_rel=0.01,v_rel=0.005,buffer=64,zp=hp', 'V', realistic(sh, headDim + 1), sh);
    }
  });

  it('adversarial: constant channel, one huge outlier, constant tokens, all zeros, a single token', async () => {
    const s1 = { kvHeads: 2, tokens: 257, headDim: 64 };
    const x = asF16(filled(2 * 257 * 64, (i) => (i % 64 === 0 ? 1.5 : i % 64 === 1 ? 0 : Math.sin(i))));
    x[(257 + 40) * 64 + 7] = 60000; // head 1, token 40
    for (let d = 0; d < 64; d++) (x[77 * 64 + d] = 0.375), (x[(257 + 77) * 64 + d] = 0.375); // token 77 constant
    for (const spec of ['packkv:buffer=64,zp=int', 'packkv:buffer=64,zp=hp,repack=greedy']) {
      for (const kind of ['K', 'V'] as TensorKind[]) await expectBound(spec, kind, x, s1);
      const y = await nat.decode((await nat.encode(spec, 'K', x, s1)).stream);
      for (let d = 0; d < 64; d++) expect(y[77 * 64 + d]).toBe(0.375); // constant token: exact (fp16 data)
    }
    const zeros = new Float32Array(2 * 200 * 64);
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const e = await nat.encode('packkv:buffer=64', kind, zeros, { kvHeads: 2, tokens: 200, headDim: 64 });
      expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(zeros));
      expect(e.breakdown.payload).toBe(0);
    }
    const single = asF16(filled(2 * 64, (i) => i / 7));
    const one = await nat.encode('packkv', 'K', single, { kvHeads: 2, tokens: 1, headDim: 64 });
    expect(one.breakdown).toEqual({ payload: 0, scales: 0, zeros: 0, residual: 256, metadata: 0, host: 0 });
    expect(Array.from(await nat.decode(one.stream))).toEqual(Array.from(single));
  });
});

describe('bit-packing: each pack at its own minimal width', () => {
  it('every width is the fewest bits that hold code − min, and min is the pack minimum', async () => {
    const s = { kvHeads: 2, tokens: 300, headDim: 96 };
    for (const spec of ['packkv:repack=none', 'packkv:repack=greedy,pack=8', 'packkv:repack=median,pack=32,zp=hp']) {
      const ps = parse(await nat.encode(spec, 'V', realistic(s, 4), s));
      let nonZero = 0;
      for (const seg of ps.segments) {
        expect(seg.minBits).toBe(bitLength(Math.max(...seg.mins)));
        seg.packs.forEach((vals, i) => {
          expect(Math.min(...vals)).toBe(0);
          expect(bitLength(Math.max(...vals))).toBe(seg.widths[i]);
          nonZero += seg.widths[i] > 0 ? 1 : 0;
        });
      }
      expect(nonZero).toBeGreaterThan(0);
    }
  });

  it('width 0: constant packs store no payload and decode exactly', async () => {
    const s = { kvHeads: 2, tokens: 256, headDim: 64 };
    // each token spans [−2, 2] (channels 0 and 1), every other channel is constant along tokens
    const x = filled(2 * 256 * 64, (i) => (i % 64 === 0 ? -2 : i % 64 === 1 ? 2 : (((i % 64) % 9) - 4) / 2));
    const e = await nat.encode('packkv:k_rel=0.125,buffer=64', 'K', x, s);
    const ps = parse(e);
    expect(ps.segments.every((seg) => seg.widths.every((w) => w === 0))).toBe(true);
    expect(e.breakdown.payload).toBe(0);
    expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(x));
  });
});

describe('repacking', () => {
  const s = { kvHeads: 2, tokens: 300, headDim: 64 };
  for (const repack of ['median', 'greedy']) {
    it(`${repack}: a permutation per block, undone exactly by decode and the products`, async () => {
      for (const kind of ['K', 'V'] as TensorKind[])
        for (const zp of ['int', 'hp']) {
          const x = realistic(s, 20, -1); // no outlier channel: token medians differ
          const spec = `packkv:buffer=64,zp=${zp}`;
          const re = await nat.encode(`${spec},repack=${repack}`, kind, x, s);
          const none = await nat.encode(`${spec},repack=none`, kind, x, s);
          const ps = parse(re);
          expect(ps.perms.length).toBe(4);
          for (const perm of ps.perms) expect([...perm].sort((a, b) => a - b)).toEqual([...Array(64).keys()]);
          expect(ps.perms.some((perm) => perm.some((t, j) => t !== j))).toBe(true);
          expect(Array.from(await nat.decode(re.stream))).toEqual(Array.from(await nat.decode(none.stream)));
          const r = lcg(3);
          if (kind === 'K') {
            const q = filled(4 * 64, () => r());
            expect(relDiff(await nat.qk(re.stream, q, 4, 1), await nat.qk(none.stream, q, 4, 1))).toBeLessThan(1e-6);
          } else {
            const p = filled(4 * 300, () => Math.abs(r()));
            expect(relDiff(await nat.pv(re.stream, p, 4, 1), await nat.pv(none.stream, p, 4, 1))).toBeLessThan(1e-6);
          }
          if (repack === 'median')
            for (let slot = 1; slot < ps.compressed; slot++) {
              if (slot % 64 === 0) continue;
              const median = (sl: number) => Array.from(ps.codes.subarray(sl * 128, sl * 128 + 128)).sort((a, b) => a - b)[63];
              expect(median(slot)).toBeLessThanOrEqual(median(slot - 1)); // descending median code
            }
        }
    });
  }

  it('repacking narrows the packs on realistic data (greedy most)', async () => {
    const sh = { kvHeads: 2, tokens: 1024, headDim: 128 };
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const x = realistic(sh, 30);
      const [none, median, greedy] = await Promise.all(
        ['none', 'median', 'greedy'].map((m) => nat.encode(`packkv:repack=${m}`, kind, x, sh)));
      expect(median.breakdown.payload).toBeLessThan(none.breakdown.payload);
      expect(greedy.breakdown.payload).toBeLessThan(median.breakdown.payload);
    }
  });
});

describe('fused products equal decode-then-multiply', () => {
  const cases: [string, KvShape][] = [
    ['packkv', { kvHeads: 2, tokens: 300, headDim: 128 }],
    ['packkv:repack=greedy,zp=hp,buffer=64', { kvHeads: 2, tokens: 257, headDim: 96 }],
    ['packkv:repack=none,pack=8,block=32,buffer=32', { kvHeads: 1, tokens: 100, headDim: 64 }],
    ['packkv:k_rel=0.01,v_rel=0.01,pack=32,block=128,buffer=128', { kvHeads: 2, tokens: 330, headDim: 256 }],
    ['packkv', { kvHeads: 2, tokens: 50, headDim: 64 }], // buffer only
  ];
  for (const [spec, s] of cases)
    it(`${spec} at [${s.kvHeads}, ${s.tokens}, ${s.headDim}] with GQA (4 query heads per KV head, 3 queries)`, async () => {
      await expectProducts(spec, s, realistic(s, 5), realistic(s, 6), s.kvHeads * 4, 3);
    });

  it('query heads read their own KV head: a head-1-only key changes only heads 2 and 3', async () => {
    const s = { kvHeads: 2, tokens: 128, headDim: 32 };
    const k = filled(2 * 128 * 32, (i) => (i >= 128 * 32 ? (i % 2) + 1 : 0));
    const e = await nat.encode('packkv:k_rel=0.125,buffer=64', 'K', k, s);
    const scores = await nat.qk(e.stream, new Float32Array(4 * 32).fill(1), 4, 1);
    expect(Array.from(scores.subarray(0, 256))).toEqual(new Array(256).fill(0));
    expect(Array.from(scores.subarray(256))).toEqual(new Array(256).fill(48));
  });
});

const dumpDir = join(import.meta.dirname, '..', 'datasets', 'default');
const dumpFile = existsSync(dumpDir) ? join(dumpDir, 'packkv-llama-6l-kv.safetensors') : '';
describe.skipIf(!existsSync(dumpFile))('the embedded real dump (layer 1 of a 6-layer Llama, fp16)', () => {
  it('bound, products and ratio with the default setting', async () => {
    const dump = await openDump([dumpFile]);
    const { k, v } = await loadLayer(dump, dump.layers[1]);
    const s = { kvHeads: dump.kvHeads, tokens: dump.tokens, headDim: dump.headDim };
    await expectBound('packkv', 'K', k, s);
    await expectBound('packkv', 'V', v, s);
    await expectProducts('packkv', s, k, v, dump.heads, 2);
    const ke = await nat.encode('packkv', 'K', k, s);
    expect(k.length * 2 / ke.deviceBytes).toBeGreaterThan(3);
  });
});

describe('streams are deterministic and validated', () => {
  const s = { kvHeads: 2, tokens: 300, headDim: 64 };
  it('encoding twice gives identical bytes', async () => {
    const x = realistic(s, 8);
    for (const spec of ['packkv', 'packkv:repack=greedy,zp=hp']) {
      const [a, b] = [await nat.encode(spec, 'K', x, s), await nat.encode(spec, 'K', x, s)];
      expect(Buffer.from(a.stream).equals(Buffer.from(b.stream))).toBe(true);
    }
    const e = await nat.encode('packkv', 'V', x, s);
    expect(nat.streamInfo(e.stream)).toEqual({ codec: 'packkv', kind: 'V', shape: s, breakdown: e.breakdown,
      params: 'k_rel=0.1,v_rel=0.2,block=64,buffer=192,pack=16,repack=median,zp=int' });
  });

  it('rejects bad parameters, naming the codec and the parameter', async () => {
    const x = realistic(s, 9);
    const enc = (spec: string) => nat.encode(spec, 'K', x, s);
    await expect(enc('packkv:k_rel=0.004')).rejects.toThrow("codec 'packkv': parameter k_rel=0.004 is invalid: expected a number in (0.004, 1)");
    await expect(enc('packkv:v_rel=1')).rejects.toThrow("codec 'packkv': parameter v_rel=1 is invalid");
    await expect(enc('packkv:block=72')).rejects.toThrow("codec 'packkv': parameter block=72 must be a multiple of pack=16");
    await expect(enc('packkv:buffer=32')).rejects.toThrow("codec 'packkv': parameter buffer=32 must be at least block=64");
    expect(() => nat.parseCodec('packkv:k_rel=2')).toThrow("codec 'packkv': parameter k_rel=2 is invalid");
    expect(() => nat.parseCodec('packkv:pack=12')).toThrow('expected one of 8, 16, 32');
    expect(() => nat.parseCodec('packkv:repack=sort')).toThrow('expected one of none, greedy, median');
    expect(() => nat.parseCodec('packkv:order=exact')).toThrow('valid parameters: k_rel, v_rel, block, buffer, pack, repack, zp');
  });

  it('rejects data whose scale or fp16 zero point cannot be stored, naming the token', async () => {
    const sh = { kvHeads: 1, tokens: 64, headDim: 8 };
    const wide = filled(64 * 8, (i) => (i === 8 * 3 ? -60000 : i === 8 * 3 + 1 ? 60000 : 0));
    await expect(nat.encode('packkv:k_rel=0.9,buffer=64', 'K', wide, sh)).rejects.toThrow(
      "codec 'packkv': K token 3: scale (max − min)·k_rel = 108000 exceeds the fp16 maximum 65504");
    const low = filled(64 * 8, (i) => (i === 8 * 5 ? -70000 : 0));
    await expect(nat.encode('packkv:zp=hp,buffer=64', 'V', low, sh)).rejects.toThrow(
      "codec 'packkv': V token 5: its min -70000 is outside fp16 (zp=hp); use zp=int");
  });

  it('rejects corrupt streams: a bad width, a repeated permutation index', async () => {
    const e = await nat.encode('packkv:buffer=64', 'V', realistic(s, 10), s);
    const ps = parse(e);
    const bodyAt = e.stream.length - ps.bodyBytes;
    const badWidth = e.stream.slice();
    badWidth[bodyAt + 6 * ps.compressed + 4 * 4 * 2 + 1] ^= 0x01; // first width nibble of segment 0
    await expect(nat.decode(badWidth)).rejects.toThrow(/stream is corrupt/);
    const badPerm = e.stream.slice();
    const permAt = bodyAt + ps.bufferAt - 4 * 48;
    badPerm[permAt] = (badPerm[permAt] & 0xc0) | ps.perms[0][1]; // slot 0 repeats slot 1's token
    await expect(nat.decode(badPerm)).rejects.toThrow(/permutation repeats/);
  });
});
