// Process bookkeeping: every process the bench starts is tracked by pid so that it is stopped on
// normal completion, on error, on SIGINT/SIGTERM and on exit. Also: spawning servers and tools.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { SETTINGS, log, sleep } from './common.js';

export const tracked = new Map(); // pid -> description
export const tempDirs = new Set();

/** True while the pid exists and is not a zombie. */
export function isAlive(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

export function signal(pid, sig) {
  try {
    process.kill(pid, sig);
  } catch {
    /* already gone */
  }
}

// Processes we have SIGSTOPped (outage simulation). Every path that stops or
// cleans up sends them SIGCONT first, so nothing is ever left stopped.
const paused = new Set();

/** SIGSTOP a tracked process (a black-holed peer: its sockets stay open and silent). */
export function pauseProcess(pid) {
  paused.add(pid);
  signal(pid, 'SIGSTOP');
}

/** SIGCONT a process paused with pauseProcess (idempotent). */
export function resumeProcess(pid) {
  if (!paused.delete(pid)) return;
  signal(pid, 'SIGCONT');
}

/** SIGTERM, wait up to timeoutMs, then SIGKILL. */
export async function terminate(pid, timeoutMs = SETTINGS.stopTimeoutMs) {
  if (!pid) return;
  resumeProcess(pid);
  if (isAlive(pid)) {
    signal(pid, 'SIGTERM');
    const deadline = Date.now() + timeoutMs;
    while (isAlive(pid) && Date.now() < deadline) await sleep(50);
    if (isAlive(pid)) {
      log(`pid ${pid} (${tracked.get(pid) ?? '?'}) ignored SIGTERM for ${timeoutMs} ms, sending SIGKILL`);
      signal(pid, 'SIGKILL');
      const killDeadline = Date.now() + 3000;
      while (isAlive(pid) && Date.now() < killDeadline) await sleep(50);
    }
  }
  tracked.delete(pid);
}

/** Stop everything still tracked (servers are normally stopped by their handles). */
export async function terminateAll() {
  for (const pid of [...tracked.keys()]) await terminate(pid);
}

/** Synchronous last-resort cleanup, safe to call from 'exit' handlers. */
export function cleanupSync() {
  for (const pid of [...paused]) resumeProcess(pid);
  const pids = [...tracked.keys()].filter(isAlive);
  for (const pid of pids) signal(pid, 'SIGTERM');
  const deadline = Date.now() + 3000;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  while (pids.some(isAlive) && Date.now() < deadline) Atomics.wait(pause, 0, 0, 50);
  for (const pid of pids) if (isAlive(pid)) signal(pid, 'SIGKILL');
  tracked.clear();
  for (const dir of tempDirs) {
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch {
      /* ignore */
    }
  }
  tempDirs.clear();
}

/** Clean up on exit and on SIGINT/SIGTERM/SIGHUP. */
export function installCleanupHandlers() {
  process.on('exit', cleanupSync);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(sig, () => {
      log(`received ${sig}, cleaning up`);
      cleanupSync();
      process.exit(128 + (os.constants.signals[sig] ?? 1));
    });
  }
}

/**
 * Spawn a long-running process (a server) with output appended to logPath.
 * Returns the ChildProcess with `.exited` (a promise of {code, signal}).
 */
export function spawnServer(cmd, args, { logPath, cwd, env, description = cmd, onStdoutLine } = {}) {
  const out = fs.openSync(logPath, 'a');
  fs.writeSync(out, `$ ${cmd} ${args.join(' ')}\n`);
  const child = spawn(cmd, args, {
    cwd,
    env: env ?? process.env,
    stdio: ['ignore', onStdoutLine ? 'pipe' : out, out],
  });
  fs.closeSync(out);
  child.exited = new Promise((resolve) => {
    child.on('error', (err) => {
      child.spawnError = err;
      resolve({ code: null, signal: null, error: err });
    });
    child.on('exit', (code, sig) => resolve({ code, signal: sig }));
  });
  if (child.pid) tracked.set(child.pid, description);
  if (onStdoutLine && child.stdout) {
    let buf = '';
    child.stdout.on('data', (chunk) => {
      fs.appendFileSync(logPath, chunk);
      buf += chunk.toString('utf8');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        onStdoutLine(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
      }
    });
  }
  return child;
}

/** Run a tool to completion; resolves {code, stdout, stderr, ms}. Killed after timeoutMs. */
export function runTool(cmd, args, { timeoutMs = 120_000, cwd, onSpawn } = {}) {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    if (child.pid) tracked.set(child.pid, cmd);
    onSpawn?.(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      void terminate(child.pid, 2000);
    }, timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      if (child.pid) tracked.delete(child.pid);
      reject(err);
    });
    child.on('close', (code, sig) => {
      clearTimeout(timer);
      if (child.pid) tracked.delete(child.pid);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      if (timedOut) reject(new Error(`${cmd} timed out after ${timeoutMs} ms`));
      else resolve({ code, signal: sig, stdout, stderr, ms });
    });
  });
}
