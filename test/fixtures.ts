// Canonical KV dumps for the CLI tests (deterministic F16 data) and helpers that damage files on purpose.
import { readdirSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import { f16ToF32, f32ToF16 } from '../cli/io/dtype.js';
import { writeSafetensors, type TensorToWrite } from '../cli/io/safetensors.js';
import { lcg } from './helpers.js';

export interface DumpSpec {
  layers?: number;
  kvHeads?: number;
  /** query heads; 0 writes no queries */
  heads?: number;
  tokens?: number;
  headDim?: number;
  nQueries?: number;
  /** key channel scaled up, as real post-RoPE keys have */
  outlierChannel?: number;
  metadata?: Record<string, string>;
  /** overrides of single elements: tensor name -> values written at the start of it */
  poison?: Record<string, number[]>;
  /** shape overrides by tensor name */
  shapes?: Record<string, number[]>;
}

export interface WrittenTensor {
  shape: number[];
  /** the values the file holds (after f16 rounding) */
  values: Float32Array;
  bytes: Uint8Array;
}

export const DEFAULT_DUMP = { layers: 2, kvHeads: 2, heads: 4, tokens: 160, headDim: 64, nQueries: 8, outlierChannel: 5 };

/** Writes layers.{i}.key/value (and .query) in F16; returns every tensor by name, in file order. */
export async function writeDump(path: string, spec: DumpSpec = {}): Promise<Map<string, WrittenTensor>> {
  const s = { ...DEFAULT_DUMP, ...spec };
  const rand = lcg(1234);
  const kvShape = [s.kvHeads, s.tokens, s.headDim];
  const plan: [string, number[], (i: number) => number][] = [];
  for (let l = 0; l < s.layers; l++) {
    plan.push([`layers.${l}.key`, kvShape, (i) => 2 * rand() * (i % s.headDim === s.outlierChannel ? 12 : 1) + 0.1 * l]);
    plan.push([`layers.${l}.value`, kvShape, () => rand()]);
    if (s.heads > 0) plan.push([`layers.${l}.query`, [s.heads, s.nQueries, s.headDim], () => 3 * rand()]);
  }
  const written = new Map<string, WrittenTensor>();
  const tensors: TensorToWrite[] = plan.map(([name, defaultShape, fill]) => {
    const shape = spec.shapes?.[name] ?? defaultShape;
    const f32 = new Float32Array(shape.reduce((a, b) => a * b, 1)).map((_, i) => fill(i));
    f32.set(spec.poison?.[name] ?? [], 0);
    const half = f32ToF16(f32);
    const bytes = new Uint8Array(half.buffer, half.byteOffset, half.byteLength);
    written.set(name, { shape, values: f16ToF32(half), bytes });
    return { name, dtype: 'F16', shape, data: bytes };
  });
  await writeSafetensors(path, tensors, spec.metadata ?? { producer: 'packkv-test', model: 'fixture' });
  return written;
}

/** A safetensors file from a literal header (object or text) and data bytes; the length field may lie. */
export async function writeRawSafetensors(path: string, header: object | string, data: Uint8Array, headerLen?: number): Promise<void> {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerLen ?? json.length));
  await writeFile(path, Buffer.concat([len, json, data]));
}

/** Copies a file, keeping its first `keep` bytes (negative: all but the last -keep). */
export async function truncatedCopy(from: string, to: string, keep: number): Promise<void> {
  const bytes = await readFile(from);
  await writeFile(to, bytes.subarray(0, keep < 0 ? bytes.length + keep : keep));
}

/** Copies a file with `patch` applied to its bytes. */
export async function patchedCopy(from: string, to: string, patch: (bytes: Buffer) => void): Promise<void> {
  const bytes = Buffer.from(await readFile(from));
  patch(bytes);
  await writeFile(to, bytes);
}

/** Start of the data section of a .pkv file (see cli/io/pkv.ts: 24 fixed bytes, header, 16-byte alignment). */
export function pkvDataStart(bytes: Buffer): number {
  return Math.ceil((24 + Number(bytes.readBigUInt64LE(8))) / 16) * 16;
}

/** Temp files an atomic writer might leave behind, anywhere under dir. */
export function tempLeftovers(dir: string): string[] {
  return (readdirSync(dir, { recursive: true }) as string[]).filter((f) => /\.tmp-|\.tmp$/.test(f)).map((f) => join(dir, f));
}

export function absMax(values: Float32Array): number {
  return values.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
}

export function range(values: Float32Array): number {
  let lo = Infinity;
  let hi = -Infinity;
  for (const x of values) (lo = Math.min(lo, x)), (hi = Math.max(hi, x));
  return hi - lo;
}
