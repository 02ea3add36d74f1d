#!/usr/bin/env node
// packkv executable: runs the compiled CLI (npm run build compiles cli/ to dist/).
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';

const entry = fileURLToPath(new URL('../dist/cli/main.js', import.meta.url));
if (!existsSync(entry)) {
  process.stderr.write(`packkv: error: ${entry} is missing; run 'npm run build' first\n`);
  process.exit(1);
}
const { main } = await import(pathToFileURL(entry).href);
process.exitCode = await main(process.argv);
