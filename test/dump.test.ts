// KV dump discovery: naming conventions, templates, shards, GQA and batch folding, query re-layout, every error.

import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, type Dtype } from '../cli/io/dtype.js';
import { describeLayout, loadLayer, openDump } from '../cli/io/dump.js';
import { writeSafetensors } from '../cli/io/safetensors.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'packkv-dump-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Spec {
  name: string;
  shape: number[];
  dtype?: Dtype;
  /** value of element i; defaults to a pattern unique to the tensor */
  fill?: (i: number) => number;
}

/** Deterministic values exactly representable in f16 and bf16: small multiples of 1/8, offset per tensor. */
function values(spec: Spec, seed: number): Float32Array {
  const n = spec.shape.reduce((a, b) => a * b, 1);
  return new Float32Array(n).map((_, i) => (spec.fill ? spec.fill(i) : seed * 16 + ((i * 7) % 61) / 8 - 3));
}

function encode(data: Float32Array, dtype: Dtype): Uint8Array {
  const typed = dtype === 'F32' ? data : dtype === 'F16' ? f32ToF16(data) : f32ToBf16(data);
  return new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
}

/** Writes the tensors and returns the f32 values each holds, by name. */
async function make(file: string, specs: Spec[], metadata?: Record<string, string>): Promise<Map<string, Float32Array>> {
  const written = new Map<string, Float32Array>();
  const tensors = specs.map((spec, seed) => {
    const dtype = spec.dtype ?? 'F32';
    const data = values(spec, seed);
    const bytes = encode(data, dtype);
    const u16 = () => new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
    written.set(spec.name, dtype === 'F32' ? data : dtype === 'F16' ? f16ToF32(u16()) : bf16ToF32(u16()));
    return { name: spec.name, dtype, shape: spec.shape, data: bytes };
  });
  await writeSafetensors(join(dir, file), tensors, metadata);
  return written;
}

const path = (file: string) => join(dir, file);

describe('openDump: naming conventions', () => {
  it('canonical names with GQA queries, layers sorted numerically', async () => {
    const written = await make('canon.safetensors', [
      { name: 'layers.10.key', shape: [2, 5, 4] }, { name: 'layers.10.value', shape: [2, 5, 4] },
      { name: 'layers.2.key', shape: [2, 5, 4] }, { name: 'layers.2.value', shape: [2, 5, 4] },
      { name: 'layers.2.query', shape: [4, 3, 4] }, { name: 'layers.10.query', shape: [4, 3, 4] },
    ]);
    const dump = await openDump([path('canon.safetensors')]);
    expect({ name: dump.name, layout: dump.layout, kvHeads: dump.kvHeads, heads: dump.heads, tokens: dump.tokens,
      headDim: dump.headDim, nQueries: dump.nQueries, dtype: dump.dtype, postRope: dump.postRope })
      .toEqual({ name: 'canon', layout: 'canonical', kvHeads: 2, heads: 4, tokens: 5, headDim: 4, nQueries: 3, dtype: 'F32', postRope: true });
    expect(dump.layers.map((l) => [l.layer, l.key.name, l.value.name, l.query?.name])).toEqual([
      [2, 'layers.2.key', 'layers.2.value', 'layers.2.query'], [10, 'layers.10.key', 'layers.10.value', 'layers.10.query']]);
    const { k, v, q } = await loadLayer(dump, dump.layers[1]);
    expect(Array.from(k)).toEqual(Array.from(written.get('layers.10.key')!));
    expect(Array.from(v)).toEqual(Array.from(written.get('layers.10.value')!));
    const raw = written.get('layers.10.query')!;
    expect(q!.length).toBe(4 * 3 * 4);
    for (let t = 0; t < 3; t++) for (let h = 0; h < 4; h++) for (let j = 0; j < 4; j++) {
      expect(q![(t * 4 + h) * 4 + j]).toBe(raw[(h * 3 + t) * 4 + j]);
    }
  });

  it('Hugging Face cache names with batch folded into heads, f16 keys and bf16 values', async () => {
    const written = await make('hf.safetensors', [
      { name: 'past_key_values.0.key', shape: [2, 3, 4, 8], dtype: 'F16' },
      { name: 'past_key_values.0.value', shape: [2, 3, 4, 8], dtype: 'BF16' },
      { name: 'queries.0', shape: [2, 6, 2, 8], dtype: 'F16' },
      { name: 'lm_head.weight', shape: [2] },
    ], { rope: 'pre-rope' });
    const dump = await openDump([path('hf.safetensors')]);
    expect([dump.layout, dump.kvHeads, dump.heads, dump.tokens, dump.headDim, dump.nQueries, dump.dtype, dump.postRope])
      .toEqual(['hf-cache', 6, 12, 4, 8, 2, 'F16', false]);
    expect(dump.metadata).toEqual({ rope: 'pre-rope' });
    const { k, v, q } = await loadLayer(dump, dump.layers[0]);
    expect(Array.from(k)).toEqual(Array.from(written.get('past_key_values.0.key')!));
    expect(Array.from(v)).toEqual(Array.from(written.get('past_key_values.0.value')!));
    const raw = written.get('queries.0')!; // [batch 2, heads 6, q 2, d 8]
    for (let b = 0; b < 2; b++) for (let h = 0; h < 6; h++) for (let t = 0; t < 2; t++) for (let j = 0; j < 8; j++) {
      expect(q![(t * 12 + b * 6 + h) * 8 + j]).toBe(raw[((b * 6 + h) * 2 + t) * 8 + j]);
    }
  });

  it('a --layout template, without queries', async () => {
    await make('tmpl.safetensors', [
      { name: 'model.layers.0.k_cache', shape: [1, 3, 2, 4] }, { name: 'model.layers.0.v_cache', shape: [1, 3, 2, 4] },
      { name: 'model.layers.1.k_cache', shape: [1, 3, 2, 4] }, { name: 'model.layers.1.v_cache', shape: [1, 3, 2, 4] },
    ]);
    const template = 'model.layers.{i}.k_cache,model.layers.{i}.v_cache,model.layers.{i}.q';
    const dump = await openDump([path('tmpl.safetensors')], { layout: template });
    expect([dump.layout, dump.layers.length, dump.kvHeads, dump.heads, dump.nQueries, dump.tokens]).toEqual([template, 2, 3, 0, 0, 2]);
    const loaded = await loadLayer(dump, dump.layers[1]);
    expect([loaded.k.length, loaded.v.length, loaded.q]).toEqual([24, 24, undefined]);
    await expect(openDump([path('tmpl.safetensors')])).rejects.toThrow(/no K\/V tensors found/);
  });

  it('describeLayout names every accepted pattern', () => {
    const text = describeLayout().join('\n');
    for (const p of ['layers.{i}.key', 'layers.{i}.value', 'layers.{i}.query', 'past_key_values.{i}.key', 'queries.{i}', '--layout']) {
      expect(text).toContain(p);
    }
  });
});

describe('openDump: shards', () => {
  it('opens the shards an index JSON names, relative to the index', async () => {
    await mkdir(path('sharded'), { recursive: true });
    const w0 = await make('sharded/kv-00001-of-00002.safetensors', [
      { name: 'layers.0.key', shape: [2, 4, 4] }, { name: 'layers.0.value', shape: [2, 4, 4] }]);
    await make('sharded/kv-00002-of-00002.safetensors', [
      { name: 'layers.1.key', shape: [2, 4, 4] }, { name: 'layers.1.value', shape: [2, 4, 4] }]);
    const weightMap = { 'layers.0.key': 'kv-00001-of-00002.safetensors', 'layers.0.value': 'kv-00001-of-00002.safetensors',
      'layers.1.key': 'kv-00002-of-00002.safetensors', 'layers.1.value': 'kv-00002-of-00002.safetensors' };
    await writeFile(path('sharded/kv.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    const dump = await openDump([path('sharded/kv.safetensors.index.json')]);
    expect(dump.name).toBe('kv');
    expect(dump.files).toEqual([path('sharded/kv-00001-of-00002.safetensors'), path('sharded/kv-00002-of-00002.safetensors')]);
    expect(dump.layers.map((l) => [l.layer, l.key.file])).toEqual([
      [0, path('sharded/kv-00001-of-00002.safetensors')], [1, path('sharded/kv-00002-of-00002.safetensors')]]);
    expect(Array.from((await loadLayer(dump, dump.layers[0])).k)).toEqual(Array.from(w0.get('layers.0.key')!));
    const direct = await openDump(dump.files);
    expect(direct.layers.map((l) => l.layer)).toEqual([0, 1]);
  });

  it('refuses an index that places a tensor in the wrong shard, and a tensor in two shards', async () => {
    await writeFile(path('sharded/wrong.index.json'), JSON.stringify({ weight_map: {
      'layers.0.key': 'kv-00002-of-00002.safetensors', 'layers.1.key': 'kv-00002-of-00002.safetensors' } }));
    await expect(openDump([path('sharded/wrong.index.json')]))
      .rejects.toThrow(/wrong\.index\.json, tensor 'layers\.0\.key': index places the tensor in '.*kv-00002-of-00002\.safetensors', which does not contain it/);
    await writeFile(path('sharded/noweights.index.json'), '{"metadata": {}}');
    await expect(openDump([path('sharded/noweights.index.json')])).rejects.toThrow(/noweights\.index\.json: index JSON has no weight_map/);
    await make('dup.safetensors', [{ name: 'layers.0.key', shape: [2, 4, 4] }]);
    await expect(openDump([path('sharded/kv-00001-of-00002.safetensors'), path('dup.safetensors')]))
      .rejects.toThrow(/dup\.safetensors, tensor 'layers\.0\.key': tensor also present in '.*kv-00001-of-00002\.safetensors'/);
  });
});

describe('openDump errors name the file, the tensor and the problem', () => {
  const kv = (i: number, shape = [2, 4, 4]): Spec[] => [{ name: `layers.${i}.key`, shape }, { name: `layers.${i}.value`, shape }];

  it('no K/V tensors: says what was looked for and what the file has', async () => {
    await make('none.safetensors', ['embed.weight', 'norm.weight', 'queries.0'].map((name) => ({ name, shape: [2] })));
    const err = openDump([path('none.safetensors')]);
    await expect(err).rejects.toThrow(/none\.safetensors: no K\/V tensors found; looked for layers\.\{i\}\.key \+ layers\.\{i\}\.value \(canonical\), past_key_values\.\{i\}\.key \+ past_key_values\.\{i\}\.value \(hf-cache\)/);
    await expect(err).rejects.toThrow(/the dump has tensors such as 'embed\.weight', 'norm\.weight', 'queries\.0'/);
    await expect(openDump([path('none.safetensors')], { layout: 'a.{i}.k,a.{i}.v' })).rejects.toThrow(/looked for a\.\{i\}\.k \+ a\.\{i\}\.v \(a\.\{i\}\.k,a\.\{i\}\.v\)/);
  });

  it('malformed --layout templates', async () => {
    await expect(openDump([path('none.safetensors')], { layout: 'a.{i}.k' })).rejects.toThrow(/--layout 'a\.\{i\}\.k': expected 'KEY,VALUE\[,QUERY\]'/);
    await expect(openDump([path('none.safetensors')], { layout: 'a.{i}.k,a.v' })).rejects.toThrow(/\('a\.v' has 0\)/);
  });

  it('a layer with a key but no value', async () => {
    await make('novalue.safetensors', [...kv(0), { name: 'layers.3.key', shape: [2, 4, 4] }]);
    await expect(openDump([path('novalue.safetensors')]))
      .rejects.toThrow("novalue.safetensors, tensor 'layers.3.key': layer 3 has this tensor but no value tensor (expected 'layers.3.value')");
  });

  it('K/V shapes that differ within a layer or across layers', async () => {
    await make('kvshape.safetensors', [{ name: 'layers.0.key', shape: [2, 4, 4] }, { name: 'layers.0.value', shape: [2, 5, 4] }]);
    await expect(openDump([path('kvshape.safetensors')]))
      .rejects.toThrow("kvshape.safetensors, tensor 'layers.0.value': shape [2,5,4] does not match its key 'layers.0.key' shape [2,4,4]");
    await make('layershape.safetensors', [...kv(0), ...kv(1, [2, 6, 4])]);
    await expect(openDump([path('layershape.safetensors')]))
      .rejects.toThrow("layershape.safetensors, tensor 'layers.1.key': shape [2,6,4] does not match the first layer's key 'layers.0.key' shape [2,4,4]");
  });

  it('rank not 3 or 4', async () => {
    await make('rank.safetensors', kv(0, [8, 4]));
    await expect(openDump([path('rank.safetensors')]))
      .rejects.toThrow(/rank\.safetensors, tensor 'layers\.0\.key': rank 2 tensor; expected \[kv_heads, tokens, head_dim\] or \[batch, kv_heads, tokens, head_dim\] \(shape \[8,4\]\)/);
    await make('qrank.safetensors', [...kv(0), { name: 'layers.0.query', shape: [1, 1, 4, 1, 4] }]);
    await expect(openDump([path('qrank.safetensors')])).rejects.toThrow(/qrank\.safetensors, tensor 'layers\.0\.query': rank 5 tensor/);
  });

  it("queries whose head_dim differs from the keys'", async () => {
    await make('qdim.safetensors', [...kv(0), { name: 'layers.0.query', shape: [4, 1, 8] }]);
    await expect(openDump([path('qdim.safetensors')]))
      .rejects.toThrow("qdim.safetensors, tensor 'layers.0.query': query head_dim 8 differs from key 'layers.0.key' head_dim 4 (shape [4,1,8])");
  });

  it('query heads not a multiple of KV heads', async () => {
    await make('gqa.safetensors', [...kv(0, [5, 4, 4]), { name: 'layers.0.query', shape: [12, 1, 4] }]);
    await expect(openDump([path('gqa.safetensors')]))
      .rejects.toThrow("gqa.safetensors, tensor 'layers.0.query': 12 query heads is not a multiple of 5 KV heads");
  });

  it('NaN and Inf refused by default, kept with allowNonFinite', async () => {
    const bad = [NaN, 1, Infinity, 2, NaN];
    await make('nan.safetensors', [...kv(0), { name: 'layers.3.key', shape: [2, 4, 4], fill: (i) => bad[i] ?? 0 },
      { name: 'layers.3.value', shape: [2, 4, 4] }]);
    const dump = await openDump([path('nan.safetensors')]);
    expect(Array.from((await loadLayer(dump, dump.layers[0])).k.slice(0, 2))).toEqual([-3, -3 + 7 / 8]);
    await expect(loadLayer(dump, dump.layers[1])).rejects.toThrow(
      "nan.safetensors, tensor 'layers.3.key': has 2 NaN and 1 Inf values; refusing to compress non-finite data (pass --allow-non-finite to keep going)");
    const { k } = await loadLayer(dump, dump.layers[1], { allowNonFinite: true });
    expect([Number.isNaN(k[0]), k[1], k[2], k[3], Number.isNaN(k[4])]).toEqual([true, 1, Infinity, 2, true]);
  });
});
