// safetensors reader (header first, then one tensor at a time at its offset) and atomic writer.

import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { PackkvError } from '../errors.js';
import { DTYPE_BYTES, SUPPORTED_DTYPES, bf16ToF32, f16ToF32, isDtype, type Dtype } from './dtype.js';

export interface TensorEntry {
  name: string;
  dtype: Dtype;
  shape: number[];
  file: string;
  /** absolute byte offsets in the file */
  start: number;
  end: number;
}

export interface SafetensorsFile {
  path: string;
  metadata: Record<string, string>;
  tensors: Map<string, TensorEntry>;
  size: number;
}

export interface TensorToWrite {
  name: string;
  dtype: Dtype;
  shape: number[];
  data: Uint8Array;
}

/** Dtypes the format defines but packkv does not read: named so the error says "unsupported", not "unknown". */
const OTHER_SAFETENSORS_DTYPES = new Set([
  'BOOL', 'U8', 'I8', 'I16', 'U16', 'I32', 'U32', 'I64', 'U64', 'F64', 'C64',
  'F8_E4M3', 'F8_E5M2', 'F8_E8M0', 'F6_E2M3', 'F6_E3M2', 'F4',
]);
const MAX_HEADER_BYTES = 100_000_000; // the limit the reference implementation enforces
const READ_CHUNK = 1 << 30; // one read() call moves at most 2 GiB; stay well under it
const METADATA_KEY = '__metadata__';

if (endianness() !== 'LE') throw new PackkvError('safetensors data is little-endian; this host is big-endian');

export function elementCount(shape: readonly number[]): number {
  return shape.reduce((n, d) => n * d, 1);
}

export function formatShape(shape: readonly number[]): string {
  return `[${shape.join(',')}]`;
}

export async function openSafetensors(path: string): Promise<SafetensorsFile> {
  const fh = await openForRead(path);
  try {
    const size = (await fh.stat()).size;
    if (size < 8) throw new PackkvError(`truncated file: ${size} bytes, shorter than the 8-byte header length`, path);
    const headerLen = Number((await readExactly(fh, path, 0, 8)).readBigUInt64LE(0));
    if (8 + headerLen > size) {
      throw new PackkvError(`header length ${headerLen} goes past the end of the file (${size} bytes)`, path);
    }
    if (headerLen > MAX_HEADER_BYTES) throw new PackkvError(`header length ${headerLen} exceeds ${MAX_HEADER_BYTES} bytes`, path);
    const header = parseHeader(path, (await readExactly(fh, path, 8, headerLen)).toString('utf8'));
    const metadata = parseMetadata(path, header[METADATA_KEY]);
    const dataStart = 8 + headerLen;
    const entries = Object.entries(header)
      .filter(([name]) => name !== METADATA_KEY)
      .map(([name, raw]) => parseEntry(path, name, raw, dataStart));
    checkLayout(path, entries, size - dataStart, dataStart);
    return { path, metadata, size, tensors: new Map(entries.map((e) => [e.name, e])) };
  } finally {
    await fh.close();
  }
}

async function openForRead(path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r');
  } catch (err) {
    throw new PackkvError(`cannot open: ${(err as Error).message}`, path);
  }
}

async function readExactly(fh: FileHandle, path: string, position: number, length: number, tensor?: string): Promise<Buffer> {
  const buf = Buffer.allocUnsafeSlow(length);
  let done = 0;
  while (done < length) {
    const want = Math.min(length - done, READ_CHUNK);
    const { bytesRead } = await fh.read(buf, done, want, position + done);
    if (bytesRead === 0) {
      throw new PackkvError(`truncated file: wanted ${length} bytes at offset ${position}, got ${done}`, path, tensor);
    }
    done += bytesRead;
  }
  return buf;
}

function parseHeader(path: string, text: string): Record<string, unknown> {
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (err) {
    throw new PackkvError(`header is not valid JSON: ${(err as Error).message}`, path);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) {
    throw new PackkvError(`header is not a JSON object (got ${describeJson(header)})`, path);
  }
  return header as Record<string, unknown>;
}

function describeJson(value: unknown): string {
  return value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value;
}

function parseMetadata(path: string, raw: unknown): Record<string, string> {
  if (raw === undefined) return {};
  const ok = typeof raw === 'object' && raw !== null && !Array.isArray(raw) &&
    Object.values(raw).every((v) => typeof v === 'string');
  if (!ok) throw new PackkvError(`${METADATA_KEY} must be an object of string values`, path);
  return { ...(raw as Record<string, string>) };
}

function parseEntry(path: string, name: string, raw: unknown, dataStart: number): TensorEntry {
  const fail = (problem: string): never => {
    throw new PackkvError(problem, path, name);
  };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail(`header entry is ${describeJson(raw)}, not an object`);
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (!isDtype(dtype)) {
    const kind = typeof dtype === 'string' && OTHER_SAFETENSORS_DTYPES.has(dtype) ? 'unsupported' : 'unknown';
    fail(`${kind} dtype ${JSON.stringify(dtype)} (supported: ${SUPPORTED_DTYPES.join(', ')})`);
  }
  if (!isIntArray(shape)) fail(`shape ${JSON.stringify(shape)} is not an array of non-negative integers`);
  if (!isIntArray(offsets) || offsets.length !== 2 || offsets[0] > offsets[1]) {
    fail(`data_offsets ${JSON.stringify(offsets)} is not a pair [begin, end] of non-negative integers with begin <= end`);
  }
  const [begin, end] = offsets as number[];
  const dt = dtype as Dtype;
  const dims = shape as number[];
  const needed = elementCount(dims) * DTYPE_BYTES[dt];
  if (needed !== end - begin) {
    fail(`dtype ${dt} with shape ${formatShape(dims)} needs ${needed} bytes, offsets give ${end - begin}`);
  }
  return { name, dtype: dt, shape: [...dims], file: path, start: dataStart + begin, end: dataStart + end };
}

function isIntArray(value: unknown): value is number[] {
  return Array.isArray(value) && value.every((d) => Number.isSafeInteger(d) && d >= 0);
}

/**
 * Tensors must not overlap and must fit in the data section. When the tensors tile the data
 * section without gaps (as every writer lays them out) and the file ends early, the file was cut
 * short; otherwise the header's offsets themselves are wrong.
 */
function checkLayout(path: string, entries: TensorEntry[], dataSize: number, dataStart: number): void {
  const sorted = entries.filter((e) => e.end > e.start).sort((a, b) => a.start - b.start);
  let contiguous = sorted.length === 0 || sorted[0].start === dataStart;
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1];
    const cur = sorted[i];
    if (cur.start < prev.end) {
      const range = (e: TensorEntry) => `[${e.start - dataStart}, ${e.end - dataStart})`;
      throw new PackkvError(`overlaps tensor '${prev.name}': bytes ${range(cur)} vs ${range(prev)}`, path, cur.name);
    }
    if (cur.start !== prev.end) contiguous = false;
  }
  const dataEnd = dataStart + dataSize;
  const outside = sorted.find((e) => e.end > dataEnd);
  if (!outside) return;
  const claimed = sorted[sorted.length - 1].end - dataStart;
  if (contiguous) {
    throw new PackkvError(
      `truncated file: the header describes ${claimed} data bytes but only ${dataSize} are present`, path, outside.name);
  }
  throw new PackkvError(
    `data_offsets [${outside.start - dataStart}, ${outside.end - dataStart}] out of range: ` +
      `past the end of the file (data section is ${dataSize} bytes)`, path, outside.name);
}

export async function readTensorRaw(entry: TensorEntry): Promise<Uint8Array> {
  const fh = await openForRead(entry.file);
  try {
    const buf = await readExactly(fh, entry.file, entry.start, entry.end - entry.start, entry.name);
    return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  } finally {
    await fh.close();
  }
}

export async function readTensorF32(entry: TensorEntry): Promise<Float32Array> {
  const raw = await readTensorRaw(entry); // a fresh buffer at offset 0, so any element view is aligned
  const count = elementCount(entry.shape);
  if (entry.dtype === 'F32') return new Float32Array(raw.buffer, raw.byteOffset, count);
  const u16 = new Uint16Array(raw.buffer, raw.byteOffset, count);
  return entry.dtype === 'F16' ? f16ToF32(u16) : bf16ToF32(u16);
}

/** Writes a standard safetensors file via a temp file and a rename, so a failure never leaves a partial file. */
export async function writeSafetensors(
  path: string,
  tensors: TensorToWrite[],
  metadata?: Record<string, string>,
): Promise<void> {
  const header = encodeHeader(path, tensors, metadata);
  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    await writeAll(fh, header);
    for (const t of tensors) await writeAll(fh, t.data);
    await fh.close();
    await rename(tmp, path);
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
}

/** 8-byte length + JSON header padded with spaces so the data section starts 8-byte aligned. */
function encodeHeader(path: string, tensors: TensorToWrite[], metadata?: Record<string, string>): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header[METADATA_KEY] = metadata;
  let offset = 0;
  for (const t of tensors) {
    checkTensorToWrite(path, t, header);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  const out = Buffer.alloc(8 + padded, 0x20);
  out.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(out, 8);
  return out;
}

function checkTensorToWrite(path: string, t: TensorToWrite, header: Record<string, unknown>): void {
  if (t.name === METADATA_KEY || t.name in header) throw new PackkvError('duplicate or reserved tensor name', path, t.name);
  if (!isDtype(t.dtype)) throw new PackkvError(`unsupported dtype ${JSON.stringify(t.dtype)}`, path, t.name);
  if (!isIntArray(t.shape)) throw new PackkvError(`shape ${JSON.stringify(t.shape)} is not an array of non-negative integers`, path, t.name);
  const needed = elementCount(t.shape) * DTYPE_BYTES[t.dtype];
  if (needed !== t.data.byteLength) {
    throw new PackkvError(`dtype ${t.dtype} with shape ${formatShape(t.shape)} needs ${needed} bytes, data has ${t.data.byteLength}`, path, t.name);
  }
}

async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
  let done = 0;
  while (done < data.byteLength) {
    const { bytesWritten } = await fh.write(data, done, Math.min(data.byteLength - done, READ_CHUNK));
    done += bytesWritten;
  }
}
