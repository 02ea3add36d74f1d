// safetensors reader/writer and dtype conversions: round trips, hand-computed bit patterns, every header error.

import { mkdtemp, open, readdir, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../cli/io/dtype.js';
import { openSafetensors, readTensorF32, readTensorRaw, writeSafetensors } from '../cli/io/safetensors.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'packkv-st-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const f16 = (xs: number[]) => Array.from(f32ToF16(new Float32Array(xs)));
const bf16 = (xs: number[]) => Array.from(f32ToBf16(new Float32Array(xs)));
const bytes = (u16: Uint16Array | Float32Array) => new Uint8Array(u16.buffer, u16.byteOffset, u16.byteLength);

/** A file from a header (object or raw JSON text) and a data section, as the format lays them out. */
function craft(header: unknown, data: Uint8Array | number = 0, headerLenOverride?: number): Buffer {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerLenOverride ?? json.length));
  const body = typeof data === 'number' ? Buffer.alloc(data) : Buffer.from(data);
  return Buffer.concat([len, json, body]);
}

async function openCrafted(name: string, content: Buffer): Promise<unknown> {
  const path = join(dir, name);
  await writeFile(path, content);
  return openSafetensors(path);
}

describe('f16 conversion', () => {
  it('encodes hand-computed bit patterns', () => {
    expect(f16([1, 65504, 2 ** -24, -2, 0, 2 ** -14, 0.5, -65504])).toEqual(
      [0x3c00, 0x7bff, 0x0001, 0xc000, 0x0000, 0x0400, 0x3800, 0xfbff]);
    expect(f16([-0])).toEqual([0x8000]);
  });

  it('rounds to nearest even, including at the subnormal boundary and into inf', () => {
    expect(f16([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -20])).toEqual([0x3c00, 0x3c02, 0x3c01]);
    expect(f16([2 ** -25, 3 * 2 ** -26, 3 * 2 ** -25, 2 ** -26])).toEqual([0x0000, 0x0001, 0x0002, 0x0000]);
    expect(f16([65519, 65520, 1e6, -1e6, 2 ** -14 - 2 ** -25])).toEqual([0x7bff, 0x7c00, 0x7c00, 0xfc00, 0x0400]);
    expect(f16([Infinity, -Infinity])).toEqual([0x7c00, 0xfc00]);
    const nan = f16([NaN])[0];
    expect(nan & 0x7c00).toBe(0x7c00);
    expect(nan & 0x03ff).not.toBe(0);
  });

  it('decodes normals, subnormals, zeros, inf and nan', () => {
    const out = f16ToF32(new Uint16Array([0x3c00, 0x7bff, 0x0001, 0x03ff, 0xc000, 0x7c00, 0xfc00, 0x7e00, 0x8000, 0x0400]));
    expect(Array.from(out.slice(0, 7))).toEqual([1, 65504, 2 ** -24, 1023 * 2 ** -24, -2, Infinity, -Infinity]);
    expect(Number.isNaN(out[7])).toBe(true);
    expect(Object.is(out[8], -0)).toBe(true);
    expect(out[9]).toBe(2 ** -14);
  });

  it('round-trips every f16 bit pattern exactly', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const back = f32ToF16(f16ToF32(all));
    for (let h = 0; h < 65536; h++) {
      const isNan = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
      if (isNan) expect(Number.isNaN(f16ToF32(new Uint16Array([back[h]]))[0])).toBe(true);
      else if (back[h] !== h) expect(back[h]).toBe(h);
    }
  });

  it('sends every midpoint between neighbouring f16 values to the even one', () => {
    const lo = new Uint16Array(0x7bff).map((_, i) => i); // 0 .. 0x7bfe, each with its successor
    const a = f16ToF32(lo);
    const b = f16ToF32(lo.map((h) => h + 1));
    const mid = a.map((x, i) => (x + b[i]) / 2); // exact in f32: 12 significant bits
    const got = f32ToF16(mid);
    for (let i = 0; i < lo.length; i++) {
      const even = (lo[i] & 1) === 0 ? lo[i] : lo[i] + 1;
      if (got[i] !== even) expect([i, got[i]]).toEqual([i, even]);
    }
  });
});

describe('bf16 conversion', () => {
  it('encodes and rounds to nearest even', () => {
    expect(bf16([1, -2, 0.15625, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20])).toEqual(
      [0x3f80, 0xc000, 0x3e20, 0x3f80, 0x3f82, 0x3f81]);
    expect(bf16([3.4028234663852886e38, Infinity, -Infinity, 2 ** -133])).toEqual([0x7f80, 0x7f80, 0xff80, 0x0001]);
    const nan = bf16([NaN])[0];
    expect(nan & 0x7f80).toBe(0x7f80);
    expect(nan & 0x007f).not.toBe(0);
  });

  it('decodes by widening to the top half of an f32', () => {
    const out = bf16ToF32(new Uint16Array([0x3f80, 0xc000, 0x0001, 0xff80, 0x7fc0, 0x7f7f]));
    expect(Array.from(out.slice(0, 4))).toEqual([1, -2, 2 ** -133, -Infinity]);
    expect(Number.isNaN(out[4])).toBe(true);
    expect(out[5]).toBe(3.3895313892515355e38);
  });
});

describe('writeSafetensors / read round trip', () => {
  const f32 = new Float32Array([1.5, -2.25, 3e-8, 65504, -0, 7]);
  const half = new Uint16Array([0x3c00, 0xc000, 0x0001, 0x7bff, 0x8000, 0x1234]);
  const brain = new Uint16Array([0x3f80, 0xc000, 0x0001, 0x7f7f, 0x8000]);
  const tensors = [
    { name: 'a.f16', dtype: 'F16' as const, shape: [2, 3], data: bytes(half) },
    { name: 'b.f32', dtype: 'F32' as const, shape: [3, 2], data: bytes(f32) },
    { name: 'c.bf16', dtype: 'BF16' as const, shape: [5], data: bytes(brain) },
    { name: 'd.empty', dtype: 'F32' as const, shape: [0, 4], data: new Uint8Array(0) },
  ];

  it('reads back the same bytes, shapes, metadata and values', async () => {
    const path = join(dir, 'round.safetensors');
    await writeSafetensors(path, tensors, { rope: 'post-rope', model: 'tiny' });
    const file = await openSafetensors(path);
    expect(file.metadata).toEqual({ rope: 'post-rope', model: 'tiny' });
    expect([...file.tensors.keys()]).toEqual(['a.f16', 'b.f32', 'c.bf16', 'd.empty']);
    for (const t of tensors) {
      const entry = file.tensors.get(t.name)!;
      expect([entry.dtype, entry.shape]).toEqual([t.dtype, t.shape]);
      expect(Array.from(await readTensorRaw(entry))).toEqual(Array.from(t.data));
    }
    expect(Array.from(await readTensorF32(file.tensors.get('b.f32')!))).toEqual(Array.from(f32));
    expect(Array.from(await readTensorF32(file.tensors.get('a.f16')!))).toEqual([1, -2, 2 ** -24, 65504, -0, Array.from(f16ToF32(new Uint16Array([0x1234])))[0]]);
    expect(Array.from(await readTensorF32(file.tensors.get('c.bf16')!)).slice(0, 2)).toEqual([1, -2]);
    expect(await readdir(dir)).not.toContain(`round.safetensors.tmp-${process.pid}`);
  });

  it('writes the standard layout: padded header, contiguous data in the given order', async () => {
    const path = join(dir, 'layout.safetensors');
    await writeSafetensors(path, tensors);
    const raw = await readFile(path);
    const headerLen = Number(raw.readBigUInt64LE(0));
    expect(headerLen % 8).toBe(0);
    const header = JSON.parse(raw.subarray(8, 8 + headerLen).toString());
    expect(Object.keys(header)).toEqual(['a.f16', 'b.f32', 'c.bf16', 'd.empty']);
    expect(header['a.f16'].data_offsets).toEqual([0, 12]);
    expect(header['b.f32'].data_offsets).toEqual([12, 36]);
    expect(header['c.bf16'].data_offsets).toEqual([36, 46]);
    expect(header['d.empty'].data_offsets).toEqual([46, 46]);
    expect(raw.length).toBe(8 + headerLen + 46);
    expect(Array.from(raw.subarray(8 + headerLen + 12, 8 + headerLen + 36))).toEqual(Array.from(bytes(f32)));
  });

  it('leaves neither a partial file nor its temp file when the write fails', async () => {
    const target = join(dir, 'is-a-dir');
    await mkdir(join(target, 'child'), { recursive: true });
    await expect(writeSafetensors(target, tensors)).rejects.toThrow();
    expect((await readdir(dir)).filter((f) => f.includes('.tmp-'))).toEqual([]);
    const bad = [{ name: 'x', dtype: 'F16' as const, shape: [2, 3], data: new Uint8Array(10) }];
    await expect(writeSafetensors(join(dir, 'bad.safetensors'), bad)).rejects.toThrow(/tensor 'x'.*needs 12 bytes, data has 10/);
    expect(await readdir(dir)).not.toContain('bad.safetensors');
  });
});

describe('openSafetensors errors name the file and the tensor', () => {
  const entry = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };

  it('file shorter than 8 bytes', async () => {
    await expect(openCrafted('short.safetensors', Buffer.alloc(5))).rejects.toThrow(/short\.safetensors: truncated file: 5 bytes/);
  });

  it('header length past the end of the file', async () => {
    await expect(openCrafted('hlen.safetensors', craft({ t: entry }, 8, 1000)))
      .rejects.toThrow(/hlen\.safetensors: header length 1000 goes past the end of the file/);
  });

  it('invalid JSON and non-object headers', async () => {
    await expect(openCrafted('json.safetensors', craft('{"t": [1,'))).rejects.toThrow(/json\.safetensors: header is not valid JSON/);
    await expect(openCrafted('arr.safetensors', craft([1, 2]))).rejects.toThrow(/arr\.safetensors: header is not a JSON object \(got an array\)/);
    await expect(openCrafted('null.safetensors', craft('null'))).rejects.toThrow(/null\.safetensors: header is not a JSON object \(got null\)/);
  });

  it('unknown and unsupported dtypes', async () => {
    await expect(openCrafted('unk.safetensors', craft({ t: { ...entry, dtype: 'F17' } }, 8)))
      .rejects.toThrow(/unk\.safetensors, tensor 't': unknown dtype "F17" \(supported: F16, BF16, F32\)/);
    await expect(openCrafted('i8.safetensors', craft({ q8: { ...entry, dtype: 'I8', data_offsets: [0, 2] } }, 2)))
      .rejects.toThrow(/i8\.safetensors, tensor 'q8': unsupported dtype "I8" \(supported: F16, BF16, F32\)/);
    await expect(openCrafted('f64.safetensors', craft({ d: { ...entry, dtype: 'F64', data_offsets: [0, 16] } }, 16)))
      .rejects.toThrow(/tensor 'd': unsupported dtype "F64"/);
  });

  it('shapes that are not arrays of non-negative integers', async () => {
    for (const [i, shape] of [[2, -1], 'abc', [1.5], null].entries()) {
      await expect(openCrafted(`shape${i}.safetensors`, craft({ bad: { ...entry, shape } }, 8)))
        .rejects.toThrow(new RegExp(`shape${i}\\.safetensors, tensor 'bad': shape .* is not an array of non-negative integers`));
    }
  });

  it('byte length that does not match shape and dtype', async () => {
    await expect(openCrafted('len.safetensors', craft({ w: { dtype: 'F16', shape: [2, 3], data_offsets: [0, 10] } }, 10)))
      .rejects.toThrow("len.safetensors, tensor 'w': dtype F16 with shape [2,3] needs 12 bytes, offsets give 10");
  });

  it('data_offsets out of range', async () => {
    const header = { a: { ...entry, data_offsets: [0, 8] }, far: { ...entry, data_offsets: [64, 72] } };
    await expect(openCrafted('range.safetensors', craft(header, 16)))
      .rejects.toThrow(/range\.safetensors, tensor 'far': data_offsets \[64, 72\] out of range: past the end of the file/);
    await expect(openCrafted('rev.safetensors', craft({ r: { ...entry, data_offsets: [8, 0] } }, 8)))
      .rejects.toThrow(/rev\.safetensors, tensor 'r': data_offsets \[8,0\] is not a pair/);
  });

  it('overlapping tensors', async () => {
    const header = { first: { ...entry, data_offsets: [0, 8] }, second: { ...entry, data_offsets: [4, 12] } };
    await expect(openCrafted('overlap.safetensors', craft(header, 12)))
      .rejects.toThrow(/overlap\.safetensors, tensor 'second': overlaps tensor 'first'/);
  });

  it('truncated data section', async () => {
    const path = join(dir, 'full.safetensors');
    await writeSafetensors(path, [
      { name: 'x', dtype: 'F32', shape: [4], data: new Uint8Array(16) },
      { name: 'y', dtype: 'F32', shape: [4], data: new Uint8Array(16) },
    ]);
    const full = await readFile(path);
    await expect(openCrafted('cut.safetensors', full.subarray(0, full.length - 6)))
      .rejects.toThrow(/cut\.safetensors, tensor 'y': truncated file: the header describes 32 data bytes but only 26 are present/);
  });
});

describe('reads only the header and the tensor asked for', () => {
  it('never requests the big tensor while opening and reading a small one', async () => {
    const path = join(dir, 'big.safetensors');
    const small = new Float32Array([3, 1, 4, 1]);
    await writeSafetensors(path, [
      { name: 'big', dtype: 'F32', shape: [1 << 18], data: new Uint8Array(4 << 18) },
      { name: 'small', dtype: 'F32', shape: [4], data: bytes(small) },
    ]);
    const probe = await open(path, 'r');
    const proto = Object.getPrototypeOf(probe) as { read: (...args: unknown[]) => Promise<unknown> };
    await probe.close();
    const spy = vi.spyOn(proto, 'read');
    try {
      const file = await openSafetensors(path);
      expect(Array.from(await readTensorF32(file.tensors.get('small')!))).toEqual([3, 1, 4, 1]);
      const requested = spy.mock.calls.reduce((sum, args) => sum + Number(args[2]), 0);
      expect(spy.mock.calls.length).toBeGreaterThanOrEqual(3); // length, header, tensor
      expect(requested).toBeLessThan(400);
    } finally {
      spy.mockRestore();
    }
  });

  it('handles offsets past 4 GiB in a sparse file', async () => {
    const bigBytes = 2 ** 33;
    const header = { huge: { dtype: 'F32', shape: [bigBytes / 4], data_offsets: [0, bigBytes] },
      tail: { dtype: 'F32', shape: [2], data_offsets: [bigBytes, bigBytes + 8] } };
    const head = craft(header);
    const path = join(dir, 'sparse.safetensors');
    const fh = await open(path, 'w');
    await fh.write(head, 0, head.length, 0);
    await fh.write(bytes(new Float32Array([2.5, -1])), 0, 8, head.length + bigBytes);
    await fh.close();
    const file = await openSafetensors(path);
    expect(file.size).toBe(head.length + bigBytes + 8);
    expect(Array.from(await readTensorF32(file.tensors.get('tail')!))).toEqual([2.5, -1]);
  });
});
