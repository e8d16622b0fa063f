// Causality checks of a mirrored copy: drive test/helpers/causal-writer.py (every 4 KiB block of
// every write names the write; every issue and completion is numbered by one event counter) and
// decode every block of a copy.
//
// (a) crash consistency / causality: if the copy shows write w anywhere, every write acknowledged
//     to the host before w was issued is visible in its block(s), or superseded there by a later
//     write (a higher id). Writes never acknowledged may or may not be visible.
// (b) up to date (sync mode, after convergence): every acknowledged write is visible or superseded.
// Every block must also show zeros (never written) or a write that was issued to that block.
import type { ChildProcess } from 'node:child_process';
import { onLines, spawnTracked } from './children.js';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const CAUSAL_WRITER_SCRIPT = path.join(HERE, 'causal-writer.py');
const PYTHON = '/usr/bin/python3';
export const BLOCK = 4096;

/** [id, offset, len, issueEv, ackEv]; ackEv -1 = never acknowledged. */
export type CausalWrite = [number, number, number, number, number];
/** [n, issueEv, ackEv, issuedMs, latencyMs, forced]; ackEv -1 = no reply. */
export type CausalFlush = [number, number, number, number, number, boolean];

export interface CausalRun {
  writes: CausalWrite[];
  flushes: CausalFlush[];
  events: number;
  acked: number;
  unknown: number;
  maxLatencyMs: number;
  maxFlushMs: number;
  error: string | null;
  durationMs: number;
  seed: number;
}

export interface CausalWriterOptions {
  qd?: number;
  conns?: number;
  len?: number;
  span?: number;
  rate?: number;
  count?: number;
  firstId?: number;
  seed?: number;
  flushEvery?: number;
  drainS?: number;
}

export interface FlushEvent { n: number; ms: number; forced: boolean; at: number }

export interface CausalWriter {
  proc: ChildProcess;
  result: Promise<CausalRun>;
  /** Completed FLUSHes, with the local time their reply was seen. */
  flushes: FlushEvent[];
  /** Issue a FLUSH now: `issued` once the writer has sent it, `done` at its reply (never, without one). */
  flush(): { issued: Promise<number>; done: Promise<FlushEvent> };
  /** Close stdin: the writer drains what is in flight, prints its result and exits. */
  stop(): Promise<CausalRun>;
  kill(): Promise<void>;
  stderr: string[];
}

export async function startCausalWriter(uri: string, opts: CausalWriterOptions = {}, timeoutMs = 15_000): Promise<CausalWriter> {
  const args = [CAUSAL_WRITER_SCRIPT, uri];
  const flag = (name: string, v: number | undefined) => { if (v !== undefined) args.push(name, String(v)); };
  flag('--qd', opts.qd); flag('--conns', opts.conns); flag('--len', opts.len); flag('--span', opts.span);
  flag('--rate', opts.rate); flag('--count', opts.count); flag('--first-id', opts.firstId); flag('--seed', opts.seed);
  flag('--flush-every', opts.flushEvery); flag('--drain-s', opts.drainS);
  const proc = spawnTracked(PYTHON, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const stderr: string[] = [];
  const lines: string[] = [];
  const flushes: FlushEvent[] = [];
  const issuedForced: number[] = [];
  const forcedWaiters: ((n: number) => void)[] = [];
  const flushWaiters = new Map<number, (e: FlushEvent) => void>();
  let onReady: (() => void) | null = null;
  const unterminated = onLines(proc.stdout!, (line) => {
    lines.push(line);
    if (!line.startsWith('{"event"')) return;
    const e = JSON.parse(line) as { event: string; n: number; ms: number; forced: boolean };
    if (e.event === 'ready') onReady?.();
    else if (e.event === 'flush-issued' && e.forced) {
      issuedForced.push(e.n);
      forcedWaiters.shift()?.(e.n);
    } else if (e.event === 'flush') {
      const fe = { n: e.n, ms: e.ms, forced: e.forced, at: Date.now() };
      flushes.push(fe);
      flushWaiters.get(e.n)?.(fe);
      flushWaiters.delete(e.n);
    }
  });
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (c: string) => stderr.push(c));
  proc.stdin!.on('error', () => undefined);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once('exit', (code, signal) => resolve({ code, signal }));
  });
  const result = exited.then(async ({ code, signal }) => {
    await new Promise((r) => setImmediate(r));
    if (unterminated()) lines.push(unterminated());
    const last = lines.filter((l) => l.startsWith('{"writes"')).pop();
    if (code !== 0 || !last) throw new Error(`causal writer exited (code ${code}, signal ${signal}) without a result\n${stderr.join('')}`);
    return JSON.parse(last) as CausalRun;
  });
  result.catch(() => undefined);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`causal writer not ready within ${timeoutMs} ms: ${stderr.join('')}`)), timeoutMs);
    onReady = () => { clearTimeout(timer); resolve(); };
    if (lines.some((l) => l.includes('"event": "ready"'))) onReady();
    void exited.then(({ code }) => { clearTimeout(timer); reject(new Error(`causal writer exited (code ${code}) before ready: ${stderr.join('')}`)); });
  }).catch(async (err: unknown) => {
    proc.kill('SIGKILL');
    await exited;
    throw err;
  });
  return {
    proc, result, flushes, stderr,
    flush: () => {
      const issued = new Promise<number>((resolve) => {
        forcedWaiters.push(resolve);
        proc.stdin!.write('flush\n');
      });
      const done = issued.then((n) => flushes.find((f) => f.n === n)
        ?? new Promise<FlushEvent>((resolve) => flushWaiters.set(n, resolve)));
      return { issued, done };
    },
    stop: () => { proc.stdin!.end(); return result; },
    kill: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGKILL');
        await exited;
      }
    },
  };
}

/** The bytes of write `id` at `offset` (what causal-writer.py writes). */
export function causalPattern(id: number, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let b = 0; b < length; b += BLOCK) {
    const unit = Buffer.alloc(16);
    unit.writeBigUInt64BE(BigInt(id), 0);
    unit.writeBigUInt64BE(BigInt(offset + b), 8);
    for (let i = 0; i < BLOCK; i += 16) unit.copy(out, b + i);
  }
  return out;
}

/** Decoded blocks: the write id each 4 KiB block shows; 0 = all zeros, -1 = neither (torn or foreign). */
export type Decoded = Float64Array;

export function decodeBuffer(buf: Buffer, base = 0): Decoded {
  const n = Math.floor(buf.length / BLOCK);
  const out = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    const blk = buf.subarray(k * BLOCK, (k + 1) * BLOCK);
    const id = Number(blk.readBigUInt64BE(0));
    const off = Number(blk.readBigUInt64BE(8));
    let ok = true;
    if (id === 0 && off === 0) {
      for (let i = 0; i < BLOCK; i += 8) if (blk.readBigUInt64BE(i) !== 0n) { ok = false; break; }
      out[k] = ok ? 0 : -1;
      continue;
    }
    if (off !== base + k * BLOCK || id === 0) ok = false;
    for (let i = 16; ok && i < BLOCK; i += 16) if (blk.compare(blk, 0, 16, i, i + 16) !== 0) ok = false;
    out[k] = ok ? id : -1;
  }
  return out;
}

/** Decode every block of a file (a copy's backing file), e.g. right after its site was killed. */
export async function decodeCopy(file: string): Promise<Decoded> {
  return decodeBuffer(await fs.readFile(file));
}

export interface CausalityReport {
  /** Blocks showing a write (not zeros). */
  shown: number;
  /** The latest-issued write the copy shows, and its global issue event. */
  newest: { id: number; block: number; issueEv: number } | null;
  /** Acknowledged writes that had to be visible (or superseded), over all blocks. */
  required: number;
  /** Descriptions of the violations (at most 20), and their count. */
  violations: string[];
  violationCount: number;
}

interface BlockWrite { id: number; issueEv: number; ackEv: number }

/**
 * Check a decoded copy against the runs of the writer that produced it (in the order they ran, one
 * after the other, ids increasing). `upToDate`: also require every acknowledged write (sync mode,
 * converged). Blocks beyond the copy, or never written, must be zeros.
 */
export function checkCausality(copy: Decoded, runs: CausalRun[], opts: { upToDate?: boolean } = {}): CausalityReport {
  const perBlock = new Map<number, BlockWrite[]>();
  let base = 0;
  for (const run of runs) {
    for (const [id, offset, len, issueEv, ackEv] of run.writes) {
      for (let b = offset; b < offset + len; b += BLOCK) {
        const k = b / BLOCK;
        let l = perBlock.get(k);
        if (!l) perBlock.set(k, (l = []));
        l.push({ id, issueEv: base + issueEv, ackEv: ackEv < 0 ? -1 : base + ackEv });
      }
    }
    base += run.events;
  }
  for (const l of perBlock.values()) l.sort((x, y) => x.id - y.id);

  const violations: string[] = [];
  let violationCount = 0;
  const violate = (s: string) => { violationCount++; if (violations.length < 20) violations.push(s); };
  let newest: CausalityReport['newest'] = null;
  let shown = 0;
  for (let k = 0; k < copy.length; k++) {
    const v = copy[k];
    if (v === 0) continue;
    if (v < 0) { violate(`block ${k} (offset ${k * BLOCK}) holds data that is neither zeros nor one whole write`); continue; }
    shown++;
    const w = perBlock.get(k)?.find((x) => x.id === v);
    if (!w) { violate(`block ${k} (offset ${k * BLOCK}) shows write ${v}, which was never issued to that block`); continue; }
    if (!newest || w.issueEv > newest.issueEv) newest = { id: v, block: k, issueEv: w.issueEv };
  }
  const horizon = opts.upToDate ? Infinity : newest ? newest.issueEv : -1;
  let required = 0;
  for (const [k, list] of perBlock) {
    let need: BlockWrite | null = null;
    for (let i = list.length - 1; i >= 0; i--) {
      const x = list[i];
      if (x.ackEv >= 0 && x.ackEv < horizon) { need = x; break; }
    }
    if (!need) continue;
    required++;
    const v = k < copy.length ? copy[k] : 0;
    if (v >= need.id) continue;
    if (v < 0) continue;   // reported above
    const why = opts.upToDate
      ? `write ${need.id} was acknowledged (event ${need.ackEv}) and the copy is up to date`
      : `write ${need.id} was acknowledged (event ${need.ackEv}) before write ${newest!.id} (block ${newest!.block}, on the copy) was issued (event ${newest!.issueEv})`;
    violate(`block ${k} (offset ${k * BLOCK}) shows ${v === 0 ? 'zeros' : `write ${v}`}, but ${why}`);
  }
  return { shown, newest, required, violations, violationCount };
}

/** One line for a test's log. */
export function describeReport(r: CausalityReport): string {
  return `shown=${r.shown} required=${r.required} newest=${r.newest ? r.newest.id : 'none'} violations=${r.violationCount}`;
}
