// TailorKV through the native addon: both layer modes, byte counts by hand, bounds, sparse top-k, layer rule.
import { describe, expect, it } from 'vitest';

import { resolveLayerSpecs, densePreferenceScore, decideLayerModes, type LayerAttention } from '../cli/layer-policy.js';
import { native, type EncodedTensor, type KvShape, type TensorKind } from '../cli/native.js';
import { filled, lcg, relDiff, streamBody } from './helpers.js';
import { half, asF16, realistic, qkRef, pvRef, expectProducts } from './codec-helpers.js';

const nat = native();
const MASKED = Math.fround(-1e30); // kMaskedScore in kernels/tailorkv/format.h

function softmax(scores: Float32Array, tokens: number, scale: number): Float32Array {
  const p = new Float32Array(scores.length);
  for (let off = 0; off < scores.length; off += tokens) {
    let max = -Infinity;
    for (let t = 0; t < tokens; t++) max = Math.max(max, scale * scores[off + t]);
    let sum = 0;
    for (let t = 0; t < tokens; t++) sum += Math.exp(scale * scores[off + t] - max);
    for (let t = 0; t < tokens; t++) p[off + t] = Math.exp(scale * scores[off + t] - max) / sum;
  }
  return p;
}

function total(e: EncodedTensor): number {
  const b = e.breakdown;
  return b.payload + b.scales + b.zeros + b.residual + b.metadata + b.host;
}

describe('byte accounting, counted by hand', () => {
  const s = { kvHeads: 1, tokens: 128, headDim: 64 };
  const x = realistic(s, 1);

  it('q, 1-bit K, T=128, G=64, R=64: 1024 B codes + 256 B scales + 256 B mins: 1.5 bits, 10.67×', async () => {
    const e = await nat.encode('tailorkv:mode=q,bits=1,group=64,residual=64', 'K', x, s);
    // codes 128 tokens × 64 channels / 8; scales, mins: 2 token groups × 64 channels × 2 B
    expect(e.breakdown).toEqual({ payload: 1024, scales: 256, zeros: 256, residual: 0, metadata: 0, host: 0 });
    expect((128 * 64 * 2) / e.deviceBytes).toBeCloseTo(16 / 1.5, 12);
  });

  it('q, 1-bit V, T=128, R=64: 64 tokens quantized (one channel group each), the last 64 fp16', async () => {
    const e = await nat.encode('tailorkv:mode=q,bits=1,group=64,residual=64', 'V', x, s);
    expect(e.breakdown).toEqual({ payload: 512, scales: 128, zeros: 128, residual: 8192, metadata: 0, host: 0 });
  });

  it('q, 2-bit V at head_dim 96 with G=64: two channel groups per token (64 + 32 wide)', async () => {
    const s96 = { kvHeads: 1, tokens: 64, headDim: 96 };
    const e = await nat.encode('tailorkv:mode=q,bits=2,group=64,residual=0', 'V', realistic(s96, 2), s96);
    expect(e.breakdown).toEqual({ payload: 1536, scales: 256, zeros: 256, residual: 0, metadata: 0, host: 0 });
  });

  it('q, K with T=100, R=64 keeps T mod R = 36 tokens fp16', async () => {
    const s100 = { kvHeads: 1, tokens: 100, headDim: 32 };
    const e = await nat.encode('tailorkv:mode=q,bits=2,group=64,residual=64', 'K', realistic(s100, 3), s100);
    expect(e.breakdown).toEqual({ payload: 512, scales: 64, zeros: 64, residual: 36 * 32 * 2, metadata: 0, host: 0 });
  });

  it('s, K and V, T=100, sinks 4, window 12: 16 device tokens, 84 host tokens, max|K| per channel', async () => {
    const s2 = { kvHeads: 2, tokens: 100, headDim: 32 };
    const spec = 'tailorkv:mode=s,sinks=4,window=12,budget=8,channels=4';
    const k = await nat.encode(spec, 'K', realistic(s2, 4), s2);
    const v = await nat.encode(spec, 'V', realistic(s2, 5), s2);
    expect(k.breakdown).toEqual({ payload: 0, scales: 0, zeros: 0, residual: 2048, metadata: 128, host: 10752 });
    expect(v.breakdown).toEqual({ payload: 0, scales: 0, zeros: 0, residual: 2048, metadata: 0, host: 10752 });
    const fp16 = 2 * 100 * 32 * 2;
    expect(fp16 / k.deviceBytes).toBeCloseTo(12800 / 2176, 12); // device-only ratio 5.88×
    expect(fp16 / k.totalBytes).toBeCloseTo(12800 / 12928, 12); // total: host holds each offloaded token once
    expect(fp16 / v.totalBytes).toBe(1);
  });

  it('payload + scales + zeros + residual + metadata + host = stream body bytes', async () => {
    const cases: [string, KvShape][] = [
      ['tailorkv:mode=q,bits=1', { kvHeads: 2, tokens: 300, headDim: 128 }],
      ['tailorkv:mode=q,bits=2,group=32,residual=32', { kvHeads: 1, tokens: 77, headDim: 96 }],
      ['tailorkv:mode=q,bits=4,group=64,residual=0', { kvHeads: 2, tokens: 1, headDim: 256 }],
      ['tailorkv:mode=s', { kvHeads: 2, tokens: 300, headDim: 64 }],
      ['tailorkv:mode=s,sinks=64,window=64', { kvHeads: 1, tokens: 100, headDim: 128 }],
      ['tailorkv:mode=s,sinks=0,window=0,budget=5', { kvHeads: 1, tokens: 33, headDim: 64 }],
    ];
    for (const [spec, sh] of cases)
      for (const kind of ['K', 'V'] as TensorKind[]) {
        const e = await nat.encode(spec, kind, realistic(sh, 6), sh);
        expect(total(e)).toBe(streamBody(e.stream).byteLength);
        expect(e.totalBytes).toBe(total(e));
      }
  });
});

/** |x − x̂| ≤ scale/2 (+ float rounding) for every quantized element, the scale read from the stream. */
async function expectQuantBound(spec: string, kind: TensorKind, bits: number, group: number, residual: number, x: Float32Array, s: KvShape) {
  const e = await nat.encode(spec, kind, x, s);
  const y = await nat.decode(e.stream);
  const body = streamBody(e.stream);
  const r = kind === 'K' ? (residual > 0 ? s.tokens % residual : s.tokens % group) : residual === 0 ? 0 : Math.min(s.tokens, residual);
  const tq = s.tokens - r;
  const vGroups = Math.ceil(s.headDim / group);
  let worst = 0;
  for (let h = 0; h < s.kvHeads; h++)
    for (let t = 0; t < s.tokens; t++)
      for (let d = 0; d < s.headDim; d++) {
        const i = (h * s.tokens + t) * s.headDim + d;
        const err = Math.abs(x[i] - y[i]);
        if (t >= tq) {
          expect(err).toBe(0); // residual tokens are fp16 and the input is fp16
          continue;
        }
        const si = kind === 'K'
          ? (h * (tq / group) + Math.floor(t / group)) * s.headDim + d
          : (h * vGroups + Math.floor(d / group)) * tq + t;
        const scale = half(body.getUint16(e.breakdown.payload + si * 2, true));
        const bound = scale / 2 + 4e-7 * (Math.abs(x[i]) + scale * (2 ** bits - 1));
        expect(err).toBeLessThanOrEqual(bound);
        worst = Math.max(worst, err / Math.max(bound, 1e-30));
      }
  return worst;
}

describe('mode=q error bound: |x − x̂| ≤ scale/2, scale = (max − min)/(2^b − 1) rounded up', () => {
  const s = { kvHeads: 2, tokens: 200, headDim: 64 };
  for (const bits of [1, 2, 4]) {
    it(`K at ${bits} bits, 200 tokens (not a multiple of G=32 or R=64)`, async () => {
      const worst = await expectQuantBound(`tailorkv:mode=q,bits=${bits},group=32,residual=64`, 'K', bits, 32, 64, realistic(s, 10 + bits), s);
      expect(worst).toBeGreaterThan(0.5); // tight: some element comes close to the bound
    });
  }

  it('1-bit reconstructs every element as its group min or min + scale (spec §3.4)', async () => {
    const x = realistic(s, 20);
    const e = await nat.encode('tailorkv:mode=q,bits=1,group=64,residual=0', 'K', x, s);
    const y = await nat.decode(e.stream);
    const body = streamBody(e.stream);
    for (let t = 0; t < 192; t++) {
      const si = Math.floor(t / 64) * 64 + 7; // head 0, channel 7
      const scale = half(body.getUint16(e.breakdown.payload + si * 2, true));
      const min = half(body.getUint16(e.breakdown.payload + e.breakdown.scales + si * 2, true));
      expect([min, Math.fround(min + scale)]).toContain(y[t * 64 + 7]);
    }
  });

  it('V at 2 bits, head_dim 96 with G=64 (partial channel group), last R tokens fp16', async () => {
    const s96 = { kvHeads: 2, tokens: 130, headDim: 96 };
    const worst = await expectQuantBound('tailorkv:mode=q,bits=2,group=64,residual=64', 'V', 2, 64, 64, realistic(s96, 21), s96);
    expect(worst).toBeGreaterThan(0.5);
  });

  it('realistic data, 1024 tokens: 1-bit K is 10.67× (all tokens quantized), 2-bit 6.4× with ~3× less error', async () => {
    const s1 = { kvHeads: 2, tokens: 1024, headDim: 128 };
    const x = realistic(s1, 22);
    const one = await nat.encode('tailorkv:mode=q,bits=1', 'K', x, s1);
    const two = await nat.encode('tailorkv:mode=q,bits=2', 'K', x, s1);
    expect(one.breakdown.residual).toBe(0); // 1024 mod 128 = 0
    expect((x.length * 2) / one.deviceBytes).toBeCloseTo(16 / 1.5, 10);
    expect((x.length * 2) / two.deviceBytes).toBeCloseTo(16 / 2.5, 10);
    const err1 = relDiff(await nat.decode(one.stream), x);
    const err2 = relDiff(await nat.decode(two.stream), x);
    expect(err1).toBeLessThan(1);
    expect(err2).toBeLessThan(err1 / 2.5);
  });

  it('adversarial: constant channel, one huge outlier, all zeros, a single token', async () => {
    const s1 = { kvHeads: 1, tokens: 96, headDim: 32 };
    const x = filled(96 * 32, (i) => (i % 32 === 0 ? 1.5 : i % 32 === 1 ? 0 : Math.sin(i)));
    x[40 * 32 + 7] = 60000;
    const xs = asF16(x);
    await expectQuantBound('tailorkv:mode=q,bits=2,group=32,residual=0', 'K', 2, 32, 0, xs, s1);
    await expectQuantBound('tailorkv:mode=q,bits=1,group=32,residual=0', 'V', 1, 32, 0, xs, s1);
    const y = await nat.decode((await nat.encode('tailorkv:mode=q,bits=1,group=32,residual=0', 'K', xs, s1)).stream);
    for (let t = 0; t < 96; t++) {
      expect(y[t * 32]).toBe(1.5); // constant channel: scale 0, exact (NaN in the original)
      expect(y[t * 32 + 1]).toBe(0);
    }
    const zs = { kvHeads: 1, tokens: 5, headDim: 64 };
    for (const mode of ['q,residual=0', 's'])
      for (const kind of ['K', 'V'] as TensorKind[]) {
        const z = await nat.decode((await nat.encode(`tailorkv:mode=${mode}`, kind, new Float32Array(5 * 64), zs)).stream);
        expect(Array.from(z)).toEqual(new Array(5 * 64).fill(0));
      }
    const single = asF16(filled(64, (i) => i / 7));
    const one = { kvHeads: 1, tokens: 1, headDim: 64 };
    const sk = await nat.encode('tailorkv:mode=q', 'K', single, one);
    expect(sk.breakdown).toEqual({ payload: 0, scales: 0, zeros: 0, residual: 128, metadata: 0, host: 0 });
    expect(Array.from(await nat.decode(sk.stream))).toEqual(Array.from(single));
    const ss = await nat.encode('tailorkv:mode=s', 'K', single, one);
    expect(ss.breakdown).toEqual({ payload: 0, scales: 0, zeros: 0, residual: 128, metadata: 128, host: 0 });
    expect(Array.from(await nat.qk(ss.stream, single, 1, 1))).toEqual([Math.fround(single.reduce((a, v) => a + v * v, 0))]);
  });
});

describe('mode=s decode is exact; sinks and window on the device, the rest on the host', () => {
  it('fp16 data round-trips bit for bit (K channel-major on the host, V token-major)', async () => {
    const s = { kvHeads: 2, tokens: 257, headDim: 96 };
    const x = realistic(s, 30);
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const e = await nat.encode('tailorkv:mode=s,sinks=8,window=56', kind, x, s);
      expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(x));
    }
  });

  it('a prompt shorter than sinks + window keeps everything on the device (the original asserts instead)', async () => {
    const s = { kvHeads: 1, tokens: 40, headDim: 64 };
    const e = await nat.encode('tailorkv:mode=s,sinks=8,window=56', 'K', realistic(s, 31), s);
    expect(e.breakdown.host).toBe(0);
    expect(e.breakdown.residual).toBe(40 * 64 * 2);
  });

  it('the K stream stores max|K| per channel over all tokens (fp16, the channel-scoring bound)', async () => {
    const s = { kvHeads: 1, tokens: 50, headDim: 32 };
    const x = realistic(s, 32);
    x[20 * 32 + 3] = -300; // offloaded token, channel 3
    const e = await nat.encode('tailorkv:mode=s,sinks=2,window=2', 'K', x, s);
    const body = streamBody(e.stream);
    expect(half(body.getUint16(e.breakdown.residual + 3 * 2, true))).toBe(300);
    let mx = 0;
    for (let t = 0; t < 50; t++) mx = Math.max(mx, Math.abs(x[t * 32 + 5]));
    expect(half(body.getUint16(e.breakdown.residual + 5 * 2, true))).toBe(mx);
  });
});

describe('fused products equal decode-then-multiply', () => {
  const cases: [string, KvShape][] = [
    ['tailorkv:mode=q,bits=1,group=64,residual=128', { kvHeads: 2, tokens: 300, headDim: 128 }],
    ['tailorkv:mode=q,bits=2,group=64,residual=64', { kvHeads: 2, tokens: 257, headDim: 96 }],
    ['tailorkv:mode=q,bits=1,group=32,residual=32', { kvHeads: 1, tokens: 100, headDim: 64 }],
    ['tailorkv:mode=q,bits=4,group=64,residual=0', { kvHeads: 2, tokens: 130, headDim: 256 }],
    ['tailorkv:mode=s,budget=1000', { kvHeads: 2, tokens: 300, headDim: 128 }],
    ['tailorkv:mode=s,sinks=3,window=5,budget=500', { kvHeads: 1, tokens: 257, headDim: 96 }],
    ['tailorkv:mode=s,budget=100', { kvHeads: 2, tokens: 99, headDim: 64 }],
    ['tailorkv:mode=s,sinks=0,window=1,budget=64,channels=12', { kvHeads: 1, tokens: 65, headDim: 256 }],
  ];
  for (const [spec, s] of cases) {
    it(`${spec} at [${s.kvHeads}, ${s.tokens}, ${s.headDim}] with GQA (4 query heads per KV head, 3 queries)`, async () => {
      // mode=s with budget >= offloaded tokens fetches every token: the scores are exact too
      await expectProducts(spec, s, realistic(s, 5), realistic(s, 6), s.kvHeads * 4, 3);
    });
  }
});

/** The spec's selection, recomputed: channels by |q̄|·max|K|, approximate scores on them. */
function approxScores(k: Float32Array, q: Float32Array, s: KvShape, qHeads: number, n: number, kh: number, sinks: number, window: number, channels: number) {
  const D = s.headDim;
  const group = qHeads / s.kvHeads;
  const qbar = new Float64Array(D);
  for (let h = kh * group; h < (kh + 1) * group; h++) for (let d = 0; d < D; d++) qbar[d] += q[(n * qHeads + h) * D + d];
  const chScore = Array.from(qbar, (v, d) => {
    let mx = 0;
    for (let t = 0; t < s.tokens; t++) mx = Math.max(mx, Math.abs(k[(kh * s.tokens + t) * D + d]));
    return Math.abs(v / group) * mx;
  });
  const ch = chScore.map((v, d) => [v, d]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, channels).map((e) => e[1]).sort((a, b) => a - b);
  const approx: number[] = [];
  for (let t = sinks; t < s.tokens - window; t++) {
    let acc = 0;
    for (const c of ch) acc += (qbar[c] / group) * k[(kh * s.tokens + t) * D + c];
    approx.push(acc);
  }
  return approx;
}

describe('mode=s: per-query top-k of the offloaded tokens by channel-subset scoring', () => {
  const s = { kvHeads: 2, tokens: 600, headDim: 128 };
  const qHeads = 4;
  const nq = 5;
  const k = realistic(s, 40);
  const r = lcg(41);
  const q = filled(nq * qHeads * s.headDim, () => r() * 2);

  it('device tokens exact, `budget` offloaded tokens exact, the others -1e30; shared by the GQA group', async () => {
    const e = await nat.encode('tailorkv:mode=s,sinks=8,window=56,budget=50,channels=8', 'K', k, s);
    const scores = await nat.qk(e.stream, q, qHeads, nq);
    const ref = qkRef(k, q, s, qHeads, nq);
    for (let n = 0; n < nq; n++)
      for (let h = 0; h < qHeads; h++) {
        const row = (n * qHeads + h) * s.tokens;
        const selected: number[] = [];
        for (let t = 0; t < s.tokens; t++) {
          const got = scores[row + t];
          const onDevice = t < 8 || t >= s.tokens - 56;
          if (onDevice || got !== MASKED) expect(Math.abs(got - ref[row + t])).toBeLessThan(1e-4 * (1 + Math.abs(ref[row + t])));
          if (!onDevice && got !== MASKED) selected.push(t);
        }
        expect(selected.length).toBe(50);
        const partner = (n * qHeads + (h ^ 1)) * s.tokens; // the other query head of the same KV head
        for (const t of selected) expect(scores[partner + t]).not.toBe(MASKED);
        // the chosen tokens are the top 50 of the approximate scores
        const approx = approxScores(k, q, s, qHeads, n, Math.floor(h / 2), 8, 56, 8);
        const chosen = new Set(selected.map((t) => t - 8));
        const minIn = Math.min(...[...chosen].map((m) => approx[m]));
        const maxOut = Math.max(...approx.filter((_, m) => !chosen.has(m)));
        expect(minIn).toBeGreaterThanOrEqual(maxOut - 1e-9);
      }
  });

  it('softmax gives unselected tokens exactly 0; p·V then reads only device + selected tokens, exactly', async () => {
    const spec = 'tailorkv:mode=s,sinks=8,window=56,budget=50';
    const kq = await nat.encode(spec, 'K', k, s);
    const v = realistic(s, 42);
    const ve = await nat.encode(spec, 'V', v, s);
    const p = softmax(await nat.qk(kq.stream, q, qHeads, nq), s.tokens, 1 / Math.sqrt(128));
    let zeros = 0;
    for (const w of p) zeros += w === 0 ? 1 : 0;
    expect(zeros).toBe(nq * qHeads * (600 - 64 - 50));
    expect(relDiff(await nat.pv(ve.stream, p, qHeads, nq), pvRef(v, p, s, qHeads, nq))).toBeLessThan(1e-6);
  });

  it('finds planted dominant tokens (a retrieval "needle") that the sinks and window miss', async () => {
    const sh = { kvHeads: 1, tokens: 512, headDim: 64 };
    const rk = lcg(43);
    const kk = asF16(filled(512 * 64, () => rk() * 0.5));
    const needles = [100, 333];
    for (const t of needles) for (const c of [3, 9, 20]) kk[t * 64 + c] = 8;
    const qq = asF16(filled(2 * 64, (i) => ([3, 9, 20].includes(i % 64) ? 4 : rk() * 0.3)));
    const spec = 'tailorkv:mode=s,sinks=4,window=16,budget=8,channels=4';
    const scores = await nat.qk((await nat.encode(spec, 'K', kk, sh)).stream, qq, 2, 1);
    for (const h of [0, 1]) for (const t of needles) expect(scores[h * 512 + t]).toBeGreaterThan(90);
    // the attention output with the top-8 is close; sinks + window alone (budget=0) is not
    const rv = lcg(44);
    const vv = asF16(filled(512 * 64, () => rv() * 2));
    const ref = pvRef(vv, softmax(qkRef(kk, qq, sh, 2, 1), 512, 1 / 8), sh, 2, 1);
    const ve = (spec2: string) => nat.encode(spec2, 'V', vv, sh);
    const withTopK = await nat.pv((await ve(spec)).stream, softmax(scores, 512, 1 / 8), 2, 1);
    const noTopK = 'tailorkv:mode=s,sinks=4,window=16,budget=0,channels=4';
    const streamOnly = await nat.qk((await nat.encode(noTopK, 'K', kk, sh)).stream, qq, 2, 1);
    const withoutTopK = await nat.pv((await ve(noTopK)).stream, softmax(streamOnly, 512, 1 / 8), 2, 1);
    expect(relDiff(withTopK, ref)).toBeLessThan(0.05);
    expect(relDiff(withoutTopK, ref)).toBeGreaterThan(5 * relDiff(withTopK, ref));
  });

  it('query heads read their own KV head (GQA): a query on KV head 1 selects from KV head 1', async () => {
    const sh = { kvHeads: 2, tokens: 64, headDim: 32 };
    const kk = new Float32Array(2 * 64 * 32);
    kk[(64 + 30) * 32 + 0] = 1; // KV head 1, token 30, channel 0
    const e = await nat.encode('tailorkv:mode=s,sinks=1,window=1,budget=1,channels=1', 'K', kk, sh);
    const scores = await nat.qk(e.stream, filled(4 * 32, (i) => (i % 32 === 0 ? 2 : 0)), 4, 1);
    expect(scores[2 * 64 + 30]).toBe(2);
    expect(scores[3 * 64 + 30]).toBe(2);
    expect(scores[0 * 64 + 30]).toBe(MASKED); // KV head 0 is all zeros: the tie picks token 1
    expect(scores[0 * 64 + 1]).toBe(0);
  });
});

describe('streams are deterministic and parameters validated', () => {
  const s = { kvHeads: 2, tokens: 96, headDim: 64 };

  it('encoding twice gives identical bytes, in both modes; products too', async () => {
    const x = realistic(s, 50);
    for (const mode of ['q', 's']) {
      const a = await nat.encode(`tailorkv:mode=${mode}`, 'K', x, s);
      const b = await nat.encode(`tailorkv:mode=${mode}`, 'K', x, s);
      expect(Buffer.from(a.stream).equals(Buffer.from(b.stream))).toBe(true);
      const q = filled(2 * 2 * 64, (i) => Math.cos(i));
      expect(Array.from(await nat.qk(a.stream, q, 2, 2))).toEqual(Array.from(await nat.qk(b.stream, q, 2, 2)));
    }
    expect(nat.streamInfo((await nat.encode('tailorkv:mode=s', 'V', x, s)).stream).params).toBe(
      'mode=s,bits=1,group=64,residual=128,sinks=8,window=56,budget=128,channels=8,qlayers=-1,alpha=0.05,tau=0.2',
    );
  });

  it('mode=auto parses, but encoding it says the layer rule must be resolved first', async () => {
    expect(nat.parseCodec('tailorkv').params.startsWith('mode=auto,')).toBe(true);
    await expect(nat.encode('tailorkv', 'K', realistic(s, 1), s, 'layers.3.key')).rejects.toThrow(
      "tensor 'layers.3.key': codec 'tailorkv': mode=auto must be resolved per layer before encoding",
    );
  });

  it('rejects bad parameters, naming the codec and the parameter', async () => {
    expect(() => nat.parseCodec('tailorkv:mode=x')).toThrow("codec 'tailorkv': parameter mode=x is invalid: expected one of auto, q, s");
    expect(() => nat.parseCodec('tailorkv:bits=3')).toThrow('parameter bits=3 is invalid: expected one of 1, 2, 4');
    expect(() => nat.parseCodec('tailorkv:budget=-1')).toThrow('parameter budget=-1 is invalid');
    expect(() => nat.parseCodec('tailorkv:qlayers=0+1')).toThrow('parameter qlayers=0+1 is invalid');
    expect(() => nat.parseCodec('tailorkv:topk=3')).toThrow('valid parameters: mode, bits, group, residual, sinks, window, budget, channels, qlayers, alpha, tau');
    const x = realistic(s, 1);
    await expect(nat.encode('tailorkv:mode=q,bits=1,group=48', 'K', x, s)).rejects.toThrow(
      "codec 'tailorkv': group=48 must be a multiple of 32 (codes per 32-bit word at bits=1)",
    );
    await expect(nat.encode('tailorkv:mode=q,residual=96', 'K', x, s)).rejects.toThrow('residual=96 must be a multiple of group=64');
    await expect(nat.encode('tailorkv:mode=s,channels=65', 'K', x, s)).rejects.toThrow('channels=65 exceeds head_dim=64');
    await expect(nat.encode('tailorkv:mode=s,sinks=0,window=0,budget=0', 'V', x, s)).rejects.toThrow('no token would be attended');
    const big = x.slice();
    big[7] = 70000;
    await expect(nat.encode('tailorkv:mode=s', 'V', big, s)).rejects.toThrow('out of the fp16 range');
  });
});

describe('layer rule (cli/layer-policy.ts): attention mass outside the top 5% of tokens', () => {
  const shape = { qHeads: 2, kvHeads: 1, tokens: 200, headDim: 16, nQueries: 4 };
  const r = lcg(60);
  const k = filled(200 * 16, () => r() * 0.1);
  for (const t of [10, 150]) for (let d = 0; d < 16; d++) k[t * 16 + d] = 1;
  const spread: LayerAttention = { layer: 0, q: new Float32Array(4 * 2 * 16), k, shape }; // q = 0: uniform attention
  const peaked: LayerAttention = { layer: 1, q: new Float32Array(4 * 2 * 16).fill(20), k, shape };

  it('uniform attention: P = 1 − 10/200 → quantization-friendly; two dominant keys: P ≈ 0 → sparse', () => {
    expect(densePreferenceScore(spread, 0.05)).toBeCloseTo(0.95, 12);
    expect(densePreferenceScore(peaked, 0.05)).toBeLessThan(1e-6);
    const modes = decideLayerModes('tailorkv', [spread, peaked]);
    expect(modes.map((m) => m.mode)).toEqual(['q', 's']);
    expect(modes[0].score).toBeCloseTo(0.95, 12);
    const rest = 'bits=1,group=64,residual=128,sinks=8,window=56,budget=128,channels=8,qlayers=-1,alpha=0.05,tau=0.2';
    expect(resolveLayerSpecs('tailorkv', [spread, peaked])).toEqual([`tailorkv:mode=q,${rest}`, `tailorkv:mode=s,${rest}`]);
  });

  it('uses only the last 32 queries and maps query heads to KV heads (GQA)', () => {
    const gqa = { qHeads: 4, kvHeads: 2, tokens: 200, headDim: 16, nQueries: 40 };
    const k2 = new Float32Array(2 * 200 * 16);
    k2.set(k, 200 * 16); // KV head 1 has the two dominant keys, KV head 0 is all zeros
    const q = new Float32Array(40 * 4 * 16);
    // heads 2, 3 (KV head 1) peaked in the last 32 queries; the 8 older ones stay uniform and must not count
    for (let n = 8; n < 40; n++) q.fill(20, (n * 4 + 2) * 16, (n * 4 + 4) * 16);
    const p = densePreferenceScore({ layer: 0, q, k: k2, shape: gqa }, 0.05);
    expect(p).toBeCloseTo(0.95 / 2, 6); // heads 0, 1 uniform (0.95), heads 2, 3 peaked (≈ 0)
  });

  it('tau and alpha come from the spec; qlayers=N forces the first N layers to q', () => {
    expect(resolveLayerSpecs('tailorkv:tau=0.96', [spread])[0]).toMatch(/^tailorkv:mode=s,/);
    expect(resolveLayerSpecs('tailorkv:alpha=0', [peaked])[0]).toMatch(/^tailorkv:mode=q,/); // top 0 tokens: P = 1
    const three = [0, 1, 2].map((layer) => ({ ...peaked, layer }));
    expect(resolveLayerSpecs('tailorkv:qlayers=1,bits=2', three).map((sp) => sp.split(',')[0])).toEqual([
      'tailorkv:mode=q', 'tailorkv:mode=s', 'tailorkv:mode=s',
    ]);
    expect(resolveLayerSpecs('tailorkv:qlayers=0', [spread])[0]).toMatch(/^tailorkv:mode=s,/);
  });

  it('explicit modes and other codecs pass through unchanged; conflicts and missing queries are errors', () => {
    expect(resolveLayerSpecs('tailorkv:mode=q,bits=2', [spread, peaked])).toEqual(['tailorkv:mode=q,bits=2', 'tailorkv:mode=q,bits=2']);
    expect(resolveLayerSpecs('kivi:bits=2', [spread])).toEqual(['kivi:bits=2']);
    expect(resolveLayerSpecs('fp16', [spread, peaked])).toEqual(['fp16', 'fp16']);
    expect(() => resolveLayerSpecs('tailorkv:mode=s,qlayers=1', [spread])).toThrow('qlayers chooses modes per layer, so it needs mode=auto');
    const none = { layer: 4, q: new Float32Array(0), k, shape: { ...shape, nQueries: 0 } };
    expect(() => resolveLayerSpecs('tailorkv', [none])).toThrow('layer 4: the TailorKV layer rule needs queries');
  });

  it('resolved specs encode', async () => {
    const [q, s] = resolveLayerSpecs('tailorkv', [spread, peaked]);
    const kv = { kvHeads: 1, tokens: 200, headDim: 16 };
    expect((await nat.encode(q, 'K', asF16(k), kv)).breakdown.payload).toBeGreaterThan(0);
    expect((await nat.encode(s, 'K', asF16(k), kv)).breakdown.host).toBe(136 * 16 * 2);
  });
});
