// `report --plot`: the rate–distortion and speed-up charts' content (read back from the SVG's aria labels) and the command.

import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { plotData, renderPlot, renderPlotSvg, textWidth } from '../cli/plot.js';
import { writeRecords, type BenchRecord } from '../cli/results.js';
import { runCli } from './run-cli.js';

function makeRecord(overrides: Partial<BenchRecord> = {}): BenchRecord {
  return {
    schema: 1, runId: 'run-1', time: '2026-11-23T07:30:00.000Z', dump: 'tiny', dumpFiles: ['tiny.safetensors'],
    layer: 'all', tensor: 'K', codec: 'kivi', params: 'bits=2,group=32,residual=128', device: 'cpu', gitCommit: null,
    kvHeads: 2, heads: 8, tokens: 256, headDim: 64, fp16Bytes: 4000, deviceBytes: 1000, hostBytes: 0, totalBytes: 1000,
    breakdown: { payload: 800, scales: 100, zeros: 100, residual: 0, metadata: 0, host: 0 },
    compressionRatio: 4, totalCompressionRatio: 4, maxAbs: 0.01, rmse: 0.002, relL2: 0.02, snrDb: 34,
    proxy: 'queries', scoresRelL2: 0.01, kl: 1e-4, tv: 0.004, top32Recall: 0.94, top1pctRecall: 1,
    attnOutRelL2: 0.02, attnOutCosine: 0.9998, sinkMassErr: 5e-4, headAttnOutRelL2: [0.02], headKl: [1e-4], headTop32Recall: [0.9], encodeMBps: 800, decodeMBps: 900, qkMs: 1,
    pvMs: null, notes: [],
    ...overrides,
  };
}

/** A K and a V record of one codec setting, errors growing as the ratio does. */
function setting(codec: string, params: string, ratio: number, err: number, extra: Partial<BenchRecord> = {}): BenchRecord[] {
  const common = { codec, params, compressionRatio: ratio, totalCompressionRatio: ratio, ...extra };
  return [
    makeRecord({ ...common, tensor: 'K', attnOutRelL2: err, relL2: 2 * err, kl: err / 10 }),
    makeRecord({
      ...common, tensor: 'V', attnOutRelL2: err / 2, relL2: err, scoresRelL2: null, kl: null, tv: null,
      top32Recall: null, top1pctRecall: null, sinkMassErr: null, qkMs: null, pvMs: extra.pvMs ?? 1,
    }),
  ];
}

const cpuRecords: BenchRecord[] = [
  ...setting('fp16', '', 1, 0),
  ...setting('kivi', 'bits=2,group=32,residual=128', 5.3, 0.17),
  ...setting('kivi', 'bits=4,group=32,residual=128', 3.2, 0.035),
  ...setting('kivi', 'bits=8,group=32,residual=128', 1.8, 0.002),
  ...setting('packkv', 'k_rel=0.05,v_rel=0.1', 3.9, 0.03),
  ...setting('packkv', 'k_rel=0.2,v_rel=0.4', 4.6, 0.18),
  makeRecord({ layer: 0, attnOutRelL2: 0.5 }), // per-layer rows are not drawn
];

/** GPU records of one run: fp16 baseline at 4 ms (q·Kᵀ) and 6 ms (p·V), kivi:bits=2 at 2 ms and 3 ms. */
const gpuRecords: BenchRecord[] = [
  ...setting('fp16', '', 1, 0, { device: 'cuda', runId: 'gpu', qkMs: 4, pvMs: 6 }),
  ...setting('kivi', 'bits=2,group=32,residual=128', 5.3, 0.17, { device: 'cuda', runId: 'gpu', qkMs: 2, pvMs: 3 }),
];

const count = (svg: string, role: string) => svg.split(`aria-roledescription="${role}"`).length - 1;
const ariaLabels = (svg: string, role: string) =>
  [...svg.matchAll(new RegExp(`aria-label="([^"]*)" role="graphics-symbol" aria-roledescription="${role}"`, 'g'))].map((m) => m[1]);

describe('rate–distortion chart', () => {
  let svg: string;
  beforeAll(async () => {
    const plot = await renderPlot(cpuRecords, { proxy: 'attnOutRelL2' });
    expect(plot.warnings).toEqual([]);
    svg = plot.svg;
  });

  it('is an SVG document with the dump name in the title', () => {
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toContain("aria-label=\"Title text 'packkv: tiny'\"");
  });

  it('draws one line per codec × tensor and one point per setting, fp16 (error 0) left off the log axis', () => {
    expect(ariaLabels(svg, 'line mark').sort()).toEqual(['kivi K', 'kivi V', 'packkv K', 'packkv V']);
    expect(count(svg, 'point')).toBe(10);
    expect(ariaLabels(svg, 'point')).toContain('kivi K bits=2,group=32,residual=128: attnOutRelL2 0.17, compression ratio 5.3×');
    expect(svg).toContain("Symbol legend titled 'codec' for fill color and stroke color with 2 values: kivi, packkv");
    expect(svg).toContain("Symbol legend titled 'tensor'");
    expect(svg).toContain('not drawn on the log axis: fp16 K, V (attnOutRelL2 = 0)');
  });

  it('uses the chosen proxy as the x-axis title, log scale for errors', () => {
    expect(svg).toMatch(/X-axis titled 'attnOutRelL2: attention-output relative L2 error[^']*\(log scale\)' for a log scale/);
    expect(svg).toContain("Y-axis titled 'compression ratio (fp16 ÷ device bytes)'");
  });

  it('labels points with the parameter that varies (bits=2), not the whole string', () => {
    const data = plotData(cpuRecords, { proxy: 'attnOutRelL2' });
    expect(data.points.filter((p) => p.codec === 'kivi').map((p) => p.label).sort()).toEqual(
      ['bits=2', 'bits=2', 'bits=4', 'bits=4', 'bits=8', 'bits=8']);
    expect(svg).toMatch(/<text[^>]*>bits=8<\/text>/);
  });

  it('another proxy: KL has no V points (V leaves the scores exact) and says so', async () => {
    const plot = await renderPlot(cpuRecords, { proxy: 'kl' });
    expect(ariaLabels(plot.svg, 'line mark').sort()).toEqual(['kivi K', 'packkv K']);
    expect(count(plot.svg, 'point')).toBe(5);
    expect(plot.svg).toMatch(/X-axis titled 'kl: KL\(p_ref ‖ p_test\)/);
    expect(plot.notes).toContain('V records have no kl (scores do not depend on V)');
  });

  it('top-32 recall is on a linear axis and includes fp16 (recall 0.94 here, drawable)', async () => {
    const svgRecall = await renderPlotSvg(cpuRecords, { proxy: 'top32Recall', tensor: 'K' });
    expect(svgRecall).toMatch(/X-axis titled 'top32Recall: [^']*' for a linear scale/);
    expect(ariaLabels(svgRecall, 'line mark').sort()).toEqual(['fp16 K', 'kivi K', 'packkv K']);
  });

  it('tensor option keeps one tensor; the newest record of a repeated setting wins', () => {
    const rerun = makeRecord({ ...cpuRecords[2], time: '2026-11-24T00:00:00.000Z', attnOutRelL2: 0.25 });
    const data = plotData([...cpuRecords, rerun], { proxy: 'attnOutRelL2', tensor: 'K' });
    expect(data.points.every((p) => p.tensor === 'K')).toBe(true);
    expect(data.points.find((p) => p.label === 'bits=2')?.distortion).toBe(0.25);
  });

  it('refuses when nothing can be drawn, saying why', async () => {
    await expect(renderPlot(setting('fp16', '', 1, 0), { proxy: 'relL2' })).rejects.toThrow(
      /nothing to plot: .*fp16 K, V \(relL2 = 0\)/);
  });

  it('omits the speed-up chart without GPU records (CPU timings are not kernel timings)', () => {
    expect(count(svg, 'bar')).toBe(0);
    expect(svg).not.toContain('GPU speed-up');
  });
});

describe('speed-up chart', () => {
  it('appears with GPU records: one bar per setting × product, fp16 time ÷ codec time of the same run', async () => {
    const plot = await renderPlot([...cpuRecords, ...gpuRecords], { proxy: 'attnOutRelL2' });
    expect(plot.warnings).toEqual([]);
    expect(plot.speedups.map((b) => [b.setting, b.product, b.speedup])).toEqual([
      ['kivi', 'q·Kᵀ (K)', 2],
      ['kivi', 'p·V (V)', 2],
    ]);
    expect(count(plot.svg, 'bar')).toBe(2);
    expect(ariaLabels(plot.svg, 'bar')).toContain('kivi:bits=2,group=32,residual=128: q·Kᵀ (K) 2× the speed of fp16');
    expect(plot.svg).toContain("Title text 'GPU speed-up of the fused products over cuBLAS fp16 (same run)'");
  });

  it('needs the fp16 baseline of the same run', () => {
    const otherRun = gpuRecords.map((r) => (r.codec === 'fp16' ? { ...r, runId: 'another' } : r));
    expect(plotData(otherRun, { proxy: 'attnOutRelL2' }).speedups).toEqual([]);
  });
});

describe('textWidth', () => {
  it('is near DejaVu Sans widths, narrower than Vega’s 0.8 em guess', () => {
    expect(textWidth('bits=2', 10)).toBeCloseTo(10 * (0.62 + 0.3 + 0.4 + 0.62 + 0.84 + 0.62), 6); // b i t s = 2
    expect(textWidth('kivi', 10)).toBeLessThan(0.8 * 4 * 10);
    expect(textWidth('AB', 10, 'bold')).toBeGreaterThan(textWidth('AB', 10));
  });
});

describe('packkv report --plot', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'packkv-plot-'));
    await writeRecords(join(dir, 'results'), 'run-1', [...cpuRecords, ...gpuRecords]);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const cli = runCli;

  it('writes the SVG atomically (no temp file left) and prints one line', async () => {
    const file = join(dir, 'rd.svg');
    const run = await cli('report', join(dir, 'results'), '--plot', file);
    expect(run.err).toBe('');
    expect(run.code).toBe(0);
    expect(run.out).toBe(`wrote ${file} (10 points, 2 codecs)\n`);
    const svg = await readFile(file, 'utf8');
    expect(svg).toContain('</svg>');
    expect(count(svg, 'bar')).toBe(2);
    expect(await readdir(dir)).toEqual(['rd.svg', 'results']);
  });

  it('--proxy picks the x axis and --codec filters', async () => {
    const file = join(dir, 'kl.svg');
    const run = await cli('report', join(dir, 'results'), '--plot', file, '--proxy', 'kl', '--codec', 'kivi');
    expect(run.out).toBe(`wrote ${file} (3 points, 1 codec)\n`);
    const svg = await readFile(file, 'utf8');
    expect(svg).toMatch(/X-axis titled 'kl: /);
    expect(ariaLabels(svg, 'line mark')).toEqual(['kivi K']);
  });

  it('rejects an unknown proxy, --proxy without --plot, and --plot with a text format', async () => {
    const bad = await cli('report', join(dir, 'results'), '--plot', join(dir, 'x.svg'), '--proxy', 'snrDb');
    expect(bad.code).not.toBe(0);
    expect(bad.err).toMatch(/argument 'snrDb' is invalid/);
    const alone = await cli('report', join(dir, 'results'), '--proxy', 'kl');
    expect(alone.err).toMatch(/--proxy chooses the x axis of --plot/);
    const both = await cli('report', join(dir, 'results'), '--plot', join(dir, 'y.svg'), '--csv');
    expect(both.code).not.toBe(0);
    expect(both.err).toMatch(/cannot be used with/);
    expect((await readdir(dir)).filter((f) => f.endsWith('.svg')).sort()).toEqual(['kl.svg', 'rd.svg']);
  });
});
