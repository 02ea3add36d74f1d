// Turns command-line file arguments into dumps: shards of one dump are grouped, the default dump found.
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

import { PackkvError } from './errors.js';
import { packageRoot } from './native.js';

const SHARD = /^(.*)-\d{5}-of-\d{5}\.safetensors$/;

/** The embedded real dump(s) under datasets/default/. */
export function defaultDumpFiles(): string[] {
  const dir = join(packageRoot(), 'datasets', 'default');
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.safetensors')).sort() : [];
  if (files.length === 0) throw new PackkvError('no embedded default dump found', dir);
  return files.map((f) => join(dir, f));
}

/**
 * Each argument is one dump, except shards ("name-00001-of-00003.safetensors"), which are grouped
 * into the dump they belong to; an index JSON is a dump of its own (it names its shards).
 */
export function groupDumpFiles(files: string[]): string[][] {
  const groups = new Map<string, string[]>();
  for (const file of files) {
    if (!existsSync(file)) throw new PackkvError('no such file', file);
    const shard = SHARD.exec(file);
    const key = shard ? shard[1] : file;
    groups.set(key, [...(groups.get(key) ?? []), file]);
  }
  return [...groups.values()];
}
