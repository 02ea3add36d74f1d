// KV dumps: find each layer's K/V (and query) tensors across safetensors shards, check shapes, load as f32.

import { readFile } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { PackkvError } from '../errors.js';
import type { Dtype } from './dtype.js';
import { formatShape, openSafetensors, readTensorF32, type TensorEntry } from './safetensors.js';

export interface LayerRef {
  layer: number;
  key: TensorEntry;
  value: TensorEntry;
  query?: TensorEntry;
}

export interface KvDump {
  /** basename of the first file without extension */
  name: string;
  files: string[];
  /** which naming convention matched: 'canonical', 'hf-cache', or the --layout template */
  layout: string;
  layers: LayerRef[];
  /** batch folded in: batch * kv_heads */
  kvHeads: number;
  /** query heads, batch folded in; 0 without queries */
  heads: number;
  tokens: number;
  headDim: number;
  /** the keys' dtype (values may differ; everything is read as f32) */
  dtype: Dtype;
  /** query positions per head; 0 without queries */
  nQueries: number;
  metadata: Record<string, string>;
  postRope: boolean;
}

export interface LoadedLayer {
  /** [kvHeads, tokens, headDim] */
  k: Float32Array;
  /** [kvHeads, tokens, headDim] */
  v: Float32Array;
  /** [nQueries, heads, headDim] */
  q?: Float32Array;
}

interface Convention {
  layout: string;
  key: string;
  value: string;
  query?: string;
}

const CONVENTIONS: Convention[] = [
  { layout: 'canonical', key: 'layers.{i}.key', value: 'layers.{i}.value', query: 'layers.{i}.query' },
  { layout: 'hf-cache', key: 'past_key_values.{i}.key', value: 'past_key_values.{i}.value', query: 'queries.{i}' },
];

const KV_SHAPE = '[kv_heads, tokens, head_dim] or [batch, kv_heads, tokens, head_dim]';
const Q_SHAPE = '[heads, q_tokens, head_dim] or [batch, heads, q_tokens, head_dim]';

export function describeLayout(): string[] {
  return [
    `canonical: layers.{i}.key, layers.{i}.value, optional layers.{i}.query; K/V ${KV_SHAPE}, query ${Q_SHAPE}`,
    'hf-cache: past_key_values.{i}.key, past_key_values.{i}.value [batch, kv_heads, tokens, head_dim], ' +
      'optional queries.{i} [batch, heads, q_tokens, head_dim]',
    "--layout 'KEY,VALUE[,QUERY]': name templates with {i} for the layer index, " +
      'e.g. model.layers.{i}.k_cache,model.layers.{i}.v_cache',
    'sharded dumps: pass every shard, or the index JSON (weight_map) that lists them',
  ];
}

export async function openDump(files: string[], opts: { layout?: string } = {}): Promise<KvDump> {
  if (files.length === 0) throw new PackkvError('no dump files given');
  const convention = opts.layout === undefined ? undefined : parseLayout(opts.layout);
  const { shards, indexes } = await expandIndexes(files);
  const opened = await Promise.all(shards.map((path) => openSafetensors(path)));
  const tensors = new Map<string, TensorEntry>();
  for (const file of opened) {
    for (const [name, entry] of file.tensors) {
      const other = tensors.get(name);
      if (other) throw new PackkvError(`tensor also present in '${other.file}'`, file.path, name);
      tensors.set(name, entry);
    }
  }
  for (const index of indexes) checkIndex(index, tensors);
  const metadata: Record<string, string> = Object.assign({}, ...opened.map((f) => f.metadata).reverse());
  const chosen = convention ?? CONVENTIONS.find((c) => matchLayers(c, tensors).size > 0);
  const layers = chosen ? pairLayers(chosen, matchLayers(chosen, tensors)) : [];
  if (!chosen || layers.length === 0) throw noKvError(shards, tensors, convention);
  return { name: dumpName(files[0]), files: shards, layout: chosen.layout, layers, ...checkShapes(layers), metadata, postRope: isPostRope(metadata) };
}

/** A --layout value: a convention's name, or 'KEY,VALUE[,QUERY]' templates with {i}. */
function parseLayout(layout: string): Convention {
  const named = CONVENTIONS.find((c) => c.layout === layout);
  if (named) return named;
  const parts = layout.split(',').map((p) => p.trim());
  const bad = parts.find((p) => p.split('{i}').length !== 2);
  if (parts.length < 2 || parts.length > 3 || bad !== undefined) {
    throw new PackkvError(
      `--layout '${layout}': expected 'KEY,VALUE[,QUERY]' templates each with one {i}` +
        (bad !== undefined ? ` ('${bad}' has ${bad.split('{i}').length - 1})` : ''),
    );
  }
  return { layout, key: parts[0], value: parts[1], query: parts[2] };
}

interface IndexFile {
  path: string;
  weightMap: Record<string, string>;
}

async function expandIndexes(files: string[]): Promise<{ shards: string[]; indexes: IndexFile[] }> {
  const shards: string[] = [];
  const indexes: IndexFile[] = [];
  const seen = new Set<string>();
  const add = (path: string) => {
    if (!seen.has(resolve(path))) shards.push(path);
    seen.add(resolve(path));
  };
  for (const file of files) {
    if (!file.endsWith('.json')) {
      add(file);
      continue;
    }
    const index = await readIndex(file);
    indexes.push(index);
    for (const shard of new Set(Object.values(index.weightMap))) add(shard);
  }
  return { shards, indexes };
}

async function readIndex(path: string): Promise<IndexFile> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(path, 'utf8'));
  } catch (err) {
    throw new PackkvError(`cannot read index JSON: ${(err as Error).message}`, path);
  }
  const weightMap = (parsed as { weight_map?: unknown } | null)?.weight_map;
  const valid = typeof weightMap === 'object' && weightMap !== null && !Array.isArray(weightMap) &&
    Object.values(weightMap).every((v) => typeof v === 'string');
  if (!valid) throw new PackkvError('index JSON has no weight_map object of {tensor: shard file}', path);
  const dir = dirname(path);
  const resolved = Object.entries(weightMap as Record<string, string>).map(([t, s]) => [t, isAbsolute(s) ? s : join(dir, s)]);
  return { path, weightMap: Object.fromEntries(resolved) };
}

function checkIndex(index: IndexFile, tensors: Map<string, TensorEntry>): void {
  for (const [name, shard] of Object.entries(index.weightMap)) {
    const entry = tensors.get(name);
    if (!entry || resolve(entry.file) !== resolve(shard)) {
      throw new PackkvError(`index places the tensor in '${shard}', which does not contain it`, index.path, name);
    }
  }
}

interface PartialLayer {
  key?: TensorEntry;
  value?: TensorEntry;
  query?: TensorEntry;
}

function templateRegex(template: string): RegExp {
  const [before, after] = template.split('{i}').map((s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  return new RegExp(`^${before}(\\d+)${after}$`);
}

function matchLayers(convention: Convention, tensors: Map<string, TensorEntry>): Map<number, PartialLayer> {
  const roles = (['key', 'value', 'query'] as const).filter((role) => convention[role] !== undefined);
  const patterns = roles.map((role) => [role, templateRegex(convention[role]!)] as const);
  const found = new Map<number, PartialLayer>();
  for (const [name, entry] of tensors) {
    for (const [role, regex] of patterns) {
      const m = regex.exec(name);
      if (!m) continue;
      const layer = Number(m[1]);
      found.set(layer, { ...found.get(layer), [role]: entry });
    }
  }
  // A convention whose only matches are queries has found no KV cache.
  return [...found.values()].some((l) => l.key || l.value) ? found : new Map();
}

function pairLayers(convention: Convention, found: Map<number, PartialLayer>): LayerRef[] {
  const layers: LayerRef[] = [];
  for (const [layer, { key, value, query }] of [...found].sort((a, b) => a[0] - b[0])) {
    const present = key ?? value ?? query!;
    if (!key || !value) {
      const missing = (['key', 'value'] as const).filter((role) => !{ key, value }[role]);
      const expected = missing.map((role) => `'${convention[role].replace('{i}', String(layer))}'`).join(' and ');
      throw new PackkvError(`layer ${layer} has this tensor but no ${missing.join(' and ')} tensor (expected ${expected})`, present.file, present.name);
    }
    layers.push(query ? { layer, key, value, query } : { layer, key, value });
  }
  return layers;
}

function noKvError(files: string[], tensors: Map<string, TensorEntry>, convention?: Convention): PackkvError {
  const looked = (convention ? [convention] : CONVENTIONS).map((c) => `${c.key} + ${c.value} (${c.layout})`);
  const names = [...tensors.keys()];
  const sample = names.slice(0, 5).map((n) => `'${n}'`).join(', ');
  const has = names.length === 0 ? 'no tensors at all' : `tensors such as ${sample}` +
    (names.length > 5 ? ` (and ${names.length - 5} more)` : '');
  return new PackkvError(
    `no K/V tensors found; looked for ${looked.join(', ')}; the dump has ${has}. ` +
      "Name the tensors with --layout 'KEY,VALUE[,QUERY]' templates using {i} for the layer index",
    files.join(', '),
  );
}

type ShapeFacts = Pick<KvDump, 'kvHeads' | 'heads' | 'tokens' | 'headDim' | 'dtype' | 'nQueries'>;

/** Every layer shares one K/V shape; queries (where present) share one shape compatible with it. */
function checkShapes(layers: LayerRef[]): ShapeFacts {
  const first = layers[0].key;
  const [kvHeads, tokens, headDim] = folded(first, KV_SHAPE);
  for (const { key, value } of layers) {
    folded(key, KV_SHAPE);
    folded(value, KV_SHAPE);
    requireSameShape(value, key, 'its key');
    requireSameShape(key, first, 'the first layer\'s key');
  }
  const queries = layers.flatMap((l) => (l.query ? [l.query] : []));
  if (queries.length === 0) return { kvHeads, heads: 0, tokens, headDim, dtype: first.dtype, nQueries: 0 };
  const [heads, nQueries, qDim] = folded(queries[0], Q_SHAPE);
  for (const q of queries) requireSameShape(q, queries[0], 'the first query');
  const q = queries[0];
  if (qDim !== headDim) throw shapeError(q, `query head_dim ${qDim} differs from key '${first.name}' head_dim ${headDim}`);
  const batch = (e: TensorEntry) => (e.shape.length === 4 ? e.shape[0] : 1);
  if (batch(q) !== batch(first)) throw shapeError(q, `query batch ${batch(q)} differs from key '${first.name}' batch ${batch(first)}`);
  if (heads % kvHeads !== 0) throw shapeError(q, `${heads} query heads is not a multiple of ${kvHeads} KV heads`);
  return { kvHeads, heads, tokens, headDim, dtype: first.dtype, nQueries };
}

/** Shape as [batch * heads, tokens, head_dim]. */
function folded(entry: TensorEntry, expected: string): [number, number, number] {
  const s = entry.shape;
  if (s.length === 3) return [s[0], s[1], s[2]];
  if (s.length === 4) return [s[0] * s[1], s[2], s[3]];
  throw shapeError(entry, `rank ${s.length} tensor; expected ${expected}`);
}

function requireSameShape(entry: TensorEntry, reference: TensorEntry, what: string): void {
  const same = entry.shape.length === reference.shape.length && entry.shape.every((d, i) => d === reference.shape[i]);
  if (!same) {
    throw shapeError(entry, `shape ${formatShape(entry.shape)} does not match ${what} '${reference.name}' shape ${formatShape(reference.shape)}`);
  }
}

function shapeError(entry: TensorEntry, problem: string): PackkvError {
  return new PackkvError(`${problem} (shape ${formatShape(entry.shape)})`, entry.file, entry.name);
}

/** Keys are post-RoPE unless the metadata says the dump holds them before rotation. */
function isPostRope(metadata: Record<string, string>): boolean {
  const norm = (v: string | undefined) => (v ?? '').toLowerCase().replace(/[\s_-]/g, '');
  if (['prerope', 'pre', 'before', 'none', 'unrotated'].includes(norm(metadata.rope))) return false;
  for (const key of ['post_rope', 'rope_applied', 'postrope']) {
    if (['false', '0', 'no'].includes(norm(metadata[key]))) return false;
  }
  return true;
}

function dumpName(file: string): string {
  return basename(file).replace(/\.index\.json$/, '').replace(/\.[^.]*$/, '') || basename(file);
}

export async function loadLayer(
  dump: KvDump,
  ref: LayerRef,
  opts: { allowNonFinite?: boolean } = {},
): Promise<LoadedLayer> {
  const [k, v, rawQ] = await Promise.all([
    readTensorF32(ref.key),
    readTensorF32(ref.value),
    ref.query ? readTensorF32(ref.query) : undefined,
  ]);
  if (!opts.allowNonFinite) {
    requireFinite(ref.key, k);
    requireFinite(ref.value, v);
    if (ref.query && rawQ) requireFinite(ref.query, rawQ);
  }
  if (!rawQ) return { k, v };
  return { k, v, q: queryPositionMajor(rawQ, dump.heads, dump.nQueries, dump.headDim) };
}

function requireFinite(entry: TensorEntry, data: Float32Array): void {
  let nan = 0;
  let inf = 0;
  for (let i = 0; i < data.length; i++) {
    const x = data[i];
    if (x - x !== 0) {
      if (Number.isNaN(x)) nan++;
      else inf++;
    }
  }
  if (nan + inf > 0) {
    throw new PackkvError(
      `has ${nan} NaN and ${inf} Inf values; refusing to compress non-finite data (pass --allow-non-finite to keep going)`,
      entry.file,
      entry.name,
    );
  }
}

/** [heads, nQueries, headDim] -> [nQueries, heads, headDim]: one decode step's queries side by side. */
function queryPositionMajor(q: Float32Array, heads: number, nQueries: number, headDim: number): Float32Array {
  const out = new Float32Array(q.length);
  for (let h = 0; h < heads; h++) {
    for (let t = 0; t < nQueries; t++) {
      const src = (h * nQueries + t) * headDim;
      out.set(q.subarray(src, src + headDim), (t * heads + h) * headDim);
    }
  }
  return out;
}
