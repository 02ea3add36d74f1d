// The bench summary table: one row per dump × codec setting, K and V figures side by side.
import Table from 'cli-table3';

import { formatPct, formatRatio, formatSig3 } from './report-format.js';
import type { BenchRecord } from './results.js';

const DASH = '–';
const pair = (k: string, v: string) => `${k} / ${v}`;
const num = (x: number | null, fmt: (x: number) => string) => (x === null ? DASH : fmt(x));
const db = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : '∞');
const rate = (x: number) => (x >= 100 ? x.toFixed(0) : x.toPrecision(3));

/** Wraps a parameter string at commas so the table stays narrow. */
function wrapParams(params: string, width = 30): string {
  const lines: string[] = [];
  let line = '';
  for (const part of params.split(',')) {
    if (line && line.length + part.length + 1 > width) {
      lines.push(line + ',');
      line = part;
    } else line = line ? `${line},${part}` : part;
  }
  if (line) lines.push(line);
  return lines.join('\n') || DASH;
}

export function renderSideBySide(records: BenchRecord[], color = false): string {
  const all = records.filter((r) => r.layer === 'all');
  const rows = new Map<string, { K?: BenchRecord; V?: BenchRecord }>();
  for (const r of all) {
    const key = `${r.dump}\u0000${r.codec}\u0000${r.params}`;
    rows.set(key, { ...rows.get(key), [r.tensor]: r });
  }
  const table = new Table({
    head: ['dump', 'codec', 'params', 'ratio K / V', 'relL2 K / V', 'SNR dB K / V', 'maxAbs K / V', 'attn-out err K / V', 'KL (K)', 'top-32 (K)', 'enc MB/s K / V', 'dec MB/s K / V', 'device'],
    style: color ? {} : { head: [], border: [] },
  });
  for (const { K, V } of rows.values()) {
    const any = (K ?? V)!;
    const both = (f: (r: BenchRecord) => string) => pair(K ? f(K) : DASH, V ? f(V) : DASH);
    table.push([
      any.dump,
      any.codec,
      wrapParams(any.params),
      both((r) => formatRatio(r.compressionRatio)) +
        ((K?.hostBytes ?? 0) + (V?.hostBytes ?? 0) > 0 ? `\nwith host ${both((r) => formatRatio(r.totalCompressionRatio))}` : ''),
      both((r) => formatPct(r.relL2)),
      both((r) => db(r.snrDb)),
      both((r) => formatSig3(r.maxAbs)),
      both((r) => formatPct(r.attnOutRelL2)),
      K ? num(K.kl, formatSig3) : DASH,
      K ? num(K.top32Recall, formatPct) : DASH,
      both((r) => rate(r.encodeMBps)),
      both((r) => rate(r.decodeMBps)),
      any.device,
    ]);
  }
  return table.toString() + '\n';
}
