// Per-layer codec specs: resolves TailorKV's mode=auto to mode=q or mode=s per layer (tailorkv.md §3.2).
//
// The original classifies layers once per model, offline, on a calibration prompt. Here the same
// "dense preference" rule runs on each dump's own queries, so every dump gets its own layer list.
// Override: qlayers=N makes the layers with index < N mode=q and all others mode=s (the paper's
// shipped lists are prefixes: {0} is qlayers=1, {0,1} is qlayers=2). The registry splits specs on
// ',' and knows only int/float/enum values, so a list like "q:0,1;s:rest" could not survive it;
// a prefix count does, and is validated by the registry like any other parameter.
import { PackkvError } from './errors.js';
import type { AttentionShape } from './metrics.js';
import { native } from './native.js';

/** One layer as the bench holds it: queries [nQueries, qHeads, headDim], keys [kvHeads, tokens, headDim]. */
export interface LayerAttention {
  layer: number;
  q: Float32Array;
  k: Float32Array;
  shape: AttentionShape;
}

/** The rule reads the last RULE_QUERIES query rows of every head (the reference's n_q). */
export const RULE_QUERIES = 32;

export interface LayerDecision {
  layer: number;
  mode: 'q' | 's';
  /** mean attention mass outside the top alpha of tokens; null when qlayers decided */
  score: number | null;
}

function checkLayer(l: LayerAttention): void {
  const { qHeads, kvHeads, tokens, headDim, nQueries } = l.shape;
  const where = `layer ${l.layer}`;
  if (nQueries < 1 || qHeads < 1)
    throw new PackkvError(`${where}: the TailorKV layer rule needs queries (give qlayers=N, or mode=q or mode=s)`);
  if (kvHeads < 1 || qHeads % kvHeads !== 0)
    throw new PackkvError(`${where}: ${qHeads} query heads is not a multiple of ${kvHeads} KV heads`);
  if (l.q.length !== nQueries * qHeads * headDim)
    throw new PackkvError(`${where}: queries hold ${l.q.length} values, shape needs ${nQueries * qHeads * headDim}`);
  if (l.k.length !== kvHeads * tokens * headDim)
    throw new PackkvError(`${where}: keys hold ${l.k.length} values, shape needs ${kvHeads * tokens * headDim}`);
}

/**
 * P = mean over the last RULE_QUERIES queries and all heads of the softmax(q·Kᵀ/√D) mass outside
 * the top floor(alpha·T) tokens (causal when the shape gives query positions; query head h reads
 * KV head h / (qHeads/kvHeads)).
 */
export function densePreferenceScore(l: LayerAttention, alpha: number): number {
  checkLayer(l);
  const { qHeads, kvHeads, tokens, headDim, nQueries } = l.shape;
  const top = Math.floor(alpha * tokens);
  const first = Math.max(0, nQueries - RULE_QUERIES);
  const scale = 1 / Math.sqrt(headDim);
  const probs = new Float64Array(tokens);
  let outside = 0;
  for (let n = first; n < nQueries; n++)
    for (let h = 0; h < qHeads; h++) {
      const qOff = (n * qHeads + h) * headDim;
      const kBase = Math.floor(h / (qHeads / kvHeads)) * tokens * headDim;
      const visible = l.shape.queryPositions ? Math.min(tokens, l.shape.queryPositions[n] + 1) : tokens;
      let max = -Infinity;
      probs.fill(0);
      for (let t = 0; t < visible; t++) {
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += l.q[qOff + d] * l.k[kBase + t * headDim + d];
        probs[t] = dot * scale;
        max = Math.max(max, probs[t]);
      }
      let sum = 0;
      for (let t = 0; t < visible; t++) sum += (probs[t] = Math.exp(probs[t] - max));
      probs.sort();
      let topMass = 0;
      for (let i = 0; i < top; i++) topMass += probs[tokens - 1 - i];
      outside += 1 - topMass / sum;
    }
  return outside / ((nQueries - first) * qHeads);
}

function paramMap(canonical: string): Map<string, string> {
  return new Map(canonical.split(',').filter(Boolean).map((kv) => kv.split('=', 2) as [string, string]));
}

/** The decision per layer for a tailorkv spec whose mode is auto (throws for other specs). */
export function decideLayerModes(spec: string, layers: LayerAttention[]): LayerDecision[] {
  const { codec, params } = native().parseCodec(spec);
  const p = paramMap(params);
  if (codec !== 'tailorkv' || p.get('mode') !== 'auto')
    throw new PackkvError(`'${spec}': only a tailorkv spec with mode=auto has per-layer decisions`);
  const qlayers = Number(p.get('qlayers'));
  const alpha = Number(p.get('alpha'));
  const tau = Number(p.get('tau'));
  return layers.map((l) => {
    if (qlayers >= 0) return { layer: l.layer, mode: l.layer < qlayers ? 'q' : 's', score: null };
    const score = densePreferenceScore(l, alpha);
    return { layer: l.layer, mode: score > tau ? 'q' : 's', score };
  });
}

/**
 * One codec spec per layer. tailorkv with mode=auto (the default): mode=q or mode=s by the rule or
 * by qlayers, as a full canonical spec; tailorkv with mode=q|s and any other codec: `spec` as given.
 */
export function resolveLayerSpecs(spec: string, layers: LayerAttention[]): string[] {
  if (spec.split(':')[0] !== 'tailorkv') return layers.map(() => spec);
  const { params } = native().parseCodec(spec);
  const p = paramMap(params);
  if (p.get('mode') !== 'auto') {
    if (p.get('qlayers') !== '-1')
      throw new PackkvError(`'${spec}': qlayers chooses modes per layer, so it needs mode=auto, not mode=${p.get('mode')}`);
    return layers.map(() => spec);
  }
  return decideLayerModes(spec, layers).map(({ mode }) => `tailorkv:${params.replace(/^mode=auto/, `mode=${mode}`)}`);
}
