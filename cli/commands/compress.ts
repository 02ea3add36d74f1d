// `packkv compress` / `packkv decompress`: a dump to a .pkv container and back to safetensors.
import { stat } from 'node:fs/promises';
import { basename } from 'node:path';

import Table from 'cli-table3';
import { Command } from 'commander';

import { groupDumpFiles } from '../dumps.js';
import { PackkvError } from '../errors.js';
import { f32ToBf16, f32ToF16 } from '../io/dtype.js';
import { loadLayer, openDump, type KvDump } from '../io/dump.js';
import { openPkv, readPkvEntry, writePkv, type PkvInput } from '../io/pkv.js';
import { elementCount, openSafetensors, readTensorRaw, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { native } from '../native.js';

interface CompressOptions {
  codec: string;
  output?: string;
  layout?: string;
  json: boolean;
}

interface SizeRow {
  tensor: string;
  role: string;
  originalBytes: number;
  fp16Bytes: number;
  storedBytes: number;
}

/** Every K/V tensor as a codec stream; queries and any other tensors of the dump kept raw. */
async function containerInputs(dump: KvDump, spec: string, rows: SizeRow[]): Promise<PkvInput[]> {
  const nat = native();
  const inputs: PkvInput[] = [];
  const streamed = new Set<string>();
  const shape = { kvHeads: dump.kvHeads, tokens: dump.tokens, headDim: dump.headDim };
  for (const ref of dump.layers) {
    const { k, v } = await loadLayer(dump, ref);
    for (const [entry, data, role] of [[ref.key, k, 'K'], [ref.value, v, 'V']] as const) {
      const enc = await nat.encode(spec, role, data, shape, entry.name).catch((e: Error) => {
        throw new PackkvError(e.message.replace(/^tensor '[^']*': /, ''), entry.file, entry.name);
      });
      inputs.push({ entry: { name: entry.name, encoding: 'stream', role, layer: ref.layer, dtype: entry.dtype, shape: entry.shape }, bytes: enc.stream });
      rows.push({ tensor: entry.name, role, originalBytes: entry.end - entry.start, fp16Bytes: data.length * 2, storedBytes: enc.deviceBytes });
      streamed.add(entry.name);
    }
  }
  for (const file of dump.files) {
    const st = await openSafetensors(file);
    for (const entry of st.tensors.values()) {
      if (streamed.has(entry.name)) continue;
      const role = dump.layers.some((l) => l.query?.name === entry.name) ? 'Q' : 'other';
      const layer = dump.layers.find((l) => l.query?.name === entry.name)?.layer ?? null;
      inputs.push({ entry: { name: entry.name, encoding: 'raw', role, layer, dtype: entry.dtype, shape: entry.shape }, bytes: await readTensorRaw(entry) });
      rows.push({ tensor: entry.name, role, originalBytes: entry.end - entry.start, fp16Bytes: elementCount(entry.shape) * 2, storedBytes: entry.end - entry.start });
    }
  }
  return inputs;
}

function sizeTable(rows: SizeRow[], fileBytes: number, out: string): string {
  const table = new Table({ head: ['tensors', 'count', 'original bytes', 'fp16 bytes', 'stored bytes', 'ratio vs fp16'], style: { head: [], border: [] } });
  for (const role of ['K', 'V', 'Q', 'other']) {
    const rs = rows.filter((r) => r.role === role);
    if (rs.length === 0) continue;
    const sum = (f: (r: SizeRow) => number) => rs.reduce((s, r) => s + f(r), 0);
    const fp16 = sum((r) => r.fp16Bytes), stored = sum((r) => r.storedBytes);
    table.push([role === 'other' ? 'other (raw)' : role === 'Q' ? 'Q (raw)' : role, rs.length, sum((r) => r.originalBytes), fp16, stored, `${(fp16 / stored).toFixed(2)}×`]);
  }
  return `${table.toString()}\n${out}: ${fileBytes} bytes (container header, stream headers and alignment included)\n`;
}

async function runCompress(files: string[], opts: CompressOptions): Promise<void> {
  const groups = groupDumpFiles(files);
  if (groups.length !== 1) throw new PackkvError(`compress takes the files of one dump, got ${groups.length} dumps`);
  const spec = native().parseCodec(opts.codec);
  const dump = await openDump(groups[0], { layout: opts.layout });
  const output = opts.output ?? `${dump.name}.pkv`;
  const rows: SizeRow[] = [];
  const inputs = await containerInputs(dump, opts.codec, rows);
  const bytes = await writePkv(
    output,
    { codec: spec.codec, params: spec.params, created: new Date().toISOString(), source: { files: dump.files.map((f) => basename(f)), layout: dump.layout }, metadata: dump.metadata },
    inputs,
  );
  if (opts.json) process.stdout.write(JSON.stringify({ output, codec: spec.codec, params: spec.params, fileBytes: bytes, tensors: rows }, null, 2) + '\n');
  else process.stdout.write(`${spec.codec}:${spec.params}\n` + sizeTable(rows, bytes, output));
}

function toDtypeBytes(data: Float32Array, dtype: TensorToWrite['dtype']): Uint8Array {
  if (dtype === 'F32') return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const half = dtype === 'F16' ? f32ToF16(data) : f32ToBf16(data);
  return new Uint8Array(half.buffer, half.byteOffset, half.byteLength);
}

async function runDecompress(file: string, opts: { output?: string }): Promise<void> {
  const pkv = await openPkv(file);
  const output = opts.output ?? file.replace(/\.pkv$/, '') + '.decompressed.safetensors';
  const tensors: TensorToWrite[] = [];
  for (const entry of pkv.header.tensors) {
    const bytes = await readPkvEntry(pkv, entry);
    if (entry.encoding === 'raw') {
      tensors.push({ name: entry.name, dtype: entry.dtype, shape: entry.shape, data: bytes });
      continue;
    }
    const decoded = await native().decode(bytes, entry.name).catch((e: Error) => {
      throw new PackkvError(e.message.replace(/^tensor '[^']*': /, ''), file, entry.name);
    });
    if (decoded.length !== elementCount(entry.shape))
      throw new PackkvError(`stream holds ${decoded.length} values, shape [${entry.shape}] needs ${elementCount(entry.shape)}`, file, entry.name);
    tensors.push({ name: entry.name, dtype: entry.dtype, shape: entry.shape, data: toDtypeBytes(decoded, entry.dtype) });
  }
  const metadata = { ...pkv.header.metadata, packkv_decompressed_from: `${pkv.header.codec}:${pkv.header.params}` };
  await writeSafetensors(output, tensors, metadata);
  const size = (await stat(output)).size;
  const raw = tensors.reduce((s, t) => s + t.data.byteLength, 0);
  process.stdout.write(`${output}: ${tensors.length} tensors, ${raw} data bytes (${size} bytes on disk), from ${pkv.header.codec}:${pkv.header.params}\n`);
}

export function registerCompress(program: Command): void {
  program
    .command('compress')
    .description('compress a dump\'s K/V tensors into a self-describing .pkv container')
    .argument('<dump...>', 'the safetensors files of one dump (shards or index JSON included)')
    .requiredOption('-c, --codec <spec>', "codec spec 'name:key=value,...' (see packkv bench --list-codecs)")
    .option('-o, --output <file>', 'output container (default: <dump name>.pkv)')
    .option('--layout <templates>', "tensor naming: 'canonical', 'hf-cache', or 'KEY,VALUE[,QUERY]' templates with {i}")
    .option('--json', 'print sizes as JSON', false)
    .addHelpText('after', `
Examples:
  packkv compress dump.safetensors --codec kivi:bits=2,group=32,residual=128 -o dump.pkv
  packkv compress dump.safetensors --codec fp16 -o dump-fp16.pkv --json`)
    .action((files: string[], opts: CompressOptions) => runCompress(files, opts));

  program
    .command('decompress')
    .description('decode a .pkv container back into a safetensors file (original names, shapes, dtypes)')
    .argument('<container>', '.pkv file written by packkv compress')
    .option('-o, --output <file>', 'output safetensors file (default: <container>.decompressed.safetensors)')
    .addHelpText('after', `
Examples:
  packkv decompress dump.pkv -o dump.restored.safetensors
  python3 -c "from safetensors.numpy import load_file; print(load_file('dump.restored.safetensors').keys())"`)
    .action((file: string, opts: { output?: string }) => runDecompress(file, opts));
}
