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
  /** null in V records: scores and probabilities do not depend on V */
  kOnly: boolean;
}

const PROXY_AXES: Record<ProxyField, ProxyAxis> = {
  attnOutRelL2: { title: 'attention-output relative L2 error ‖ô − o‖ / ‖o‖', log: true, format: '~%', kOnly: false },
  relL2: { title: 'tensor relative L2 error ‖x̂ − x‖ / ‖x‖', log: true, format: '~%', kOnly: false },
  kl: { title: 'KL(p_ref ‖ p_test) of attention probabilities, nats', log: true, format: '.0e', kOnly: true },
  tv: { title: 'total variation of attention probabilities', log: true, format: '~%', kOnly: true },
  top32Recall: { title: 'top-32 recall of attended tokens', log: false, format: '~%', kOnly: true },
  scoresRelL2: { title: 'attention-score relative L2 error ‖q·K̂ᵀ − q·Kᵀ‖ / ‖q·Kᵀ‖', log: true, format: '~%', kOnly: true },
};

/** One codec setting on one tensor of one dump: a point of the rate–distortion chart. */
export interface RatePoint {
  codec: string;
  tensor: 'K' | 'V';
  dump: string;
  params: string;
  /** the parameters that differ between the points of this codec's line ('' when it has one setting) */
  label: string;
  distortion: number;
  compressionRatio: number;
  /** becomes the point's aria-label in the SVG */
  description: string;
}

/** A codec setting's fused-product speed on the GPU relative to the fp16 baseline of the same run. */
export interface SpeedBar {
  setting: string;
  codec: string;
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
}

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

/** Per codec, the key=value pairs that vary between its settings: "bits=2" rather than the whole string. */
function varyingParamLabels(records: BenchRecord[]): Map<string, string> {
  const valuesByKey = new Map<string, Set<string>>();
  for (const r of records) {
    for (const [k, v] of splitParams(r.params)) {
      const id = `${r.codec}\u0000${k}`;
      valuesByKey.set(id, (valuesByKey.get(id) ?? new Set()).add(v));
    }
  }
  const labels = new Map<string, string>();
  for (const r of records) {
    const varying = splitParams(r.params).filter(([k]) => (valuesByKey.get(`${r.codec}\u0000${k}`)?.size ?? 0) > 1);
    labels.set(settingLabel(r), varying.map(([k, v]) => `${k}=${v}`).join(','));
  }
  return labels;
}

function formatNumber(x: number): string {
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e5 ? String(Number(x.toPrecision(4))) : x.toExponential(3);
}

function ratePoints(records: BenchRecord[], opts: PlotOptions, notes: string[]): RatePoint[] {
  const axis = PROXY_AXES[opts.proxy];
  const tensor = opts.tensor ?? 'both';
  const chosen = latestAggregates(records, (r) => tensor === 'both' || r.tensor === tensor);
  const multiDump = new Set(chosen.map((r) => r.dump)).size > 1;
  const labels = varyingParamLabels(chosen);
  const missing = new Set<string>();
  const offAxis = new Set<string>();
  const points: RatePoint[] = [];
  for (const r of chosen) {
    const x = r[opts.proxy];
    if (x === null) {
      missing.add(r.tensor);
      continue;
    }
    if (!Number.isFinite(x) || !Number.isFinite(r.compressionRatio) || (axis.log && x <= 0)) {
      offAxis.add(`${r.codec} ${r.tensor} (${opts.proxy} = ${formatNumber(x)})`);
      continue;
    }
    const label = labels.get(settingLabel(r)) ?? '';
    const where = multiDump ? ` on ${r.dump}` : '';
    const description = `${r.codec} ${r.tensor}${r.params ? ` ${r.params}` : ''}${where}: ` +
      `${opts.proxy} ${formatNumber(x)}, compression ratio ${formatNumber(r.compressionRatio)}×`;
    points.push({ codec: r.codec, tensor: r.tensor, dump: r.dump, params: r.params, label, distortion: x,
      compressionRatio: r.compressionRatio, description });
  }
  if (missing.size > 0) notes.push(`${[...missing].join(', ')} records have no ${opts.proxy} (scores do not depend on V)`);
  if (offAxis.size > 0) notes.push(`not drawn${axis.log ? ' on the log axis' : ''}: ${[...offAxis].sort().join(', ')}`);
  if (chosen.some((r) => r.proxy === 'self-keys')) notes.push('some dumps have no queries: their last keys stand in (proxy=self-keys)');
  return points.sort((a, b) => a.distortion - b.distortion);
}

/** Speed-ups of GPU records against the fp16 record of the same run, dump and tensor; pooled over dumps. */
function speedBars(records: BenchRecord[], tensor: PlotOptions['tensor']): SpeedBar[] {
  const gpu = latestAggregates(records, (r) => r.device === 'cuda' && (tensor === undefined || tensor === 'both' || r.tensor === tensor));
  const baseline = (r: BenchRecord) =>
    records.find((b) => b.codec === 'fp16' && b.layer === 'all' && b.device === 'cuda' && b.runId === r.runId &&
      b.dump === r.dump && b.tensor === r.tensor);
  const sums = new Map<string, SpeedBar & { baseMs: number; codecMs: number }>();
  for (const r of gpu) {
    if (r.codec === 'fp16') continue;
    const field = r.tensor === 'K' ? 'qkMs' : 'pvMs';
    const ms = r[field];
    const baseMs = baseline(r)?.[field];
    if (ms === null || baseMs === null || baseMs === undefined || !(ms > 0) || !(baseMs > 0)) continue;
    const product = r.tensor === 'K' ? 'q·Kᵀ (K)' : 'p·V (V)';
    const key = `${settingLabel(r)}\u0000${product}`;
    const bar = sums.get(key) ?? { setting: settingLabel(r), codec: r.codec, product, speedup: 0, baseMs: 0, codecMs: 0 };
    bar.baseMs += baseMs;
    bar.codecMs += ms;
    sums.set(key, bar);
  }
  return [...sums.values()]
    .map(({ setting, codec, product, baseMs, codecMs }) => ({ setting, codec, product, speedup: baseMs / codecMs }))
    .sort((a, b) => (a.setting < b.setting ? -1 : a.setting > b.setting ? 1 : a.product < b.product ? -1 : 1));
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

const WIDTH = 640;

function rateDistortionChart(data: PlotData, proxy: ProxyField): TopLevelSpec['vconcat' & keyof TopLevelSpec] {
  const axis = PROXY_AXES[proxy];
  const x = {
    field: 'distortion',
    type: 'quantitative',
    scale: axis.log ? { type: 'log' } : { zero: false },
    axis: { title: `${proxy}: ${axis.title}${axis.log ? ' (log scale)' : ''}`, format: axis.format, labelOverlap: 'greedy' },
  };
  const y = {
    field: 'compressionRatio',
    type: 'quantitative',
    scale: { zero: true },
    axis: { title: 'compression ratio (fp16 bytes ÷ device bytes, ×)' },
  };
  const color = { field: 'codec', type: 'nominal', legend: { title: 'codec', orient: 'right' } };
  const tensorLegend = { title: 'tensor', orient: 'right', labelExpr: "datum.label === 'K' ? 'K (keys)' : 'V (values)'" };
  return {
    width: WIDTH,
    height: 380,
    title: { text: 'Rate–distortion: each line one codec, each point one setting (newest run)', fontSize: 13, anchor: 'start' },
    data: { values: data.points },
    layer: [
      {
        mark: { type: 'line', strokeWidth: 2, point: { filled: true, size: 70 } },
        encoding: {
          x, y, color,
          strokeDash: { field: 'tensor', type: 'nominal', scale: { domain: ['K', 'V'], range: [[1, 0], [6, 3]] }, legend: tensorLegend },
          shape: { field: 'tensor', type: 'nominal', scale: { domain: ['K', 'V'], range: ['circle', 'triangle-up'] }, legend: tensorLegend },
          detail: { field: 'dump', type: 'nominal' },
          order: { field: 'distortion', type: 'quantitative' },
          description: { field: 'description', type: 'nominal' },
        },
      },
      {
        mark: { type: 'text', align: 'left', baseline: 'bottom', dx: 5, dy: -4, fontSize: 10, opacity: 0.85 },
        encoding: { x, y, color: { ...color, legend: null }, text: { field: 'label', type: 'nominal' } },
      },
    ],
  } as never;
}

function speedupChart(data: PlotData): TopLevelSpec['vconcat' & keyof TopLevelSpec] {
  const y = { field: 'setting', type: 'nominal', axis: { title: null, labelLimit: 320 } };
  const yOffset = { field: 'product', type: 'nominal' };
  const x = { field: 'speedup', type: 'quantitative', axis: { title: 'speed-up over cuBLAS fp16 in the same run (fp16 time ÷ codec time, ×)' } };
  return {
    width: WIDTH - 200,
    height: { step: 14 },
    title: { text: 'GPU: fused product on the compressed stream vs fp16', fontSize: 13, anchor: 'start' },
    data: { values: data.speedups },
    layer: [
      {
        mark: { type: 'bar' },
        encoding: {
          y, yOffset, x,
          color: { field: 'product', type: 'nominal', scale: { range: ['#4c78a8', '#f58518'] }, legend: { title: 'product' } },
          description: { field: 'setting', type: 'nominal' },
        },
      },
      { mark: { type: 'text', align: 'left', dx: 3, fontSize: 10 }, encoding: { y, yOffset, x, text: { field: 'speedup', format: '.2f' } } },
      { mark: { type: 'rule', strokeDash: [4, 3], color: '#555' }, encoding: { x: { datum: 1 } } },
    ],
  } as never;
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
    vconcat: charts,
    spacing: 36,
    // the speed-up chart's colours are products, not codecs
    resolve: { scale: { color: 'independent' }, legend: { color: 'independent' } },
    config: {
      font: 'DejaVu Sans, Helvetica, Arial, sans-serif',
      axis: { labelFontSize: 11, titleFontSize: 12, titleFontWeight: 'normal' },
      legend: { labelFontSize: 11, titleFontSize: 12, labelLimit: 220 },
      view: { stroke: '#ccc' },
    },
  } as TopLevelSpec;
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
  const logger = { level: () => logger, warn: (...args: unknown[]) => (warnings.push(args.join(' ')), logger),
    info: () => logger, debug: () => logger, error: (...args: unknown[]) => { throw new Error(args.join(' ')); } };
  const compiled = vegaLite.compile(plotSpec(data, opts.proxy), { logger: logger as never }).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  try {
    return { ...data, svg: await view.toSVG() };
  } finally {
    view.finalize();
  }
}

/** SVG of the rate–distortion chart (ratio vs proxy, a line per codec and tensor) and, with GPU records, the speed-up chart. */
export async function renderPlotSvg(records: BenchRecord[], opts: PlotOptions): Promise<string> {
  return (await renderPlot(records, opts)).svg;
}
