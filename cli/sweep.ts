// Sweep grids: "packkv:k_rel=0.02..0.2:10,repack=median" expands to the specs of every grid point.
import { PackkvError } from './errors.js';

const RANGE = /^(-?[\d.eE+-]+)\.\.(-?[\d.eE+-]+):(\d+)(log)?$/;

/** One parameter's values: "a..b:n" (n evenly spaced, "a..b:nlog" log-spaced), "x|y|z", or one value. */
export function expandValues(key: string, value: string): string[] {
  const range = RANGE.exec(value);
  if (range) {
    const [lo, hi, n] = [Number(range[1]), Number(range[2]), Number(range[3])];
    const log = range[4] === 'log';
    if (!Number.isFinite(lo) || !Number.isFinite(hi) || n < 1 || (log && (lo <= 0 || hi <= 0)))
      throw new PackkvError(`--sweep ${key}=${value}: expected a..b:n with finite a, b and n >= 1 (a, b > 0 for log)`);
    if (n === 1) return [String(lo)];
    return Array.from({ length: n }, (_, i) => {
      const t = i / (n - 1);
      const v = log ? lo * (hi / lo) ** t : lo + (hi - lo) * t;
      return String(Number(v.toPrecision(3)));
    });
  }
  return value.split('|');
}

/** The Cartesian product of every parameter's values, as codec specs. */
export function expandSweep(sweep: string): string[] {
  const colon = sweep.indexOf(':');
  if (colon < 0) return [sweep];
  const name = sweep.slice(0, colon);
  // ',' separates parameters; a range's ':n' never contains ',' so splitting is safe.
  const params = sweep.slice(colon + 1).split(',').filter((p) => p.length > 0);
  let specs: string[][] = [[]];
  for (const p of params) {
    const eq = p.indexOf('=');
    if (eq < 0) throw new PackkvError(`--sweep '${sweep}': '${p}' is not key=value`);
    const key = p.slice(0, eq);
    const values = expandValues(key, p.slice(eq + 1));
    specs = specs.flatMap((prefix) => values.map((v) => [...prefix, `${key}=${v}`]));
  }
  return specs.map((ps) => (ps.length ? `${name}:${ps.join(',')}` : name));
}
