// The measurement behind `packkv bench`: every codec over every layer of every dump, as BenchRecords.
import { performance } from 'node:perf_hooks';

import { PackkvError } from './errors.js';
import { loadLayer, type KvDump } from './io/dump.js';
import { resolveLayerSpecs } from './layer-policy.js';
import {
  attentionOutput,
  attentionScores,
  ErrorAccumulator,
  ProxyAccumulator,
  causalVisibility,
  softmaxRows,
  type AttentionShape,
  type AttentionTensors,
} from './metrics.js';
import { native, type ByteBreakdown, type EncodedTensor, type TensorKind } from './native.js';
import type { BenchRecord } from './results.js';

export interface BenchContext {
  runId: string;
  gitCommit: string | null;
  /**
   * 'cuda': encode, decode and the products run on the GPU for codecs with CUDA kernels (the GPU
   * encoder's bytes are checked against the CPU encoder's stream on every tensor)
   */
  device: 'cpu' | 'cuda';
  /** timed GPU repeats (median reported) */
  gpuRepeats?: number;
  allowNonFinite: boolean;
  /** called after each (dump, layer, codec) step */
  onStep?: (label: string) => void;
}

/** One layer's attention problem and its exact (uncompressed) reference. */
interface LayerProblem {
  k: Float32Array;
  v: Float32Array;
  q: Float32Array;
  shape: AttentionShape;
  proxy: 'queries' | 'self-keys';
  ref: AttentionTensors;
}

/** Stand-in queries when a dump has none: the last keys of each KV head ([nq, kvHeads, D]). */
function selfKeyQueries(k: Float32Array, kvHeads: number, tokens: number, headDim: number, nq: number): Float32Array {
  const q = new Float32Array(nq * kvHeads * headDim);
  for (let n = 0; n < nq; n++)
    for (let h = 0; h < kvHeads; h++) {
      const t = tokens - nq + n;
      q.set(k.subarray((h * tokens + t) * headDim, (h * tokens + t + 1) * headDim), (n * kvHeads + h) * headDim);
    }
  return q;
}

/**
 * Positions of the queries: the dump's metadata `q_positions` ("a..b") when it agrees with the
 * query count, else the last nQueries positions (DESIGN.md: the last decode steps). Stand-in
 * self-key queries are the last keys, at the same positions.
 */
export function queryPositionsOf(dump: KvDump, nQueries: number): number[] {
  const m = /^(\d+)\.\.(\d+)$/.exec(dump.metadata.q_positions ?? '');
  if (m && Number(m[2]) - Number(m[1]) + 1 === nQueries && Number(m[2]) < dump.tokens)
    return Array.from({ length: nQueries }, (_, n) => Number(m[1]) + n);
  return Array.from({ length: nQueries }, (_, n) => dump.tokens - nQueries + n);
}

async function layerProblem(dump: KvDump, layerIndex: number, allowNonFinite: boolean): Promise<LayerProblem> {
  const { k, v, q } = await loadLayer(dump, dump.layers[layerIndex], { allowNonFinite });
  const { kvHeads, tokens, headDim } = dump;
  const proxy = q ? 'queries' : 'self-keys';
  const nQueries = q ? dump.nQueries : Math.min(16, tokens);
  const qHeads = q ? dump.heads : kvHeads;
  const queries = q ?? selfKeyQueries(k, kvHeads, tokens, headDim, nQueries);
  const queryPositions = queryPositionsOf(dump, nQueries);
  const shape: AttentionShape = { qHeads, kvHeads, tokens, headDim, nQueries, queryPositions };
  const scores = attentionScores(queries, k, shape);
  const probs = softmaxRows(scores, tokens, 1 / Math.sqrt(headDim), causalVisibility(shape));
  return { k, v, q: queries, shape, proxy, ref: { scores, probs, out: attentionOutput(probs, v, shape) } };
}

interface TensorRun {
  /** where decode and the product ran (a stream without CUDA kernels falls back to the CPU) */
  device: 'cpu' | 'cuda';
  encoded: EncodedTensor;
  decoded: Float32Array;
  encodeMs: number;
  decodeMs: number;
  productMs: number;
  test: AttentionTensors;
}

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const value = await fn();
  return [value, performance.now() - t0];
}

async function runTensor(spec: string, kind: TensorKind, p: LayerProblem, label: string, gpu: { repeats: number } | null): Promise<TensorRun> {
  const nat = native();
  const { kvHeads, tokens, headDim, qHeads, nQueries } = p.shape;
  const data = kind === 'K' ? p.k : p.v;
  const [encoded, cpuEncodeMs] = await timed(() => nat.encode(spec, kind, data, { kvHeads, tokens, headDim }, label));
  // On the GPU the times are CUDA-event medians of the kernels alone; on the CPU, wall time of one call.
  // A stream the GPU has no kernels for (e.g. one mode of a per-layer codec) runs on the CPU reference.
  let device: 'cpu' | 'cuda' = gpu ? 'cuda' : 'cpu';
  let encodeMs = cpuEncodeMs;
  if (gpu) {
    // The GPU encoder runs on the same tensor; the addon throws unless its body equals encoded.stream's.
    try {
      encodeMs = (await nat.gpuRun('encode', encoded.stream, data, 1, 1, gpu.repeats, label)).medianMs;
    } catch (e) {
      if (!/no CUDA kernels/.test((e as Error).message)) throw e;
    }
  }
  const onGpuOrCpu = async (op: 'decode' | 'qk' | 'pv', x: Float32Array | null): Promise<[Float32Array, number]> => {
    if (device === 'cuda') {
      try {
        const r = await nat.gpuRun(op, encoded.stream, x, qHeads, nQueries, gpu!.repeats, label);
        return [r.result, r.medianMs];
      } catch (e) {
        if (!/no CUDA kernels/.test((e as Error).message)) throw e;
        device = 'cpu';
      }
    }
    if (op === 'decode') return timed(() => nat.decode(encoded.stream, label));
    return timed(() => (op === 'qk' ? nat.qk : nat.pv)(encoded.stream, x!, qHeads, nQueries, label));
  };
  const decodeOn = () => onGpuOrCpu('decode', null);
  const productOn = (op: 'qk' | 'pv', x: Float32Array) => onGpuOrCpu(op, x);
  const [decoded, decodeMs] = await decodeOn();
  if (kind === 'K') {
    // Scores come from the fused product on the compressed stream, not from the decoded tensor.
    const [scores, productMs] = await productOn('qk', p.q);
    const probs = softmaxRows(scores, tokens, 1 / Math.sqrt(headDim), causalVisibility(p.shape));
    return { encoded, decoded, encodeMs, decodeMs, productMs, device, test: { scores, probs, out: attentionOutput(probs, p.v, p.shape) } };
  }
  const [out, productMs] = await productOn('pv', p.ref.probs);
  return { encoded, decoded, encodeMs, decodeMs, productMs, device, test: { ...p.ref, out } };
}

/** Sums of one codec × tensor over the layers of a dump, for the layer='all' record. */
/** Rows of one query head: [nQueries, 1, ...] slices of [nQueries, qHeads, ...] attention tensors. */
function headSlice(t: AttentionTensors, shape: AttentionShape, h: number): AttentionTensors {
  const pick = (x: Float32Array, width: number) => {
    const out = new Float32Array(shape.nQueries * width);
    for (let n = 0; n < shape.nQueries; n++) out.set(x.subarray((n * shape.qHeads + h) * width, (n * shape.qHeads + h + 1) * width), n * width);
    return out;
  };
  return { scores: pick(t.scores, shape.tokens), probs: pick(t.probs, shape.tokens), out: pick(t.out, shape.headDim) };
}

class TensorTotals {
  error = new ErrorAccumulator();
  proxies = new ProxyAccumulator();
  /** the same proxies for each query head alone */
  headProxies: ProxyAccumulator[] = [];
  breakdown: ByteBreakdown = { payload: 0, scales: 0, zeros: 0, residual: 0, metadata: 0, host: 0 };
  fp16Bytes = 0;
  encodeMs = 0;
  decodeMs = 0;
  productMs = 0;
  layers = 0;
  cpuLayers = 0;

  /** params: the aggregate's parameter string; per-layer totals take the layer's own. */
  constructor(public params = '') {}

  add(run: TensorRun, p: LayerProblem, fp16Bytes: number, original: Float32Array): void {
    this.error.add(original, run.decoded);
    this.proxies.add(p.ref, run.test, p.shape);
    const oneHead: AttentionShape = { ...p.shape, qHeads: 1, kvHeads: 1 };
    for (let h = 0; h < p.shape.qHeads; h++) {
      this.headProxies[h] ??= new ProxyAccumulator();
      this.headProxies[h].add(headSlice(p.ref, p.shape, h), headSlice(run.test, p.shape, h), oneHead);
    }
    for (const key of Object.keys(this.breakdown) as (keyof ByteBreakdown)[]) this.breakdown[key] += run.encoded.breakdown[key];
    this.fp16Bytes += fp16Bytes;
    this.encodeMs += run.encodeMs;
    this.decodeMs += run.decodeMs;
    this.productMs += run.productMs;
    this.layers += 1;
    if (run.device === 'cpu') this.cpuLayers += 1;
    if (this.params === '') this.params = run.encoded.params;
  }
}

function makeRecord(
  ctx: BenchContext,
  dump: KvDump,
  layer: number | 'all',
  kind: TensorKind,
  codec: string,
  proxy: LayerProblem['proxy'],
  t: TensorTotals,
): BenchRecord {
  const err = t.error.result();
  const px = t.proxies.result();
  const b = t.breakdown;
  const deviceBytes = b.payload + b.scales + b.zeros + b.residual + b.metadata;
  const isK = kind === 'K';
  const mixed = t.cpuLayers > 0 && t.cpuLayers < t.layers;
  const mbps = (ms: number) => (ms > 0 ? t.fp16Bytes / 1e6 / (ms / 1e3) : null);
  return {
    schema: 1,
    runId: ctx.runId,
    time: new Date().toISOString(),
    dump: dump.name,
    dumpFiles: dump.files,
    layer,
    tensor: kind,
    codec,
    params: t.params,
    device: ctx.device === 'cuda' && t.cpuLayers === t.layers ? 'cpu' : ctx.device,
    gitCommit: ctx.gitCommit,
    kvHeads: dump.kvHeads,
    heads: dump.heads || dump.kvHeads,
    tokens: dump.tokens,
    headDim: dump.headDim,
    fp16Bytes: t.fp16Bytes,
    deviceBytes,
    hostBytes: b.host,
    totalBytes: deviceBytes + b.host,
    breakdown: { ...b },
    compressionRatio: t.fp16Bytes / deviceBytes,
    totalCompressionRatio: t.fp16Bytes / (deviceBytes + b.host),
    ...err,
    proxy,
    scoresRelL2: isK ? px.scoresRelL2 : null,
    kl: isK ? px.kl : null,
    tv: isK ? px.tv : null,
    top32Recall: isK ? px.top32Recall : null,
    top1pctRecall: isK ? px.top1pctRecall : null,
    attnOutRelL2: px.attnOutRelL2,
    attnOutCosine: px.attnOutCosine,
    sinkMassErr: isK ? px.sinkMassErr : null,
    headAttnOutRelL2: t.headProxies.map((a) => a.result().attnOutRelL2),
    headKl: isK ? t.headProxies.map((a) => a.result().kl) : null,
    headTop32Recall: isK ? t.headProxies.map((a) => a.result().top32Recall) : null,
    encodeMBps: mbps(t.encodeMs) ?? 0,
    decodeMBps: mbps(t.decodeMs) ?? 0,
    // Times summed over layers that ran on different devices compare with nothing: leave them out.
    qkMs: isK && !mixed ? t.productMs : null,
    pvMs: !isK && !mixed ? t.productMs : null,
    notes: [
      ...(ctx.device === 'cuda' && t.cpuLayers > 0
        ? [`${t.cpuLayers} of ${t.layers} layers ran on the CPU reference (no CUDA kernels for their streams)` +
            (mixed ? '; product times left out (mixed devices)' : '')]
        : []),
      ...(proxy === 'self-keys' ? ['proxy=self-keys: the dump has no queries; its last keys stand in'] : []),
      ...(dump.postRope ? [] : ['keys are pre-RoPE (dump metadata)']),
    ],
  };
}

/** A dump with every layer's attention problem loaded: evaluated many times by sweeps and tune. */
export interface LoadedDump {
  dump: KvDump;
  problems: LayerProblem[];
}

export async function loadDumpProblems(dump: KvDump, allowNonFinite: boolean): Promise<LoadedDump> {
  const problems: LayerProblem[] = [];
  for (let li = 0; li < dump.layers.length; li++) problems.push(await layerProblem(dump, li, allowNonFinite));
  return { dump, problems };
}

/**
 * One codec spec over every layer of a loaded dump, for the given tensors: per-layer records then
 * the dump-wide aggregate per tensor. Per-layer codecs (TailorKV's quantize-or-offload rule)
 * decide from every layer's queries before any layer is encoded.
 */
export async function evaluateSpec(
  loaded: LoadedDump,
  spec: string,
  ctx: BenchContext,
  kinds: readonly TensorKind[] = ['K', 'V'],
): Promise<BenchRecord[]> {
  const { dump, problems } = loaded;
  const attention = problems.map((p, li) => ({ layer: dump.layers[li].layer, q: p.q, k: p.k, shape: p.shape }));
  const layerSpecs = resolveLayerSpecs(spec, attention);
  const canonical = native().parseCodec(spec);
  const onGpu = ctx.device === 'cuda' && native().gpuCodecs().includes(canonical.codec);
  const gpu = onGpu ? { repeats: ctx.gpuRepeats ?? 20 } : null;
  const specCtx: BenchContext = { ...ctx, device: onGpu ? 'cuda' : 'cpu' };
  const records: BenchRecord[] = [];
  const totals = new Map(kinds.map((k) => [k, new TensorTotals(canonical.params)]));
  for (let li = 0; li < dump.layers.length; li++) {
    const problem = problems[li];
    const fp16Bytes = problem.k.length * 2;
    for (const kind of kinds) {
      const entry = kind === 'K' ? dump.layers[li].key : dump.layers[li].value;
      const run = await runTensor(layerSpecs[li], kind, problem, entry.name, gpu).catch((e: Error) => {
        throw new PackkvError(e.message.replace(/^tensor '[^']*': /, ''), entry.file, entry.name);
      });
      const original = kind === 'K' ? problem.k : problem.v;
      const layerTotals = new TensorTotals();
      layerTotals.add(run, problem, fp16Bytes, original);
      records.push(makeRecord(specCtx, dump, dump.layers[li].layer, kind, canonical.codec, problem.proxy, layerTotals));
      totals.get(kind)!.add(run, problem, fp16Bytes, original);
    }
    ctx.onStep?.(`${dump.name} layer ${dump.layers[li].layer} ${spec}`);
  }
  const proxy = problems[0]?.proxy ?? 'queries';
  for (const kind of kinds) records.push(makeRecord(specCtx, dump, 'all', kind, canonical.codec, proxy, totals.get(kind)!));
  return records;
}

/** Runs every codec on every layer of one dump; returns per-layer and dump-wide records. */
export async function benchDump(dump: KvDump, specs: string[], ctx: BenchContext): Promise<BenchRecord[]> {
  const loaded = await loadDumpProblems(dump, ctx.allowNonFinite);
  const records: BenchRecord[] = [];
  for (const spec of specs) records.push(...(await evaluateSpec(loaded, spec, ctx)));
  return records;
}
