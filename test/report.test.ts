// Report formats: CSV (RFC 4180), JSON round-trip, Markdown, terminal table, summary line, the command.

import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { describe, expect, it } from 'vitest';
import { PackkvError } from '../cli/errors.js';
import { registerReport } from '../cli/commands/report.js';
import { CSV_COLUMNS, renderReport, renderSummaryLine, renderTable, selectRecords } from '../cli/report-format.js';
import { recordFromJson, writeRecords, type BenchRecord } from '../cli/results.js';

function makeRecord(overrides: Partial<BenchRecord> = {}): BenchRecord {
  return {
    schema: 1, runId: 'run-1', time: '2026-11-23T07:30:00.000Z', dump: 'tiny', dumpFiles: ['a.safetensors', 'b.safetensors'],
    layer: 'all', tensor: 'K', codec: 'kivi', params: 'bits=2,group=32,residual=128', device: 'cpu', gitCommit: null,
    kvHeads: 2, heads: 8, tokens: 256, headDim: 64, fp16Bytes: 4570, deviceBytes: 1000, hostBytes: 0, totalBytes: 1000,
    breakdown: { payload: 700, scales: 100, zeros: 100, residual: 90, metadata: 10, host: 0 },
    compressionRatio: 4.57, totalCompressionRatio: 4.57, maxAbs: 0.01234, rmse: 0.002, relL2: 0.0213, snrDb: 33.43,
    proxy: 'queries', scoresRelL2: 0.01, kl: 0.000123, tv: 0.004, top32Recall: 0.9375, top1pctRecall: 1,
    attnOutRelL2: 0.021, attnOutCosine: 0.9997, sinkMassErr: 0.0005, headAttnOutRelL2: [0.02, 0.022], headKl: [0.0001, 0.000146], headTop32Recall: [0.9375, 0.9375], encodeMBps: 812.3, decodeMBps: 45.67, qkMs: 1,
    pvMs: null, notes: ['a "quoted" note', 'second'],
    ...overrides,
  };
}

const kiviK = makeRecord();
const kiviV = makeRecord({
  tensor: 'V', fp16Bytes: 4120, deviceBytes: 1000, totalBytes: 1000, compressionRatio: 4.12,
  totalCompressionRatio: 4.12, attnOutRelL2: 0.015, scoresRelL2: null, kl: null, tv: null, top32Recall: null,
  top1pctRecall: null, qkMs: null, pvMs: 2,
});
const kiviLayer0 = makeRecord({ layer: 0, relL2: 0.5 });
const fp16K = makeRecord({
  codec: 'fp16', params: '', fp16Bytes: 4570, deviceBytes: 4570, totalBytes: 4570, compressionRatio: 1,
  totalCompressionRatio: 1, relL2: 0, snrDb: Infinity, maxAbs: 0, attnOutRelL2: 0, qkMs: 3.1, notes: [],
});
const records = [kiviV, kiviLayer0, fp16K, kiviK];

/** Minimal RFC 4180 parser: quoted fields, doubled quotes, commas and newlines inside quotes. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') (field += '"'), i++;
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') row.push(field), (field = '');
    else if (c === '\n') row.push(field), rows.push(row), (row = []), (field = '');
    else field += c;
  }
  if (field !== '' || row.length > 0) row.push(field), rows.push(row);
  return rows;
}

describe('selectRecords', () => {
  it('keeps aggregate rows by default, per-layer with each, filters codec by name or full spec', () => {
    expect(selectRecords(records).map((r) => `${r.codec}/${r.layer}/${r.tensor}`)).toEqual([
      'fp16/all/K', 'kivi/all/K', 'kivi/all/V',
    ]);
    expect(selectRecords(records, { layers: 'each', codec: 'kivi' }).map((r) => `${r.layer}/${r.tensor}`)).toEqual([
      '0/K', 'all/K', 'all/V',
    ]);
    expect(selectRecords(records, { codec: 'kivi:bits=2,group=32,residual=128' })).toHaveLength(2);
    expect(selectRecords(records, { codec: 'kvcomp' })).toHaveLength(0);
  });
});

describe('CSV', () => {
  const csv = renderReport(records, 'csv', { layers: 'each' });
  const rows = parseCsv(csv);
  const header = rows[0];
  const byName = (row: string[]) => Object.fromEntries(header.map((h, i) => [h, row[i]]));

  it('has a header of the record fields, breakdown flattened, and one row per record', () => {
    expect(header).toEqual(CSV_COLUMNS);
    expect(header.slice(0, 4)).toEqual(['schema', 'runId', 'time', 'dump']);
    expect(header).toContain('breakdownPayload');
    expect(header).toContain('breakdownHost');
    expect(header).not.toContain('breakdown');
    expect(rows).toHaveLength(5);
    expect(rows.every((r) => r.length === header.length)).toBe(true);
  });

  it('quotes a params string with commas and a note with quotes (RFC 4180)', () => {
    expect(csv).toContain(',"bits=2,group=32,residual=128",');
    expect(csv).toContain('"a ""quoted"" note; second"');
    const k = byName(rows[3]);
    expect(k.layer).toBe('all');
    expect(k.tensor).toBe('K');
    expect(k.params).toBe('bits=2,group=32,residual=128');
    expect(k.notes).toBe('a "quoted" note; second');
    expect(k.dumpFiles).toBe('a.safetensors;b.safetensors');
    expect(k.breakdownPayload).toBe('700');
    expect(k.compressionRatio).toBe('4.57');
    expect(k.gitCommit).toBe('');
  });

  it('writes null as empty and Infinity as Infinity', () => {
    const fp16 = byName(rows[1]);
    expect(fp16.codec).toBe('fp16');
    expect(fp16.snrDb).toBe('Infinity');
    expect(byName(rows[4]).kl).toBe('');
  });
});

describe('JSON', () => {
  it('round-trips every field exactly, Infinity included', () => {
    const parsed = JSON.parse(renderReport(records, 'json', { layers: 'each' })) as unknown[];
    const back = parsed.map(recordFromJson);
    expect(back).toEqual(selectRecords(records, { layers: 'each' }));
    expect(back[0].snrDb).toBe(Infinity);
    expect(Object.keys(parsed[1] as object)).toContain('breakdown');
  });
});

describe('Markdown and table', () => {
  it('markdown has the header row, an alignment row and formatted cells', () => {
    const lines = renderReport(records, 'markdown').trimEnd().split('\n');
    expect(lines[0]).toBe(
      '| dump | layer | tensor | codec | params | ratio | total ratio | relL2 | SNR dB | maxAbs | attn-out err | KL | top-32 recall | enc MB/s | dec MB/s |',
    );
    expect(lines[1]).toMatch(/^\| :--- \| ---: \| :--- \|/);
    expect(lines).toHaveLength(5);
    expect(lines[3]).toBe(
      '| tiny | all | K | kivi | bits=2,group=32,residual=128 | 4.57× | 4.57× | 2.13% | 33.4 | 0.0123 | 2.10% | 1.23e-4 | 93.8% | 812 | 45.7 |',
    );
    expect(lines[2]).toContain('| fp16 | – | 1.00× | 1.00× | 0% | ∞ | 0 | 0% |');
  });

  it('terminal table shows the main columns without colour codes', () => {
    const text = renderTable(records);
    expect(text).toContain('total ratio');
    expect(text).toContain('4.57×');
    expect(text).toContain('4.12×');
    expect(text).not.toContain('50.0%'); // the per-layer row is left out by default
    expect(text).not.toMatch(/\u001b\[/);
    expect(renderTable(records, { layers: 'each' })).toContain('50.0%');
  });
});

describe('renderSummaryLine', () => {
  it('one line per codec with K and V ratios and the worst attention-output error', () => {
    expect(renderSummaryLine([kiviK, kiviV, kiviLayer0])).toBe(
      'kivi:bits=2,group=32,residual=128  K 4.57×, V 4.12× at attention-output error 2.1%',
    );
  });

  it('aligns labels and compares fused-product time with the fp16 baseline', () => {
    const fp16V = makeRecord({ ...fp16K, tensor: 'V', qkMs: null, pvMs: 1 });
    const lines = renderSummaryLine(records.concat(fp16V)).split('\n');
    expect(lines).toEqual([
      'fp16                               K 1.00×, V 1.00× at attention-output error 0%',
      'kivi:bits=2,group=32,residual=128  K 4.57×, V 4.12× at attention-output error 2.1%; ' +
        'q·Kᵀ 3.10× faster than fp16 (CPU reference), p·V 2.00× slower than fp16 (CPU reference)',
    ]);
  });

  it('drops the CPU-reference label for GPU records', () => {
    const gpu = records.concat(makeRecord({ ...fp16K, tensor: 'V', qkMs: null, pvMs: 1 })).map((r) => ({ ...r, device: 'cuda' as const }));
    expect(renderSummaryLine(gpu)).toContain('q·Kᵀ 3.10× faster than fp16, p·V 2.00× slower than fp16');
  });

  it('is empty without aggregate records', () => {
    expect(renderSummaryLine([kiviLayer0])).toBe('');
  });
});

describe('report command', () => {
  async function runCli(args: string[]): Promise<void> {
    const program = new Command().exitOverride().configureOutput({ writeErr: () => {} });
    registerReport(program);
    await program.parseAsync(['node', 'packkv', 'report', ...args]);
  }

  it('writes CSV to --out atomically', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'packkv-report-'));
    try {
      await writeRecords(path.join(dir, 'results'), 'run-1', records);
      const out = path.join(dir, 'out.csv');
      await runCli([path.join(dir, 'results'), '--csv', '--codec', 'kivi', '--out', out]);
      const rows = parseCsv(await fs.readFile(out, 'utf8'));
      expect(rows[0]).toEqual(CSV_COLUMNS);
      expect(rows.slice(1).map((r) => r[CSV_COLUMNS.indexOf('tensor')])).toEqual(['K', 'V']);
      expect((await fs.readdir(dir)).sort()).toEqual(['out.csv', 'results']);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it('fails with a clear message when there are no records', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'packkv-report-'));
    try {
      const err = await runCli([dir]).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PackkvError);
      expect((err as Error).message).toMatch(/no benchmark records found in .*packkv-report-.*run `packkv bench` first/);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it('rejects two formats at once', async () => {
    await expect(runCli(['--csv', '--json'])).rejects.toThrow(/cannot be used with option/);
  });
});

describe('renderSideBySide (the bench table)', () => {
  it('one row per codec setting with K and V figures side by side; host ratios on a second line', async () => {
    const { renderSideBySide } = await import('../cli/side-by-side.js');
    const text = renderSideBySide([kiviK, kiviV, kiviLayer0]);
    const rows = text.split('\n').filter((l) => l.includes('kivi'));
    expect(rows).toHaveLength(1); // the per-layer record is not a row
    expect(rows[0]).toContain('4.57× / 4.12×');
    expect(rows[0]).toContain('2.10% / 1.50%');
    expect(text).not.toContain('with host');
    const hosted = renderSideBySide([makeRecord({ hostBytes: 500, totalBytes: 1500, totalCompressionRatio: 3.05 }), kiviV]);
    expect(hosted).toContain('with host 3.05× / 4.12×');
  });
});
