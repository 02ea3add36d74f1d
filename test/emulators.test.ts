// The GPU kernels' host emulations (kernels/tools/*_emu.cpp, built with the addon): each runs a
// kernel's block phases as loops over thread ids on the CPU and compares the result byte for byte
// with the CPU codec. They need no GPU, so they guard the GPU encoders wherever the tests run.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const dir = join(import.meta.dirname, '..', 'build', 'emulators');

const emulators: { name: string; args: string[]; summary: RegExp }[] = [
  { name: 'packkv_encode_emu', args: ['--quick'], summary: /all checks passed/ },
  { name: 'packkv_v3_emu', args: [], summary: /all ok \(0 failures\)/ },
  { name: 'kvcomp_encode_emu', args: [], summary: /emulated encode: (\d+) \/ \1 cases identical/ },
];

describe('GPU kernels emulated on the CPU match the CPU codecs', () => {
  it.each(emulators)('$name', ({ name, args, summary }) => {
    const bin = join(dir, name);
    expect(existsSync(bin), `${bin} is missing: npm run build makes it`).toBe(true);
    // execFileSync throws (failing the test) on a non-zero exit: any mismatch exits 1.
    const out = execFileSync(bin, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
    expect(out).toMatch(summary);
    expect(out).not.toMatch(/FAIL|mismatch(?!es)/);
  }, 300_000);
});
