// The .pkv container: compressed K/V streams of a dump plus raw side tensors, with checksums.
//
// Layout (little endian):
//   0   "PKVC"                magic
//   4   u32 version (1)
//   8   u64 header length N
//   16  u32 crc32 of the header JSON, u32 reserved (0)
//   24  header JSON (N bytes, UTF-8), zero padding to a multiple of 16
//   ..  tensor data, each entry at its `offset` (relative to the data start), 16-byte aligned
import { open, rename, rm } from 'node:fs/promises';
import { crc32 } from 'node:zlib';

import { PackkvError } from '../errors.js';
import type { Dtype } from './dtype.js';

export const PKV_MAGIC = 'PKVC';
export const PKV_VERSION = 1;
const FIXED = 24;

export interface PkvEntry {
  /** the tensor's name in the source dump */
  name: string;
  /** 'stream': a packkv codec stream; 'raw': the original bytes (queries and other side tensors) */
  encoding: 'stream' | 'raw';
  role: 'K' | 'V' | 'Q' | 'other';
  layer: number | null;
  dtype: Dtype;
  shape: number[];
  offset: number;
  length: number;
  crc32: number;
}

export interface PkvHeader {
  format: 'packkv-container';
  version: number;
  codec: string;
  params: string;
  created: string;
  source: { files: string[]; layout: string };
  metadata: Record<string, string>;
  tensors: PkvEntry[];
}

export interface PkvInput {
  entry: Omit<PkvEntry, 'offset' | 'length' | 'crc32'>;
  bytes: Uint8Array;
}

const align16 = (n: number) => Math.ceil(n / 16) * 16;

/** Writes the container to a temp file and renames it, so no partial .pkv is ever left. */
export async function writePkv(
  path: string,
  head: Omit<PkvHeader, 'format' | 'version' | 'tensors'>,
  inputs: PkvInput[],
): Promise<number> {
  let offset = 0;
  const tensors: PkvEntry[] = inputs.map(({ entry, bytes }) => {
    const placed = { ...entry, offset, length: bytes.byteLength, crc32: crc32(bytes) };
    offset = align16(offset + bytes.byteLength);
    return placed;
  });
  const header: PkvHeader = { format: 'packkv-container', version: PKV_VERSION, ...head, tensors };
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const fixed = Buffer.alloc(FIXED);
  fixed.write(PKV_MAGIC, 0, 'latin1');
  fixed.writeUInt32LE(PKV_VERSION, 4);
  fixed.writeBigUInt64LE(BigInt(json.length), 8);
  fixed.writeUInt32LE(crc32(json), 16);
  const dataStart = align16(FIXED + json.length);
  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    await fh.write(fixed, 0, FIXED, 0);
    await fh.write(json, 0, json.length, FIXED);
    for (let i = 0; i < inputs.length; i++) {
      const bytes = inputs[i].bytes;
      await fh.write(bytes, 0, bytes.byteLength, dataStart + tensors[i].offset);
    }
    const end = dataStart + offset;
    await fh.truncate(end);
    await fh.close();
    await rename(tmp, path);
    return end;
  } catch (err) {
    await fh.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw err;
  }
}

export interface PkvFile {
  path: string;
  header: PkvHeader;
  dataStart: number;
  size: number;
}

/** Reads and checks the header: magic, version, header checksum, entries inside the file. */
export async function openPkv(path: string): Promise<PkvFile> {
  const fh = await open(path, 'r').catch((e: NodeJS.ErrnoException) => {
    throw new PackkvError(e.code === 'ENOENT' ? 'no such file' : `cannot open: ${e.message}`, path);
  });
  try {
    const size = (await fh.stat()).size;
    const fixed = Buffer.alloc(FIXED);
    const { bytesRead } = await fh.read(fixed, 0, FIXED, 0);
    if (bytesRead < FIXED || fixed.toString('latin1', 0, 4) !== PKV_MAGIC)
      throw new PackkvError(`not a .pkv container (bad magic; expected '${PKV_MAGIC}')`, path);
    const version = fixed.readUInt32LE(4);
    if (version !== PKV_VERSION)
      throw new PackkvError(`.pkv format version ${version} is not supported (this build reads ${PKV_VERSION})`, path);
    const headerLen = Number(fixed.readBigUInt64LE(8));
    if (FIXED + headerLen > size)
      throw new PackkvError(`header length ${headerLen} runs past the end of the file (${size} bytes)`, path);
    const json = Buffer.alloc(headerLen);
    await fh.read(json, 0, headerLen, FIXED);
    if (crc32(json) !== fixed.readUInt32LE(16)) throw new PackkvError('header checksum mismatch (file is corrupt)', path);
    let header: PkvHeader;
    try {
      header = JSON.parse(json.toString('utf8')) as PkvHeader;
    } catch (e) {
      throw new PackkvError(`header is not valid JSON: ${(e as Error).message}`, path);
    }
    if (header?.format !== 'packkv-container' || !Array.isArray(header.tensors))
      throw new PackkvError("header is not a packkv container header (no 'tensors' table)", path);
    const dataStart = align16(FIXED + headerLen);
    for (const t of header.tensors) {
      if (t.offset < 0 || dataStart + t.offset + t.length > size)
        throw new PackkvError(`data runs past the end of the file (truncated?)`, path, t.name);
    }
    return { path, header, dataStart, size };
  } finally {
    await fh.close();
  }
}

/** Reads one entry's bytes and verifies its checksum. */
export async function readPkvEntry(file: PkvFile, entry: PkvEntry): Promise<Uint8Array> {
  const fh = await open(file.path, 'r');
  try {
    const bytes = new Uint8Array(entry.length);
    const { bytesRead } = await fh.read(bytes, 0, entry.length, file.dataStart + entry.offset);
    if (bytesRead !== entry.length) throw new PackkvError('data is truncated', file.path, entry.name);
    if (crc32(bytes) !== entry.crc32)
      throw new PackkvError('checksum mismatch: the stored data is corrupt', file.path, entry.name);
    return bytes;
  } finally {
    await fh.close();
  }
}
