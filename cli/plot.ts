// `report --plot`: rate–distortion and GPU speed-up charts of BenchRecords, drawn by Vega-Lite as SVG without a browser.

import type { TopLevelSpec } from 'vega-lite';
import { PackkvError } from './errors.js';
import type { BenchRecord } from './results.js';

/** Record fields that can be the distortion axis. */
export const PROXY_FIELDS = ['attnOutRelL2', 'relL2', 'kl', 'tv', 'top32Recall', 'scoresRelL2'] as const;
export type ProxyField = (typeof PROXY_FIELDS)[number];
export const DEFAULT_PROXY: ProxyField = 'attnOutRelL2';

export interface PlotOptions {
  proxy: ProxyField;
  /** which tensor's records to draw (default both) */
  tensor?: 'K' | 'V' | 'both';
}

interface ProxyAxis {
  /** what the number is, with its unit */
  title: string;
  /** error metrics span decades: log scale (zero cannot be drawn there) */
  log: boolean;
  /** d3-format of the tick labels */
  format: string;
}

const PROXY_AXES: Record<ProxyField, ProxyAxis> = {
  attnOutRelL2: { title: 'attention-output relative L2 error ‖ô − o‖ / ‖o‖', log: true, format: '~%' },
  relL2: { title: 'tensor relative L2 error ‖x̂ − x‖ / ‖x‖', log: true, format: '~%' },
  kl: { title: 'KL(p_ref ‖ p_test) of attention probabilities, nats', log: true, format: '.0e' },
  tv: { title: 'total variation of attention probabilities', log: true, format: '~%' },
  top32Recall: { title: 'top-32 recall of attended tokens', log: false, format: '~%' },
  scoresRelL2: { title: 'attention-score relative L2 error ‖q·K̂ᵀ − q·Kᵀ‖ / ‖q·Kᵀ‖', log: true, format: '~%' },
};

/** One codec setting on one tensor of one dump: a point of the rate–distortion chart. */
export interface RatePoint {
  codec: string;
  tensor: 'K' | 'V';
  dump: string;
  /** the parameter strings of the settings that land on this point (usually one) */
  params: string[];
  /** the parameters that differ between the points of this codec's line ('' when it has one setting) */
  label: string;
  distortion: number;
  compressionRatio: number;
  /** becomes the point's aria-label in the SVG */
  description: string;
  /** the line the point is on ("kivi K", with " on <dump>" when there are several); its aria-label */
  line: string;
}

/** A codec setting's fused-product speed on the GPU relative to the fp16 baseline of the same run. */
export interface SpeedBar {
  /** codec and the parameters that tell its settings apart, e.g. "kivi bits=2" */
  setting: string;
  codec: string;
  /** the full codec:params spec; becomes the bar's aria-label with the speed-up */
  description: string;
  product: 'q·Kᵀ (K)' | 'p·V (V)';
  /** Σ fp16 ms ÷ Σ codec ms over dumps */
  speedup: number;
}

export interface PlotData {
  points: RatePoint[];
  speedups: SpeedBar[];
  dumps: string[];
  codecs: string[];
  /** why some records are not drawn, for the chart's subtitle */
  notes: string[];
}

export interface RenderedPlot extends PlotData {
  svg: string;
  /** Vega-Lite's compile warnings (none expected; tests check) */
  warnings: string[];
}

/** The uncompressed baseline: speed-ups are relative to it, and it is drawn grey. */
const BASELINE = 'fp16';

const settingLabel = (r: BenchRecord) => (r.params ? `${r.codec}:${r.params}` : r.codec);

/** The dump-wide records, the newest one where a setting was benchmarked more than once. */
function latestAggregates(records: BenchRecord[], keep: (r: BenchRecord) => boolean): BenchRecord[] {
  const latest = new Map<string, BenchRecord>();
  for (const r of records) {
    if (r.layer !== 'all' || !keep(r)) continue;
    const key = [r.dump, r.codec, r.params, r.tensor].join('\u0000');
    const seen = latest.get(key);
    if (seen === undefined || r.time > seen.time) latest.set(key, r);
  }
  return [...latest.values()];
}

function splitParams(params: string): [string, string][] {
  return params === '' ? [] : params.split(',').map((kv) => kv.split('=', 2) as [string, string]);
}

/** Per codec, the key=value pairs of each setting that vary between its settings: bits=2 rather than the whole string. */
function varyingParams(records: BenchRecord[]): Map<string, string[]> {
  const valuesByKey = new Map<string, Set<string>>();
  for (const r of records) {
    for (const [k, v] of splitParams(r.params)) {
      const id = `${r.codec}\u0000${k}`;
      valuesByKey.set(id, (valuesByKey.get(id) ?? new Set()).add(v));
    }
  }
  const varying = new Map<string, string[]>();
  for (const r of records) {
    const pairs = splitParams(r.params).filter(([k]) => (valuesByKey.get(`${r.codec}\u0000${k}`)?.size ?? 0) > 1);
    varying.set(settingLabel(r), pairs.map(([k, v]) => `${k}=${v}`));
  }
  return varying;
}

function formatNumber(x: number): string {
  if (x === 0) return '0';
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e5 ? String(Number(x.toPrecision(4))) : x.toExponential(3);
}

/** Keeps the records the distortion axis can show; says in notes why the others are left out. */
function drawable(records: BenchRecord[], proxy: ProxyField, notes: string[]): BenchRecord[] {
  const log = PROXY_AXES[proxy].log;
  const missing = new Set<string>();
  /** "fp16 K, V" by the value that keeps them off the axis */
  const offAxis = new Map<string, Set<string>>();
  const kept = records.filter((r) => {
    const x = r[proxy];
    if (x === null) missing.add(r.tensor);
    else if (!Number.isFinite(x) || !Number.isFinite(r.compressionRatio) || (log && x <= 0)) {
      const why = Number.isFinite(r.compressionRatio) ? `${proxy} = ${formatNumber(x)}` : `ratio ${r.compressionRatio}`;
      const key = `${r.codec}\u0000${why}`;
      offAxis.set(key, (offAxis.get(key) ?? new Set()).add(r.tensor));
    } else return true;
    return false;
  });
  if (missing.size > 0) notes.push(`${[...missing].join(', ')} records have no ${proxy} (scores do not depend on V)`);
  if (offAxis.size > 0) {
    const which = [...offAxis].sort().map(([key, tensors]) => {
      const [codec, why] = key.split('\u0000');
      return `${codec} ${[...tensors].sort().join(', ')} (${why})`;
    });
    notes.push(`not drawn${log ? ' on the log axis' : ''}: ${which.join('; ')}`);
  }
  if (records.some((r) => r.proxy === 'self-keys')) notes.push('some dumps have no queries: their last keys stand in (proxy=self-keys)');
  return kept;
}

/**
 * One point per distinct (codec, tensor, dump, distortion, ratio). A sweep of k_rel × v_rel gives K
 * records that differ only in v_rel and coincide: they become one point labelled by what they share.
 */
function ratePoints(records: BenchRecord[], opts: PlotOptions, notes: string[]): RatePoint[] {
  const tensor = opts.tensor ?? 'both';
  const chosen = latestAggregates(records, (r) => tensor === 'both' || r.tensor === tensor);
  const varying = varyingParams(chosen);
  const multiDump = new Set(chosen.map((r) => r.dump)).size > 1;
  const groups = new Map<string, BenchRecord[]>();
  for (const r of drawable(chosen, opts.proxy, notes)) {
    const key = [r.codec, r.tensor, r.dump, r[opts.proxy], r.compressionRatio].join('\u0000');
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  const points: RatePoint[] = [];
  for (const group of groups.values()) {
    const r = group[0];
    const x = r[opts.proxy] as number;
    const shared = (varying.get(settingLabel(r)) ?? []).filter((kv) => group.every((g) => varying.get(settingLabel(g))?.includes(kv)));
    const settings = group.length > 1 ? ` (${group.length} settings)` : r.params ? ` ${r.params}` : '';
    const description = `${r.codec} ${r.tensor}${shared.length > 0 && group.length > 1 ? ` ${shared.join(',')}` : ''}${settings}` +
      `${multiDump ? ` on ${r.dump}` : ''}: ${opts.proxy} ${formatNumber(x)}, compression ratio ${formatNumber(r.compressionRatio)}×`;
    const line = `${r.codec} ${r.tensor}${multiDump ? ` on ${r.dump}` : ''}`;
    points.push({ codec: r.codec, tensor: r.tensor, dump: r.dump, params: group.map((g) => g.params), label: shared.join(','),
      distortion: x, compressionRatio: r.compressionRatio, description, line });
  }
  return points.sort((a, b) => a.distortion - b.distortion);
}

/** Speed-ups of GPU records against the fp16 record of the same run, dump and tensor; pooled over dumps. */
function speedBars(records: BenchRecord[], tensor: PlotOptions['tensor']): SpeedBar[] {
  const gpu = latestAggregates(records, (r) => r.device === 'cuda' && (tensor === undefined || tensor === 'both' || r.tensor === tensor));
  const baseline = (r: BenchRecord) =>
    records.find((b) => b.codec === BASELINE && b.layer === 'all' && b.device === 'cuda' && b.runId === r.runId &&
      b.dump === r.dump && b.tensor === r.tensor);
  const sums = new Map<string, SpeedBar & { baseMs: number; codecMs: number }>();
  const short = varyingParams(gpu);
  for (const r of gpu) {
    if (r.codec === BASELINE) continue;
    const field = r.tensor === 'K' ? 'qkMs' : 'pvMs';
    const ms = r[field];
    const baseMs = baseline(r)?.[field];
    if (ms === null || baseMs === null || baseMs === undefined || !(ms > 0) || !(baseMs > 0)) continue;
    const product = r.tensor === 'K' ? 'q·Kᵀ (K)' : 'p·V (V)';
    const key = `${settingLabel(r)}\u0000${product}`;
    const varying = short.get(settingLabel(r)) ?? [];
    const setting = varying.length > 0 ? `${r.codec} ${varying.join(',')}` : r.codec;
    const bar = sums.get(key) ?? { setting, codec: r.codec, description: settingLabel(r), product, speedup: 0, baseMs: 0, codecMs: 0 };
    bar.baseMs += baseMs;
    bar.codecMs += ms;
    sums.set(key, bar);
  }
  return [...sums.values()]
    .map(({ baseMs, codecMs, ...bar }) => {
      const speedup = baseMs / codecMs;
      return { ...bar, speedup, description: `${bar.description}: ${bar.product} ${formatNumber(speedup)}× the speed of fp16` };
    })
    .sort((a, b) => (a.setting < b.setting ? -1 : a.setting > b.setting ? 1 : a.product < b.product ? 1 : -1));
}

/** What the charts show, before any drawing: the points, the speed-up bars, and what was left out. */
export function plotData(records: BenchRecord[], opts: PlotOptions): PlotData {
  const notes: string[] = [];
  const points = ratePoints(records, opts, notes);
  const speedups = speedBars(records, opts.tensor);
  return {
    points,
    speedups,
    dumps: [...new Set(points.map((p) => p.dump))].sort(),
    codecs: [...new Set(points.map((p) => p.codec))].sort(),
    notes,
  };
}

/** One chart of the concat (Vega-Lite exports only its top-level spec type). */
type ChartSpec = Extract<TopLevelSpec, { concat: unknown }>['concat'][number];

const WIDTH = 680;
const HEIGHT = 400;
/** Marks the rate–distortion points in the compiled Vega spec, where their labels are attached. */
const POINT_STYLE = 'rd-point';

const PALETTE = ['#4c78a8', '#f58518', '#e45756', '#72b7b2', '#54a24b', '#eeca3b', '#b279a2', '#ff9da6', '#9d755d'];

/** Codec colours: the fp16 baseline grey, the others in palette order, so a codec keeps its colour whether fp16 is drawn or not. */
function codecColors(codecs: string[]): { domain: string[]; range: string[] } {
  let next = 0;
  return { domain: codecs, range: codecs.map((c) => (c === BASELINE ? '#888888' : PALETTE[next++ % PALETTE.length])) };
}

/** Log-axis ticks at 1, 2, 5 × 10^k inside the data's range (only 1 × 10^k over wide ranges). */
function logTicks(values: number[]): number[] {
  const lo = Math.min(...values) / 1.5;
  const hi = Math.max(...values) * 1.5;
  const steps = Math.log10(hi / lo) > 4 ? [1] : [1, 2, 5];
  const ticks: number[] = [];
  for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k++) {
    for (const m of steps) {
      const t = Number((m * 10 ** k).toPrecision(1));
      if (t >= lo && t <= hi) ticks.push(t);
    }
  }
  return ticks;
}

function rateDistortionChart(data: PlotData, proxy: ProxyField): ChartSpec {
  const axis = PROXY_AXES[proxy];
  // An unrounded log domain (a "nice" one wastes whole decades) with ticks of our own.
  const ticks = axis.log ? { values: logTicks(data.points.map((p) => p.distortion)) } : {};
  const x = {
    field: 'distortion',
    type: 'quantitative',
    scale: axis.log ? ({ type: 'log', nice: false, padding: 24 } as const) : { zero: false },
    axis: {
      title: `${proxy}: ${axis.title}${axis.log ? ' (log scale)' : ''}`,
      format: axis.format,
      labelOverlap: 'greedy',
      tickCount: 10,
      ...ticks,
    },
  } as const;
  const y = {
    field: 'compressionRatio',
    type: 'quantitative',
    scale: { zero: true },
    axis: { title: 'compression ratio (fp16 ÷ device bytes)' },
  } as const;
  const color = { field: 'codec', type: 'nominal', scale: codecColors(data.codecs), legend: { title: 'codec', orient: 'right' } } as const;
  const tensorLegend = { title: 'tensor', orient: 'right', labelExpr: "datum.label === 'K' ? 'K (keys)' : 'V (values)'" } as const;
  return {
    width: WIDTH,
    height: HEIGHT,
    title: { text: 'Rate–distortion: a line per codec and tensor, a point per setting', fontSize: 13, anchor: 'start' },
    data: { values: data.points },
    encoding: { x, y, color },
    layer: [
      {
        mark: { type: 'line', strokeWidth: 2 },
        encoding: {
          strokeDash: { field: 'tensor', type: 'nominal', scale: { domain: ['K', 'V'], range: [[1, 0], [6, 3]] }, legend: tensorLegend },
          detail: { field: 'dump', type: 'nominal' },
          order: { field: 'distortion', type: 'quantitative' },
          description: { field: 'line', type: 'nominal' },
        },
      },
      {
        mark: { type: 'point', filled: true, size: 70, opacity: 1, style: POINT_STYLE },
        encoding: {
          shape: { field: 'tensor', type: 'nominal', scale: { domain: ['K', 'V'], range: ['circle', 'triangle-up'] }, legend: tensorLegend },
          description: { field: 'description', type: 'nominal' },
        },
      },
    ],
  };
}

function speedupChart(data: PlotData): ChartSpec {
  // Vertical bars: long setting names go under the axis at an angle, so both charts keep one left edge.
  const x = { field: 'setting', type: 'nominal', axis: { title: null, labelAngle: -30, labelLimit: 400 } } as const;
  const products = { domain: ['q·Kᵀ (K)', 'p·V (V)'] };
  const xOffset = { field: 'product', type: 'nominal', scale: products } as const;
  const y = {
    field: 'speedup',
    type: 'quantitative',
    axis: { title: 'fp16 time ÷ codec time (×)' },
  } as const;
  return {
    width: WIDTH,
    height: 220,
    title: { text: 'GPU speed-up of the fused products over cuBLAS fp16 (same run)', fontSize: 13, anchor: 'start' },
    data: { values: data.speedups },
    layer: [
      {
        mark: { type: 'bar' },
        encoding: {
          x, xOffset, y,
          color: { field: 'product', type: 'nominal', scale: { ...products, range: ['#f58518', '#4c78a8'] }, legend: { title: 'product' } },
          description: { field: 'description', type: 'nominal' },
        },
      },
      {
        mark: { type: 'text', baseline: 'bottom', dy: -2, fontSize: 9 },
        encoding: { x, xOffset, y, text: { field: 'speedup', type: 'quantitative', format: '.2f' } },
      },
      { mark: { type: 'rule', strokeDash: [4, 3], color: '#555' }, encoding: { y: { datum: 1 } } },
    ],
  };
}

/** The Vega-Lite spec of the charts (exported for tests and for users who want to restyle it). */
export function plotSpec(data: PlotData, proxy: ProxyField): TopLevelSpec {
  const dumps = data.dumps.length <= 3 ? data.dumps.join(', ') : `${data.dumps.slice(0, 3).join(', ')} and ${data.dumps.length - 3} more`;
  const charts = [rateDistortionChart(data, proxy), ...(data.speedups.length > 0 ? [speedupChart(data)] : [])];
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: `packkv: ${dumps}`, subtitle: data.notes, fontSize: 16, subtitleFontSize: 11, anchor: 'start' },
    background: 'white',
    padding: 16,
    // one column, each chart flush left (a grid would shift the first chart right by the bar labels' width)
    concat: charts,
    columns: 1,
    align: 'none',
    spacing: 36,
    // the speed-up chart's colours are products, not codecs; independent legends stay beside their chart
    resolve: {
      scale: { color: 'independent', shape: 'independent', strokeDash: 'independent' },
      legend: { color: 'independent', shape: 'independent', strokeDash: 'independent' },
    },
    config: {
      font: 'DejaVu Sans, Helvetica, Arial, sans-serif',
      axis: { labelFontSize: 11, titleFontSize: 12, titleFontWeight: 'normal' },
      legend: { labelFontSize: 11, titleFontSize: 12, labelLimit: 220 },
      view: { stroke: '#ccc' },
    },
  };
}

type VegaSpec = import('vega').Spec;
type VegaMark = NonNullable<VegaSpec['marks']>[number];

/** A point label's place, in the pixel frame of the rate–distortion chart. */
interface PlacedLabel {
  x: number;
  y: number;
  /** the label's estimated box, for its white backing */
  x0: number;
  y0: number;
  x1: number;
  y1: number;
  text: string;
  fill: string;
  align: 'left' | 'center' | 'right';
  baseline: 'top' | 'middle' | 'bottom';
}

/** Text width in ems, per character, close to DejaVu Sans (the first font the charts ask for). */
function charEm(c: string): number {
  if ("ijl.,:;'!|·ᵀ ".includes(c)) return 0.3;
  if ('frt()[]-/'.includes(c)) return 0.4;
  if ('mw%MW'.includes(c)) return 0.92;
  if ('=×÷−+<>~'.includes(c)) return 0.84;
  return /[A-Z]/.test(c) ? 0.72 : 0.62;
}

/**
 * Estimated width of a line of text in pixels. Without a canvas Vega guesses 0.8 em per character,
 * which makes titles, legends and labels claim far more room than they take; this replaces that guess
 * while the charts are laid out (through Vega's textMetrics.width hook), and places the point labels.
 */
export function textWidth(text: string, fontSize: number, fontWeight?: string | number): number {
  const bold = fontWeight === 'bold' || (typeof fontWeight === 'number' && fontWeight >= 600);
  let ems = 0;
  for (const c of text) ems += charEm(c);
  return ems * fontSize * (bold ? 1.08 : 1);
}

const LABEL_DATA = 'rd_point_labels';
const LABEL_FONT_SIZE = 10;

/** Adds the point-label text mark (fed later by placeLabels) beside the rate–distortion points; returns their mark's name. */
function addLabelMark(spec: VegaSpec): string {
  const field = (name: keyof PlacedLabel) => ({ field: name });
  const labelMark = {
    type: 'text',
    from: { data: LABEL_DATA },
    interactive: false,
    aria: false,
    encode: {
      update: { x: field('x'), y: field('y'), text: field('text'), fill: field('fill'), align: field('align'),
        baseline: field('baseline'), fontSize: { value: LABEL_FONT_SIZE } },
    },
  } as VegaMark;
  const backing = {
    type: 'rect',
    from: { data: LABEL_DATA },
    interactive: false,
    aria: false,
    encode: {
      update: { x: field('x0'), y: field('y0'), x2: field('x1'), y2: field('y1'), fill: { value: 'white' }, opacity: { value: 0.8 } },
    },
  } as VegaMark;
  const visit = (marks: VegaMark[] | undefined): string | undefined => {
    const i = marks?.findIndex((m) => m.type === 'symbol' && [m.style].flat().includes(POINT_STYLE)) ?? -1;
    if (marks === undefined || i < 0) {
      return (marks ?? []).map((m) => (m.type === 'group' ? visit(m.marks) : undefined)).find((n) => n !== undefined);
    }
    marks.splice(i + 1, 0, backing, labelMark);
    return marks[i].name;
  };
  const pointMark = visit(spec.marks);
  if (pointMark === undefined) throw new Error('plot: the compiled spec has no named rate–distortion point mark');
  spec.data = [...(spec.data ?? []), { name: LABEL_DATA, values: [] }];
  return pointMark;
}

/** The bits of a rendered scenegraph node that label placement reads. */
interface SceneNode {
  marktype?: string;
  name?: string;
  items?: SceneNode[];
  x?: number;
  y?: number;
  fill?: string;
  datum?: RatePoint;
}

function sceneMarks(node: SceneNode, type: string, out: SceneNode[] = []): SceneNode[] {
  if (node.marktype === type) out.push(node);
  else for (const child of node.items ?? []) sceneMarks(child, type, out);
  return out;
}

/** The fields of a Vega text item that its width depends on. */
interface TextItem {
  fontSize?: number;
  fontWeight?: string | number;
}

type Box = [x0: number, y0: number, x1: number, y1: number];

const overlaps = (a: Box, b: Box) => a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];

/** Does the segment p–q cross box b? (Liang–Barsky clipping.) */
function segmentHits(p: [number, number], q: [number, number], b: Box): boolean {
  let t0 = 0;
  let t1 = 1;
  const d = [q[0] - p[0], q[1] - p[1]];
  for (const [delta, lo, hi, start] of [[d[0], b[0], b[2], p[0]], [d[1], b[1], b[3], p[1]]]) {
    if (delta === 0) {
      if (start < lo || start > hi) return false;
      continue;
    }
    const [ta, tb] = [(lo - start) / delta, (hi - start) / delta];
    t0 = Math.max(t0, Math.min(ta, tb));
    t1 = Math.min(t1, Math.max(ta, tb));
  }
  return t0 <= t1;
}

/**
 * Greedy label placement: each label takes the first of eight places around its point that stays in
 * the chart and covers no point and no earlier label, preferring places no line crosses (a white
 * backing keeps a crossed label readable); a label with no free place is left out (the point's
 * aria-label still names its setting). Text width is estimated: there is no canvas to measure with.
 */
function placeLabels(points: SceneNode[], lines: SceneNode[]): PlacedLabel[] {
  const [gap, diag] = [7, 5]; // from the point's centre; the point's radius is under 5
  const places = [
    [gap, 0, 'left', 'middle'], [diag, -diag, 'left', 'bottom'], [diag, diag, 'left', 'top'], [0, -gap, 'center', 'bottom'],
    [0, gap, 'center', 'top'], [-gap, 0, 'right', 'middle'], [-diag, -diag, 'right', 'bottom'], [-diag, diag, 'right', 'top'],
  ] as const;
  const segments = lines.flatMap((line) => (line.items ?? []).slice(1).map((q, i) => [line.items![i], q] as const))
    .map(([p, q]) => [[p.x ?? 0, p.y ?? 0], [q.x ?? 0, q.y ?? 0]] as [[number, number], [number, number]]);
  const taken: Box[] = points.map((p) => [(p.x ?? 0) - 5, (p.y ?? 0) - 5, (p.x ?? 0) + 5, (p.y ?? 0) + 5]);
  const placed = new Map<SceneNode, PlacedLabel>();
  for (const avoidLines of [true, false]) {
    for (const point of points) {
      const text = point.datum?.label ?? '';
      if (text === '' || placed.has(point)) continue;
      const width = textWidth(text, LABEL_FONT_SIZE);
      const height = LABEL_FONT_SIZE + 2;
      for (const [dx, dy, align, baseline] of places) {
        const x = (point.x ?? 0) + dx;
        const y = (point.y ?? 0) + dy;
        const x0 = align === 'left' ? x : align === 'center' ? x - width / 2 : x - width;
        const y0 = baseline === 'top' ? y : baseline === 'middle' ? y - height / 2 : y - height;
        const box: Box = [x0, y0, x0 + width, y0 + height];
        if (box[0] < 0 || box[1] < 0 || box[2] > WIDTH || box[3] > HEIGHT || taken.some((t) => overlaps(t, box))) continue;
        if (avoidLines && segments.some(([p, q]) => segmentHits(p, q, box))) continue;
        taken.push(box);
        placed.set(point, { x, y, x0: box[0], y0: box[1], x1: box[2], y1: box[3], text, fill: point.fill ?? '#333', align, baseline });
        break;
      }
    }
  }
  return [...placed.values()];
}

/** The charts' data and their SVG. Vega loads only here, so other commands do not pay for it. */
export async function renderPlot(records: BenchRecord[], opts: PlotOptions): Promise<RenderedPlot> {
  const data = plotData(records, opts);
  if (data.points.length === 0) {
    const why = data.notes.length > 0 ? ` (${data.notes.join('; ')})` : '';
    throw new PackkvError(`nothing to plot: no layer=all record has a drawable ${opts.proxy}${why}`);
  }
  const [vega, vegaLite] = await Promise.all([import('vega'), import('vega-lite')]);
  const warnings: string[] = [];
  const errors: string[] = [];
  const logger = vega.logger(vega.Warn);
  logger.warn = (...args: readonly unknown[]) => (warnings.push(args.join(' ')), logger);
  logger.error = (...args: readonly unknown[]) => (errors.push(args.join(' ')), logger);
  const compiled = vegaLite.compile(plotSpec(data, opts.proxy), { logger }).spec;
  const pointMark = addLabelMark(compiled);
  const view = new vega.View(vega.parse(compiled), { renderer: 'none', logger });
  const metrics = (vega as unknown as { textMetrics: { width: (item: TextItem, text?: unknown) => number } }).textMetrics;
  const vegaWidth = metrics.width;
  metrics.width = (item, text) => textWidth(String(text ?? '').trim(), item.fontSize ?? 11, item.fontWeight);
  try {
    // First pass lays out the points; their pixel places decide where the labels go.
    await view.runAsync();
    const root = (view.scenegraph() as unknown as { root: SceneNode }).root;
    const pointMarks = sceneMarks(root, 'symbol').filter((m) => m.name === pointMark);
    const lines = sceneMarks(root, 'line');
    view.data(LABEL_DATA, placeLabels(pointMarks.flatMap((m) => m.items ?? []), lines));
    const svg = await view.toSVG();
    if (errors.length > 0) throw new Error(`plot: Vega failed: ${errors.join('; ')}`);
    return { ...data, svg, warnings };
  } finally {
    metrics.width = vegaWidth;
    view.finalize();
  }
}

/** SVG of the rate–distortion chart (ratio vs proxy, a line per codec and tensor) and, with GPU records, the speed-up chart. */
export async function renderPlotSvg(records: BenchRecord[], opts: PlotOptions): Promise<string> {
  return (await renderPlot(records, opts)).svg;
}
