// Error and attention-proxy metrics (DESIGN.md "Accounting"): pure functions on f32 data, fp64 sums.

import { PackkvError } from './errors.js';

/** Reconstruction error of one tensor, or of many aggregated exactly. */
export interface TensorError {
  maxAbs: number;
  rmse: number;
  /** ‖x̂−x‖ / ‖x‖ */
  relL2: number;
  /** 10·log10(Σx² / Σ(x̂−x)²); Infinity when exact */
  snrDb: number;
}

/** Shape of one layer's attention problem. q: [nQueries, qHeads, headDim]; K, V: [kvHeads, tokens, headDim]. */
export interface AttentionShape {
  qHeads: number;
  kvHeads: number;
  tokens: number;
  headDim: number;
  nQueries: number;
  /** absolute token position of each query (causal mask: query n sees tokens 0..pos[n]); all tokens when absent */
  queryPositions?: number[];
}

/** The three stages of attention: raw scores q·Kᵀ, softmax probabilities, output p·V. */
export interface AttentionTensors {
  scores: Float32Array;
  probs: Float32Array;
  out: Float32Array;
}

export interface AttentionProxies {
  scoresRelL2: number;
  kl: number;
  tv: number;
  top32Recall: number;
  top1pctRecall: number;
  attnOutRelL2: number;
  attnOutCosine: number;
  sinkMassErr: number;
}

/** Floor for p_test inside KL so a zeroed probability gives a large but finite divergence. */
const KL_FLOOR = 1e-30;

function checkSameLength(a: ArrayLike<number>, b: ArrayLike<number>, what: string): void {
  if (a.length !== b.length) {
    throw new PackkvError(`${what}: length mismatch (${a.length} vs ${b.length})`);
  }
}

function checkLength(a: ArrayLike<number>, expected: number, what: string): void {
  if (a.length !== expected) {
    throw new PackkvError(`${what}: expected ${expected} elements, got ${a.length}`);
  }
}

/** ‖err‖/‖ref‖ from sums of squares; 0/0 counts as exact. */
function relL2FromSums(errSq: number, refSq: number): number {
  if (errSq === 0) return 0;
  return refSq === 0 ? Infinity : Math.sqrt(errSq / refSq);
}

function snrDbFromSums(errSq: number, refSq: number): number {
  if (errSq === 0) return Infinity;
  return 10 * Math.log10(refSq / errSq);
}

/** Accumulates reconstruction error over many tensors: the result is that of their concatenation. */
export class ErrorAccumulator {
  refSq = 0;
  errSq = 0;
  count = 0;
  maxAbs = 0;

  add(original: Float32Array, reconstructed: Float32Array): this {
    checkSameLength(original, reconstructed, 'tensorError');
    let refSq = 0;
    let errSq = 0;
    let maxAbs = this.maxAbs;
    for (let i = 0; i < original.length; i++) {
      const x = original[i];
      const d = reconstructed[i] - x;
      refSq += x * x;
      errSq += d * d;
      const a = Math.abs(d);
      if (a > maxAbs || Number.isNaN(a)) maxAbs = a;
    }
    this.refSq += refSq;
    this.errSq += errSq;
    this.count += original.length;
    this.maxAbs = maxAbs;
    return this;
  }

  result(): TensorError {
    return {
      maxAbs: this.maxAbs,
      rmse: this.count === 0 ? 0 : Math.sqrt(this.errSq / this.count),
      relL2: relL2FromSums(this.errSq, this.refSq),
      snrDb: snrDbFromSums(this.errSq, this.refSq),
    };
  }
}

export function tensorError(original: Float32Array, reconstructed: Float32Array): TensorError {
  return new ErrorAccumulator().add(original, reconstructed).result();
}

/** Validates the shape and returns the GQA group size (query heads per KV head). */
function checkShape(shape: AttentionShape): number {
  for (const [name, v] of Object.entries(shape)) {
    if (name === 'queryPositions') continue; // checked by causalVisibility
    if (!Number.isInteger(v) || v < 0) throw new PackkvError(`attention shape: ${name}=${v} is not a count`);
  }
  if (shape.kvHeads === 0 || shape.qHeads % shape.kvHeads !== 0) {
    throw new PackkvError(`attention shape: qHeads=${shape.qHeads} is not a multiple of kvHeads=${shape.kvHeads}`);
  }
  return shape.qHeads / shape.kvHeads;
}

/** scores[n, h, t] = q[n, h, :] · k[h / group, t, :] (unscaled). */
export function attentionScores(q: Float32Array, k: Float32Array, shape: AttentionShape): Float32Array {
  const group = checkShape(shape);
  const { qHeads, kvHeads, tokens, headDim, nQueries } = shape;
  checkLength(q, nQueries * qHeads * headDim, 'attentionScores: q');
  checkLength(k, kvHeads * tokens * headDim, 'attentionScores: k');
  const scores = new Float32Array(nQueries * qHeads * tokens);
  for (let n = 0; n < nQueries; n++) {
    for (let h = 0; h < qHeads; h++) {
      const qOff = (n * qHeads + h) * headDim;
      const kBase = Math.floor(h / group) * tokens * headDim;
      const sOff = (n * qHeads + h) * tokens;
      for (let t = 0; t < tokens; t++) {
        const kOff = kBase + t * headDim;
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[qOff + d] * k[kOff + d];
        scores[sOff + t] = dot;
      }
    }
  }
  return scores;
}

/** Row-wise softmax(scale · s), max-subtracted for stability. scale is 1/√headDim for attention. */
export function softmaxRows(scores: Float32Array, rowLen: number, scale: number, visible?: ArrayLike<number>): Float32Array {
  if (rowLen <= 0 || scores.length % rowLen !== 0) {
    throw new PackkvError(`softmaxRows: length ${scores.length} is not a multiple of row length ${rowLen}`);
  }
  if (visible && visible.length !== scores.length / rowLen) {
    throw new PackkvError(`softmaxRows: ${visible.length} visibility limits for ${scores.length / rowLen} rows`);
  }
  const probs = new Float32Array(scores.length);
  const exps = new Float64Array(rowLen);
  for (let off = 0, row = 0; off < scores.length; off += rowLen, row++) {
    // Causal attention: the row sees tokens [0, n); the rest get probability 0.
    const n = visible ? Math.max(1, Math.min(rowLen, visible[row])) : rowLen;
    let max = -Infinity;
    for (let t = 0; t < n; t++) max = Math.max(max, scale * scores[off + t]);
    let sum = 0;
    for (let t = 0; t < n; t++) {
      exps[t] = Math.exp(scale * scores[off + t] - max);
      sum += exps[t];
    }
    for (let t = 0; t < n; t++) probs[off + t] = exps[t] / sum;
  }
  return probs;
}

/**
 * Tokens each attention row may see under causal masking: query n at absolute position pos[n]
 * sees tokens 0..pos[n]. Rows are [nQueries, qHeads]. Without positions every row sees all.
 */
export function causalVisibility(shape: AttentionShape): Int32Array | undefined {
  const positions = shape.queryPositions;
  if (!positions) return undefined;
  if (positions.length !== shape.nQueries)
    throw new PackkvError(`causalVisibility: ${positions.length} query positions for ${shape.nQueries} queries`);
  const visible = new Int32Array(shape.nQueries * shape.qHeads);
  for (let n = 0; n < shape.nQueries; n++) visible.fill(positions[n] + 1, n * shape.qHeads, (n + 1) * shape.qHeads);
  return visible;
}

/** out[n, h, :] = Σ_t p[n, h, t] · v[h / group, t, :]. */
export function attentionOutput(p: Float32Array, v: Float32Array, shape: AttentionShape): Float32Array {
  const group = checkShape(shape);
  const { qHeads, kvHeads, tokens, headDim, nQueries } = shape;
  checkLength(p, nQueries * qHeads * tokens, 'attentionOutput: p');
  checkLength(v, kvHeads * tokens * headDim, 'attentionOutput: v');
  const out = new Float32Array(nQueries * qHeads * headDim);
  const acc = new Float64Array(headDim);
  for (let n = 0; n < nQueries; n++) {
    for (let h = 0; h < qHeads; h++) {
      const pOff = (n * qHeads + h) * tokens;
      const vBase = Math.floor(h / group) * tokens * headDim;
      acc.fill(0);
      for (let t = 0; t < tokens; t++) {
        const w = p[pOff + t];
        if (w === 0) continue;
        const vOff = vBase + t * headDim;
        for (let d = 0; d < headDim; d++) acc[d] += w * v[vOff + d];
      }
      out.set(acc, (n * qHeads + h) * headDim);
    }
  }
  return out;
}

/** Marks the k largest entries of row (ties go to the lower index) in `mark`. */
function markTopK(row: Float32Array, k: number, mark: Uint8Array): void {
  mark.fill(0);
  const sorted = Float32Array.from(row).sort();
  const threshold = sorted[row.length - k];
  let taken = 0;
  for (let t = 0; t < row.length && taken < k; t++) {
    if (row[t] > threshold) {
      mark[t] = 1;
      taken++;
    }
  }
  for (let t = 0; t < row.length && taken < k; t++) {
    if (row[t] === threshold) {
      mark[t] = 1;
      taken++;
    }
  }
}

function topKRecall(ref: Float32Array, test: Float32Array, k: number, refMark: Uint8Array, testMark: Uint8Array): number {
  markTopK(ref, k, refMark);
  markTopK(test, k, testMark);
  let hits = 0;
  for (let t = 0; t < ref.length; t++) hits += refMark[t] & testMark[t];
  return hits / k;
}

/** Per-row distribution metrics, summed (the accumulator divides by the row count). */
interface RowSums {
  kl: number;
  tv: number;
  top32: number;
  top1pct: number;
  sink: number;
}

function addDistributionRows(refP: Float32Array, testP: Float32Array, tokens: number, sums: RowSums): void {
  const k32 = Math.min(32, tokens);
  const k1pct = Math.max(1, Math.ceil(0.01 * tokens));
  const refMark = new Uint8Array(tokens);
  const testMark = new Uint8Array(tokens);
  for (let off = 0; off < refP.length; off += tokens) {
    const ref = refP.subarray(off, off + tokens);
    const test = testP.subarray(off, off + tokens);
    let kl = 0;
    let tv = 0;
    for (let t = 0; t < tokens; t++) {
      const p = ref[t];
      if (p > 0) kl += p * Math.log(p / Math.max(test[t], KL_FLOOR));
      tv += Math.abs(p - test[t]);
    }
    sums.kl += kl;
    sums.tv += 0.5 * tv;
    sums.top32 += topKRecall(ref, test, k32, refMark, testMark);
    sums.top1pct += topKRecall(ref, test, k1pct, refMark, testMark);
    sums.sink += Math.abs(test[0] - ref[0]);
  }
}

function cosine(a: Float32Array, b: Float32Array): number {
  let dot = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  if (aa === 0 && bb === 0) return 1;
  if (aa === 0 || bb === 0) return 0;
  return dot / Math.sqrt(aa * bb);
}

/** Scores at or below this are masked (a sparse codec's unselected tokens), not estimates. */
export const MASKED_SCORE = -1e29;

function sumSquares(ref: Float32Array, test: Float32Array, skipMasked = false): { refSq: number; errSq: number } {
  let refSq = 0;
  let errSq = 0;
  for (let i = 0; i < ref.length; i++) {
    if (skipMasked && test[i] <= MASKED_SCORE) continue;
    const d = test[i] - ref[i];
    refSq += ref[i] * ref[i];
    errSq += d * d;
  }
  return { refSq, errSq };
}

/**
 * Aggregates attention proxies over layers: row metrics are averaged over all rows of all layers
 * (a row-count-weighted mean of per-layer means), relative L2s come from global sums of squares.
 */
export class ProxyAccumulator {
  rows = 0;
  scoresRefSq = 0;
  scoresErrSq = 0;
  outRefSq = 0;
  outErrSq = 0;
  cosineSum = 0;
  readonly rowSums: RowSums = { kl: 0, tv: 0, top32: 0, top1pct: 0, sink: 0 };

  add(ref: AttentionTensors, test: AttentionTensors, shape: AttentionShape): this {
    checkShape(shape);
    const { qHeads, tokens, headDim, nQueries } = shape;
    const rows = nQueries * qHeads;
    for (const [name, t] of [['ref', ref], ['test', test]] as const) {
      checkLength(t.scores, rows * tokens, `attentionProxies: ${name} scores`);
      checkLength(t.probs, rows * tokens, `attentionProxies: ${name} probs`);
      checkLength(t.out, rows * headDim, `attentionProxies: ${name} out`);
    }
    const scores = sumSquares(ref.scores, test.scores, true); // masked scores show in KL/TV/recall instead
    this.scoresRefSq += scores.refSq;
    this.scoresErrSq += scores.errSq;
    const out = sumSquares(ref.out, test.out);
    this.outRefSq += out.refSq;
    this.outErrSq += out.errSq;
    for (let r = 0; r < rows; r++) {
      const span = [r * headDim, (r + 1) * headDim] as const;
      this.cosineSum += cosine(ref.out.subarray(...span), test.out.subarray(...span));
    }
    if (tokens > 0) addDistributionRows(ref.probs, test.probs, tokens, this.rowSums);
    this.rows += rows;
    return this;
  }

  result(): AttentionProxies {
    const mean = (sum: number) => (this.rows === 0 ? 0 : sum / this.rows);
    return {
      scoresRelL2: relL2FromSums(this.scoresErrSq, this.scoresRefSq),
      kl: mean(this.rowSums.kl),
      tv: mean(this.rowSums.tv),
      top32Recall: mean(this.rowSums.top32),
      top1pctRecall: mean(this.rowSums.top1pct),
      attnOutRelL2: relL2FromSums(this.outErrSq, this.outRefSq),
      attnOutCosine: this.rows === 0 ? 1 : this.cosineSum / this.rows,
      sinkMassErr: mean(this.rowSums.sink),
    };
  }
}

export function attentionProxies(ref: AttentionTensors, test: AttentionTensors, shape: AttentionShape): AttentionProxies {
  return new ProxyAccumulator().add(ref, test, shape).result();
}

/** fp16 bytes ÷ stored bytes (DESIGN.md "Accounting"); a codec that stores nothing is a bug. */
export function compressionRatio(fp16Bytes: number, storedBytes: number): number {
  if (!(storedBytes > 0)) {
    throw new PackkvError(`compression ratio: stored bytes must be positive, got ${storedBytes}`);
  }
  return fp16Bytes / storedBytes;
}
