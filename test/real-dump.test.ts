// Every codec's default settings on every layer of the embedded real dump: fused products agree
// with decode-then-multiply, every stored byte is accounted for, output bytes are deterministic,
// and KVComp's error bound holds on real keys and values.
import { describe, expect, it } from 'vitest';

import { defaultDumpFiles } from '../cli/dumps.js';
import { loadLayer, openDump } from '../cli/io/dump.js';
import { layerAttention } from './real-dump-helpers.js';
import { native } from '../cli/native.js';
import { resolveLayerSpecs } from '../cli/layer-policy.js';
import { relDiff, streamBody } from './helpers.js';

const nat = native();
const dump = await openDump(defaultDumpFiles());
const layers = await Promise.all(dump.layers.map((ref) => loadLayer(dump, ref)));
const shape = { kvHeads: dump.kvHeads, tokens: dump.tokens, headDim: dump.headDim };
const attention = layerAttention(dump, layers);

/** Decode-then-multiply reference in double: scores [nq, qHeads, T] and outputs [nq, qHeads, D]. */
function products(k: Float32Array, v: Float32Array, q: Float32Array, p: Float32Array) {
  const { kvHeads, tokens: T, headDim: D } = shape;
  const qHeads = dump.heads;
  const nq = dump.nQueries;
  const scores = new Float32Array(nq * qHeads * T);
  const out = new Float32Array(nq * qHeads * D);
  for (let n = 0; n < nq; n++)
    for (let h = 0; h < qHeads; h++) {
      const kh = Math.floor(h / (qHeads / kvHeads));
      const row = n * qHeads + h;
      for (let t = 0; t < T; t++) {
        let s = 0;
        for (let d = 0; d < D; d++) s += q[row * D + d] * k[(kh * T + t) * D + d];
        scores[row * T + t] = s;
        const pt = p[row * T + t];
        for (let d = 0; d < D; d++) out[row * D + d] += pt * v[(kh * T + t) * D + d];
      }
    }
  return { scores, out };
}

const specs = nat.codecs().flatMap((c) => c.defaultRuns);

describe.each(specs)('%s on the embedded real dump', (spec) => {
  const perLayer = resolveLayerSpecs(spec, attention);

  it('fused q·Kᵀ and p·V equal decode-then-multiply on every layer (real queries, GQA)', async () => {
    for (let li = 0; li < layers.length; li++) {
      const { k, v, q } = layers[li];
      const ek = await nat.encode(perLayer[li], 'K', k, shape);
      const ev = await nat.encode(perLayer[li], 'V', v, shape);
      const p = new Float32Array(dump.nQueries * dump.heads * dump.tokens).map((_, i) => ((i * 7919) % 1000) / 1000 / dump.tokens);
      const ref = products(await nat.decode(ek.stream), await nat.decode(ev.stream), q!, p);
      const scores = await nat.qk(ek.stream, q!, dump.heads, dump.nQueries);
      // sparse layers mask unselected tokens (≤ −1e29): compare the tokens the codec kept
      const kept = scores.map((s, i) => (s <= -1e29 ? ref.scores[i] : s));
      expect(relDiff(kept, ref.scores)).toBeLessThan(1e-5);
      expect(relDiff(await nat.pv(ev.stream, p, dump.heads, dump.nQueries), ref.out)).toBeLessThan(1e-5);
    }
  });

  it('counts every body byte and encodes deterministically', async () => {
    for (let li = 0; li < layers.length; li++)
      for (const [kind, x] of [['K', layers[li].k], ['V', layers[li].v]] as const) {
        const a = await nat.encode(perLayer[li], kind, x, shape);
        const b = await nat.encode(perLayer[li], kind, x, shape);
        const body = streamBody(a.stream).byteLength;
        expect(a.deviceBytes + a.breakdown.host).toBe(body);
        expect(Buffer.from(a.stream).equals(Buffer.from(b.stream))).toBe(true);
      }
  });
});

describe('kvcomp error bound on the real dump', () => {
  it('|x − x̂| ≤ scale/2 with scale = rel × unit range (fp16, rounded up), coded tokens only', async () => {
    const { tokens: T, headDim: D, kvHeads: H } = shape;
    const half = (v: number) => v * (1 + 2 ** -10); // an fp16 scale rounded up is at most 1 ulp above
    for (const { k, v } of layers) {
      for (const [kind, x, rel, block, recent] of [['K', k, 0.05, 64, 128], ['V', v, 0.1, 128, 256]] as const) {
        const y = await nat.decode((await nat.encode(`kvcomp:k_rel=0.05,v_rel=0.1`, kind, x, shape)).stream);
        const coded = Math.max(0, T - (T % block) - (recent - block));
        const unit = kind === 'K' ? 64 : 1; // K: one step per 64-token block; V: one per token
        let worst = 0;
        for (let t0 = 0; t0 < coded; t0 += unit) {
          let lo = Infinity;
          let hi = -Infinity;
          for (let h = 0; h < H; h++)
            for (let t = t0; t < t0 + unit; t++)
              for (let d = 0; d < D; d++) {
                const e = x[(h * T + t) * D + d];
                lo = Math.min(lo, e);
                hi = Math.max(hi, e);
              }
          const bound = half(rel * (hi - lo)) / 2;
          for (let h = 0; h < H; h++)
            for (let t = t0; t < t0 + unit; t++)
              for (let d = 0; d < D; d++) {
                const i = (h * T + t) * D + d;
                worst = Math.max(worst, Math.abs(x[i] - y[i]) / (bound + 1e-6 * Math.abs(x[i])));
              }
        }
        expect(worst).toBeLessThanOrEqual(1);
        expect(worst).toBeGreaterThan(0.5); // the bound is nearly reached: the test can fail
        let tailErr = 0; // the fp16 tail is stored exactly
        for (let h = 0; h < H; h++)
          for (let t = coded; t < T; t++)
            for (let d = 0; d < D; d++) tailErr = Math.max(tailErr, Math.abs(y[(h * T + t) * D + d] - x[(h * T + t) * D + d]));
        expect(tailErr).toBe(0);
      }
    }
  });
});
