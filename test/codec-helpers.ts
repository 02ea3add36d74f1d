// Codec test helpers: fp16-exact realistic tensors and decode-then-multiply reference products.
import { expect } from 'vitest';

import { f16ToF32, f32ToF16 } from '../cli/io/dtype.js';
import { native, type KvShape } from '../cli/native.js';
import { filled, lcg, relDiff } from './helpers.js';

/** The value of a binary16 bit pattern. */
export function half(bits: number): number {
  return f16ToF32(new Uint16Array([bits]))[0];
}

/** Round to fp16 so a tensor is exactly what an fp16 dump holds. */
export function asF16(x: Float32Array): Float32Array {
  return f16ToF32(f32ToF16(x));
}

export function realistic(shape: KvShape, seed: number, outlierChannel = 5): Float32Array {
  const r = lcg(seed);
  return asF16(filled(shape.kvHeads * shape.tokens * shape.headDim, (i) => {
    const d = i % shape.headDim;
    return r() * 2 + Math.sin(i * 0.001) + (d === outlierChannel ? 12 + r() : 0);
  }));
}

/** Reference products on a decoded tensor, in double. */
export function qkRef(k: Float32Array, q: Float32Array, s: KvShape, qHeads: number, nq: number): Float32Array {
  const out = new Float32Array(nq * qHeads * s.tokens);
  for (let n = 0; n < nq; n++)
    for (let h = 0; h < qHeads; h++) {
      const kh = Math.floor(h / (qHeads / s.kvHeads));
      for (let t = 0; t < s.tokens; t++) {
        let acc = 0;
        for (let d = 0; d < s.headDim; d++) acc += q[(n * qHeads + h) * s.headDim + d] * k[(kh * s.tokens + t) * s.headDim + d];
        out[(n * qHeads + h) * s.tokens + t] = acc;
      }
    }
  return out;
}

export function pvRef(v: Float32Array, p: Float32Array, s: KvShape, qHeads: number, nq: number): Float32Array {
  const out = new Float32Array(nq * qHeads * s.headDim);
  for (let n = 0; n < nq; n++)
    for (let h = 0; h < qHeads; h++) {
      const kh = Math.floor(h / (qHeads / s.kvHeads));
      for (let d = 0; d < s.headDim; d++) {
        let acc = 0;
        for (let t = 0; t < s.tokens; t++) acc += p[(n * qHeads + h) * s.tokens + t] * v[(kh * s.tokens + t) * s.headDim + d];
        out[(n * qHeads + h) * s.headDim + d] = acc;
      }
    }
  return out;
}

/** Fused q·Kᵀ and p·V on the compressed streams equal decode-then-multiply within 1e-5 (relative L2). */
export async function expectProducts(spec: string, s: KvShape, k: Float32Array, v: Float32Array, qHeads: number, nq: number) {
  const nat = native();
  const r = lcg(99);
  const ke = await nat.encode(spec, 'K', k, s);
  const ve = await nat.encode(spec, 'V', v, s);
  const q = filled(nq * qHeads * s.headDim, () => r() * 3);
  const p = filled(nq * qHeads * s.tokens, () => Math.abs(r()));
  expect(relDiff(await nat.qk(ke.stream, q, qHeads, nq), qkRef(await nat.decode(ke.stream), q, s, qHeads, nq))).toBeLessThan(1e-5);
  expect(relDiff(await nat.pv(ve.stream, p, qHeads, nq), pvRef(await nat.decode(ve.stream), p, s, qHeads, nq))).toBeLessThan(1e-5);
}
