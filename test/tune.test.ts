// Sweep grids and the tune search: grid expansion by hand, and the chosen setting is the most
// compressing one that passes on every layer.
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { evaluateSpec, loadDumpProblems } from '../cli/bench-run.js';
import { openDump } from '../cli/io/dump.js';
import { native } from '../cli/native.js';
import { expandSweep, expandValues } from '../cli/sweep.js';
import { compareToKivi, parseTarget, tuneCodec } from '../cli/tune.js';
import { writeDump } from './fixtures.js';
import { tempDir } from './helpers.js';

describe('sweep grids', () => {
  it('a..b:n gives n evenly spaced values, ends included', () => {
    expect(expandSweep('packkv:k_rel=0.02..0.2:10')).toEqual(
      [0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2].map((v) => `packkv:k_rel=${v}`),
    );
  });
  it('log spacing and lists, as a Cartesian product in order', () => {
    expect(expandValues('k_rel', '0.01..1:3log')).toEqual(['0.01', '0.1', '1']);
    expect(expandSweep('kivi:bits=1|2,group=32|64')).toEqual([
      'kivi:bits=1,group=32', 'kivi:bits=1,group=64', 'kivi:bits=2,group=32', 'kivi:bits=2,group=64',
    ]);
    expect(expandSweep('fp16')).toEqual(['fp16']);
  });
  it('rejects a malformed range', () => {
    expect(() => expandValues('k_rel', '0..1:3log')).toThrow('a, b > 0 for log');
  });
});

describe('tune', () => {
  it('parses targets and lists the valid names on a bad one', () => {
    expect(parseTarget('attn_out_rel=0.01')).toEqual({ name: 'attn_out_rel', metric: 'attnOutRelL2', atLeast: false, limit: 0.01 });
    expect(parseTarget('top32_recall=0.99').atLeast).toBe(true);
    expect(() => parseTarget('attn=0.01')).toThrow('attn_out_rel, kl, top32_recall');
  });

  it('picks the smallest KIVI bit width that passes on every layer, for K and V separately', async () => {
    const dir = tempDir();
    await writeDump(join(dir, 'd.safetensors'), { layers: 3, tokens: 256 });
    const loaded = await loadDumpProblems(await openDump([join(dir, 'd.safetensors')]), false);
    const ctx = { runId: 't', gitCommit: null, device: 'cpu' as const, allowNonFinite: false };
    const target = parseTarget('attn_out_rel=0.02');
    const kivi = native().codecs().find((c) => c.name === 'kivi')!;
    const row = await tuneCodec(loaded, kivi, target, ctx, []);
    // Recompute every bit width by hand: the choice must pass, every more compressing one must fail.
    for (const kind of ['K', 'V'] as const) {
      const worst: Record<string, number> = {};
      for (const bits of ['1', '2', '4', '8']) {
        const recs = await evaluateSpec(loaded, `kivi:bits=${bits}`, ctx, [kind]);
        worst[bits] = Math.max(...recs.filter((r) => r.layer !== 'all').map((r) => r.attnOutRelL2));
      }
      const chosen = (kind === 'K' ? row.k : row.v).value!;
      expect(worst[chosen]).toBeLessThanOrEqual(0.02);
      for (const fewer of ['1', '2', '4', '8'].filter((b) => Number(b) < Number(chosen))) expect(worst[fewer]).toBeGreaterThan(0.02);
      expect((kind === 'K' ? row.k : row.v).achieved).toBe(worst[chosen]);
    }
    // a key-only target holds V to the attention-output error of the tuned K setting
    const klRow = await tuneCodec(loaded, kivi, parseTarget('kl=1e-3'), ctx, []);
    expect(klRow.v.heldTo).toEqual({ name: 'attn_out_rel', metric: 'attnOutRelL2', atLeast: false, limit: Math.max(klRow.k.attnOutWorst!, 1e-6) });
    expect(klRow.k.achieved!).toBeLessThanOrEqual(1e-3);
    const [withVs] = compareToKivi([row]);
    expect(withVs.vsKivi).toBe(0);
    expect(row.totalRatio).toBeCloseTo((row.k.fp16Bytes * 2) / (row.k.deviceBytes! + row.v.deviceBytes!), 12);
  });
});
