// KVComp codec through the native addon: spec arithmetic, Huffman stream, byte counts, fused products.
import { describe, expect, it } from 'vitest';

import { f32ToF16 } from '../cli/io/dtype.js';
import { native, type EncodedTensor, type KvShape, type TensorKind } from '../cli/native.js';
import { filled, lcg, streamBody } from './helpers.js';
import { half, asF16, realistic, expectProducts } from './codec-helpers.js';

const nat = native();

/** torch.round: half to even. */
function roundHalfEven(v: number): number {
  const r = Math.round(v);
  return (Math.abs(v - Math.trunc(v)) === 0.5 && r % 2 !== 0 ? r - 1 : r) || 0; // no -0
}

/** The smallest fp16 value >= v (v positive, in range). */
function halfUp(v: number): number {
  const h = f32ToF16(new Float32Array([v]))[0];
  return half(h) >= v ? half(h) : half(h + 1);
}

// ---- the stream body, read as kernels/kvcomp/format.h draws it -------------------------------

interface Geometry {
  block: number;
  rel: number;
  codedTokens: number;
  tailTokens: number;
  units: number;
  segments: number;
  vecsPerSeg: number;
  symsPerVec: number;
}

function paramsOf(e: EncodedTensor): Record<string, number> {
  return Object.fromEntries(e.params.split(',').map((kv) => [kv.split('=')[0], Number(kv.split('=')[1])]));
}

function geometryOf(kind: TensorKind, s: KvShape, p: Record<string, number>): Geometry {
  const k = kind === 'K' ? 'k_' : 'v_';
  const block = p[`${k}block`];
  const full = s.tokens - (s.tokens % block);
  const keep = p[`${k}recent`] - block;
  const codedTokens = full > keep ? full - keep : 0;
  const blocks = codedTokens / block;
  return {
    block,
    rel: p[`${k}rel`],
    codedTokens,
    tailTokens: s.tokens - codedTokens,
    units: kind === 'K' ? blocks : codedTokens,
    segments: blocks * s.kvHeads,
    vecsPerSeg: kind === 'K' ? block : s.headDim,
    symsPerVec: kind === 'K' ? s.headDim : block,
  };
}

const align = (off: number, to: number) => Math.ceil(off / to) * to;

interface Body {
  g: Geometry;
  alphabet: number;
  zpBytes: number;
  maxLength: number;
  arenaBytes: number;
  lengths: number[];
  scales: number[];
  zps: number[];
  segRaw: boolean[];
  vecBits: number[];
  /** metadata bytes by the layout formula: header, lengths, tables, padding */
  metadata: number;
  vecOff: number;
  residual: number;
}

function parseBody(e: EncodedTensor): Body {
  const dv = streamBody(e.stream);
  const g = geometryOf(e.kind, e.shape, paramsOf(e));
  const alphabet = dv.getUint16(0, true);
  const zpBytes = dv.getUint8(2);
  const maxLength = dv.getUint8(3);
  const arenaBytes = dv.getUint32(4, true);
  const lengths = Array.from({ length: alphabet }, (_, s) => (dv.getUint8(8 + (s >> 1)) >> (4 * (s & 1))) & 15);
  const scaleOff = align(8 + Math.ceil(alphabet / 2), 2);
  const zpOff = align(scaleOff + 2 * g.units, zpBytes);
  const segOff = align(zpOff + zpBytes * g.units, 4);
  const vecOff = segOff + 4 * g.segments;
  const arenaOff = vecOff + 2 * g.segments * g.vecsPerSeg;
  const tailOff = align(arenaOff + arenaBytes, 2);
  const zpAt = (u: number) =>
    zpBytes === 1 ? dv.getInt8(zpOff + u) : zpBytes === 2 ? dv.getInt16(zpOff + 2 * u, true) : dv.getInt32(zpOff + 4 * u, true);
  return {
    g,
    alphabet,
    zpBytes,
    maxLength,
    arenaBytes,
    lengths,
    scales: Array.from({ length: g.units }, (_, u) => half(dv.getUint16(scaleOff + 2 * u, true))),
    zps: Array.from({ length: g.units }, (_, u) => zpAt(u)),
    segRaw: Array.from({ length: g.segments }, (_, s) => (dv.getUint32(segOff + 4 * s, true) & 0x80000000) !== 0),
    vecBits: Array.from({ length: g.segments * g.vecsPerSeg }, (_, v) => dv.getUint16(vecOff + 2 * v, true)),
    metadata: tailOff - arenaBytes - 2 * g.units - zpBytes * g.units,
    vecOff,
    residual: dv.byteLength - tailOff,
  };
}

/** Quantization unit of element (h, t, d): K one per block of tokens, V one per token. */
function unitOf(kind: TensorKind, g: Geometry, t: number): number {
  return kind === 'K' ? Math.floor(t / g.block) : t;
}

/** The spec's integer code of every coded element (-1 for tail elements), from the stream's scales. */
function specCodes(e: EncodedTensor, body: Body, x: Float32Array): Int32Array {
  const { kvHeads, tokens, headDim } = e.shape;
  const codes = new Int32Array(x.length).fill(-1);
  for (let h = 0; h < kvHeads; h++)
    for (let t = 0; t < body.g.codedTokens; t++)
      for (let d = 0; d < headDim; d++) {
        const i = (h * tokens + t) * headDim + d;
        const u = unitOf(e.kind, body.g, t);
        codes[i] = roundHalfEven(x[i] / body.scales[u]) - body.zps[u];
      }
  return codes;
}

/** Unit minima and maxima over all heads and channels, as the spec's BlockQuant / TokenQuant take them. */
function unitRanges(e: EncodedTensor, g: Geometry, x: Float32Array): { lo: number[]; hi: number[] } {
  const lo = new Array(g.units).fill(Infinity);
  const hi = new Array(g.units).fill(-Infinity);
  const { kvHeads, tokens, headDim } = e.shape;
  for (let h = 0; h < kvHeads; h++)
    for (let t = 0; t < g.codedTokens; t++)
      for (let d = 0; d < headDim; d++) {
        const u = unitOf(e.kind, g, t);
        const v = x[(h * tokens + t) * headDim + d];
        lo[u] = Math.min(lo[u], v);
        hi[u] = Math.max(hi[u], v);
      }
  return { lo, hi };
}

/**
 * The spec's arithmetic, element by element: scale = fp16 round-up of rel·(hi − lo) (where that
 * is not below the degenerate-unit floor), zp = round(lo/scale), x̂ = (round(x/scale) − zp)·scale
 * bit for bit, |x − x̂| ≤ scale/2 + float rounding, fp16 tail exact. Returns the worst error / bound.
 */
async function expectSpecArithmetic(spec: string, kind: TensorKind, x: Float32Array, s: KvShape): Promise<number> {
  const e = await nat.encode(spec, kind, x, s);
  const y = await nat.decode(e.stream);
  const body = parseBody(e);
  const { lo, hi } = unitRanges(e, body.g, x);
  for (let u = 0; u < body.g.units; u++) {
    const want = body.g.rel * (hi[u] - lo[u]);
    const floor = 2 ** Math.max(Math.ceil(Math.log2(Math.max(Math.abs(lo[u]), Math.abs(hi[u])) || 1) - 24), -24);
    if (want > 2 * floor) expect(body.scales[u]).toBe(halfUp(want));
    else expect(body.scales[u]).toBeGreaterThan(0); // degenerate unit: the floor, never 0
    expect(body.zps[u]).toBe(roundHalfEven(lo[u] / body.scales[u]));
  }
  const codes = specCodes(e, body, x);
  const wrong: string[] = []; // element-wise expect() is slow; collect the first few failures
  let worst = 0;
  for (let i = 0; i < x.length && wrong.length < 5; i++) {
    if (codes[i] < 0) {
      if (y[i] !== x[i]) wrong.push(`tail element ${i}: ${y[i]} != ${x[i]}`); // fp16 tail of fp16 data
      continue;
    }
    const t = Math.floor(i / s.headDim) % s.tokens;
    const u = unitOf(kind, body.g, t);
    const scale = body.scales[u];
    const bound = scale / 2 + 2 ** -23 * (Math.abs(x[i]) + scale);
    if (codes[i] >= body.alphabet) wrong.push(`element ${i}: code ${codes[i]} outside the alphabet`);
    if (y[i] !== Math.fround((codes[i] + body.zps[u]) * scale)) wrong.push(`element ${i}: x̂ ${y[i]} is not (code + zp)·scale`);
    if (Math.abs(x[i] - y[i]) > bound) wrong.push(`element ${i}: |${x[i]} − ${y[i]}| > ${bound}`);
    worst = Math.max(worst, Math.abs(x[i] - y[i]) / bound);
  }
  expect(wrong).toEqual([]);
  return worst;
}

/** Payload bits the stream's codebook gives a segment's codes, and the raw width. */
function segmentBits(body: Body, codes: Int32Array, e: EncodedTensor, seg: number): { huffman: number; raw: number } {
  const { tokens, headDim, kvHeads } = e.shape;
  const b = Math.floor(seg / kvHeads);
  const h = seg % kvHeads;
  let huffman = 0;
  for (let t = b * body.g.block; t < (b + 1) * body.g.block; t++)
    for (let d = 0; d < headDim; d++) huffman += body.lengths[codes[(h * tokens + t) * headDim + d]];
  return { huffman, raw: body.g.block * headDim * Math.ceil(Math.log2(body.alphabet)) };
}

function kraftSum(lengths: number[]): number {
  return lengths.reduce((acc, l) => acc + 2 ** -l, 0);
}

/** Deterministic Fisher–Yates shuffle. */
function shuffled(values: number[], seed: number): number[] {
  const r = lcg(seed);
  const out = values.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor((r() + 0.5) * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** A K tensor whose first block holds the given codes (value = code · step) and whose tail is realistic. */
function keyBlockOf(codes: number[], step: number, s: KvShape): Float32Array {
  const x = realistic(s, 77);
  codes.forEach((c, i) => (x[i] = c * step));
  return x;
}

describe('kvcomp byte accounting, counted by hand', () => {
  it('K, 1×130×64, k_rel=0.25: one coded block of known codes, 66 tail tokens, 9262 B', async () => {
    // Block codes 0..4 (step 0.25, zero point 0): 2988, 999, 99, 9, 1 of each. With add-one
    // smoothing over the alphabet 0..5 (A = floor(1/0.25) + 2) the weights are 2989, 1000, 100,
    // 10, 2, 1: Huffman lengths 1, 2, 3, 4, 5, 5 and 2988 + 2·999 + 3·99 + 4·9 + 5 = 5324 bits.
    const s = { kvHeads: 1, tokens: 130, headDim: 64 };
    const counts = [2988, 999, 99, 9, 1];
    const codes = shuffled(counts.flatMap((n, c) => new Array(n).fill(c)), 3);
    const e = await nat.encode('kvcomp:k_rel=0.25', 'K', keyBlockOf(codes, 0.25, s), s);
    const body = parseBody(e);
    expect(body.alphabet).toBe(6);
    expect(body.lengths).toEqual([1, 2, 3, 4, 5, 5]);
    expect(body.scales).toEqual([0.25]);
    expect(body.zps).toEqual([0]);
    // metadata: 8 header + 3 lengths + 1 pad + 1 pad + 4 segment table + 64·2 vector table = 145
    // payload ceil(5324/8) = 666; scale 2; int8 zero point 1; tail 66·64·2 = 8448
    expect(e.breakdown).toEqual({ payload: 666, scales: 2, zeros: 1, residual: 8448, metadata: 145, host: 0 });
    expect(body.vecBits.reduce((a, b) => a + b, 0)).toBe(5324);
    expect(streamBody(e.stream).byteLength).toBe(9262);
    expect((130 * 64 * 2) / e.deviceBytes).toBeCloseTo(16640 / 9262, 12);
  });

  it('V, 1×35×32, v_block=16, v_recent=16: 32 per-token units, a 3-token tail, raw width 5', async () => {
    // Every token holds codes 0..16 then 15 zeros (v_rel = 1/16: step = (1 − 0)/16 per token).
    const s = { kvHeads: 1, tokens: 35, headDim: 32 };
    const x = filled(35 * 32, (i) => (i % 32 <= 16 ? (i % 32) / 16 : 0));
    const e = await nat.encode('kvcomp:v_rel=0.0625,v_block=16,v_recent=16', 'V', x, s);
    const body = parseBody(e);
    expect(body.g).toMatchObject({ codedTokens: 32, tailTokens: 3, units: 32, segments: 2 });
    expect(body.alphabet).toBe(18);
    expect(body.zpBytes).toBe(1);
    // 2 segments × 32 channel vectors of 16 tokens; lengths from the stream's codebook
    const counts = new Array(18).fill(0);
    for (let d = 0; d < 32; d++) counts[d <= 16 ? d : 0] += 32;
    const bits = counts.reduce((acc, n, c) => acc + n * body.lengths[c], 0);
    expect(body.segRaw).toEqual([false, false]);
    expect(e.breakdown.payload).toBe(2 * Math.ceil(bits / 2 / 8));
    // 8 header + 9 lengths + 1 pad | 64 scales | 32 zeros | 2 pad + 2·4 segment table + 64·2 vector table
    expect(e.breakdown).toMatchObject({ scales: 64, zeros: 32, residual: 3 * 32 * 2, metadata: 8 + 9 + 1 + 2 + 8 + 128 });
    expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(x));
  });

  const cases: [string, TensorKind, KvShape][] = [
    ['kvcomp', 'K', { kvHeads: 2, tokens: 1024, headDim: 128 }],
    ['kvcomp', 'V', { kvHeads: 2, tokens: 1024, headDim: 128 }],
    ['kvcomp:k_rel=0.01,k_block=32,k_recent=32', 'K', { kvHeads: 3, tokens: 301, headDim: 96 }],
    ['kvcomp:v_rel=0.3,v_block=64,v_recent=64', 'V', { kvHeads: 1, tokens: 250, headDim: 256 }],
    ['kvcomp', 'V', { kvHeads: 2, tokens: 200, headDim: 64 }], // all tail: 200 < v_recent
  ];
  for (const [spec, kind, s] of cases) {
    it(`${spec} ${kind} [${s.kvHeads}, ${s.tokens}, ${s.headDim}]: the breakdown is every body byte, section by section`, async () => {
      const e = await nat.encode(spec, kind, realistic(s, 21), s);
      const b = e.breakdown;
      const body = parseBody(e);
      expect(b.payload + b.scales + b.zeros + b.residual + b.metadata + b.host).toBe(streamBody(e.stream).byteLength);
      expect(b.host).toBe(0);
      expect(b.payload).toBe(body.arenaBytes);
      expect(b.scales).toBe(2 * body.g.units);
      expect(b.zeros).toBe(body.zpBytes * body.g.units);
      expect(b.residual).toBe(body.residual);
      expect(b.residual).toBe(2 * s.kvHeads * body.g.tailTokens * s.headDim);
      expect(b.metadata).toBe(body.metadata);
      const tables = 8 + Math.ceil(body.alphabet / 2) + 4 * body.g.segments + 2 * body.g.segments * body.g.vecsPerSeg;
      expect(b.metadata - tables).toBeGreaterThanOrEqual(0);
      expect(b.metadata - tables).toBeLessThanOrEqual(7); // alignment padding only
      // the arena is exactly the segments' bit counts, each segment padded to a byte
      let arena = 0;
      for (let seg = 0; seg < body.g.segments; seg++) {
        const bits = body.vecBits.slice(seg * body.g.vecsPerSeg, (seg + 1) * body.g.vecsPerSeg).reduce((x, y) => x + y, 0);
        arena += Math.ceil(bits / 8);
      }
      expect(arena).toBe(body.arenaBytes);
    });
  }

  it("default K and V on realistic data: ratio over 3.5×, average code length within Gallager's bound of the entropy", async () => {
    const s = { kvHeads: 2, tokens: 1024, headDim: 128 };
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const x = realistic(s, kind === 'K' ? 31 : 32);
      const e = await nat.encode('kvcomp', kind, x, s);
      const body = parseBody(e);
      expect(body.segRaw.every((raw) => !raw)).toBe(true);
      const codes = specCodes(e, body, x).filter((c) => c >= 0);
      const hist = new Map<number, number>();
      for (const c of codes) hist.set(c, (hist.get(c) ?? 0) + 1);
      let entropy = 0;
      for (const n of hist.values()) entropy -= (n / codes.length) * Math.log2(n / codes.length);
      const pMax = Math.max(...hist.values()) / codes.length;
      const avg = body.vecBits.reduce((a, b) => a + b, 0) / codes.length;
      expect(avg).toBeGreaterThanOrEqual(entropy);
      expect(avg).toBeLessThan(entropy + pMax + 0.086); // Gallager's bound on Huffman redundancy
      expect((s.kvHeads * s.tokens * s.headDim * 2) / e.deviceBytes).toBeGreaterThan(3.5);
    }
  });
});

describe('kvcomp quantizer: the spec arithmetic and |x − x̂| ≤ scale/2', () => {
  const shapes: KvShape[] = [
    { kvHeads: 2, tokens: 300, headDim: 64 },
    { kvHeads: 2, tokens: 333, headDim: 96 },
    { kvHeads: 1, tokens: 450, headDim: 128 },
    { kvHeads: 2, tokens: 257, headDim: 256 },
  ];
  for (const s of shapes)
    for (const kind of ['K', 'V'] as TensorKind[])
      it(`${kind} head_dim ${s.headDim}, ${s.tokens} tokens (not a multiple of any block)`, async () => {
        const spec = 'kvcomp:k_recent=64,v_recent=128';
        const worst = await expectSpecArithmetic(spec, kind, realistic(s, s.headDim + (kind === 'K' ? 1 : 2)), s);
        expect(worst).toBeGreaterThan(0.45); // the bound is tight: some element comes close to it
        expect(worst).toBeLessThanOrEqual(1);
      });

  it('rel from 0.001 to 1 (alphabets of 1002 down to 3 codes)', async () => {
    const s = { kvHeads: 2, tokens: 200, headDim: 64 };
    for (const rel of [0.001, 0.013, 0.1, 0.5, 1]) {
      await expectSpecArithmetic(`kvcomp:k_rel=${rel},k_recent=64`, 'K', realistic(s, 40), s);
      await expectSpecArithmetic(`kvcomp:v_rel=${rel},v_block=32,v_recent=32`, 'V', realistic(s, 41), s);
    }
  });

  it('adversarial: constant channel, one huge outlier, large DC offset', async () => {
    const s = { kvHeads: 2, tokens: 192, headDim: 64 };
    const x = realistic(s, 50);
    for (let i = 0; i < x.length; i += 64) x[i] = 1.5; // channel 0 constant
    x[(0 * 192 + 10) * 64 + 7] = 60000; // one huge outlier in a coded K block and a coded V token
    for (let h = 0; h < 2; h++) for (let d = 0; d < 64; d++) x[(h * 192 + 20) * 64 + d] = 1000 + d / 64; // large offset
    const xs = asF16(x);
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const spec = 'kvcomp:k_recent=64,v_block=32,v_recent=32';
      await expectSpecArithmetic(spec, kind, xs, s);
      const body = parseBody(await nat.encode(spec, kind, xs, s));
      if (kind === 'V') expect(body.zpBytes).toBe(2); // zp = round(1000 / (0.1 · 1)) overflows the spec's int8
    }
  });

  it('all zeros, a constant tensor and a single token come back exactly', async () => {
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const s = { kvHeads: 2, tokens: 300, headDim: 64 };
      const spec = 'kvcomp:k_recent=64,v_block=64,v_recent=64';
      const zeros = new Float32Array(2 * 300 * 64);
      expect(Array.from(await nat.decode((await nat.encode(spec, kind, zeros, s)).stream))).toEqual(Array.from(zeros));
      const constant = new Float32Array(2 * 300 * 64).fill(-3.140625);
      const e = await nat.encode(spec, kind, constant, s);
      expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(constant)); // step floored, never 0
      expect(parseBody(e).zpBytes).toBe(4);
      const one = { kvHeads: 2, tokens: 1, headDim: 64 };
      const single = asF16(filled(128, (i) => i / 7 - 3));
      const se = await nat.encode('kvcomp', kind, single, one);
      expect(se.breakdown).toEqual({ payload: 0, scales: 0, zeros: 0, residual: 256, metadata: 8, host: 0 });
      expect(Array.from(await nat.decode(se.stream))).toEqual(Array.from(single));
    }
  });
});

describe('kvcomp Huffman stage', () => {
  it('decodes every symbol of the alphabet: a block holding all codes 0..17 at k_rel=0.06', async () => {
    // lo = 0.4·step → zp 0, code 0; hi/step = 17.064 → code 17 = floor(1/0.06) + 1, the top of the alphabet.
    const s = { kvHeads: 1, tokens: 128, headDim: 64 };
    const r = lcg(5);
    const codes = Array.from({ length: 64 * 64 }, (_, i) => (i < 18 ? i : Math.floor(17.99 * (r() + 0.5) ** 3)));
    const x = keyBlockOf(codes, 0.0625, s);
    for (let i = 0; i < 64 * 64; i++) {
      if (codes[i] === 0) x[i] = 0.025;
      if (codes[i] === 17) x[i] = 1.0665;
    }
    const e = await nat.encode('kvcomp:k_rel=0.06', 'K', x, s);
    const body = parseBody(e);
    expect(body.scales).toEqual([0.0625]);
    expect(body.alphabet).toBe(18);
    const got = specCodes(e, body, x);
    expect(new Set(Array.from(got.subarray(0, 4096)))).toEqual(new Set(Array.from({ length: 18 }, (_, c) => c)));
    expect(Array.from(got.subarray(0, 4096))).toEqual(codes);
    expect(kraftSum(body.lengths)).toBe(1); // a complete canonical prefix code
    expect(new Set(body.lengths).size).toBeGreaterThan(2); // genuinely variable-length
    const y = await nat.decode(e.stream);
    for (let i = 0; i < 4096; i++) expect(y[i]).toBe(codes[i] * 0.0625);
    await expectSpecArithmetic('kvcomp:k_rel=0.06', 'K', x, s);
  });

  it('keeps codewords within 12 bits for a Fibonacci-frequency histogram, and stays near optimal', async () => {
    // With the codec's add-one smoothing, symbols 17, 1, 0, 2, 3, ..., 15 weigh F(1)..F(17) and
    // symbol 16 fills the block: unconstrained Huffman is a chain 17 codewords deep.
    const fib = [1, 1];
    while (fib.length < 17) fib.push(fib[fib.length - 1] + fib[fib.length - 2]);
    const order = [17, 1, 0, ...Array.from({ length: 14 }, (_, i) => i + 2)];
    const weights = new Array(18).fill(0);
    order.forEach((sym, i) => (weights[sym] = fib[i]));
    const counts = weights.map((w) => Math.max(w - 1, 0));
    counts[16] = 64 * 128 - counts.reduce((a, b) => a + b, 0);
    weights[16] = counts[16] + 1;
    const s = { kvHeads: 1, tokens: 128, headDim: 128 };
    const codes = shuffled(counts.flatMap((n, c) => new Array(n).fill(c)), 9);
    const x = keyBlockOf(codes, 1 / 16, s);
    const e = await nat.encode('kvcomp:k_rel=0.0625', 'K', x, s);
    const body = parseBody(e);
    expect(body.alphabet).toBe(18);
    expect(Array.from(specCodes(e, body, x).subarray(0, 8192))).toEqual(codes);
    const unlimited = huffmanLengths(weights);
    expect(Math.max(...unlimited)).toBe(17); // the premise: the limit binds
    expect(body.maxLength).toBe(12);
    expect(Math.max(...body.lengths)).toBe(12);
    expect(kraftSum(body.lengths)).toBe(1);
    // package-merge is optimal among 12-bit-limited codes: never below Huffman, barely above it
    const cost = (lengths: number[]) => weights.reduce((acc, w, c) => acc + w * lengths[c], 0);
    expect(cost(body.lengths)).toBeGreaterThanOrEqual(cost(unlimited));
    expect(cost(body.lengths)).toBeLessThan(cost(unlimited) * 1.01);
    expect(body.vecBits.reduce((a, b) => a + b, 0)).toBe(counts.reduce((acc, n, c) => acc + n * body.lengths[c], 0));
    const y = await nat.decode(e.stream);
    for (let i = 0; i < 8192; i++) expect(y[i]).toBe(codes[i] / 16);
  });

  it('stores an incompressible (uniform-random codes) block raw, and it round-trips', async () => {
    // k_rel = 1/64: 66 codes, raw width 7. Blocks 0, 1, 3 hold codes 30..34 (plus 0 and 64 once), so
    // the stream's book gives those short codewords and the rest about 8 bits; block 2 holds uniform
    // codes 0..64, which cost more under that book than raw 7-bit codes.
    const s = { kvHeads: 1, tokens: 320, headDim: 64 };
    const r = lcg(13);
    const x = filled(320 * 64, (i) => {
      const j = i % (64 * 64);
      if (Math.floor(i / (64 * 64)) === 2) return Math.floor((r() + 0.5) * 65) / 64;
      return j === 0 ? 0 : j === 1 ? 1 : (32 + (j % 5) - 2) / 64;
    });
    const e = await nat.encode('kvcomp:k_rel=0.015625', 'K', x, s);
    const body = parseBody(e);
    expect(body.alphabet).toBe(66);
    expect(body.scales).toEqual([1 / 64, 1 / 64, 1 / 64, 1 / 64]);
    expect(body.segRaw).toEqual([false, false, true, false]);
    const codes = specCodes(e, body, x);
    for (let seg = 0; seg < 4; seg++) {
      const { huffman, raw } = segmentBits(body, codes, e, seg);
      if (seg === 2) expect(huffman).toBeGreaterThan(raw);
      else expect(huffman).toBeLessThan(raw / 2);
    }
    expect(body.vecBits.slice(2 * 64, 3 * 64)).toEqual(new Array(64).fill(64 * 7));
    expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(x)); // all values are multiples of 1/64
    await expectSpecArithmetic('kvcomp:k_rel=0.015625', 'K', x, s);
  });

  it('rejects a corrupt codebook, tables and arena instead of decoding garbage', async () => {
    const s = { kvHeads: 2, tokens: 512, headDim: 64 };
    const e = await nat.encode('kvcomp', 'K', realistic(s, 60), s);
    const header = e.stream.length - streamBody(e.stream).byteLength;
    const body = parseBody(e);
    const corrupt = (at: number, value: number) => {
      const bad = e.stream.slice();
      bad[header + at] = value;
      return bad;
    };
    await expect(nat.decode(corrupt(8, 0xff))).rejects.toThrow(/codec 'kvcomp': corrupt stream: the codebook/);
    await expect(nat.decode(corrupt(2, 3))).rejects.toThrow(/zero-point width 3/);
    await expect(nat.decode(corrupt(body.vecOff, (body.vecBits[0] + 1) & 0xff))).rejects.toThrow(/corrupt stream/);
  });
});

describe('kvcomp fused products equal decode-then-multiply', () => {
  const cases: [string, KvShape][] = [
    ['kvcomp', { kvHeads: 2, tokens: 1024, headDim: 128 }],
    ['kvcomp:k_recent=64,v_recent=128', { kvHeads: 2, tokens: 300, headDim: 64 }],
    ['kvcomp:k_rel=0.01,v_rel=0.02,k_recent=64,v_block=64,v_recent=64', { kvHeads: 2, tokens: 257, headDim: 96 }],
    ['kvcomp:k_rel=0.2,v_rel=0.5,k_block=32,k_recent=32,v_block=16,v_recent=16', { kvHeads: 1, tokens: 100, headDim: 256 }],
    ['kvcomp', { kvHeads: 2, tokens: 33, headDim: 64 }], // all fp16 tail
  ];
  for (const [spec, s] of cases) {
    it(`${spec} at [${s.kvHeads}, ${s.tokens}, ${s.headDim}] with GQA (4 query heads per KV head, 3 queries)`, async () => {
      await expectProducts(spec, s, realistic(s, 5), realistic(s, 6), s.kvHeads * 4, 3);
    });
  }

  it('query heads read their own KV head (h / (qHeads / kvHeads))', async () => {
    const s = { kvHeads: 2, tokens: 256, headDim: 64 };
    const x = filled(2 * 256 * 64, (i) => (i >= 256 * 64 ? 1 : 0));
    // rel = 1/16 makes the step exactly 1/16, so 0 and 1 come back exactly
    const k = await nat.encode('kvcomp:k_rel=0.0625', 'K', x, s);
    const scores = await nat.qk(k.stream, new Float32Array(4 * 64).fill(1), 4, 1);
    expect(Array.from(scores.subarray(0, 512))).toEqual(new Array(512).fill(0));
    expect(Array.from(scores.subarray(512))).toEqual(new Array(512).fill(64));
    const v = await nat.encode('kvcomp:v_rel=0.0625', 'V', x, s);
    const out = await nat.pv(v.stream, new Float32Array(4 * 256).fill(1 / 256), 4, 1);
    expect(Array.from(out.subarray(0, 128))).toEqual(new Array(128).fill(0));
    expect(Array.from(out.subarray(128))).toEqual(new Array(128).fill(1));
  });
});

describe('kvcomp streams are deterministic and validated', () => {
  const s = { kvHeads: 2, tokens: 400, headDim: 64 };
  it('encoding twice gives identical bytes; the stream header names the canonical parameters', async () => {
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const x = realistic(s, 8);
      const a = await nat.encode('kvcomp', kind, x, s);
      const b = await nat.encode('kvcomp', kind, x, s);
      expect(Buffer.from(a.stream).equals(Buffer.from(b.stream))).toBe(true);
      expect(nat.streamInfo(a.stream)).toEqual({
        codec: 'kvcomp',
        params: 'k_rel=0.05,v_rel=0.1,k_block=64,v_block=128,k_recent=128,v_recent=256',
        kind,
        shape: s,
        breakdown: a.breakdown,
      });
    }
  });

  it('lists its parameters and the default runs', () => {
    const info = nat.codecs().find((c) => c.name === 'kvcomp');
    expect(info?.params.map((p) => `${p.name}=${p.default}`)).toEqual([
      'k_rel=0.05', 'v_rel=0.1', 'k_block=64', 'v_block=128', 'k_recent=128', 'v_recent=256',
    ]);
    expect(info?.defaultRuns).toEqual(['kvcomp', 'kvcomp:k_rel=0.03,v_rel=0.06']);
  });

  it('rejects bad parameters, naming the codec and the parameter', async () => {
    expect(() => nat.parseCodec('kvcomp:k_rel=0')).toThrow("codec 'kvcomp': parameter k_rel=0 is invalid: expected a number in [0.001, 1]");
    expect(() => nat.parseCodec('kvcomp:v_rel=abc')).toThrow("codec 'kvcomp': parameter v_rel=abc is invalid");
    expect(() => nat.parseCodec('kvcomp:k_block=48')).toThrow('expected one of 16, 32, 64, 128, 256');
    expect(() => nat.parseCodec('kvcomp:block=64')).toThrow(
      'valid parameters: k_rel, v_rel, k_block, v_block, k_recent, v_recent',
    );
    await expect(nat.encode('kvcomp:k_recent=100', 'K', realistic(s, 1), s, 'layers.3.key')).rejects.toThrow(
      "tensor 'layers.3.key': codec 'kvcomp': k_recent=100 must be a positive multiple of k_block=64",
    );
    await expect(nat.encode('kvcomp:v_block=256', 'V', realistic(s, 1), s)).resolves.toMatchObject({ codec: 'kvcomp' });
    await expect(nat.encode('kvcomp:v_block=256,v_recent=128', 'V', realistic(s, 1), s)).rejects.toThrow(
      "codec 'kvcomp': v_recent=128 must be a positive multiple of v_block=256",
    );
  });

  it('rejects data it cannot represent and products of the wrong kind or head count', async () => {
    const big = realistic(s, 2);
    big[5] = 70000;
    await expect(nat.encode('kvcomp', 'K', big, s)).rejects.toThrow(/codec 'kvcomp': value 70000.* outside the fp16 range/);
    const wide = realistic(s, 2);
    wide[0] = -60000;
    wide[1] = 60000;
    await expect(nat.encode('kvcomp:k_rel=1', 'K', wide, s)).rejects.toThrow(/step exceeds the fp16 range of scales/);
    const nan = realistic(s, 2);
    nan[9] = NaN;
    await expect(nat.encode('kvcomp', 'V', nan, s)).rejects.toThrow(/1 non-finite values/);
    const k = await nat.encode('kvcomp', 'K', realistic(s, 3), s);
    await expect(nat.pv(k.stream, new Float32Array(2 * 400), 2, 1)).rejects.toThrow('p·V needs a V stream, got a K stream');
    await expect(nat.qk(k.stream, new Float32Array(3 * 64), 3, 1)).rejects.toThrow('3 query heads is not a multiple of 2 KV heads');
    await expect(nat.decode(k.stream.slice(0, k.stream.length - 1))).rejects.toThrow(/truncated/);
  });
});

/** Unconstrained Huffman code lengths (textbook, for comparison). */
function huffmanLengths(weights: number[]): number[] {
  let nodes = weights.map((w, s) => ({ w, syms: [s] }));
  const lengths = new Array(weights.length).fill(0);
  while (nodes.length > 1) {
    nodes.sort((a, b) => a.w - b.w);
    const [a, b] = nodes.splice(0, 2);
    for (const s of [...a.syms, ...b.syms]) lengths[s]++;
    nodes.push({ w: a.w + b.w, syms: [...a.syms, ...b.syms] });
  }
  return lengths;
}
