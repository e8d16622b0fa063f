// Support for the fuzz tests (not a test file itself): one seeded fast-check run per target,
// bounded for `npm test` and long under `npm run fuzz` (scripts/fuzz.js).
//
// Environment:
//   FUZZ_SEED     seed of every target (default: a fixed one, so `npm test` is deterministic)
//   FUZZ_RUNS     inputs per target (overrides each target's bounded default)
//   FUZZ_SECONDS  time budget per target in seconds: runs until it is spent (unless FUZZ_RUNS
//                 also caps the count); without it, a target stops after its bounded default
//                 or after its safety time limit, whichever comes first
//   FUZZ_REPORT   file to which one JSON line per target is appended (used by scripts/fuzz.js)
//   FUZZ_TOLERATE_KNOWN=1  skip the checks of the known, reported bugs (see regressions.test.ts)
//                 so that a long run explores past them; never set in `npm test`
//
// Each target prints "fuzz: <target>: N inputs, seed S" (the issue asks every fuzz run to say
// how many inputs it executed); a failure throws fast-check's report: the shrunk counterexample,
// the seed and the path to replay it (FUZZ_SEED=S plus the path in `fc.assert(..., { path })`).
import fs from 'node:fs';
import fc from 'fast-check';

export const DEFAULT_SEED = 20240611;

function envInt(name: string): number | undefined {
  const v = process.env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return Math.trunc(n);
}

export const SEED = envInt('FUZZ_SEED') ?? DEFAULT_SEED;
const RUNS = envInt('FUZZ_RUNS');
const SECONDS = envInt('FUZZ_SECONDS');

/** Known bugs (regressions.test.ts) are not checked: a long run can explore past them. */
export const TOLERATE_KNOWN = process.env.FUZZ_TOLERATE_KNOWN === '1';

/** True under `npm run fuzz` (a long run was asked for). */
export const LONG = RUNS !== undefined || SECONDS !== undefined;

export interface TargetBudget {
  /** Inputs in the bounded run (npm test). */
  runs: number;
  /** Safety cap in ms for the bounded run, so a slow machine still stays inside the suite's budget. */
  capMs: number;
}

function params(b: TargetBudget): { numRuns: number; interruptAfterTimeLimit: number } {
  if (SECONDS !== undefined) return { numRuns: RUNS ?? 1_000_000_000, interruptAfterTimeLimit: SECONDS * 1000 };
  if (RUNS !== undefined) return { numRuns: RUNS, interruptAfterTimeLimit: 24 * 3600 * 1000 };
  return { numRuns: b.runs, interruptAfterTimeLimit: b.capMs };
}

/** Mocha timeout for a target's `it` (0: none, for long runs). */
export function timeoutFor(b: TargetBudget): number {
  return LONG ? 0 : Math.max(30_000, b.capMs * 4);
}

/**
 * Run `property` as fuzz target `target`: fc.assert with the seed and budget, report the number
 * of inputs executed, throw fast-check's report (shrunk counterexample, seed, path) on failure.
 */
export async function fuzz<Ts>(
  target: string,
  property: fc.IRawProperty<Ts>,
  budget: TargetBudget,
): Promise<void> {
  const p = params(budget);
  const started = Date.now();
  let details: fc.RunDetails<Ts> | null = null;
  const reporter = (out: fc.RunDetails<Ts>): void => {
    details = out;
    if (out.failed) throw new Error(`fuzz target "${target}" (FUZZ_SEED=${out.seed}):\n${fc.defaultReportMessage(out) ?? 'failed'}\n${describeError(out.errorInstance)}`);
  };
  try {
    await fc.assert(property, {
      seed: SEED, numRuns: p.numRuns, interruptAfterTimeLimit: p.interruptAfterTimeLimit, reporter,
    });
  } finally {
    const d = details as fc.RunDetails<Ts> | null;
    const ms = Date.now() - started;
    const n = d ? d.numRuns : 0;
    const extra = d?.failed ? `, FAILED after ${d.numShrinks} shrinks` : d?.interrupted && !LONG ? ' (safety time limit reached)' : '';
    console.log(`      fuzz: ${target}: ${n} inputs, seed ${SEED}${extra} [${(ms / 1000).toFixed(1)} s]`);
    const report = process.env.FUZZ_REPORT;
    if (report) {
      fs.appendFileSync(report, JSON.stringify({
        target, inputs: n, seed: SEED, ms, failed: d?.failed ?? true, shrinks: d?.numShrinks ?? 0,
        counterexample: d?.failed ? fc.stringify(d.counterexample) : null,
        path: d?.counterexamplePath ?? null,
        error: d?.failed ? String((d.errorInstance as Error | null)?.message ?? d.errorInstance) : null,
      }) + '\n');
    }
  }
}

function describeError(err: unknown): string {
  if (err instanceof Error) return `Error of the shrunk counterexample: ${err.stack ?? err.message}`;
  return `Error of the shrunk counterexample: ${String(err)}`;
}

// ---- process guard -----------------------------------------------------------------------------

/**
 * While armed, uncaught exceptions and unhandled rejections are captured instead of going to
 * mocha (which would fail the test without a counterexample): the property checks `take()` after
 * each input, so a crash of the in-process server fails that input and gets shrunk.
 */
export class ProcessGuard {
  private readonly errors: unknown[] = [];
  private saved: { ue: NodeJS.UncaughtExceptionListener[]; ur: NodeJS.UnhandledRejectionListener[] } | null = null;
  private readonly onError = (err: unknown): void => { this.errors.push(err); };

  arm(): void {
    if (this.saved) return;
    this.saved = {
      ue: process.listeners('uncaughtException'),
      ur: process.listeners('unhandledRejection'),
    };
    process.removeAllListeners('uncaughtException');
    process.removeAllListeners('unhandledRejection');
    process.on('uncaughtException', this.onError);
    process.on('unhandledRejection', this.onError);
  }

  disarm(): void {
    if (!this.saved) return;
    process.off('uncaughtException', this.onError);
    process.off('unhandledRejection', this.onError);
    for (const l of this.saved.ue) process.on('uncaughtException', l);
    for (const l of this.saved.ur) process.on('unhandledRejection', l);
    this.saved = null;
  }

  /** Throw the first error captured since the last call, if any. */
  check(): void {
    if (this.errors.length === 0) return;
    const errs = this.errors.splice(0);
    const first = errs[0];
    const msg = first instanceof Error ? `${first.name}: ${first.message}\n${first.stack ?? ''}` : String(first);
    throw new Error(`the process saw ${errs.length} uncaught exception(s)/unhandled rejection(s): ${msg}`);
  }
}

// ---- small helpers -----------------------------------------------------------------------------

/** Reject with a "hang" error if `p` does not settle within `ms`. */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`HANG: ${what} did not settle within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Split `buf` at the given cut points (any numbers; mapped into range, sorted, deduplicated). */
export function splitAt(buf: Buffer, cuts: number[]): Buffer[] {
  if (buf.length === 0) return [buf];
  const points = [...new Set(cuts.map((c) => Math.abs(Math.trunc(c)) % (buf.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let at = 0;
  for (const p of points) {
    out.push(buf.subarray(at, p));   // may be empty: empty chunks are part of what is tested
    at = p;
  }
  out.push(buf.subarray(at));
  return out;
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff, 0);
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

/** fast-check arbitrary for a Buffer of random bytes. */
export function bytes(maxLength: number, minLength = 0): fc.Arbitrary<Buffer> {
  return fc.uint8Array({ minLength, maxLength }).map((a) => Buffer.from(a));
}

/** A well-formed (round-trippable through UTF-8) string of at most `maxBytes` UTF-8 bytes. */
export function utf8String(maxBytes: number): fc.Arbitrary<string> {
  return fc.string({ unit: 'binary', maxLength: maxBytes })
    .map((s) => {
      let b = Buffer.from(s, 'utf8');
      if (b.length <= maxBytes) return s;
      // Cut at a code point boundary.
      let n = maxBytes;
      while (n > 0 && (b[n] & 0xc0) === 0x80) n--;
      b = b.subarray(0, n);
      return b.toString('utf8');
    });
}
