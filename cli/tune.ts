// `packkv tune`: per codec, the most compressing setting whose attention proxy stays within a target
// on every layer, found on the codec's tune knob (bisection for error bounds, a scan for bit widths),
// for K and V separately as PackKV does.
import { evaluateSpec, type BenchContext, type LoadedDump } from './bench-run.js';
import { PackkvError } from './errors.js';
import { native, type CodecInfo, type CodecParamSpec, type TensorKind } from './native.js';
import type { BenchRecord } from './results.js';

export type TargetMetric = 'attnOutRelL2' | 'kl' | 'top32Recall';

export interface TuneTarget {
  /** the name on the command line: attn_out_rel, kl, top32_recall */
  name: string;
  metric: TargetMetric;
  limit: number;
  /** recall must stay at or above the limit; errors at or below it */
  atLeast: boolean;
}

const TARGETS: Record<string, { metric: TargetMetric; atLeast: boolean }> = {
  attn_out_rel: { metric: 'attnOutRelL2', atLeast: false },
  kl: { metric: 'kl', atLeast: false },
  top32_recall: { metric: 'top32Recall', atLeast: true },
};

export function parseTarget(text: string): TuneTarget {
  const m = /^([a-z0-9_]+)=([\d.eE+-]+)$/.exec(text);
  const known = Object.keys(TARGETS).join(', ');
  if (!m || !(m[1] in TARGETS) || !Number.isFinite(Number(m[2])))
    throw new PackkvError(`--target '${text}': expected NAME=VALUE with NAME one of ${known}, e.g. attn_out_rel=0.01`);
  return { name: m[1], ...TARGETS[m[1]], limit: Number(m[2]) };
}

/** The per-layer worst value of the target metric over a tensor's records (null: not defined for it). */
function worstOverLayers(records: BenchRecord[], target: TuneTarget): number | null {
  const values = records.filter((r) => r.layer !== 'all').map((r) => r[target.metric]);
  if (values.some((v) => v === null)) return null;
  const nums = values as number[];
  return target.atLeast ? Math.min(...nums) : Math.max(...nums);
}

function passes(value: number, target: TuneTarget): boolean {
  return target.atLeast ? value >= target.limit : value <= target.limit;
}

export interface TunedTensor {
  kind: TensorKind;
  /** the full spec of the chosen setting, or null when no setting meets the target */
  spec: string | null;
  knob: string;
  value: string | null;
  ratio: number | null;
  fp16Bytes: number;
  deviceBytes: number | null;
  /** the target metric at the chosen setting (worst layer) */
  achieved: number | null;
  /** the attention-output error at the chosen setting (worst layer) */
  attnOutWorst: number | null;
  /** the target it was held to (a K-only metric tunes V on attn_out_rel at K's achieved value) */
  heldTo: TuneTarget;
  evaluations: number;
}

export interface FrontierRow {
  codec: string;
  k: TunedTensor;
  v: TunedTensor;
  totalRatio: number | null;
  /** total ratio ÷ tuned KIVI's total ratio − 1 */
  vsKivi: number | null;
}

function knobFor(codec: CodecInfo, kind: TensorKind): CodecParamSpec | undefined {
  return codec.params.find((p) => p.tune !== undefined && p.tune.replace(/[+-]$/, '').includes(kind));
}

export function tunableCodecs(): CodecInfo[] {
  return native().codecs().filter((c) => knobFor(c, 'K') && knobFor(c, 'V'));
}

interface Probe {
  value: string;
  ok: boolean;
  achieved: number;
  /** worst-layer attention-output error at this setting (what V is held to for key-only targets) */
  attnOut: number;
  aggregate: BenchRecord;
}

async function probe(loaded: LoadedDump, codec: string, knob: string, value: string, kind: TensorKind, target: TuneTarget, ctx: BenchContext, sink: BenchRecord[]): Promise<Probe> {
  const records = await evaluateSpec(loaded, `${codec}:${knob}=${value}`, ctx, [kind]);
  sink.push(...records);
  const metric = target.metric;
  const worst = worstOverLayers(records, target);
  if (worst === null) throw new PackkvError(`target ${target.name}: ${metric} is not defined for ${kind} records`);
  const attnOut = Math.max(...records.filter((r) => r.layer !== 'all').map((r) => r.attnOutRelL2));
  return { value, ok: passes(worst, target), achieved: worst, attnOut, aggregate: records.find((r) => r.layer === 'all')! };
}

/** Values to scan for a discrete knob, or a log-space bisection for a continuous one. */
async function search(loaded: LoadedDump, codec: string, knob: CodecParamSpec, kind: TensorKind, target: TuneTarget, ctx: BenchContext, sink: BenchRecord[]): Promise<{ best: Probe | null; evaluations: number }> {
  const larger = knob.tune!.endsWith('+');
  let evaluations = 0;
  const run = async (v: string) => {
    evaluations++;
    return probe(loaded, codec, knob.name, v, kind, target, ctx, sink);
  };
  if (knob.choices) {
    const probes: Probe[] = [];
    for (const v of knob.choices) probes.push(await run(v));
    const ok = probes.filter((p) => p.ok);
    const best = ok.sort((a, b) => b.aggregate.compressionRatio - a.aggregate.compressionRatio)[0] ?? null;
    return { best, evaluations };
  }
  // Continuous knob: error grows with the value when larger compresses more; bisect in log space.
  // Stay just inside the declared range: some codecs exclude its ends.
  const [lo, hi] = [(knob.min ?? 0) * 1.001, (knob.max ?? 1) * 0.999];
  if (!(lo > 0 && hi > lo)) throw new PackkvError(`codec '${codec}': tune knob ${knob.name} needs a positive range`);
  const fmt = (x: number) => String(Number(x.toPrecision(4)));
  const compressMost = larger ? hi : lo;
  const compressLeast = larger ? lo : hi;
  const top = await run(fmt(compressMost));
  if (top.ok) return { best: top, evaluations };
  const bottom = await run(fmt(compressLeast));
  if (!bottom.ok) return { best: null, evaluations };
  let [good, bad, best] = [Math.log(compressLeast), Math.log(compressMost), bottom];
  for (let i = 0; i < 9; i++) {
    const mid = (good + bad) / 2;
    const p = await run(fmt(Math.exp(mid)));
    if (p.ok) [good, best] = [mid, p];
    else bad = mid;
  }
  return { best, evaluations };
}

async function tuneTensor(loaded: LoadedDump, codec: CodecInfo, kind: TensorKind, target: TuneTarget, ctx: BenchContext, sink: BenchRecord[]): Promise<TunedTensor> {
  const knob = knobFor(codec, kind)!;
  const { best, evaluations } = await search(loaded, codec.name, knob, kind, target, ctx, sink);
  const fp16Bytes = loaded.problems.reduce((s, p) => s + p.k.length * 2, 0);
  return {
    kind,
    spec: best ? `${codec.name}:${knob.name}=${best.value}` : null,
    knob: knob.name,
    value: best?.value ?? null,
    ratio: best?.aggregate.compressionRatio ?? null,
    fp16Bytes,
    deviceBytes: best?.aggregate.deviceBytes ?? null,
    achieved: best?.achieved ?? null,
    attnOutWorst: best?.attnOut ?? null,
    heldTo: target,
    evaluations,
  };
}

/** Tunes K on the target, then V (on the same target, or on attn_out_rel at K's achieved value for K-only metrics). */
export async function tuneCodec(loaded: LoadedDump, codec: CodecInfo, target: TuneTarget, ctx: BenchContext, sink: BenchRecord[]): Promise<Omit<FrontierRow, 'vsKivi'>> {
  const k = await tuneTensor(loaded, codec, 'K', target, ctx, sink);
  const kOnly = target.metric !== 'attnOutRelL2';
  const vTarget: TuneTarget = kOnly
    ? { name: 'attn_out_rel', metric: 'attnOutRelL2', atLeast: false, limit: Math.max(k.attnOutWorst ?? 0, 1e-6) }
    : target;
  if (kOnly && k.attnOutWorst === null) {
    return { codec: codec.name, k, v: { ...k, kind: 'V', spec: null, value: null, ratio: null, deviceBytes: null, heldTo: vTarget }, totalRatio: null };
  }
  const v = await tuneTensor(loaded, codec, 'V', vTarget, ctx, sink);
  const totalRatio = k.deviceBytes !== null && v.deviceBytes !== null ? (k.fp16Bytes + v.fp16Bytes) / (k.deviceBytes + v.deviceBytes) : null;
  return { codec: codec.name, k, v, totalRatio };
}

/** Adds each row's memory reduction relative to tuned KIVI (the quantization baseline). */
export function compareToKivi(rows: Omit<FrontierRow, 'vsKivi'>[]): FrontierRow[] {
  const kivi = rows.find((r) => r.codec === 'kivi')?.totalRatio ?? null;
  return rows.map((r) => ({ ...r, vsKivi: kivi && r.totalRatio ? r.totalRatio / kivi - 1 : null }));
}
