// `packkv bench`: runs codecs over real KV dumps and records ratio, error, attention proxies, speed.
import { SingleBar } from 'cli-progress';
import { Command, Option } from 'commander';

import { benchDump } from '../bench-run.js';
import { defaultDumpFiles, groupDumpFiles } from '../dumps.js';
import { PackkvError } from '../errors.js';
import { describeLayout, openDump, type KvDump } from '../io/dump.js';
import { native, type CodecInfo } from '../native.js';
import { expandSweep } from '../sweep.js';
import { renderJson, renderSummaryLine, renderTable } from '../report-format.js';
import { renderSideBySide } from '../side-by-side.js';
import { DEFAULT_RESULTS_DIR, gitCommit, newRunId, writeRecords, type BenchRecord } from '../results.js';

interface BenchOptions {
  repeats: string;
  codec: string[];
  sweep: string[];
  device: 'auto' | 'cpu' | 'cuda';
  results: string;
  layout?: string;
  allowNonFinite: boolean;
  listCodecs: boolean;
  json: boolean;
  progress: boolean;
  layers: 'all' | 'each';
}

const EXAMPLES = `
Examples:
  packkv bench                                       all default codecs on the embedded real dump
  packkv bench my-dump.safetensors --codec kivi:bits=2,group=32,residual=128 --codec fp16
  packkv bench model-00001-of-00002.safetensors model-00002-of-00002.safetensors
  packkv bench dump.safetensors --layout 'model.layers.{i}.k,model.layers.{i}.v'
  packkv bench --sweep packkv:k_rel=0.02..0.2:10     10 settings of one knob (rate-distortion points)
  packkv bench --sweep 'kivi:bits=1|2|4|8,group=32|64'   every combination
  packkv bench --list-codecs                         codecs, parameters and defaults
  packkv bench --json > records.json                 machine-readable records

Dump layouts:
${describeLayout()
  .map((l) => `  ${l}`)
  .join('\n')}`;

export function formatCodecList(codecs: CodecInfo[]): string {
  const lines: string[] = [];
  for (const c of codecs) {
    lines.push(`${c.name}: ${c.summary}`);
    for (const p of c.params) {
      const allowed = p.choices ? `one of ${p.choices.join('|')}` : `${p.type} in [${p.min}, ${p.max}]`;
      const knob = p.tune ? `  [tune knob for ${p.tune.replace(/[+-]$/, '')}]` : '';
      lines.push(`    ${p.name}=${p.default}  (${allowed}) ${p.help}${knob}`);
    }
    lines.push(`    default runs: ${c.defaultRuns.join('  ')}`);
  }
  return lines.join('\n') + '\n';
}

/**
 * Picks the device: 'cuda' needs a usable GPU and kernels for every codec asked for; 'auto' uses
 * the GPU where it can and says in one line what runs on the CPU and why.
 */
function chooseDevice(requested: BenchOptions['device'], specs: string[], say: (line: string) => void): 'cpu' | 'cuda' {
  if (requested === 'cpu') return 'cpu';
  const nat = native();
  const cuda = nat.backends().cuda;
  const withKernels = new Set(nat.gpuCodecs());
  const cpuOnly = [...new Set(specs.map((s) => nat.parseCodec(s).codec))].filter((c) => !withKernels.has(c));
  if (requested === 'cuda') {
    if (!cuda.usable) throw new PackkvError(`--device cuda: ${cuda.reason}`);
    if (cpuOnly.length)
      throw new PackkvError(`--device cuda: no CUDA kernels for ${cpuOnly.join(', ')} in this build (GPU codecs: ${[...withKernels].join(', ') || 'none'})`);
    return 'cuda';
  }
  if (!cuda.usable) {
    say(`packkv: ${cuda.reason}; running on the CPU reference`);
    return 'cpu';
  }
  say(`packkv: ${cuda.device}: encode (checked against the CPU bytes), decode and fused products on the GPU` + (cpuOnly.length ? `; ${cpuOnly.join(', ')} on the CPU reference (no CUDA kernels yet)` : ''));
  return 'cuda';
}

async function runBench(files: string[], opts: BenchOptions): Promise<void> {
  const nat = native();
  if (opts.listCodecs) {
    process.stdout.write(formatCodecList(nat.codecs()));
    return;
  }
  const chosen = [...opts.codec, ...opts.sweep.flatMap(expandSweep)];
  const specs = chosen.length > 0 ? chosen : nat.codecs().flatMap((c) => c.defaultRuns);
  specs.forEach((s) => nat.parseCodec(s)); // fail on a bad spec before any work
  const say = (line: string) => process.stderr.write(line + '\n');
  const device = chooseDevice(opts.device, specs, say);
  const groups = files.length > 0 ? groupDumpFiles(files) : [defaultDumpFiles()];
  const dumps: KvDump[] = [];
  for (const g of groups) dumps.push(await openDump(g, { layout: opts.layout }));

  const steps = dumps.reduce((n, d) => n + d.layers.length * specs.length, 0);
  const showBar = opts.progress && process.stderr.isTTY === true;
  const bar = new SingleBar({
    format: 'bench [{bar}] {value}/{total} {step}',
    stream: process.stderr,
    hideCursor: true,
    clearOnComplete: true,
    noTTYOutput: false,
  });
  if (showBar) bar.start(steps, 0, { step: '' });
  const runId = newRunId();
  const ctx = {
    runId,
    gitCommit: gitCommit(),
    device,
    gpuRepeats: Number(opts.repeats),
    allowNonFinite: opts.allowNonFinite,
    onStep: (label: string) => {
      if (showBar) bar.increment(1, { step: label });
      else if (opts.progress) say(`  ${label}`);
    },
  };
  const records: BenchRecord[] = [];
  try {
    for (const dump of dumps) {
      if (!showBar && opts.progress)
        say(`bench: ${dump.name}: ${dump.layers.length} layers, ${dump.kvHeads} KV heads, ${dump.tokens} tokens, head_dim ${dump.headDim}`);
      records.push(...(await benchDump(dump, specs, ctx)));
    }
  } finally {
    if (showBar) bar.stop();
  }
  const file = await writeRecords(opts.results, runId, records);
  if (opts.json) {
    process.stdout.write(renderJson(records) + '\n');
    return;
  }
  const color = process.stdout.isTTY === true;
  process.stdout.write(opts.layers === 'each' ? renderTable(records, { layers: 'each', color }) : renderSideBySide(records, color));
  process.stdout.write('\n' + renderSummaryLine(records));
  say(`\n${records.length} records written to ${file}  (packkv report ${file} --csv)`);
}

export function registerBench(program: Command): Command {
  return program
    .command('bench')
    .description('compress real KV dumps with each codec; measure ratio, error, attention proxies and speed')
    .argument('[dumps...]', 'safetensors dump files, shards, or index JSON (default: the embedded real dump)')
    .option('-c, --codec <spec>', "codec spec 'name:key=value,...' (repeatable; default: every codec's default runs)",
      (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--sweep <grid>', "a grid of settings: 'packkv:k_rel=0.02..0.2:10' (n points; ':10log' log-spaced), 'kivi:bits=1|2|4|8' (repeatable)",
      (v: string, acc: string[]) => [...acc, v], [] as string[])
    .addOption(new Option('--device <device>', 'where codecs run').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--results <dir>', 'directory for the JSON-lines records', DEFAULT_RESULTS_DIR)
    .option('--repeats <n>', 'timed GPU repeats per kernel after 3 warm-ups (the median is reported)', '20')
    .option('--layout <templates>', "tensor naming: 'canonical', 'hf-cache', or 'KEY,VALUE[,QUERY]' templates with {i}")
    .option('--allow-non-finite', 'load tensors with NaN/Inf instead of refusing them (codecs still refuse them)', false)
    .option('--list-codecs', 'list codecs, their parameters and default runs, then exit', false)
    .option('--json', 'print the records as a JSON array instead of the table', false)
    .addOption(new Option('--layers <which>', "table rows: 'all' (dump-wide) or 'each' (per layer too)").choices(['all', 'each']).default('all'))
    .option('--no-progress', 'no progress output')
    .addHelpText('after', EXAMPLES)
    .action((dumps: string[], opts: BenchOptions) => runBench(dumps, opts));
}
