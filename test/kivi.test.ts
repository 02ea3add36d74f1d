// KIVI and fp16 codecs through the native addon: byte counts by hand, error bounds, fused products.
import { describe, expect, it } from 'vitest';

import { native, type KvShape, type TensorKind } from '../cli/native.js';
import { filled, relDiff, streamBody } from './helpers.js';
import { half, asF16, realistic, qkRef, pvRef, expectProducts } from './codec-helpers.js';

const nat = native();

describe('byte accounting, counted by hand', () => {
  const shape = { kvHeads: 1, tokens: 64, headDim: 32 };
  const x = realistic(shape, 1);

  it('kivi 2-bit K, T=64, G=32, R=32: 512 B codes + 128 B scales + 128 B mins = 768 B, 5.33×', async () => {
    const e = await nat.encode('kivi:bits=2,group=32,residual=32', 'K', x, shape);
    // codes: 64 tokens × 32 channels × 2 bits / 8; scales/mins: 2 token groups × 32 channels × 2 B
    expect(e.breakdown).toEqual({ payload: 512, scales: 128, zeros: 128, residual: 0, metadata: 0, host: 0 });
    expect(e.deviceBytes).toBe(768);
    expect(4096 / e.deviceBytes).toBeCloseTo(16 / 3, 12);
  });

  it('kivi 2-bit V, T=64, R=32: the last 32 tokens stay fp16', async () => {
    const e = await nat.encode('kivi:bits=2,group=32,residual=32', 'V', x, shape);
    // 32 quantized tokens: codes 32×32×2/8 = 256, one channel group per token: 32 scales, 32 mins
    expect(e.breakdown).toEqual({ payload: 256, scales: 64, zeros: 64, residual: 2048, metadata: 0, host: 0 });
    expect(e.deviceBytes).toBe(2432);
  });

  it('kivi K with T=100, R=32 keeps T mod R = 4 tokens fp16', async () => {
    const s = { kvHeads: 1, tokens: 100, headDim: 32 };
    const e = await nat.encode('kivi:bits=2,group=32,residual=32', 'K', realistic(s, 2), s);
    expect(e.breakdown).toEqual({ payload: 768, scales: 192, zeros: 192, residual: 256, metadata: 0, host: 0 });
  });

  it('kivi 1-bit and 8-bit: b + 32/G bits per element', async () => {
    const s = { kvHeads: 2, tokens: 128, headDim: 64 };
    const data = realistic(s, 3);
    const one = await nat.encode('kivi:bits=1,group=32,residual=0', 'K', data, s);
    const eight = await nat.encode('kivi:bits=8,group=64,residual=0', 'V', data, s);
    const n = 2 * 128 * 64;
    expect(one.deviceBytes * 8).toBe(n * (1 + 32 / 32));
    expect(eight.deviceBytes * 8).toBe(n * (8 + 32 / 64));
  });

  it('fp16 stores exactly 2 bytes per element and round-trips fp16 data bit for bit', async () => {
    const e = await nat.encode('fp16', 'K', x, shape);
    expect(e.deviceBytes).toBe(64 * 32 * 2);
    expect(Array.from(await nat.decode(e.stream))).toEqual(Array.from(x));
  });
});

/** Checks |x − x̂| ≤ scale/2 for every quantized K element, reading the group's scale from the stream. */
async function expectKeyBound(spec: string, bits: number, group: number, residual: number, x: Float32Array, s: KvShape) {
  const e = await nat.encode(spec, 'K', x, s);
  const y = await nat.decode(e.stream);
  const body = streamBody(e.stream);
  const r = residual > 0 ? s.tokens % residual : s.tokens % group;
  const tq = s.tokens - r;
  const groups = tq / group;
  const scaleOff = e.breakdown.payload;
  let worst = 0;
  let residualErr = 0;
  for (let h = 0; h < s.kvHeads; h++)
    for (let t = 0; t < s.tokens; t++)
      for (let d = 0; d < s.headDim; d++) {
        const i = (h * s.tokens + t) * s.headDim + d;
        const err = Math.abs(x[i] - y[i]);
        if (t >= tq) {
          residualErr = Math.max(residualErr, err); // residual tokens are fp16 and the input is fp16
          continue;
        }
        const scale = half(body.getUint16(scaleOff + ((h * groups + Math.floor(t / group)) * s.headDim + d) * 2, true));
        const bound = scale / 2 + 4e-7 * (Math.abs(x[i]) + scale * (2 ** bits - 1));
        worst = Math.max(worst, err / Math.max(bound, 1e-30));
      }
  expect(residualErr).toBe(0);
  expect(worst).toBeLessThanOrEqual(1); // every element within its group's bound (one assertion, fast)
  return worst;
}

describe('kivi error bound: |x − x̂| ≤ scale/2 (scale rounded up, min rounded down)', () => {
  const s = { kvHeads: 2, tokens: 200, headDim: 64 };
  for (const bits of [1, 2, 4, 8]) {
    it(`K at ${bits} bits, tokens not a multiple of the group`, async () => {
      const worst = await expectKeyBound(`kivi:bits=${bits},group=32,residual=64`, bits, 32, 64, realistic(s, 10 + bits), s);
      expect(worst).toBeGreaterThan(0.5); // the bound is tight: some element comes close to it
    });
  }

  it('V at 2 bits: per-token groups over channels, bound from the stream scales', async () => {
    const x = realistic(s, 7);
    const e = await nat.encode('kivi:bits=2,group=32,residual=0', 'V', x, s);
    const y = await nat.decode(e.stream);
    const body = streamBody(e.stream);
    const groups = s.headDim / 32;
    for (let h = 0; h < s.kvHeads; h++)
      for (let t = 0; t < s.tokens; t++)
        for (let d = 0; d < s.headDim; d++) {
          const i = (h * s.tokens + t) * s.headDim + d;
          const scale = half(body.getUint16(e.breakdown.payload + ((h * groups + Math.floor(d / 32)) * s.tokens + t) * 2, true));
          expect(Math.abs(x[i] - y[i])).toBeLessThanOrEqual(scale / 2 + 4e-7 * (Math.abs(x[i]) + 3 * scale));
        }
  });

  it('adversarial K: constant channel, huge outlier, all zeros, single token', async () => {
    const s1 = { kvHeads: 1, tokens: 96, headDim: 32 };
    const x = filled(96 * 32, (i) => (i % 32 === 0 ? 1.5 : i % 32 === 1 ? 0 : Math.sin(i)));
    x[40 * 32 + 7] = 60000; // one huge outlier in channel 7
    const xs = asF16(x);
    await expectKeyBound('kivi:bits=2,group=32,residual=0', 2, 32, 0, xs, s1);
    const y = await nat.decode((await nat.encode('kivi:bits=2,group=32,residual=0', 'K', xs, s1)).stream);
    for (let t = 0; t < 96; t++) {
      expect(y[t * 32]).toBe(1.5); // constant channel: scale 0, exact
      expect(y[t * 32 + 1]).toBe(0);
    }
    const zeros = new Float32Array(4 * 32);
    for (const kind of ['K', 'V'] as TensorKind[]) {
      const z = await nat.decode((await nat.encode('kivi:bits=2,group=32,residual=0', kind, zeros, { kvHeads: 1, tokens: 4, headDim: 32 })).stream);
      expect(Array.from(z)).toEqual(Array.from(zeros));
    }
    const single = asF16(filled(32, (i) => i / 7));
    const sk = await nat.encode('kivi:bits=2', 'K', single, { kvHeads: 1, tokens: 1, headDim: 32 });
    expect(sk.breakdown.residual).toBe(64); // one token < group: kept fp16
    expect(Array.from(await nat.decode(sk.stream))).toEqual(Array.from(single));
  });
});

describe('a group that does not divide head_dim leaves a partial last V group', () => {
  it('head_dim 96, group 64: channel groups of 64 and 32, counted by hand, bound per group', async () => {
    const s = { kvHeads: 1, tokens: 10, headDim: 96 };
    const x = realistic(s, 21, 70); // the outlier channel sits in the partial group
    const e = await nat.encode('kivi:bits=2,group=64,residual=0', 'V', x, s);
    // codes 10 tokens × 96 channels × 2 bits; 2 groups per token: 20 scales and 20 mins
    expect(e.breakdown).toEqual({ payload: 240, scales: 40, zeros: 40, residual: 0, metadata: 0, host: 0 });
    const y = await nat.decode(e.stream);
    const body = streamBody(e.stream);
    let worst = 0;
    for (let t = 0; t < 10; t++)
      for (let d = 0; d < 96; d++) {
        const scale = half(body.getUint16(240 + (Math.floor(d / 64) * 10 + t) * 2, true));
        worst = Math.max(worst, Math.abs(x[t * 96 + d] - y[t * 96 + d]) / (scale / 2 + 4e-7 * (Math.abs(x[t * 96 + d]) + 3 * scale)));
      }
    expect(worst).toBeLessThanOrEqual(1);
    const p = filled(2 * 10, (i) => (i % 10) / 45);
    expect(relDiff(await nat.pv(e.stream, p, 2, 1), pvRef(y, p, s, 2, 1))).toBeLessThan(1e-5);
  });
});

describe('fused products equal decode-then-multiply', () => {
  const cases: [string, KvShape][] = [
    ['kivi:bits=2,group=32,residual=128', { kvHeads: 2, tokens: 300, headDim: 128 }],
    ['kivi:bits=4,group=32,residual=0', { kvHeads: 2, tokens: 257, headDim: 96 }],
    ['kivi:bits=1,group=32,residual=32', { kvHeads: 1, tokens: 100, headDim: 64 }],
    ['kivi:bits=8,group=64,residual=64', { kvHeads: 2, tokens: 130, headDim: 256 }],
    ['fp16', { kvHeads: 2, tokens: 33, headDim: 64 }],
  ];
  for (const [spec, s] of cases) {
    it(`${spec} at [${s.kvHeads}, ${s.tokens}, ${s.headDim}] with GQA (4 query heads per KV head, 3 queries)`, async () => {
      await expectProducts(spec, s, realistic(s, 5), realistic(s, 6), s.kvHeads * 4, 3);
    });
  }

  it('query heads read their own KV head: a head-1-only key changes only heads 2 and 3', async () => {
    const s = { kvHeads: 2, tokens: 64, headDim: 32 };
    const k = filled(2 * 64 * 32, (i) => (i >= 64 * 32 ? 1 : 0));
    const e = await nat.encode('kivi:bits=2,residual=0', 'K', k, s);
    const scores = await nat.qk(e.stream, new Float32Array(4 * 32).fill(1), 4, 1);
    expect(Array.from(scores.subarray(0, 128))).toEqual(new Array(128).fill(0));
    expect(Array.from(scores.subarray(128))).toEqual(new Array(128).fill(32));
  });
});

describe('streams are deterministic and validated', () => {
  const s = { kvHeads: 2, tokens: 96, headDim: 64 };
  it('encoding twice gives identical bytes', async () => {
    const x = realistic(s, 8);
    const a = await nat.encode('kivi:bits=2', 'K', x, s);
    const b = await nat.encode('kivi:bits=2', 'K', x, s);
    expect(Buffer.from(a.stream).equals(Buffer.from(b.stream))).toBe(true);
    expect(nat.streamInfo(a.stream)).toEqual({ codec: 'kivi', params: 'bits=2,group=32,residual=128', kind: 'K', shape: s, breakdown: a.breakdown });
  });

  it('rejects bad magic, bad version, truncation and the wrong kind', async () => {
    const e = await nat.encode('kivi:bits=2', 'K', realistic(s, 9), s);
    const badMagic = e.stream.slice();
    badMagic[0] = 0x58;
    await expect(nat.decode(badMagic)).rejects.toThrow(/bad magic/);
    const badVersion = e.stream.slice();
    badVersion[4] = 9;
    await expect(nat.decode(badVersion)).rejects.toThrow(/version 9 is not supported/);
    await expect(nat.decode(e.stream.slice(0, e.stream.length - 1))).rejects.toThrow(/truncated/);
    await expect(nat.pv(e.stream, new Float32Array(2 * 96), 2, 1, 'layers.0.key')).rejects.toThrow(
      /tensor 'layers.0.key': p·V needs a V stream, got a K stream/,
    );
  });

  it('rejects unknown codecs and parameters, listing the valid ones', () => {
    expect(() => nat.parseCodec('kivy:bits=2')).toThrow(/unknown codec 'kivy' \(valid codecs: fp16, kivi/);
    expect(() => nat.parseCodec('kivi:bitz=2')).toThrow('valid parameters: bits, group, residual');
    expect(() => nat.parseCodec('kivi:bits=3')).toThrow('expected one of 1, 2, 4, 8');
    expect(() => nat.parseCodec('kivi:residual=48')).not.toThrow(); // shape-free checks pass; the encode checks
    expect(nat.parseCodec('kivi:group=64,bits=4')).toEqual({ codec: 'kivi', params: 'bits=4,group=64,residual=128' });
  });

  it('rejects shape-dependent parameter errors and non-finite data, naming the tensor', async () => {
    await expect(nat.encode('kivi:residual=48', 'K', realistic(s, 1), s, 'layers.2.key')).rejects.toThrow(
      "tensor 'layers.2.key': codec 'kivi': residual=48 must be a multiple of group=32",
    );
    const bad = realistic(s, 1);
    bad[3] = NaN;
    bad[4] = Infinity;
    await expect(nat.encode('kivi', 'K', bad, s, 'layers.0.key')).rejects.toThrow(/2 non-finite values/);
    await expect(nat.qk((await nat.encode('fp16', 'K', realistic(s, 1), s)).stream, new Float32Array(3 * 64), 3, 1)).rejects.toThrow(
      '3 query heads is not a multiple of 2 KV heads',
    );
  });
});

describe('kivi on the embedded real dump', () => {
  it('holds |x − x̂| ≤ scale/2 on every layer\'s keys, and fused q·Kᵀ matches decode on the real queries', async () => {
    const { defaultDumpFiles } = await import('../cli/dumps.js');
    const { openDump, loadLayer } = await import('../cli/io/dump.js');
    const dump = await openDump(defaultDumpFiles());
    expect(dump.nQueries).toBeGreaterThan(0);
    const s = { kvHeads: dump.kvHeads, tokens: dump.tokens, headDim: dump.headDim };
    for (const ref of dump.layers) {
      const { k, q } = await loadLayer(dump, ref);
      await expectKeyBound('kivi:bits=2,group=32,residual=128', 2, 32, 128, k, s);
      const e = await nat.encode('kivi:bits=2', 'K', k, s);
      const scores = await nat.qk(e.stream, q!, dump.heads, dump.nQueries);
      expect(relDiff(scores, qkRef(await nat.decode(e.stream), q!, s, dump.heads, dump.nQueries))).toBeLessThan(1e-5);
    }
  });
});
