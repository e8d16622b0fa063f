// Drive test/helpers/writer.py (a continuous libnbd writer) from a test, and check that the
// writes it saw acknowledged are in a backing file.
import type { ChildProcess } from 'node:child_process';
import { onLines, spawnTracked } from './children.js';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const WRITER_SCRIPT = path.join(HERE, 'writer.py');
// python3-libnbd is a Debian package: use the system interpreter, not whatever is first on PATH.
const PYTHON = '/usr/bin/python3';

/** [offset, length, patternId] */
export type WriteRecord = [number, number, number];

export interface WriterResult {
  writes: number;
  maxLatencyMs: number;
  acked: WriteRecord[];
  /** Issued but never acknowledged (in flight when the writer ended, or failed). */
  unknown: WriteRecord[];
  /** The slowest writes: [ms since the writer started, latency ms]. */
  slow: [number, number][];
  error: string | null;
  flushed: boolean;
  seed: number;
  durationMs: number;
}

export interface WriterOptions {
  qd?: number;
  len?: number;
  span?: number;
  /** Writes per second; 0 = as fast as possible. */
  rate?: number;
  /** Stop by itself after this many writes. */
  count?: number;
  firstId?: number;
  seed?: number;
  /** FLUSH before exiting (when the connection is alive). */
  flush?: boolean;
}

export interface Writer {
  proc: ChildProcess;
  /** Resolves with the final JSON once the writer exits (by itself, or after stop()). */
  result: Promise<WriterResult>;
  /** Close stdin (the writer finishes what is in flight, flushes if asked, prints, exits). */
  stop(): Promise<WriterResult>;
  /** SIGKILL if still running (cleanup). */
  kill(): Promise<void>;
  stderr: string[];
}

/** Start the writer against `uri`; resolves once it is connected and writing. */
export async function startWriter(uri: string, opts: WriterOptions = {}, timeoutMs = 15_000): Promise<Writer> {
  const args = [WRITER_SCRIPT, uri];
  if (opts.qd !== undefined) args.push('--qd', String(opts.qd));
  if (opts.len !== undefined) args.push('--len', String(opts.len));
  if (opts.span !== undefined) args.push('--span', String(opts.span));
  if (opts.rate !== undefined) args.push('--rate', String(opts.rate));
  if (opts.count !== undefined) args.push('--count', String(opts.count));
  if (opts.firstId !== undefined) args.push('--first-id', String(opts.firstId));
  if (opts.seed !== undefined) args.push('--seed', String(opts.seed));
  if (opts.flush) args.push('--flush');
  const proc = spawnTracked(PYTHON, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const stderr: string[] = [];
  const lines: string[] = [];
  let onReady: (() => void) | null = null;
  const unterminated = onLines(proc.stdout!, (line) => {
    lines.push(line);
    if (line.includes('"event": "ready"')) onReady?.();
  });
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (c: string) => stderr.push(c));
  proc.stdin!.on('error', () => undefined);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => {
      resolve({ code, signal });
    });
  });
  const result = exited.then(async ({ code, signal }) => {
    // let the stdout pipe drain
    await new Promise((r) => setImmediate(r));
    if (unterminated()) lines.push(unterminated());
    const last = lines.filter((l) => l.startsWith('{') && !l.includes('"event"')).pop();
    if (code !== 0 || !last) {
      throw new Error(`writer exited (code ${code}, signal ${signal}) without a result\n${stderr.join('')}`);
    }
    return JSON.parse(last) as WriterResult;
  });
  result.catch(() => undefined);

  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`writer not ready within ${timeoutMs} ms: ${stderr.join('')}`)), timeoutMs);
    onReady = () => { clearTimeout(timer); resolve(); };
    if (lines.some((l) => l.includes('"event": "ready"'))) onReady();
    void exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`writer exited (code ${code}) before it was ready: ${stderr.join('')}`));
    });
  }).catch(async (err: unknown) => {
    proc.kill('SIGKILL');
    await exited;
    throw err;
  });

  return {
    proc,
    result,
    stderr,
    stop: () => {
      proc.stdin!.end();
      return result;
    },
    kill: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGKILL');
        await exited;
      }
    },
  };
}

/** The data the writer writes for pattern `id` at `offset`. */
export function patternData(id: number, offset: number, length: number): Buffer {
  const block = Buffer.alloc(16);
  block.writeBigUInt64BE(BigInt(id), 0);
  block.writeBigUInt64BE(BigInt(offset), 8);
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i += 16) block.copy(out, i, 0, Math.min(16, length - i));
  return out;
}

export interface AckCheck {
  /** Slots whose last acknowledged write was checked. */
  checked: number;
  /** Slots skipped because a later write to them was never answered and is not all there. */
  ambiguous: number;
  /** Human-readable description of each slot that lacks its acknowledged data. */
  missing: string[];
}

/**
 * For every slot, the last acknowledged write must be there: every 16-byte block holds that
 * write's pattern, or (when a later write to the slot was issued but never answered) that
 * later write's pattern (it may have landed, in part).
 */
export async function checkAcked(file: string, results: WriterResult[]): Promise<AckCheck> {
  const last = new Map<number, WriteRecord>();
  const later = new Map<number, WriteRecord[]>();
  for (const r of results) {
    for (const w of r.acked) {
      const cur = last.get(w[0]);
      if (!cur || cur[2] < w[2]) last.set(w[0], w);
    }
  }
  for (const r of results) {
    for (const w of r.unknown) {
      const cur = last.get(w[0]);
      if (cur && cur[2] > w[2]) continue;   // superseded by an acknowledged write
      if (!later.has(w[0])) later.set(w[0], []);
      later.get(w[0])!.push(w);
    }
  }
  const fh = await fs.open(file, 'r');
  const out: AckCheck = { checked: 0, ambiguous: 0, missing: [] };
  try {
    for (const [offset, w] of last) {
      const [, len, id] = w;
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, offset);
      const alts = [patternData(id, offset, len), ...(later.get(offset) ?? []).map((u) => patternData(u[2], offset, len))];
      let bad = -1;
      for (let i = 0; i < len; i += 16) {
        const blk = buf.subarray(i, i + 16);
        if (!alts.some((a) => a.subarray(i, i + 16).equals(blk))) { bad = i; break; }
      }
      if (later.has(offset)) out.ambiguous++;
      out.checked++;
      if (bad >= 0) {
        const blk = buf.subarray(bad, bad + 16);
        const foundId = blk.readBigUInt64BE(0);
        out.missing.push(`slot ${offset} (+${bad}): expected id ${id}${later.has(offset) ? ` or ${later.get(offset)!.map((u) => u[2]).join('/')}` : ''}, found id ${foundId} (block ${blk.toString('hex')})`);
      }
    }
  } finally {
    await fh.close();
  }
  return out;
}
