// CLI end to end: every command run in-process through main(), on small canonical dumps, plus one spawned binary.

import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { openSafetensors, readTensorF32, readTensorRaw } from '../cli/io/safetensors.js';
import type { BenchRecord } from '../cli/results.js';
import {
  absMax, DEFAULT_DUMP, patchedCopy, pkvDataStart, range, tempLeftovers, truncatedCopy, writeDump, writeRawSafetensors,
  type WrittenTensor,
} from './fixtures.js';
import { runCli } from './run-cli.js';

const ROOT = join(import.meta.dirname, '..');
let dir: string;
let dump: string;
let noQueries: string;
let written: Map<string, WrittenTensor>;
const at = (name: string) => join(dir, name);

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'packkv-cli-'));
  dump = at('kv.safetensors');
  noQueries = at('noq.safetensors');
  written = await writeDump(dump);
  await writeDump(noQueries, { heads: 0 });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number;
  out: string;
  err: string;
}

/** Runs `packkv ...args` in-process with stdout and stderr captured; process.exit (commander's --help) throws. */
const cli = runCli;

async function ok(...args: string[]): Promise<Run> {
  const run = await cli(...args);
  expect(run.err, `packkv ${args.join(' ')}`).not.toMatch(/packkv: error:/);
  expect(run.code).toBe(0);
  return run;
}

const kiviSpec = 'kivi:bits=2,group=32,residual=32';
const sortKey = (r: BenchRecord) => `${r.codec} ${r.layer} ${r.tensor}`;

describe('bench and report', () => {
  const results = () => at('results');
  let records: BenchRecord[];

  beforeAll(async () => {
    const run = await ok('bench', dump, '--codec', 'fp16', '--codec', kiviSpec, '--results', results(), '--json', '--no-progress');
    records = JSON.parse(run.out);
  });

  it('writes one record per layer and tensor, plus the layer=all aggregate, for each codec', () => {
    expect(records.map(sortKey).sort()).toEqual(
      ['fp16', 'kivi'].flatMap((c) => [0, 1, 'all'].flatMap((l) => ['K', 'V'].map((t) => `${c} ${l} ${t}`))).sort());
    for (const r of records) {
      expect([r.kvHeads, r.heads, r.tokens, r.headDim, r.proxy, r.dump]).toEqual([2, 4, 160, 64, 'queries', 'kv']);
      expect(r.fp16Bytes).toBe((r.layer === 'all' ? 2 : 1) * 2 * 160 * 64 * 2);
      expect(r.notes).toEqual([]);
    }
  });

  it('fp16 is exact: ratio 1, no error, no attention error', () => {
    const fp16 = records.filter((r) => r.codec === 'fp16');
    expect(fp16).toHaveLength(6);
    for (const r of fp16) {
      expect([r.compressionRatio, r.relL2, r.maxAbs, r.attnOutRelL2]).toEqual([1, 0, 0, 0]);
      expect(r.snrDb).toBe('Infinity'); // JSON has no Infinity: written as a string
    }
  });

  it('per query head proxies: one value per head, and the pooled error lies between the heads', () => {
    for (const r of records) {
      expect(r.headAttnOutRelL2).toHaveLength(4);
      if (r.codec === 'fp16') expect(r.headAttnOutRelL2).toEqual([0, 0, 0, 0]);
      // a norm-weighted pool of per-head errors is bounded by the best and worst head
      expect(r.attnOutRelL2).toBeLessThanOrEqual(Math.max(...r.headAttnOutRelL2) + 1e-12);
      expect(r.attnOutRelL2).toBeGreaterThanOrEqual(Math.min(...r.headAttnOutRelL2) - 1e-12);
      if (r.tensor === 'K') {
        expect(r.headKl).toHaveLength(4);
        // KL is a mean over rows, and every head has the same number of rows: the mean of the heads
        const mean = r.headKl!.reduce((a, b) => a + b, 0) / 4;
        expect(r.kl!).toBeCloseTo(mean, 12);
      } else {
        expect([r.headKl, r.headTop32Recall]).toEqual([null, null]);
      }
    }
  });

  it('kivi ratios match the hand count (K: 160 mod 32 = 0 tokens in fp16; V: the last 32 tokens in fp16)', () => {
    const kivi = records.filter((r) => r.codec === 'kivi');
    expect(kivi).toHaveLength(6);
    for (const r of kivi) {
      expect(r.params).toBe('bits=2,group=32,residual=32');
      // 2-bit codes plus an fp16 scale and min per group of 32: 3 bits per element.
      const expected = r.tensor === 'K' ? 16 / 3 : (16 * 160) / (3 * 128 + 16 * 32);
      expect(r.compressionRatio).toBeCloseTo(expected, 10);
      expect(r.relL2).toBeGreaterThan(0);
      expect(r.relL2).toBeLessThan(0.5);
      expect(r.attnOutRelL2).toBeGreaterThan(0);
    }
  });

  it('the results dir holds one .jsonl with a line per record', () => {
    const files = readdirSync(results());
    expect(files).toHaveLength(1);
    expect(files[0]).toMatch(/\.jsonl$/);
    const lines = readFileSync(join(results(), files[0]), 'utf8').trim().split('\n');
    expect(lines).toHaveLength(records.length);
  });

  it('report --csv: a header row with the record fields and one row per layer=all record', async () => {
    const { out } = await ok('report', results(), '--csv');
    const [header, ...rows] = out.trim().split('\n');
    const columns = header.split(',');
    for (const c of ['codec', 'tensor', 'layer', 'compressionRatio', 'relL2']) expect(columns).toContain(c);
    expect(rows).toHaveLength(records.filter((r) => r.layer === 'all').length);
    const layer = columns.indexOf('layer');
    expect(rows.every((row) => row.split(',')[layer] === 'all')).toBe(true);
  });

  it('report --json: the same records, camelCase fields', async () => {
    const reported: BenchRecord[] = JSON.parse((await ok('report', results(), '--json')).out);
    const expected = records.filter((r) => r.layer === 'all');
    expect(reported.map(sortKey)).toEqual(expected.map(sortKey).sort());
    expect([...reported].sort((a, b) => sortKey(a).localeCompare(sortKey(b))))
      .toEqual([...expected].sort((a, b) => sortKey(a).localeCompare(sortKey(b))));
    expect(Object.keys(reported[0])).toEqual(expect.arrayContaining(['compressionRatio', 'attnOutRelL2', 'kvHeads', 'headDim']));
  });
});

describe('bench', () => {
  it('without queries: the last keys stand in, and the records say so', async () => {
    const { out } = await ok('bench', noQueries, '--codec', 'fp16', '--results', at('results-noq'), '--json', '--no-progress');
    const records: BenchRecord[] = JSON.parse(out);
    expect(records).toHaveLength(6);
    for (const r of records) {
      expect(r.proxy).toBe('self-keys');
      expect(r.heads).toBe(2);
      expect(r.notes.join(' ')).toMatch(/proxy=self-keys: the dump has no queries/);
    }
  });

  it('--list-codecs names fp16 and kivi with its parameters', async () => {
    const { out } = await ok('bench', '--list-codecs');
    expect(out).toMatch(/^fp16: /m);
    expect(out).toMatch(/^kivi: /m);
    for (const p of ['bits=2', 'group=32', 'residual=128']) expect(out).toContain(`    ${p} `);
  });
});

describe('inspect', () => {
  it('--json: shapes, dtype, queries and per-layer absmax of the fixture data', async () => {
    const info = JSON.parse((await ok('inspect', dump, '--json')).out);
    expect(info).toMatchObject({ kvHeads: 2, heads: 4, tokens: 160, headDim: 64, nQueries: 8, dtype: 'F16', layout: 'canonical' });
    expect(info.stats).toHaveLength(2);
    for (const [l, s] of info.stats.entries()) {
      expect(s.layer).toBe(l);
      expect(s.key.absmax).toBe(absMax(written.get(`layers.${l}.key`)!.values));
      expect(s.value.absmax).toBe(absMax(written.get(`layers.${l}.value`)!.values));
      expect(s.key.topChannel).toBe(DEFAULT_DUMP.outlierChannel);
    }
  });
});

describe('compress and decompress', () => {
  it('fp16: every tensor comes back byte for byte, with names, shapes, dtype and metadata', async () => {
    await ok('compress', dump, '--codec', 'fp16', '-o', at('x.pkv'));
    const { out } = await ok('decompress', at('x.pkv'), '-o', at('y.safetensors'));
    expect(out).toContain('6 tensors');
    const [before, after] = await Promise.all([openSafetensors(dump), openSafetensors(at('y.safetensors'))]);
    expect([...after.tensors.keys()].sort()).toEqual([...before.tensors.keys()].sort());
    for (const [name, entry] of before.tensors) {
      const back = after.tensors.get(name)!;
      expect([back.dtype, back.shape]).toEqual([entry.dtype, entry.shape]);
      expect(Buffer.compare(await readTensorRaw(back), await readTensorRaw(entry)), name).toBe(0);
    }
    expect(after.metadata).toEqual({ ...before.metadata, packkv_decompressed_from: expect.stringMatching(/^fp16:/) });
  });

  it('kivi 4-bit: same shapes and dtype, K/V within the 4-bit bound, queries exact', async () => {
    await ok('compress', dump, '--codec', 'kivi:bits=4', '-o', at('k4.pkv'));
    await ok('decompress', at('k4.pkv'), '-o', at('k4.safetensors'));
    const after = await openSafetensors(at('k4.safetensors'));
    expect(after.metadata.packkv_decompressed_from).toBe('kivi:bits=4,group=32,residual=128');
    for (const [name, w] of written) {
      const back = after.tensors.get(name)!;
      expect([back.dtype, back.shape]).toEqual(['F16', w.shape]);
      const values = await readTensorF32(back);
      let maxErr = 0;
      for (let i = 0; i < values.length; i++) maxErr = Math.max(maxErr, Math.abs(values[i] - w.values[i]));
      if (name.endsWith('.query')) {
        expect(maxErr, name).toBe(0);
      } else {
        expect(maxErr, name).toBeGreaterThan(0);
        expect(maxErr, name).toBeLessThan(range(w.values) / 15); // per group: range/15/2, plus f16 rounding
      }
    }
  });

  it('compress --json reports the container size and a row per tensor', async () => {
    const { out } = await ok('compress', dump, '--codec', kiviSpec, '-o', at('j.pkv'), '--json');
    const info = JSON.parse(out);
    expect(info.fileBytes).toBe(readFileSync(at('j.pkv')).length);
    expect(info.tensors.map((t: { role: string }) => t.role).sort()).toEqual(['K', 'K', 'Q', 'Q', 'V', 'V']);
  });
});

/** The Python safetensors package, importable as is or installed offline into the temp dir; null if neither works. */
function pythonSafetensors(target: string): { env: NodeJS.ProcessEnv } | null {
  const probe = (env: NodeJS.ProcessEnv) => spawnSync('python3', ['-c', 'import safetensors'], { env }).status === 0;
  if (probe(process.env)) return { env: process.env };
  const pip = spawnSync('python3', ['-m', 'pip', 'install', '-q', '--no-index', '--find-links', '/opt/pypi/files', '--target', target, 'safetensors'],
    { stdio: 'ignore', timeout: 120_000 });
  const env = { ...process.env, PYTHONPATH: target };
  return pip.status === 0 && probe(env) ? { env } : null;
}

const pyDir = mkdtempSync(join(tmpdir(), 'packkv-py-'));
const python = pythonSafetensors(pyDir);
afterAll(() => rmSync(pyDir, { recursive: true, force: true }));
const PY_READ = `
import hashlib, json, sys, safetensors
p = sys.argv[1]
out = {n: {'dtype': t['dtype'], 'shape': list(t['shape']), 'sha256': hashlib.sha256(bytes(t['data'])).hexdigest()}
       for n, t in safetensors.deserialize(open(p, 'rb').read())}
with safetensors.safe_open(p, framework='numpy') as f:
    meta = f.metadata()
print(json.dumps({'tensors': out, 'metadata': meta}))`;

describe('Python interop', () => {
  it.skipIf(python === null)('the Python safetensors package reads a decompressed file (skipped where python3 cannot import safetensors, nor install it from /opt/pypi/files)', async () => {
    await ok('compress', dump, '--codec', 'kivi:bits=2', '-o', at('py.pkv'));
    await ok('decompress', at('py.pkv'), '-o', at('py.safetensors'));
    const read = JSON.parse(execFileSync('python3', ['-c', PY_READ, at('py.safetensors')], { env: python!.env, encoding: 'utf8' }));
    const ours = await openSafetensors(at('py.safetensors'));
    expect(Object.keys(read.tensors).sort()).toEqual([...ours.tensors.keys()].sort());
    for (const [name, entry] of ours.tensors) {
      const sha256 = createHash('sha256').update(await readTensorRaw(entry)).digest('hex');
      expect(read.tensors[name]).toEqual({ dtype: entry.dtype, shape: entry.shape, sha256 });
    }
    expect(read.metadata).toEqual(ours.metadata);
  });
});

describe('errors: exit 1, one line naming the file, tensor and problem, nothing written', () => {
  let n = 0;
  /** Runs each command (with -o/--results pointed into a fresh dir) and checks the failure leaves nothing behind. */
  async function expectFailure(input: string, commands: string[][], message: RegExp[]): Promise<void> {
    const scratch = await mkdtemp(join(dir, `case-${n++}-`));
    for (const [i, command] of commands.entries()) {
      const output = join(scratch, `out-${i}`);
      const extra = command[0] === 'bench' ? ['--results', output, '--no-progress'] : command[0] === 'inspect' ? [] : ['-o', output];
      const run = await cli(...command.map((a) => (a === '$IN' ? input : a)), ...extra);
      expect(run.code, command.join(' ')).toBe(1);
      expect(run.err).toMatch(/^(.*\n)*packkv: error: .+\n$/);
      for (const m of message) expect(run.err, command.join(' ')).toMatch(m);
      expect(existsSync(output), `${command[0]} left ${output}`).toBe(false);
    }
    expect(readdirSync(scratch)).toEqual([]);
    expect(tempLeftovers(dir)).toEqual([]);
  }
  const dumpCommands = [['bench', '$IN', '--codec', 'fp16'], ['compress', '$IN', '--codec', 'fp16'], ['inspect', '$IN']];
  const dumpAt = (name: string) => at(`bad-${name}.safetensors`);
  const f16 = (shape: number[], begin: number) => ({ dtype: 'F16', shape, data_offsets: [begin, begin + shape.reduce((a, b) => a * b) * 2] });

  it('a truncated safetensors file', async () => {
    await truncatedCopy(dump, dumpAt('trunc'), -100);
    await expectFailure(dumpAt('trunc'), dumpCommands, [/bad-trunc\.safetensors, tensor 'layers\.1\.query': truncated file: the header describes \d+ data bytes but only \d+ are present/]);
  });

  it('a header length past the end of the file', async () => {
    await writeRawSafetensors(dumpAt('hlen'), '{}', new Uint8Array(0), 1_000_000);
    await expectFailure(dumpAt('hlen'), dumpCommands, [/bad-hlen\.safetensors: header length 1000000 goes past the end of the file \(10 bytes\)/]);
  });

  it('a header that is not JSON', async () => {
    await writeRawSafetensors(dumpAt('json'), '{"layers.0.key": {', new Uint8Array(0));
    await expectFailure(dumpAt('json'), dumpCommands, [/bad-json\.safetensors: header is not valid JSON/]);
  });

  it('overlapping data offsets', async () => {
    const header = { 'layers.0.key': f16([2, 4, 4], 0), 'layers.0.value': f16([2, 4, 4], 32) };
    await writeRawSafetensors(dumpAt('overlap'), header, new Uint8Array(96));
    await expectFailure(dumpAt('overlap'), dumpCommands, [/bad-overlap\.safetensors, tensor 'layers\.0\.value': overlaps tensor 'layers\.0\.key': bytes \[32, 96\) vs \[0, 64\)/]);
  });

  it('an unknown dtype', async () => {
    const header = { 'layers.0.key': { ...f16([2, 4, 4], 0), dtype: 'Q4' }, 'layers.0.value': f16([2, 4, 4], 64) };
    await writeRawSafetensors(dumpAt('dtype'), header, new Uint8Array(128));
    await expectFailure(dumpAt('dtype'), dumpCommands, [/bad-dtype\.safetensors, tensor 'layers\.0\.key': unknown dtype "Q4" \(supported: F16, BF16, F32\)/]);
  });

  it('no K/V tensors: names the patterns looked for', async () => {
    await writeRawSafetensors(dumpAt('nokv'), { 'embed.weight': f16([4], 0) }, new Uint8Array(8));
    await expectFailure(dumpAt('nokv'), dumpCommands, [
      /bad-nokv\.safetensors: no K\/V tensors found; looked for layers\.\{i\}\.key \+ layers\.\{i\}\.value \(canonical\), past_key_values\.\{i\}\.key \+ past_key_values\.\{i\}\.value \(hf-cache\)/,
      /'embed\.weight'/]);
  });

  it('K and V shapes that differ', async () => {
    await writeDump(dumpAt('shape'), { layers: 1, shapes: { 'layers.0.value': [2, 128, 64] } });
    await expectFailure(dumpAt('shape'), dumpCommands, [/bad-shape\.safetensors, tensor 'layers\.0\.value': shape \[2,128,64\] does not match its key 'layers\.0\.key' shape \[2,160,64\]/]);
  });

  it('query heads not a multiple of KV heads', async () => {
    await writeDump(dumpAt('gqa'), { layers: 1, heads: 3 });
    await expectFailure(dumpAt('gqa'), dumpCommands, [/bad-gqa\.safetensors, tensor 'layers\.0\.query': 3 query heads is not a multiple of 2 KV heads/]);
  });

  it('NaN and Inf values, counted per tensor', async () => {
    await writeDump(dumpAt('nan'), { poison: { 'layers.1.key': [NaN, 1, Infinity, NaN, -Infinity] } });
    await expectFailure(dumpAt('nan'), dumpCommands, [/bad-nan\.safetensors, tensor 'layers\.1\.key': has 2 NaN and 2 Inf values; refusing to compress non-finite data \(pass --allow-non-finite/]);
  });

  it('an unknown codec lists the valid codecs; an unknown parameter lists the valid parameters', async () => {
    await expectFailure(dump, [['bench', '$IN', '--codec', 'zstd'], ['compress', '$IN', '--codec', 'zstd']], [/unknown codec 'zstd' \(valid codecs: fp16, kivi[a-z, ]*\)/]);
    await expectFailure(dump, [['bench', '$IN', '--codec', 'kivi:bitz=2'], ['compress', '$IN', '--codec', 'kivi:bitz=2']],
      [/codec 'kivi': unknown parameter 'bitz' \(valid parameters: bits, group, residual\)/]);
  });

  it('a missing input file', async () => {
    await expectFailure(at('missing.safetensors'), dumpCommands, [/missing\.safetensors: no such file/]);
    await expectFailure(at('missing.pkv'), [['decompress', '$IN']], [/missing\.pkv: (no such file|cannot open: ENOENT)/]);
  });

  describe('damaged .pkv containers', () => {
    const pkv = () => at('good.pkv');
    const pkvAt = (name: string) => at(`bad-${name}.pkv`);
    beforeAll(async () => {
      await ok('compress', dump, '--codec', kiviSpec, '-o', pkv());
    });

    it('bad magic', async () => {
      await patchedCopy(pkv(), pkvAt('magic'), (b) => b.write('GGUF', 0, 'latin1'));
      await expectFailure(pkvAt('magic'), [['decompress', '$IN']], [/bad-magic\.pkv: not a \.pkv container \(bad magic; expected 'PKVC'\)/]);
    });

    it('an unsupported version', async () => {
      await patchedCopy(pkv(), pkvAt('version'), (b) => b.writeUInt32LE(7, 4));
      await expectFailure(pkvAt('version'), [['decompress', '$IN']], [/bad-version\.pkv: \.pkv format version 7 is not supported \(this build reads 1\)/]);
    });

    it('a flipped data byte fails its checksum', async () => {
      await patchedCopy(pkv(), pkvAt('flip'), (b) => (b[pkvDataStart(b) + 200] ^= 0x10));
      await expectFailure(pkvAt('flip'), [['decompress', '$IN']], [/bad-flip\.pkv, tensor 'layers\.0\.key': checksum mismatch: the stored data is corrupt/]);
    });

    it('a truncated container', async () => {
      await truncatedCopy(pkv(), pkvAt('trunc'), -64);
      await expectFailure(pkvAt('trunc'), [['decompress', '$IN']], [/bad-trunc\.pkv, tensor 'layers\.1\.query': data runs past the end of the file \(truncated\?\)/]);
    });
  });
});

describe('help', () => {
  it.each(['bench', 'inspect', 'compress', 'decompress', 'report'])('%s --help shows examples', async (command) => {
    const run = await cli(command, '--help');
    // commander prints help, then calls process.exit(0) (or, with exitOverride, main returns 0)
    expect(run.exitCalls.length > 0 ? run.exitCalls : [run.code]).toEqual([0]);
    expect(run.out).toContain(`Usage: packkv ${command}`);
    expect(run.out).toContain('Examples:');
  });

  it.skipIf(!existsSync(join(ROOT, 'dist/cli/main.js')))('bin/packkv.js --help lists every command (skipped: dist/ not built; run npx tsc -p tsconfig.json)', () => {
    const run = spawnSync(process.execPath, [join(ROOT, 'bin/packkv.js'), '--help'], { encoding: 'utf8', timeout: 30_000 });
    expect(run.status, run.stderr).toBe(0);
    for (const command of ['bench', 'inspect', 'compress', 'decompress', 'report']) expect(run.stdout).toMatch(new RegExp(`^  ${command} `, 'm'));
    expect(run.stdout).toContain('Examples:');
  });
});
