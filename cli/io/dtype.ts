// Whole-array conversions between the dump dtypes (F16, BF16) and f32, with round-to-nearest-even.

export type Dtype = 'F16' | 'BF16' | 'F32';

export const DTYPE_BYTES: Record<Dtype, number> = { F16: 2, BF16: 2, F32: 4 };

export const SUPPORTED_DTYPES: readonly Dtype[] = ['F16', 'BF16', 'F32'];

export function isDtype(name: unknown): name is Dtype {
  return typeof name === 'string' && (SUPPORTED_DTYPES as readonly string[]).includes(name);
}

/** f32 bit pattern of one f16 bit pattern (exact: every f16 is an f32). */
function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0; // inf / nan, payload kept
  if (exp !== 0) return (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0; // 112 = 127 - 15
  if (mant === 0) return sign >>> 0;
  // Subnormal: normalise the mantissa so its leading 1 becomes the implicit bit.
  const shift = Math.clz32(mant) - 21; // leading zeros within the 10-bit field, plus one
  return (sign | ((113 - shift) << 23) | (((mant << shift) & 0x3ff) << 13)) >>> 0;
}

let f16Table: Float32Array | undefined;

/** 64K-entry table: one f32 per f16 bit pattern, built on first use (256 KiB). */
function f16ToF32Table(): Float32Array {
  if (f16Table) return f16Table;
  const bits = new Uint32Array(65536);
  for (let h = 0; h < 65536; h++) bits[h] = f16BitsToF32Bits(h);
  f16Table = new Float32Array(bits.buffer);
  return f16Table;
}

export function f16ToF32(u16: Uint16Array): Float32Array {
  const table = f16ToF32Table();
  const out = new Float32Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = table[u16[i]];
  return out;
}

/** f16 bit pattern nearest to an f32 bit pattern (ties to even; overflow to inf; NaN stays NaN). */
export function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) return sign | roundSubnormal(mant | 0x800000, 14 - e);
  const q = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry out of the mantissa bumps the exponent, up to inf: exactly what rounding should do.
  return sign | (rem > 0x1000 || (rem === 0x1000 && (q & 1) !== 0) ? q + 1 : q);
}

/** Rounds the 24-bit significand m shifted right by `shift` bits, ties to even. */
function roundSubnormal(m: number, shift: number): number {
  if (shift > 24) return 0; // below half the smallest subnormal
  const q = m >>> shift;
  const rem = m & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  return rem > half || (rem === half && (q & 1) !== 0) ? q + 1 : q;
}

export function f32ToF16(f: Float32Array): Uint16Array {
  const bits = new Uint32Array(f.buffer, f.byteOffset, f.length);
  const out = new Uint16Array(f.length);
  for (let i = 0; i < f.length; i++) out[i] = f32BitsToF16Bits(bits[i]);
  return out;
}

export function bf16ToF32(u16: Uint16Array): Float32Array {
  const bits = new Uint32Array(u16.length);
  for (let i = 0; i < u16.length; i++) bits[i] = u16[i] << 16;
  return new Float32Array(bits.buffer);
}

/** bf16 is the top half of an f32: round the low 16 bits away, ties to even; NaN stays (quiet) NaN. */
export function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7fffffff) > 0x7f800000) return (x >>> 16) | 0x40;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

export function f32ToBf16(f: Float32Array): Uint16Array {
  const bits = new Uint32Array(f.buffer, f.byteOffset, f.length);
  const out = new Uint16Array(f.length);
  for (let i = 0; i < f.length; i++) out[i] = f32BitsToBf16Bits(bits[i]);
  return out;
}
