// packkv command-line entry: registers the commands and turns every error into one clear line.
import { Command, CommanderError } from 'commander';

import { registerBench } from './commands/bench.js';
import { registerCompress } from './commands/compress.js';
import { registerInspect } from './commands/inspect.js';
import { registerReport } from './commands/report.js';
import { registerTune } from './commands/tune.js';

export function buildProgram(): Command {
  const program = new Command();
  // Usage errors, --help and --version come back to main() instead of exiting the process.
  program.exitOverride();
  program
    .name('packkv')
    .description(
      'Measure lossy KV-cache compression (PackKV, KVComp, KIVI, TailorKV) on real KV dumps:\n' +
        'memory saved, error put into attention, and speed of attention on the compressed data.',
    )
    .version('0.1.0')
    .showHelpAfterError('(run with --help for usage and examples)')
    .addHelpText(
      'after',
      `
Examples:
  packkv bench                                   every default codec on the embedded real dump
  packkv bench dump.safetensors --codec kivi:bits=2,group=32,residual=128
  packkv inspect dump.safetensors                layout, shapes and per-layer statistics
  packkv compress dump.safetensors --codec kivi:bits=4 -o dump.pkv
  packkv decompress dump.pkv -o restored.safetensors
  packkv report --csv > results.csv              all recorded runs as CSV
  packkv tune --target attn_out_rel=0.01         most compressing setting per codec within a target
  packkv bench --sweep packkv:k_rel=0.02..0.2:10 a grid of settings (rate-distortion points)`,
    );
  registerBench(program);
  registerInspect(program);
  registerCompress(program);
  registerReport(program);
  registerTune(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode; // commander has printed its message
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`packkv: error: ${message}\n`);
    return 1;
  }
}
