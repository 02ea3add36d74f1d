// Metrics against hand-computed cases, and exactness of the layer accumulators.

import { describe, expect, it } from 'vitest';
import {
  ErrorAccumulator,
  ProxyAccumulator,
  attentionOutput,
  attentionProxies,
  attentionScores,
  compressionRatio,
  softmaxRows,
  tensorError,
  type AttentionShape,
  type AttentionTensors,
} from '../cli/metrics.js';
import { PackkvError } from '../cli/errors.js';

const f32 = (xs: number[]) => Float32Array.from(xs);

/** Deterministic pseudo-random values in [-1, 1). */
function lcg(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

function concat(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** A one-row attention problem whose tensors are given directly. */
function oneRow(scores: number[], probs: number[], out: number[]): AttentionTensors {
  return { scores: f32(scores), probs: f32(probs), out: f32(out) };
}

describe('tensorError', () => {
  it('x=[3,4], x̂=[3,5]', () => {
    const e = tensorError(f32([3, 4]), f32([3, 5]));
    expect(e.maxAbs).toBe(1);
    expect(e.rmse).toBeCloseTo(Math.sqrt(0.5), 12);
    expect(e.relL2).toBeCloseTo(0.2, 12);
    expect(e.snrDb).toBeCloseTo(10 * Math.log10(25), 12);
    expect(e.snrDb).toBeCloseTo(13.979400086720377, 10);
  });

  it('exact reconstruction: relL2 0, SNR infinite', () => {
    const e = tensorError(f32([1, -2, 3]), f32([1, -2, 3]));
    expect(e).toEqual({ maxAbs: 0, rmse: 0, relL2: 0, snrDb: Infinity });
  });

  it('rejects tensors of different length', () => {
    expect(() => tensorError(f32([1]), f32([1, 2]))).toThrow(PackkvError);
  });

  it('accumulating two layers equals the error of their concatenation', () => {
    const a = lcg(300, 1);
    const b = lcg(500, 2).map((x) => 4 * x);
    const aHat = a.map((x, i) => x + 0.01 * Math.sin(i));
    const bHat = b.map((x, i) => x + 0.2 * Math.cos(i));
    const acc = new ErrorAccumulator().add(a, aHat).add(b, bHat).result();
    const whole = tensorError(concat(a, b), concat(aHat, bHat));
    expect(acc.maxAbs).toBe(whole.maxAbs);
    expect(acc.rmse).toBeCloseTo(whole.rmse, 12);
    expect(acc.relL2).toBeCloseTo(whole.relL2, 12);
    expect(acc.snrDb).toBeCloseTo(whole.snrDb, 10);
    // not the mean of per-layer values
    const meanRel = (tensorError(a, aHat).relL2 + tensorError(b, bHat).relL2) / 2;
    expect(Math.abs(acc.relL2 - meanRel)).toBeGreaterThan(1e-3);
  });
});

describe('softmaxRows', () => {
  it('softmax of [0, ln 3] is [0.25, 0.75]', () => {
    const p = softmaxRows(f32([0, Math.log(3)]), 2, 1);
    expect(p[0]).toBeCloseTo(0.25, 7);
    expect(p[1]).toBeCloseTo(0.75, 7);
  });

  it('applies the scale and is stable for large scores, row by row', () => {
    const p = softmaxRows(f32([0, 2 * Math.log(3), 2000, 2000]), 2, 0.5);
    expect(p[0]).toBeCloseTo(0.25, 7);
    expect(p[1]).toBeCloseTo(0.75, 7);
    // exp(0.5 · 2000) overflows a naive softmax; max-subtraction keeps the row exact
    expect(Array.from(p.subarray(2))).toEqual([0.5, 0.5]);
  });

  it('rejects a length that is not a multiple of the row', () => {
    expect(() => softmaxRows(f32([1, 2, 3]), 2, 1)).toThrow(/multiple of row length 2/);
  });
});

describe('attention with GQA (4 query heads, 2 KV heads)', () => {
  const shape: AttentionShape = { qHeads: 4, kvHeads: 2, tokens: 2, headDim: 2, nQueries: 1 };
  // KV head 0 serves query heads 0-1, KV head 1 serves 2-3
  const k = f32([1, 0, 0, 1, /* kv head 1 */ 2, 0, 0, 3]);
  const v = f32([1, 2, 3, 4, /* kv head 1 */ 10, 20, 30, 40]);
  const q = f32([1, 2, 3, 4, 5, 6, 7, 8]);

  it('scores: heads 1 and 3 read different KV heads', () => {
    const s = attentionScores(q, k, shape);
    expect(Array.from(s)).toEqual([1, 2, 3, 4, 10, 18, 14, 24]);
  });

  it('output: p · V with the same head mapping', () => {
    const p = f32([1, 0, 0.5, 0.5, 0.25, 0.75, 0, 1]);
    const out = attentionOutput(p, v, shape);
    expect(Array.from(out)).toEqual([1, 2, 2, 3, 25, 35, 30, 40]);
  });

  it('rejects a wrong q length and a non-multiple head count', () => {
    expect(() => attentionScores(q.subarray(1), k, shape)).toThrow(/q: expected 8 elements, got 7/);
    expect(() => attentionScores(q, k, { ...shape, kvHeads: 3 })).toThrow(/not a multiple of kvHeads=3/);
  });
});

describe('attentionProxies', () => {
  const shape1: AttentionShape = { qHeads: 1, kvHeads: 1, tokens: 2, headDim: 2, nQueries: 1 };

  it('KL, TV, sink error, scores and output errors on one row', () => {
    const ref = oneRow([3, 4], [0.25, 0.75], [3, 4]);
    const test = oneRow([3, 5], [0.5, 0.5], [3, 5]);
    const m = attentionProxies(ref, test, shape1);
    // 0.25·ln 0.5 + 0.75·ln 1.5 = -0.1732868 + 0.3040988
    expect(m.kl).toBeCloseTo(0.130812036, 8);
    expect(m.tv).toBeCloseTo(0.25, 12);
    expect(m.sinkMassErr).toBeCloseTo(0.25, 12);
    expect(m.scoresRelL2).toBeCloseTo(0.2, 12);
    expect(m.attnOutRelL2).toBeCloseTo(0.2, 12);
    // (9 + 20) / (5 · √34)
    expect(m.attnOutCosine).toBeCloseTo(0.994692, 6);
    // two tokens: both top-k sets are all tokens (k=2) and the argmax (k=1)
    expect(m.top32Recall).toBe(1);
    expect(m.top1pctRecall).toBe(0);
  });

  it('KL stays finite when the test probability is 0', () => {
    const m = attentionProxies(oneRow([0, 0], [0.5, 0.5], [1, 0]), oneRow([0, 0], [1, 0], [1, 0]), shape1);
    expect(m.kl).toBeCloseTo(0.5 * Math.log(0.5) + 0.5 * Math.log(0.5 / 1e-30), 6);
    expect(Number.isFinite(m.kl)).toBe(true);
  });

  it('top-32 recall 0.5 and top-1% recall 0 over 64 tokens', () => {
    const tokens = 64;
    const ref = Array.from({ length: tokens }, (_, t) => tokens - t); // top 32 = tokens 0..31
    const test = Array.from({ length: tokens }, (_, t) => (t >= 16 && t < 48 ? 100 + t : t)); // 16..47
    const shape = { qHeads: 1, kvHeads: 1, tokens, headDim: 1, nQueries: 1 };
    const m = attentionProxies(oneRow(ref, ref, [1]), oneRow(test, test, [1]), shape);
    expect(m.top32Recall).toBe(0.5);
    expect(m.top1pctRecall).toBe(0); // k = ceil(0.64) = 1: token 0 vs token 47
  });

  it('aggregating two layers equals the metrics of their concatenated rows', () => {
    const shape: AttentionShape = { qHeads: 4, kvHeads: 2, tokens: 50, headDim: 8, nQueries: 3 };
    const layer = (seed: number, noise: number) => {
      const q = lcg(3 * 4 * 8, seed);
      const k = lcg(2 * 50 * 8, seed + 1).map((x) => 3 * x);
      const v = lcg(2 * 50 * 8, seed + 2);
      const kHat = k.map((x, i) => x + noise * Math.sin(i));
      const vHat = v.map((x, i) => x + noise * Math.cos(i));
      const run = (kk: Float32Array, vv: Float32Array): AttentionTensors => {
        const scores = attentionScores(q, kk, shape);
        const probs = softmaxRows(scores, shape.tokens, 1 / Math.sqrt(shape.headDim));
        return { scores, probs, out: attentionOutput(probs, vv, shape) };
      };
      return { ref: run(k, v), test: run(kHat, vHat) };
    };
    const a = layer(10, 0.05);
    const b = layer(20, 0.3);
    const acc = new ProxyAccumulator().add(a.ref, a.test, shape).add(b.ref, b.test, shape).result();
    const join = (x: AttentionTensors, y: AttentionTensors): AttentionTensors => ({
      scores: concat(x.scores, y.scores),
      probs: concat(x.probs, y.probs),
      out: concat(x.out, y.out),
    });
    const whole = attentionProxies(join(a.ref, b.ref), join(a.test, b.test), { ...shape, nQueries: 6 });
    for (const key of Object.keys(whole) as (keyof typeof whole)[]) {
      expect(acc[key], key).toBeCloseTo(whole[key], 10);
    }
    expect(acc.kl).toBeGreaterThan(0);
    expect(acc.top32Recall).toBeLessThan(1);
  });
});

describe('compressionRatio', () => {
  it('fp16 bytes over stored bytes', () => {
    expect(compressionRatio(4096, 1024)).toBe(4);
    expect(compressionRatio(1000, 219)).toBeCloseTo(4.566210, 6);
  });

  it('rejects a codec that stores no bytes', () => {
    expect(() => compressionRatio(4096, 0)).toThrow(PackkvError);
  });
});

describe('causal masking', () => {
  it('a row sees tokens 0..pos: softmax over the visible prefix, zeros after', async () => {
    const { causalVisibility } = await import('../cli/metrics.js');
    const shape = { qHeads: 2, kvHeads: 1, tokens: 3, headDim: 1, nQueries: 2, queryPositions: [0, 1] };
    const visible = causalVisibility(shape)!;
    expect(Array.from(visible)).toEqual([1, 1, 2, 2]);
    const p = softmaxRows(f32([5, 1, 1, 5, 1, 1, 0, Math.log(3), 9, 0, Math.log(3), 9]), 3, 1, visible);
    expect(Array.from(p.subarray(0, 6))).toEqual([1, 0, 0, 1, 0, 0]);
    expect(p[6]).toBeCloseTo(0.25, 7);
    expect(p[7]).toBeCloseTo(0.75, 7);
    expect(p[8]).toBe(0); // the score 9 at a later token is masked, not the maximum
  });

  it('query positions come from q_positions metadata, else the last positions', async () => {
    const { queryPositionsOf } = await import('../cli/bench-run.js');
    const dump = { tokens: 100, metadata: { q_positions: '90..93' } } as never;
    expect(queryPositionsOf(dump, 4)).toEqual([90, 91, 92, 93]);
    expect(queryPositionsOf(dump, 3)).toEqual([97, 98, 99]); // metadata disagrees with the count
  });
});
