// Shared test helpers: deterministic data, stream section access, norms.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Deterministic uniform [-0.5, 0.5) values (LCG), so tests never depend on Math.random. */
export function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296 - 0.5;
  };
}

export function filled(n: number, f: (i: number) => number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = f(i);
  return a;
}

/** ‖a − b‖ / ‖b‖ */
export function relDiff(a: Float32Array, b: Float32Array): number {
  let e = 0;
  let r = 0;
  for (let i = 0; i < a.length; i++) {
    e += (a[i] - b[i]) ** 2;
    r += b[i] ** 2;
  }
  return r === 0 ? Math.sqrt(e) : Math.sqrt(e / r);
}

/** The codec body of a packkv stream (after the 16-byte aligned header). */
export function streamBody(stream: Uint8Array): DataView {
  const dv = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  const header = Math.ceil((80 + dv.getUint16(20, true) + dv.getUint16(22, true)) / 16) * 16;
  return new DataView(stream.buffer, stream.byteOffset + header, stream.byteLength - header);
}

export function tempDir(prefix = 'packkv-test-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}
