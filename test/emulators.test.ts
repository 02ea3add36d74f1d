// The GPU kernels' host emulations (kernels/tools/*_emu.cpp, built with the addon): each runs a
// kernel's block phases as loops over thread ids on the CPU and compares the result byte for byte
// with the CPU codec. They need no GPU, so they guard the GPU encoders wherever the tests run.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const dir = join(import.meta.dirname, '..', 'build', 'emulators');

type Emulator = { name: string; args: string[]; summary: RegExp };
const emulators: Emulator[] = [
  { name: 'packkv_encode_emu', args: ['--quick'], summary: /all checks passed/ },
  { name: 'packkv_v3_emu', args: [], summary: /all ok \(0 failures\)/ },
  { name: 'kvcomp_encode_emu', args: [], summary: /emulated encode: (\d+) \/ \1 cases identical/ },
];

// Built only where nvcc is (CMake's CUDA block; CI has nvcc): they compile __host__ __device__
// code as CUDA host code or include CUDA's headers.
const cudaEmulators: Emulator[] = [
  { name: 'tailorkv_sparse_emu', args: [], summary: /all cases bit-identical/ },
  { name: 'kvcomp_t1_emu', args: [], summary: /all bit-identical/ },
];

function runEmulator({ name, args, summary }: Emulator): void {
  // execFileSync throws (failing the test) on a non-zero exit: any mismatch exits 1.
  const out = execFileSync(join(dir, name), args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  expect(out).toMatch(summary);
  expect(out).not.toMatch(/FAIL|MISMATCH|mismatch(?!es)/);
}

describe('GPU kernels emulated on the CPU match the CPU codecs', () => {
  it.each(emulators)('$name', (emu) => {
    const bin = join(dir, emu.name);
    expect(existsSync(bin), `${bin} is missing: npm run build makes it`).toBe(true);
    runEmulator(emu);
  }, 300_000);

  for (const emu of cudaEmulators) {
    const built = existsSync(join(dir, emu.name));
    it.skipIf(!built)(`${emu.name}${built ? '' : ' (skipped: built only where nvcc is)'}`, () => runEmulator(emu), 300_000);
  }
});
