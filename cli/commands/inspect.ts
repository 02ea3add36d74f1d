// `packkv inspect`: a dump's layout, shapes, dtype, queries, and per-layer K/V statistics.
import Table from 'cli-table3';
import { Command } from 'commander';

import { groupDumpFiles } from '../dumps.js';
import { PackkvError } from '../errors.js';
import { loadLayer, openDump, type KvDump } from '../io/dump.js';

export interface ChannelStats {
  absmax: number;
  /** max over channels of the per-channel absmax, divided by its median: how outlier-heavy channels are */
  channelSpread: number;
  /** the channel with the largest absmax */
  topChannel: number;
}

/** Per-channel absmax over all heads and tokens of a [heads, tokens, dim] tensor. */
export function channelStats(x: Float32Array, dim: number): ChannelStats {
  const perChannel = new Float64Array(dim);
  for (let i = 0; i < x.length; i++) {
    const a = Math.abs(x[i]);
    const c = i % dim;
    if (a > perChannel[c]) perChannel[c] = a;
  }
  const sorted = Array.from(perChannel).sort((a, b) => a - b);
  const median = dim % 2 ? sorted[(dim - 1) / 2] : (sorted[dim / 2 - 1] + sorted[dim / 2]) / 2;
  let top = 0;
  for (let c = 1; c < dim; c++) if (perChannel[c] > perChannel[top]) top = c;
  const absmax = sorted[dim - 1];
  return { absmax, channelSpread: median > 0 ? absmax / median : absmax > 0 ? Infinity : 1, topChannel: top };
}

export interface LayerStats {
  layer: number;
  key: ChannelStats;
  value: ChannelStats;
}

export async function dumpStats(dump: KvDump, allowNonFinite = false): Promise<LayerStats[]> {
  const out: LayerStats[] = [];
  for (const ref of dump.layers) {
    const { k, v } = await loadLayer(dump, ref, { allowNonFinite });
    out.push({ layer: ref.layer, key: channelStats(k, dump.headDim), value: channelStats(v, dump.headDim) });
  }
  return out;
}

function summary(dump: KvDump): [string, string][] {
  return [
    ['files', dump.files.join(', ')],
    ['layout', dump.layout],
    ['layers', `${dump.layers.length} (${dump.layers[0].layer}..${dump.layers[dump.layers.length - 1].layer})`],
    ['query heads', dump.heads ? String(dump.heads) : 'none (no queries)'],
    ['kv heads', `${dump.kvHeads}${dump.heads ? ` (GQA group ${dump.heads / dump.kvHeads})` : ''}`],
    ['tokens', String(dump.tokens)],
    ['head_dim', String(dump.headDim)],
    ['dtype', dump.dtype],
    ['queries', dump.nQueries ? `yes: last ${dump.nQueries} positions` : 'no (attention proxies use the last keys: proxy=self-keys)'],
    ['keys', dump.postRope ? 'post-RoPE' : 'pre-RoPE (dump metadata)'],
    ['fp16 bytes (K+V)', String(dump.layers.length * 2 * dump.kvHeads * dump.tokens * dump.headDim * 2)],
  ];
}

async function runInspect(files: string[], opts: { layout?: string; json: boolean; allowNonFinite: boolean }): Promise<void> {
  const groups = groupDumpFiles(files);
  if (groups.length !== 1) throw new PackkvError(`inspect takes the files of one dump, got ${groups.length} dumps`);
  const dump = await openDump(groups[0], { layout: opts.layout });
  const stats = await dumpStats(dump, opts.allowNonFinite);
  if (opts.json) {
    const { layers, ...rest } = dump;
    const layerNames = layers.map((l) => ({ layer: l.layer, key: l.key.name, value: l.value.name, query: l.query?.name ?? null }));
    process.stdout.write(JSON.stringify({ ...rest, layers: layerNames, stats }, null, 2) + '\n');
    return;
  }
  const head = new Table({ style: { head: [], border: [] } });
  for (const [k, v] of summary(dump)) head.push({ [k]: v });
  const table = new Table({
    head: ['layer', 'K absmax', 'K channel spread', 'K top channel', 'V absmax', 'V channel spread'],
    colAligns: ['right', 'right', 'right', 'right', 'right', 'right'],
    style: { head: [], border: [] },
  });
  for (const s of stats)
    table.push([s.layer, s.key.absmax.toFixed(3), s.key.channelSpread.toFixed(2), s.key.topChannel, s.value.absmax.toFixed(3), s.value.channelSpread.toFixed(2)]);
  const meta = Object.entries(dump.metadata).map(([k, v]) => `  ${k}: ${v.length > 100 ? v.slice(0, 97) + '...' : v}`);
  process.stdout.write(`${head.toString()}\n${table.toString()}\nchannel spread = max per-channel absmax / median per-channel absmax\n`);
  if (meta.length) process.stdout.write(`metadata:\n${meta.join('\n')}\n`);
}

export function registerInspect(program: Command): void {
  program
    .command('inspect')
    .description('print a dump\'s layout, shapes, dtype, queries and per-layer K/V statistics')
    .argument('<dump...>', 'the safetensors files of one dump (shards or index JSON included)')
    .option('--layout <templates>', "tensor naming: 'canonical', 'hf-cache', or 'KEY,VALUE[,QUERY]' templates with {i}")
    .option('--allow-non-finite', 'compute statistics even where tensors hold NaN/Inf', false)
    .option('--json', 'machine-readable output', false)
    .addHelpText('after', `
Examples:
  packkv inspect datasets/default/*.safetensors
  packkv inspect cache.safetensors --layout 'model.layers.{i}.k,model.layers.{i}.v' --json`)
    .action((files: string[], opts: { layout?: string; json: boolean; allowNonFinite: boolean }) => runInspect(files, opts));
}
