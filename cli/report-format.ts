// Renders BenchRecords as a terminal table, CSV, JSON or Markdown, plus bench's one-line summary per codec.

import Table from 'cli-table3';
import { stringify } from 'csv-stringify/sync';
import type { ByteBreakdown } from './native-types.js';
import { RECORD_FIELDS, nonFiniteReplacer, type BenchRecord } from './results.js';

export type ReportFormat = 'table' | 'csv' | 'json' | 'markdown';
/** 'all': only the dump-wide aggregate rows; 'each': per-layer rows too. */
export type LayerSelection = 'all' | 'each';

export interface SelectOptions {
  layers?: LayerSelection;
  /** codec name ("kivi") or full spec ("kivi:bits=2,group=32,residual=128") */
  codec?: string;
}

export interface RenderOptions extends SelectOptions {
  /** ANSI colours in the terminal table (off for files and pipes) */
  color?: boolean;
}

const BREAKDOWN_FIELDS: { [K in keyof ByteBreakdown]: string } = {
  payload: 'breakdownPayload',
  scales: 'breakdownScales',
  zeros: 'breakdownZeros',
  residual: 'breakdownResidual',
  metadata: 'breakdownMetadata',
  host: 'breakdownHost',
};

/** CSV header: every record field, with breakdown flattened in place. */
export const CSV_COLUMNS: string[] = RECORD_FIELDS.flatMap((f) =>
  f === 'breakdown' ? Object.values(BREAKDOWN_FIELDS) : [f],
);

type FlatValue = string | number | null;

/** One CSV row: scalars as they are, lists joined, breakdown spread into its own columns. */
export function flattenRecord(r: BenchRecord): Record<string, FlatValue> {
  const flat: Record<string, FlatValue> = {};
  for (const field of RECORD_FIELDS) {
    const v = r[field];
    if (field === 'breakdown') {
      for (const [k, column] of Object.entries(BREAKDOWN_FIELDS)) flat[column] = r.breakdown[k as keyof ByteBreakdown];
    } else if (field === 'notes') {
      flat[field] = r.notes.join('; ');
    } else if (field === 'dumpFiles') {
      flat[field] = r.dumpFiles.join(';');
    } else if (Array.isArray(v)) {
      flat[field] = v.join(';'); // per-head values, head 0 first
    } else {
      flat[field] = v as FlatValue;
    }
  }
  return flat;
}

// ---- number formatting ----

const DASH = '–';

function orDash(v: number | null | undefined, fmt: (x: number) => string): string {
  return v === null || v === undefined ? DASH : fmt(v);
}

function nonFinite(x: number): string | null {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return '∞';
  if (x === -Infinity) return '-∞';
  return null;
}

/** 3 significant digits, exponent form for very small or large magnitudes. */
export function formatSig3(x: number): string {
  const special = nonFinite(x);
  if (special !== null) return special;
  if (x === 0) return '0';
  const a = Math.abs(x);
  return a < 1e-3 || a >= 1e5 ? x.toExponential(2) : x.toPrecision(3);
}

/** Fraction as a percentage with 3 significant digits: 0.0213 → "2.13%". */
export function formatPct(x: number): string {
  const special = nonFinite(x);
  if (special !== null) return special;
  return x === 0 ? '0%' : `${formatSig3(x * 100)}%`;
}

export function formatRatio(x: number): string {
  return nonFinite(x) ?? `${x.toFixed(2)}×`;
}

function formatDb(x: number): string {
  return nonFinite(x) ?? x.toFixed(1);
}

function formatRate(x: number): string {
  return nonFinite(x) ?? (Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3));
}

// ---- shared column set for table and markdown ----

interface Column {
  header: string;
  numeric: boolean;
  cell(r: BenchRecord): string;
}

export const MAIN_COLUMNS: Column[] = [
  { header: 'dump', numeric: false, cell: (r) => r.dump },
  { header: 'layer', numeric: true, cell: (r) => String(r.layer) },
  { header: 'tensor', numeric: false, cell: (r) => r.tensor },
  { header: 'codec', numeric: false, cell: (r) => r.codec },
  { header: 'params', numeric: false, cell: (r) => r.params || DASH },
  { header: 'ratio', numeric: true, cell: (r) => formatRatio(r.compressionRatio) },
  { header: 'total ratio', numeric: true, cell: (r) => formatRatio(r.totalCompressionRatio) },
  { header: 'relL2', numeric: true, cell: (r) => formatPct(r.relL2) },
  { header: 'SNR dB', numeric: true, cell: (r) => formatDb(r.snrDb) },
  { header: 'maxAbs', numeric: true, cell: (r) => formatSig3(r.maxAbs) },
  { header: 'attn-out err', numeric: true, cell: (r) => formatPct(r.attnOutRelL2) },
  { header: 'KL', numeric: true, cell: (r) => orDash(r.kl, formatSig3) },
  { header: 'top-32 recall', numeric: true, cell: (r) => orDash(r.top32Recall, formatPct) },
  { header: 'enc MB/s', numeric: true, cell: (r) => formatRate(r.encodeMBps) },
  { header: 'dec MB/s', numeric: true, cell: (r) => formatRate(r.decodeMBps) },
];

// ---- selection ----

export function codecLabel(r: Pick<BenchRecord, 'codec' | 'params'>): string {
  return r.params ? `${r.codec}:${r.params}` : r.codec;
}

function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function compareRecords(a: BenchRecord, b: BenchRecord): number {
  const layerKey = (r: BenchRecord) => (r.layer === 'all' ? Infinity : r.layer);
  return (
    compareText(a.dump, b.dump) ||
    compareText(a.codec, b.codec) ||
    compareText(a.params, b.params) ||
    layerKey(a) - layerKey(b) ||
    compareText(a.tensor, b.tensor)
  );
}

/** Filters by layer selection (default 'all') and codec, sorted by dump, codec, params, layer, tensor. */
export function selectRecords(records: BenchRecord[], opts: SelectOptions = {}): BenchRecord[] {
  const layers = opts.layers ?? 'all';
  return records
    .filter((r) => layers === 'each' || r.layer === 'all')
    .filter((r) => opts.codec === undefined || r.codec === opts.codec || codecLabel(r) === opts.codec)
    .sort(compareRecords);
}

// ---- renderers (each takes the records to show, already selected) ----

export function renderJson(records: BenchRecord[]): string {
  return JSON.stringify(records, nonFiniteReplacer, 2);
}

export function renderCsv(records: BenchRecord[]): string {
  const rows = records.map((r) => {
    const flat = flattenRecord(r);
    return CSV_COLUMNS.map((c) => flat[c]);
  });
  return stringify(rows, {
    header: true,
    columns: CSV_COLUMNS,
    record_delimiter: 'unix',
    cast: { number: (x) => String(x) },
  });
}

function escapeMarkdown(cell: string): string {
  return cell.replace(/\|/g, '\\|');
}

export function renderMarkdown(records: BenchRecord[]): string {
  const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
  const header = line(MAIN_COLUMNS.map((c) => c.header));
  const rule = line(MAIN_COLUMNS.map((c) => (c.numeric ? '---:' : ':---')));
  const body = records.map((r) => line(MAIN_COLUMNS.map((c) => escapeMarkdown(c.cell(r)))));
  return [header, rule, ...body].join('\n') + '\n';
}

/** cli-table3 table of the main columns; selects with opts (default: aggregate rows only). */
export function renderTable(records: BenchRecord[], opts: RenderOptions = {}): string {
  const colour = opts.color ?? false;
  const table = new Table({
    head: MAIN_COLUMNS.map((c) => c.header),
    colAligns: MAIN_COLUMNS.map((c) => (c.numeric ? 'right' : 'left')),
    style: colour ? {} : { head: [], border: [] },
  });
  for (const r of selectRecords(records, opts)) table.push(MAIN_COLUMNS.map((c) => c.cell(r)));
  return table.toString() + '\n';
}

/** Selects with opts, then renders in the chosen format. */
export function renderReport(records: BenchRecord[], format: ReportFormat, opts: RenderOptions = {}): string {
  const selected = selectRecords(records, opts);
  switch (format) {
    case 'json':
      return renderJson(selected) + '\n';
    case 'csv':
      return renderCsv(selected);
    case 'markdown':
      return renderMarkdown(selected);
    case 'table':
      return renderTable(selected, { ...opts, layers: 'each', codec: undefined });
  }
}

// ---- summary line ----

/** Pooled ratio of a set of records: Σ fp16 bytes ÷ Σ device bytes. */
function pooledRatio(records: BenchRecord[]): number {
  const fp16 = records.reduce((s, r) => s + r.fp16Bytes, 0);
  const stored = records.reduce((s, r) => s + r.deviceBytes, 0);
  return fp16 / stored;
}

/** "q·Kᵀ 3.10× faster than fp16" from the fp16 baseline's times on the same dumps, or null. */
function speedClause(group: BenchRecord[], all: BenchRecord[], field: 'qkMs' | 'pvMs', name: string): string | null {
  let base = 0;
  let mine = 0;
  for (const r of group) {
    const ref = all.find((b) => b.codec === 'fp16' && b.dump === r.dump && b.tensor === r.tensor && b.device === r.device);
    const t = r[field];
    const tRef = ref?.[field];
    if (t === null || t === undefined || tRef === null || tRef === undefined || !(t > 0)) continue;
    base += tRef;
    mine += t;
  }
  if (!(mine > 0 && base > 0)) return null;
  const speedup = base / mine;
  return speedup >= 1
    ? `${name} ${speedup.toFixed(2)}× faster than fp16${onCpu(group)}`
    : `${name} ${(1 / speedup).toFixed(2)}× slower than fp16${onCpu(group)}`;
}

/** CPU reference timings are not kernel timings: say so next to the ratio. */
function onCpu(group: BenchRecord[]): string {
  return group.every((r) => r.device === 'cpu') ? ' (CPU reference)' : '';
}

/** Percentage for the summary: 2.1%, 0.8%, 0.050%. */
function formatSummaryPct(x: number): string {
  const p = x * 100;
  if (!Number.isFinite(p)) return `${nonFinite(p)}%`;
  if (p === 0) return '0%';
  return p >= 0.1 ? `${p.toFixed(1)}%` : `${p.toPrecision(2)}%`;
}

/**
 * One line per codec from the 'all' records, e.g.
 * "kivi:bits=2,group=32,residual=128  K 4.57×, V 4.12× at attention-output error 2.1%".
 * Ratios pool bytes over dumps; the error is the worst of the K and V records.
 */
export function renderSummaryLine(records: BenchRecord[]): string {
  const aggregates = records.filter((r) => r.layer === 'all').sort(compareRecords);
  const groups = new Map<string, BenchRecord[]>();
  for (const r of aggregates) groups.set(codecLabel(r), [...(groups.get(codecLabel(r)) ?? []), r]);
  const width = Math.max(0, ...[...groups.keys()].map((l) => l.length));
  const lines: string[] = [];
  for (const [label, group] of groups) {
    const ratios = (['K', 'V'] as const)
      .map((t) => [t, group.filter((r) => r.tensor === t)] as const)
      .filter(([, rs]) => rs.length > 0)
      .map(([t, rs]) => `${t} ${formatRatio(pooledRatio(rs))}`);
    const err = Math.max(...group.map((r) => r.attnOutRelL2));
    let line = `${label.padEnd(width)}  ${ratios.join(', ')} at attention-output error ${formatSummaryPct(err)}`;
    if (group[0].codec !== 'fp16') {
      const keys = group.filter((r) => r.tensor === 'K');
      const values = group.filter((r) => r.tensor === 'V');
      const speeds = [speedClause(keys, aggregates, 'qkMs', 'q·Kᵀ'), speedClause(values, aggregates, 'pvMs', 'p·V')];
      const present = speeds.filter((s): s is string => s !== null);
      if (present.length > 0) line += `; ${present.join(', ')}`;
    }
    lines.push(line);
  }
  return lines.join('\n');
}
