// The result store: BenchRecord, written as JSON lines to results/<run-id>.jsonl atomically, and read back.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { PackkvError } from './errors.js';
import type { ByteBreakdown, TensorKind } from './native-types.js';

export const RECORD_SCHEMA = 1;
export const DEFAULT_RESULTS_DIR = 'results';

/** One codec × dump × layer (or 'all' layers) × tensor measurement. Field names are a stable format. */
export interface BenchRecord {
  schema: 1;
  runId: string;
  /** ISO 8601 */
  time: string;
  dump: string;
  dumpFiles: string[];
  /** layer index, or 'all' for the dump-wide aggregate */
  layer: number | 'all';
  tensor: TensorKind;
  codec: string;
  /** canonical parameter string, e.g. "bits=2,group=32,residual=128" */
  params: string;
  device: 'cpu' | 'cuda';
  gitCommit: string | null;
  kvHeads: number;
  heads: number;
  tokens: number;
  headDim: number;
  fp16Bytes: number;
  deviceBytes: number;
  hostBytes: number;
  totalBytes: number;
  breakdown: ByteBreakdown;
  /** fp16Bytes / deviceBytes */
  compressionRatio: number;
  /** fp16Bytes / totalBytes */
  totalCompressionRatio: number;
  maxAbs: number;
  rmse: number;
  relL2: number;
  snrDb: number;
  /** where the attention queries came from: the dump's own, or its last keys standing in */
  proxy: 'queries' | 'self-keys';
  /** null for V records (scores do not depend on V) */
  scoresRelL2: number | null;
  kl: number | null;
  tv: number | null;
  top32Recall: number | null;
  top1pctRecall: number | null;
  /** attention output with only this tensor compressed, the other exact */
  attnOutRelL2: number;
  attnOutCosine: number;
  sinkMassErr: number | null;
  /** attnOutRelL2 per query head (index = query head), aggregated over the record's layers */
  headAttnOutRelL2: number[];
  /** kl per query head; null for V records */
  headKl: number[] | null;
  /** top32Recall per query head; null for V records */
  headTop32Recall: number[] | null;
  /** MB/s (1e6 bytes) of fp16 input */
  encodeMBps: number;
  decodeMBps: number;
  /** fused product time on the compressed stream */
  qkMs: number | null;
  pvMs: number | null;
  notes: string[];
}

/** Every record field in export order; the mapped type makes the compiler reject a missing field. */
const FIELD_ORDER: { [K in keyof BenchRecord]: true } = {
  schema: true, runId: true, time: true, dump: true, dumpFiles: true, layer: true, tensor: true,
  codec: true, params: true, device: true, gitCommit: true, kvHeads: true, heads: true, tokens: true,
  headDim: true, fp16Bytes: true, deviceBytes: true, hostBytes: true, totalBytes: true, breakdown: true,
  compressionRatio: true, totalCompressionRatio: true, maxAbs: true, rmse: true, relL2: true, snrDb: true,
  proxy: true, scoresRelL2: true, kl: true, tv: true, top32Recall: true, top1pctRecall: true,
  attnOutRelL2: true, attnOutCosine: true, sinkMassErr: true, headAttnOutRelL2: true, headKl: true,
  headTop32Recall: true, encodeMBps: true, decodeMBps: true,
  qkMs: true, pvMs: true, notes: true,
};
export const RECORD_FIELDS = Object.keys(FIELD_ORDER) as (keyof BenchRecord)[];

/** Fields whose value may be ±Infinity or NaN (an exact codec has snrDb = Infinity). */
const NUMERIC_FIELDS = new Set<string>([
  'compressionRatio', 'totalCompressionRatio', 'maxAbs', 'rmse', 'relL2', 'snrDb', 'scoresRelL2', 'kl',
  'tv', 'top32Recall', 'top1pctRecall', 'attnOutRelL2', 'attnOutCosine', 'sinkMassErr', 'encodeMBps',
  'decodeMBps', 'qkMs', 'pvMs',
]);
const NON_FINITE: Record<string, number> = { Infinity: Infinity, '-Infinity': -Infinity, NaN: NaN };

/**
 * JSON has no Infinity: non-finite numbers are written as the strings "Infinity", "-Infinity", "NaN"
 * (JSON.stringify would silently turn them into null) and revived by recordFromJson.
 */
export function nonFiniteReplacer(_key: string, value: unknown): unknown {
  return typeof value === 'number' && !Number.isFinite(value) ? String(value) : value;
}

export function recordToJson(record: BenchRecord, indent?: number): string {
  return JSON.stringify(record, nonFiniteReplacer, indent);
}

/** Checks a parsed JSON value is a BenchRecord and revives non-finite numbers; throws a plain Error naming the field. */
export function recordFromJson(value: unknown): BenchRecord {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new Error('not a JSON object');
  const obj = value as Record<string, unknown>;
  if (obj.schema !== RECORD_SCHEMA) throw new Error(`unknown schema ${JSON.stringify(obj.schema)} (expected ${RECORD_SCHEMA})`);
  for (const field of ['runId', 'dump', 'codec', 'params'] as const) {
    if (typeof obj[field] !== 'string') throw new Error(`field '${field}' missing or not a string`);
  }
  if (obj.tensor !== 'K' && obj.tensor !== 'V') throw new Error(`field 'tensor' must be 'K' or 'V'`);
  if (obj.layer !== 'all' && typeof obj.layer !== 'number') throw new Error(`field 'layer' must be a number or 'all'`);
  for (const field of NUMERIC_FIELDS) {
    const v = obj[field];
    if (typeof v === 'string' && v in NON_FINITE) obj[field] = NON_FINITE[v];
  }
  return obj as unknown as BenchRecord;
}

/** Sortable and unique: UTC time to the second, then a random suffix, e.g. 2026-11-23T07-30-00-3f9a1c. */
export function newRunId(now: Date = new Date()): string {
  const stamp = now.toISOString().slice(0, 19).replace(/:/g, '-');
  return `${stamp}-${randomBytes(3).toString('hex')}`;
}

/** Writes content via a temp file in the same directory and a rename, so readers never see half a file. */
export async function writeFileAtomic(file: string, content: string): Promise<void> {
  const dir = path.dirname(file);
  const temp = path.join(dir, `.${path.basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  try {
    const handle = await fs.open(temp, 'w');
    try {
      await handle.writeFile(content, 'utf8');
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temp, file);
  } catch (err) {
    await fs.rm(temp, { force: true });
    throw new PackkvError(`cannot write: ${(err as Error).message}`, file);
  }
}

async function readIfExists(file: string): Promise<string> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return '';
    throw new PackkvError(`cannot read: ${(err as Error).message}`, file);
  }
}

/**
 * Appends records to dir/<runId>.jsonl: old content plus new lines go to a temp file that replaces
 * the old one, so a crash leaves either the old file or the complete new one. Returns the file path.
 */
export async function writeRecords(dir: string, runId: string, records: BenchRecord[]): Promise<string> {
  if (!/^[\w.-]+$/.test(runId)) throw new PackkvError(`invalid run id '${runId}'`);
  await fs.mkdir(dir, { recursive: true });
  const file = path.join(dir, `${runId}.jsonl`);
  let old = await readIfExists(file);
  if (old.length > 0 && !old.endsWith('\n')) old += '\n';
  const lines = records.map((r) => recordToJson(r) + '\n').join('');
  await writeFileAtomic(file, old + lines);
  return file;
}

function parseLines(file: string, text: string): BenchRecord[] {
  const records: BenchRecord[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === '') continue;
    try {
      records.push(recordFromJson(JSON.parse(line)));
    } catch (err) {
      throw new PackkvError(`bad record: ${(err as Error).message}`, `${file}:${i + 1}`);
    }
  }
  return records;
}

/** The .jsonl files a path names: itself, or (for a directory) the sorted *.jsonl inside it. */
async function resultFiles(p: string): Promise<string[]> {
  let stat;
  try {
    stat = await fs.stat(p);
  } catch {
    throw new PackkvError('no such file or directory', p);
  }
  if (!stat.isDirectory()) return [p];
  const names = (await fs.readdir(p)).filter((n) => n.endsWith('.jsonl') && !n.startsWith('.')).sort();
  return names.map((n) => path.join(p, n));
}

/** Reads records from files and directories; with no paths, from results/ (missing = no records). */
export async function readRecords(paths: string[]): Promise<BenchRecord[]> {
  if (paths.length === 0) {
    const exists = await fs.stat(DEFAULT_RESULTS_DIR).then(() => true, () => false);
    if (!exists) return [];
    paths = [DEFAULT_RESULTS_DIR];
  }
  const records: BenchRecord[] = [];
  for (const p of paths) {
    for (const file of await resultFiles(p)) {
      const text = await fs.readFile(file, 'utf8').catch((err: Error) => {
        throw new PackkvError(`cannot read: ${err.message}`, file);
      });
      records.push(...parseLines(file, text));
    }
  }
  return records;
}

/** Short commit hash of HEAD, or null outside a git checkout (never throws). */
export function gitCommit(cwd: string = process.cwd()): string | null {
  try {
    const out = execFileSync('git', ['rev-parse', '--short', 'HEAD'], {
      cwd,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
      timeout: 5000,
    });
    return out.trim() || null;
  } catch {
    return null;
  }
}
