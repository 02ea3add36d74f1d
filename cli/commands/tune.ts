// `packkv tune`: the frontier of most compressing settings that keep an attention proxy within a target.
import { SingleBar } from 'cli-progress';
import Table from 'cli-table3';
import { Command } from 'commander';

import { loadDumpProblems } from '../bench-run.js';
import { defaultDumpFiles, groupDumpFiles } from '../dumps.js';
import { PackkvError } from '../errors.js';
import { openDump } from '../io/dump.js';
import { DEFAULT_RESULTS_DIR, gitCommit, newRunId, writeRecords, type BenchRecord } from '../results.js';
import { compareToKivi, parseTarget, tuneCodec, tunableCodecs, type FrontierRow, type TunedTensor } from '../tune.js';

interface TuneOptions {
  target: string;
  codec: string[];
  results: string;
  layout?: string;
  json: boolean;
  progress: boolean;
}

const fmtRatio = (x: number | null) => (x === null ? '–' : `${x.toFixed(2)}×`);
const fmtMetric = (x: number | null) => (x === null ? '–' : x.toPrecision(3));
const setting = (t: TunedTensor) => (t.value === null ? 'none meets the target' : `${t.knob}=${t.value}`);

export function renderFrontier(rows: FrontierRow[], targetText: string): string {
  const kivi = rows.find((r) => r.codec === 'kivi');
  const table = new Table({
    head: ['codec', 'K setting', 'V setting', 'K ratio', 'V ratio', 'total ratio', 'K worst layer', 'V worst layer', `vs KIVI${kivi?.k.value ? ` (bits K ${kivi.k.value}, V ${kivi.v.value ?? '–'})` : ''}`],
    colAligns: ['left', 'left', 'left', 'right', 'right', 'right', 'right', 'right', 'right'],
    style: { head: [], border: [] },
  });
  for (const r of rows) {
    const vs = r.vsKivi === null ? '–' : `${r.vsKivi >= 0 ? '+' : ''}${(r.vsKivi * 100).toFixed(1)}%`;
    table.push([r.codec, setting(r.k), setting(r.v), fmtRatio(r.k.ratio), fmtRatio(r.v.ratio), fmtRatio(r.totalRatio), fmtMetric(r.k.achieved), fmtMetric(r.v.achieved), r.codec === 'kivi' ? 'baseline' : vs]);
  }
  const vNote = rows[0] && rows[0].v.heldTo.name !== rows[0].k.heldTo.name ? `\n${targetText} is defined for keys only: each codec's V is held to the attention-output error its tuned K setting reaches (worst layer), and the V column shows that error.` : '';
  return `${table.toString()}\ntarget ${targetText} on every layer; ratios are device bytes (fp16 ÷ stored), "vs KIVI" compares total ratios.${vNote}\n`;
}

async function runTune(files: string[], opts: TuneOptions): Promise<void> {
  const target = parseTarget(opts.target);
  const all = tunableCodecs();
  const codecs = opts.codec.length ? opts.codec.map((name) => all.find((c) => c.name === name) ?? fail(name, all.map((c) => c.name))) : all;
  const groups = files.length > 0 ? groupDumpFiles(files) : [defaultDumpFiles()];
  if (groups.length !== 1) throw new PackkvError(`tune takes the files of one dump, got ${groups.length} dumps`);
  const dump = await openDump(groups[0], { layout: opts.layout });
  const loaded = await loadDumpProblems(dump, false);
  const runId = newRunId();
  const showBar = opts.progress && process.stderr.isTTY === true;
  const bar = new SingleBar({ format: 'tune [{bar}] {codec} {step}', stream: process.stderr, hideCursor: true, clearOnComplete: true });
  let evaluated = 0;
  const ctx = {
    runId, gitCommit: gitCommit(), device: 'cpu' as const, allowNonFinite: false,
    onStep: (label: string) => {
      evaluated++;
      if (showBar) bar.update(evaluated % 100, { step: label });
    },
  };
  if (showBar) bar.start(100, 0, { codec: '', step: '' });
  const records: BenchRecord[] = [];
  const rows = [];
  try {
    for (const codec of codecs) {
      if (showBar) bar.update({ codec: codec.name });
      else if (opts.progress) process.stderr.write(`tune: ${codec.name} ...\n`);
      rows.push(await tuneCodec(loaded, codec, target, ctx, records));
    }
  } finally {
    if (showBar) bar.stop();
  }
  const frontier = compareToKivi(rows);
  const file = await writeRecords(opts.results, runId, records);
  if (opts.json) process.stdout.write(JSON.stringify({ target: opts.target, dump: dump.name, frontier }, null, 2) + '\n');
  else process.stdout.write(renderFrontier(frontier, opts.target));
  process.stderr.write(`${records.length} records of every evaluated setting written to ${file}\n`);
}

function fail(name: string, valid: string[]): never {
  throw new PackkvError(`unknown or untunable codec '${name}' (tunable codecs: ${valid.join(', ')})`);
}

export function registerTune(program: Command): void {
  program
    .command('tune')
    .description('find, per codec, the most compressing setting that keeps an attention proxy within a target on every layer')
    .argument('[dump...]', 'the safetensors files of one dump (default: the embedded real dump)')
    .requiredOption('-t, --target <name=value>', 'attn_out_rel=0.01 (≤), kl=1e-3 (≤, keys), or top32_recall=0.99 (≥, keys)')
    .option('-c, --codec <name>', 'tune only this codec (repeatable; default: every tunable codec)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--results <dir>', 'directory for the records of every evaluated setting', DEFAULT_RESULTS_DIR)
    .option('--layout <templates>', "tensor naming: 'canonical', 'hf-cache', or 'KEY,VALUE[,QUERY]' templates with {i}")
    .option('--json', 'print the frontier as JSON', false)
    .option('--no-progress', 'no progress output')
    .addHelpText('after', `
Each codec declares its tune knob (packkv bench --list-codecs marks it): error bounds are bisected
in log space, bit widths scanned. K and V are tuned separately; the K record compresses only K,
the V record only V. A target defined for keys only (kl, top32_recall) holds V to the attention-
output error that the tuned K setting reaches.

Examples:
  packkv tune --target attn_out_rel=0.01
  packkv tune --target kl=1e-3 --codec packkv --codec kivi
  packkv tune my-dump.safetensors --target top32_recall=0.99 --json`)
    .action((files: string[], opts: TuneOptions) => runTune(files, opts));
}
