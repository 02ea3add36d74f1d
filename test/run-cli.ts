// Runs `packkv ...args` in-process for tests, with stdout and stderr captured.
import { vi } from 'vitest';

import { main } from '../cli/main.js';

export interface CliRun {
  code: number;
  out: string;
  err: string;
  /** process.exit calls (commander's --help): each one throws instead of exiting */
  exitCalls: unknown[];
}

export async function runCli(...args: string[]): Promise<CliRun> {
  const out: string[] = [];
  const err: string[] = [];
  const capture = (sink: string[]) => ((chunk: string | Uint8Array) => {
    sink.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
    return true;
  }) as typeof process.stdout.write;
  const spies = [
    vi.spyOn(process.stdout, 'write').mockImplementation(capture(out)),
    vi.spyOn(process.stderr, 'write').mockImplementation(capture(err)),
  ];
  const exit = vi.spyOn(process, 'exit').mockImplementation((code) => {
    throw new Error(`process.exit(${code})`);
  });
  try {
    const code = await main(['node', 'packkv', ...args]);
    return { code, out: out.join(''), err: err.join(''), exitCalls: exit.mock.calls.map((c) => c[0]) };
  } finally {
    for (const s of [...spies, exit]) s.mockRestore();
  }
}
