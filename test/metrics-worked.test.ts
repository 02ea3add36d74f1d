// docs/metrics.md's worked example: every number in its table recomputed with cli/metrics.ts, to 6 significant digits.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import {
  attentionOutput,
  attentionProxies,
  attentionScores,
  compressionRatio,
  ErrorAccumulator,
  ProxyAccumulator,
  softmaxRows,
  tensorError,
  type AttentionShape,
  type AttentionTensors,
} from '../cli/metrics.js';

/** The doc's `| \`key\` | quantity | value |` rows between the worked-example markers. */
function documentedValues(): Map<string, string> {
  const doc = readFileSync(join(import.meta.dirname, '..', 'docs', 'metrics.md'), 'utf8');
  const table = doc.split('<!-- worked-example:begin -->')[1]?.split('<!-- worked-example:end -->')[0];
  if (table === undefined) throw new Error('docs/metrics.md has no worked-example table');
  const values = new Map<string, string>();
  for (const line of table.split('\n')) {
    const row = /^\| `([^`]+)` \|.*\| ([-+0-9.e]+) \|$/.exec(line.trim());
    if (row) values.set(row[1], row[2]);
  }
  return values;
}

/** The example: one row, T = 3 tokens, D = 2, K̂ swaps the order of tokens 1 and 2, V̂ moves v1 by (0, −0.25). */
function workedExample(): Record<string, number> {
  const shape: AttentionShape = { qHeads: 1, kvHeads: 1, tokens: 3, headDim: 2, nQueries: 1 };
  const q = Float32Array.of(1, 2);
  const k = Float32Array.of(1, 0, 0, 1, 1, 1);
  const kHat = Float32Array.of(1, 0, 0, 1.5, 1, 0.5);
  const v = Float32Array.of(1, 0, 0, 2, 1, 1);
  const vHat = Float32Array.of(1, 0, 0, 1.75, 1, 1);
  const scale = 1 / Math.sqrt(shape.headDim);

  const scores = attentionScores(q, k, shape);
  const probs = softmaxRows(scores, shape.tokens, scale);
  const ref: AttentionTensors = { scores, probs, out: attentionOutput(probs, v, shape) };
  // K record: scores from K̂, exact V. V record: reference probabilities, V̂.
  const kScores = attentionScores(q, kHat, shape);
  const kProbs = softmaxRows(kScores, shape.tokens, scale);
  const kTest: AttentionTensors = { scores: kScores, probs: kProbs, out: attentionOutput(kProbs, v, shape) };
  const vTest: AttentionTensors = { ...ref, out: attentionOutput(probs, vHat, shape) };

  const kErr = tensorError(k, kHat);
  const vErr = tensorError(v, vHat);
  const kProxy = attentionProxies(ref, kTest, shape);
  const vProxy = attentionProxies(ref, vTest, shape);
  const layers = new ErrorAccumulator().add(Float32Array.of(10), Float32Array.of(11)).add(Float32Array.of(10), Float32Array.of(13)).result();
  const twoLayers = new ProxyAccumulator().add(ref, kTest, shape).add(ref, ref, shape).result();

  return {
    'K.maxAbs': kErr.maxAbs, 'K.rmse': kErr.rmse, 'K.relL2': kErr.relL2, 'K.snrDb': kErr.snrDb,
    scoresRelL2: kProxy.scoresRelL2,
    'p[0]': probs[0], 'p[1]': probs[1], 'p[2]': probs[2], 'pt[1]': kProbs[1], 'pt[2]': kProbs[2],
    kl: kProxy.kl, tv: kProxy.tv, top32Recall: kProxy.top32Recall, top1pctRecall: kProxy.top1pctRecall,
    sinkMassErr: kProxy.sinkMassErr,
    'o[0]': ref.out[0], 'o[1]': ref.out[1], 'oK[0]': kTest.out[0], 'oK[1]': kTest.out[1],
    attnOutRelL2: kProxy.attnOutRelL2, attnOutCosine: kProxy.attnOutCosine,
    'V.maxAbs': vErr.maxAbs, 'V.rmse': vErr.rmse, 'V.relL2': vErr.relL2, 'V.snrDb': vErr.snrDb,
    'oV[1]': vTest.out[1], 'V.attnOutRelL2': vProxy.attnOutRelL2, 'V.attnOutCosine': vProxy.attnOutCosine,
    'agg.maxAbs': layers.maxAbs, 'agg.rmse': layers.rmse, 'agg.relL2': layers.relL2, 'agg.snrDb': layers.snrDb,
    'agg2.kl': twoLayers.kl, 'agg2.tv': twoLayers.tv, 'agg2.top1pctRecall': twoLayers.top1pctRecall,
    'agg2.attnOutCosine': twoLayers.attnOutCosine, 'agg2.attnOutRelL2': twoLayers.attnOutRelL2,
    // the default dump's layer-0 byte counts quoted in the doc
    'kivi.K.ratio': compressionRatio(524_288, 98_304),
    'kivi.V.ratio': compressionRatio(524_288, 151_552),
    'tailorkv.K.ratio': compressionRatio(524_288, 33_280),
    'tailorkv.K.totalRatio': compressionRatio(524_288, 33_280 + 491_520),
  };
}

describe('docs/metrics.md worked example', () => {
  const documented = documentedValues();
  const computed = workedExample();

  it('documents every computed quantity and nothing else', () => {
    expect([...documented.keys()].sort()).toEqual(Object.keys(computed).sort());
  });

  it.each(Object.entries(computed))('%s matches the document to 6 significant digits', (key, value) => {
    expect(Number(documented.get(key)).toPrecision(6)).toBe(value.toPrecision(6));
  });

  it('agrees with the closed forms the document derives', () => {
    const a = Math.exp(1 / Math.SQRT2);
    const [p0, p1, p2] = [1, a, a * a].map((x) => x / (1 + a + a * a));
    const norm = Math.hypot(p0 + p2, 2 * p1 + p2);
    const closed: Record<string, number> = {
      'K.rmse': Math.sqrt(0.5 / 6), 'K.relL2': Math.sqrt(1 / 8), 'K.snrDb': 10 * Math.log10(8),
      scoresRelL2: Math.sqrt(1 / 7), kl: (p2 - p1) / Math.SQRT2, tv: p2 - p1,
      attnOutRelL2: (Math.SQRT2 * (p2 - p1)) / norm, 'V.attnOutRelL2': (0.25 * p1) / norm,
      'V.relL2': 0.25 / Math.sqrt(7), 'V.snrDb': 10 * Math.log10(112), 'agg.relL2': Math.sqrt(10 / 200),
      'agg2.attnOutRelL2': (p2 - p1) / norm, 'p[0]': p0, 'p[1]': p1, 'p[2]': p2,
    };
    for (const [key, value] of Object.entries(closed)) {
      expect(computed[key].toPrecision(6), key).toBe(value.toPrecision(6));
    }
  });
});
