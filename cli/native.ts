// Loads the packkv_native addon once and exposes it with its TypeScript types.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { PackkvError } from './errors.js';
import type { NativeAddon } from './native-types.js';

export type * from './native-types.js';

/** The package root: the nearest folder above this file with packkv's package.json. */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'CMakeLists.txt'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw new PackkvError('cannot find the packkv package root (package.json beside CMakeLists.txt)');
    dir = up;
  }
}

let cached: NativeAddon | undefined;

export function native(): NativeAddon {
  if (cached) return cached;
  const root = packageRoot();
  // PACKKV_ADDON points at another build of the addon (e.g. one configured with PACKKV_CODECS).
  const override = process.env.PACKKV_ADDON;
  const candidates = override
    ? [override]
    : ['build/Release/packkv_native.node', 'build/Debug/packkv_native.node'].map((p) => join(root, p));
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new PackkvError(
      `the native addon is not built (looked for ${candidates.join(', ')}); run 'npm run build:native'`,
    );
  }
  const require = createRequire(import.meta.url);
  const raw = require(found) as NativeAddon;
  // Argument errors are thrown synchronously by the addon; the async calls reject instead.
  cached = {
    ...raw,
    encode: async (...args) => raw.encode(...args),
    decode: async (...args) => raw.decode(...args),
    qk: async (...args) => raw.qk(...args),
    pv: async (...args) => raw.pv(...args),
    gpuRun: async (...args) => raw.gpuRun(...args),
  };
  return cached;
}
