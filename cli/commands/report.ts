// `packkv report`: reads result files and prints them as a table, CSV, JSON or Markdown, or draws them as SVG charts.

import { Command, Option } from 'commander';
import { PackkvError } from '../errors.js';
import { DEFAULT_PROXY, PROXY_FIELDS, renderPlot, type ProxyField } from '../plot.js';
import { renderReport, selectRecords, type LayerSelection, type ReportFormat } from '../report-format.js';
import { DEFAULT_RESULTS_DIR, readRecords, writeFileAtomic, type BenchRecord } from '../results.js';

interface ReportCliOptions {
  csv?: boolean;
  json?: boolean;
  markdown?: boolean;
  layers: LayerSelection;
  codec?: string;
  out?: string;
  plot?: string;
  proxy?: ProxyField;
}

const EXAMPLES = `
Examples:
  packkv report                                          table of every run under results/
  packkv report results/ --csv > results.csv             all fields as CSV
  packkv report results/2026-11-23T07-30-00-abc.jsonl --json
  packkv report --layers each --codec kivi --markdown    per-layer rows of one codec
  packkv report results/ --plot rd.svg                   ratio vs attention-output error, a line per codec
  packkv report --plot kl.svg --proxy kl --codec kivi    ratio vs KL of one codec's settings`;

function chosenFormat(opts: ReportCliOptions): ReportFormat {
  if (opts.csv) return 'csv';
  if (opts.json) return 'json';
  if (opts.markdown) return 'markdown';
  return 'table';
}

async function runReport(paths: string[], opts: ReportCliOptions): Promise<void> {
  const records = await readRecords(paths);
  const where = paths.length > 0 ? paths.join(', ') : `${DEFAULT_RESULTS_DIR}/`;
  if (records.length === 0) {
    throw new PackkvError(`no benchmark records found in ${where}; run \`packkv bench\` first`);
  }
  const selection = { layers: opts.layers, codec: opts.codec };
  if (selectRecords(records, selection).length === 0) {
    const hint = opts.codec !== undefined ? `codec '${opts.codec}'` : `--layers ${opts.layers}`;
    throw new PackkvError(`${records.length} records in ${where}, but none match ${hint} (try --layers each)`);
  }
  if (opts.plot !== undefined) return writePlot(records, opts.plot, opts);
  if (opts.proxy !== undefined) throw new PackkvError('--proxy chooses the x axis of --plot; give --plot <file.svg> too');
  const color = opts.out === undefined && process.stdout.isTTY === true;
  const text = renderReport(records, chosenFormat(opts), { ...selection, color });
  if (opts.out !== undefined) await writeFileAtomic(opts.out, text);
  else process.stdout.write(text);
}

async function writePlot(records: BenchRecord[], file: string, opts: ReportCliOptions): Promise<void> {
  const selected = selectRecords(records, { layers: 'all', codec: opts.codec });
  const plot = await renderPlot(selected, { proxy: opts.proxy ?? DEFAULT_PROXY });
  await writeFileAtomic(file, plot.svg);
  const codecs = `${plot.codecs.length} codec${plot.codecs.length === 1 ? '' : 's'}`;
  process.stdout.write(`wrote ${file} (${plot.points.length} points, ${codecs})\n`);
}

export function registerReport(program: Command): Command {
  const formats = ['csv', 'json', 'markdown'];
  const formatOption = (name: string, help: string) =>
    new Option(`--${name}`, help).conflicts(formats.filter((f) => f !== name));
  return program
    .command('report')
    .description('print benchmark results as a table, CSV, JSON or Markdown (same fields everywhere)')
    .argument('[paths...]', `result files (.jsonl) or directories of them (default: ${DEFAULT_RESULTS_DIR}/)`)
    .addOption(formatOption('csv', 'RFC 4180 CSV of every record field, with a header row'))
    .addOption(formatOption('json', 'JSON array of the full records'))
    .addOption(formatOption('markdown', 'GitHub Markdown table of the main columns'))
    .addOption(
      new Option('--layers <which>', "'all': dump-wide aggregate rows only; 'each': per-layer rows too")
        .choices(['all', 'each'])
        .default('all'),
    )
    .option('--codec <name>', 'only this codec (name, or full spec name:params)')
    .option('--out <file>', 'write to this file (atomically) instead of stdout')
    .addOption(
      new Option('--plot <file.svg>', 'draw rate–distortion curves (and GPU speed-ups where recorded) as SVG instead')
        .conflicts([...formats, 'out', 'layers']),
    )
    .addOption(
      new Option('--proxy <field>', `x axis of --plot (default: ${DEFAULT_PROXY})`).choices(PROXY_FIELDS),
    )
    .addHelpText('after', EXAMPLES)
    .action(runReport);
}
