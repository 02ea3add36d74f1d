// The result store: atomic writes and appends, reading files and directories, bad lines, git commit.

import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { PackkvError } from '../cli/errors.js';
import {
  RECORD_FIELDS,
  gitCommit,
  newRunId,
  readRecords,
  recordToJson,
  writeRecords,
  type BenchRecord,
} from '../cli/results.js';

function makeRecord(overrides: Partial<BenchRecord> = {}): BenchRecord {
  return {
    schema: 1, runId: 'run-1', time: '2026-11-23T07:30:00.000Z', dump: 'tiny', dumpFiles: ['datasets/tiny.safetensors'],
    layer: 'all', tensor: 'K', codec: 'kivi', params: 'bits=2,group=32,residual=128', device: 'cpu', gitCommit: 'abc1234',
    kvHeads: 2, heads: 8, tokens: 256, headDim: 64, fp16Bytes: 65536, deviceBytes: 14336, hostBytes: 0, totalBytes: 14336,
    breakdown: { payload: 8192, scales: 2048, zeros: 2048, residual: 2048, metadata: 0, host: 0 },
    compressionRatio: 65536 / 14336, totalCompressionRatio: 65536 / 14336, maxAbs: 0.5, rmse: 0.1, relL2: 0.12,
    snrDb: 18.4, proxy: 'queries', scoresRelL2: 0.05, kl: 0.002, tv: 0.03, top32Recall: 0.9, top1pctRecall: 0.95,
    attnOutRelL2: 0.021, attnOutCosine: 0.9998, sinkMassErr: 0.001, headAttnOutRelL2: [0.02, 0.022], headKl: [1e-4, 2e-4], headTop32Recall: [0.9, 1], encodeMBps: 850, decodeMBps: 1200, qkMs: 0.12,
    pvMs: null, notes: [],
    ...overrides,
  };
}

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'packkv-results-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('newRunId', () => {
  it('is the UTC second plus a random suffix, sortable by time', () => {
    const id = newRunId(new Date('2026-11-23T07:30:00.456Z'));
    expect(id).toMatch(/^2026-11-23T07-30-00-[0-9a-f]{6}$/);
    expect(newRunId(new Date('2026-11-23T07:30:01Z')) > id).toBe(true);
    expect(newRunId(new Date('2026-11-23T07:30:00Z'))).not.toBe(newRunId(new Date('2026-11-23T07:30:00Z')));
  });
});

describe('writeRecords', () => {
  it('writes one JSON line per record and leaves no temp file', async () => {
    const file = await writeRecords(dir, 'run-1', [makeRecord(), makeRecord({ tensor: 'V', scoresRelL2: null })]);
    expect(file).toBe(path.join(dir, 'run-1.jsonl'));
    expect(await fs.readdir(dir)).toEqual(['run-1.jsonl']);
    const lines = (await fs.readFile(file, 'utf8')).split('\n');
    expect(lines).toHaveLength(3);
    expect(lines[2]).toBe('');
    expect(Object.keys(JSON.parse(lines[0]))).toEqual(RECORD_FIELDS);
    expect(JSON.parse(lines[1]).scoresRelL2).toBeNull();
  });

  it('creates the directory when missing', async () => {
    const nested = path.join(dir, 'a', 'b');
    await writeRecords(nested, 'r', [makeRecord()]);
    expect(await fs.readdir(nested)).toEqual(['r.jsonl']);
  });

  it('appending keeps the old records, in order', async () => {
    await writeRecords(dir, 'run-1', [makeRecord({ layer: 0 }), makeRecord({ layer: 1 })]);
    await writeRecords(dir, 'run-1', [makeRecord({ layer: 'all' })]);
    const records = await readRecords([dir]);
    expect(records.map((r) => r.layer)).toEqual([0, 1, 'all']);
    expect(await fs.readdir(dir)).toEqual(['run-1.jsonl']);
  });

  it('appends after a last line without newline', async () => {
    await fs.writeFile(path.join(dir, 'r.jsonl'), recordToJson(makeRecord({ layer: 3 })));
    await writeRecords(dir, 'r', [makeRecord({ layer: 4 })]);
    expect((await readRecords([dir])).map((r) => r.layer)).toEqual([3, 4]);
  });

  it('rejects a run id that would escape the directory', async () => {
    await expect(writeRecords(dir, '../evil', [makeRecord()])).rejects.toThrow(/invalid run id/);
  });

  it('round-trips every field, Infinity SNR included', async () => {
    const exact = makeRecord({ codec: 'fp16', params: '', snrDb: Infinity, relL2: 0, notes: ['a', 'b; c'] });
    await writeRecords(dir, 'r', [exact]);
    const [back] = await readRecords([path.join(dir, 'r.jsonl')]);
    expect(back).toEqual(exact);
    expect(back.snrDb).toBe(Infinity);
  });
});

describe('readRecords', () => {
  it('reads all *.jsonl of a directory, sorted by name, ignoring other files', async () => {
    await writeRecords(dir, 'b', [makeRecord({ runId: 'b' })]);
    await writeRecords(dir, 'a', [makeRecord({ runId: 'a' }), makeRecord({ runId: 'a', tensor: 'V' })]);
    await fs.writeFile(path.join(dir, 'README.md'), '# not results\n');
    const records = await readRecords([dir]);
    expect(records.map((r) => `${r.runId}/${r.tensor}`)).toEqual(['a/K', 'a/V', 'b/K']);
  });

  it('mixes files and directories', async () => {
    const sub = path.join(dir, 'sub');
    await writeRecords(sub, 'x', [makeRecord({ runId: 'x' })]);
    const file = await writeRecords(dir, 'y', [makeRecord({ runId: 'y' })]);
    expect((await readRecords([file, sub])).map((r) => r.runId)).toEqual(['y', 'x']);
  });

  it('names file and line of a bad line', async () => {
    const file = path.join(dir, 'bad.jsonl');
    await fs.writeFile(file, `${recordToJson(makeRecord())}\n\n{"schema": 1, "runId": tru\n`);
    const err = await readRecords([file]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PackkvError);
    expect((err as Error).message).toMatch(new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:3: bad record`));
  });

  it('names the missing field of a record', async () => {
    const file = path.join(dir, 'bad.jsonl');
    const { codec: _omit, ...noCodec } = makeRecord();
    await fs.writeFile(file, `${JSON.stringify(noCodec)}\n`);
    await expect(readRecords([file])).rejects.toThrow(/bad\.jsonl:1: bad record: field 'codec' missing/);
  });

  it('rejects an unknown schema and a missing path', async () => {
    const file = path.join(dir, 'v2.jsonl');
    await fs.writeFile(file, `${JSON.stringify({ ...makeRecord(), schema: 2 })}\n`);
    await expect(readRecords([file])).rejects.toThrow(/v2\.jsonl:1: bad record: unknown schema 2/);
    await expect(readRecords([path.join(dir, 'nope')])).rejects.toThrow(/nope: no such file or directory/);
  });
});

describe('gitCommit', () => {
  it('is null outside a git repository', () => {
    expect(gitCommit(dir)).toBeNull();
  });

  it('is the short hash of HEAD inside one', () => {
    const git = (...args: string[]) =>
      execFileSync('git', ['-c', 'user.name=t', '-c', 'user.email=t@t', ...args], { cwd: dir, encoding: 'utf8' });
    git('init', '-q');
    git('commit', '-q', '--allow-empty', '-m', 'init');
    const full = git('rev-parse', 'HEAD').trim();
    const short = gitCommit(dir);
    expect(short).toMatch(/^[0-9a-f]{4,}$/);
    expect(full.startsWith(short as string)).toBe(true);
  });
});
