#!/usr/bin/env node
// Benchmark nbd-mirror against reference NBD servers (nbdkit, nbd-server, qemu-nbd).
//
// Usage:  npm run bench            (builds, installs nbd-server if missing, runs this)
//         node scripts/bench.js    (after `npm run build`)
//
// Every server exports the same preallocated raw image (filled with data once,
// so reads hit real blocks and writes are overwrites for every server) as
// export "lun0" on 127.0.0.1, one server at a time, and the same jobs are run
// against each:
//   fio --ioengine=nbd   4k randwrite QD16, 4k randread QD16, 4k randwrite QD1
//                        (IOPS, mean and p99 total latency in µs), 1M seq write QD4 (MB/s)
//   nbdcopy              copy of a random-data file (1 GiB) into the export (MB/s)
// All servers serve from the host page cache (buffered I/O, writeback), so the
// numbers compare the servers' request paths, not the disk.
// Results: markdown table on stdout (progress on stderr) and bench-results.json in the cwd.
//
// Environment (all optional):
//   BENCH_SECONDS       measured seconds per fio job            (default 10)
//   BENCH_RAMP_SECONDS  fio ramp time, not measured             (default 1)
//   BENCH_SIZE_MB       image size in MiB                       (default 2048)
//   BENCH_COPY_MB       nbdcopy source size in MiB              (default min(1024, BENCH_SIZE_MB))
//   BENCH_TARGETS       comma-separated subset of target names  (default: all)
//   BENCH_TMPDIR        where the image and temp files go       (default: os.tmpdir())
//   BENCH_NBDKIT_THREADS nbdkit --threads                       (default 16, nbdkit's own default)
//   BENCH_OUTPUT        results JSON path                       (default ./bench-results.json)
//   BENCH_NBD_MIRROR_CLI nbd-mirror entry point                 (default dist/cli.js)
//   BENCH_MIRROR_SECONDS measured seconds per fio job for the mirrored targets
//                        "nbd-mirror sync" / "nbd-mirror async"  (default BENCH_SECONDS)
//   BENCH_JOURNAL_MB    outage bench: MiB written while the peer is away (default 1024)
//   BENCH_OUTAGE_SECONDS outage bench: length of the outage under a writer (default 8)
//   BENCH_OUTAGE_RATE   outage bench: fio --rate for that writer (default 30m, a steady production-like
//                       load; 'unlimited' saturates both cores, so replay cannot outrun it here)
//
// Mirrored targets: "nbd-mirror sync" and "nbd-mirror async" run two nbd-mirror
// sites on 127.0.0.1 (a: primary lun0 on the bench image, b: secondary lun0 on a
// second image of the same size) and run the jobs against site a.
// "outage" (not a fio target; selectable in BENCH_TARGETS like one) SIGSTOPs the
// secondary site to black-hole the link and measures journal replay throughput
// and the time to converge after an outage under a writer; printed as a second table.
//
// Extending: add an entry to TARGETS (a name, an async start(ctx) returning a
// server handle, see startNbdMirror / combineServers / startMirrorPair, and
// optionally `seconds` to override BENCH_SECONDS for its fio jobs) and, if
// wanted, an entry to RATIOS (and TARGET_CHECKS).

import { spawn, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI_JS = path.resolve(process.env.BENCH_NBD_MIRROR_CLI || path.join(REPO_ROOT, 'dist', 'cli.js'));
const HOST = '127.0.0.1';
const EXPORT_NAME = 'lun0';
const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------
// Settings

function envNumber(name, def, { min = 0 } = {}) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min) throw new Error(`${name} must be a number >= ${min} (got ${JSON.stringify(raw)})`);
  return n;
}

const SETTINGS = {
  seconds: envNumber('BENCH_SECONDS', 10, { min: 1 }),
  rampSeconds: envNumber('BENCH_RAMP_SECONDS', 1, { min: 0 }),
  sizeMiB: Math.floor(envNumber('BENCH_SIZE_MB', 2048, { min: 16 })),
  copyMiB: 0, // filled below
  nbdkitThreads: Math.floor(envNumber('BENCH_NBDKIT_THREADS', 16, { min: 1 })),
  startTimeoutMs: 30_000,
  stopTimeoutMs: 10_000,
  mirrorSeconds: 0, // filled below
  journalMiB: Math.floor(envNumber('BENCH_JOURNAL_MB', 1024, { min: 1 })),
  outageSeconds: envNumber('BENCH_OUTAGE_SECONDS', 8, { min: 1 }),
  outageRate: process.env.BENCH_OUTAGE_RATE === 'unlimited' ? null : process.env.BENCH_OUTAGE_RATE || '30m',
};
SETTINGS.mirrorSeconds = envNumber('BENCH_MIRROR_SECONDS', SETTINGS.seconds, { min: 1 });
SETTINGS.copyMiB = Math.floor(envNumber('BENCH_COPY_MB', Math.min(1024, SETTINGS.sizeMiB), { min: 1 }));
if (SETTINGS.copyMiB > SETTINGS.sizeMiB) throw new Error('BENCH_COPY_MB must not exceed BENCH_SIZE_MB');

const OUTPUT_PATH = path.resolve(process.env.BENCH_OUTPUT || 'bench-results.json');

function log(msg) {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// Process bookkeeping: every process we start is tracked by pid so that it is
// stopped on normal completion, on error, on SIGINT/SIGTERM and on exit.

const tracked = new Map(); // pid -> description
const tempDirs = new Set();

/** True while the pid exists and is not a zombie. */
function isAlive(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

function signal(pid, sig) {
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
function pauseProcess(pid) {
  paused.add(pid);
  signal(pid, 'SIGSTOP');
}

/** SIGCONT a process paused with pauseProcess (idempotent). */
function resumeProcess(pid) {
  if (!paused.delete(pid)) return;
  signal(pid, 'SIGCONT');
}

/** SIGTERM, wait up to timeoutMs, then SIGKILL. */
async function terminate(pid, timeoutMs = SETTINGS.stopTimeoutMs) {
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

/** Synchronous last-resort cleanup, safe to call from 'exit' handlers. */
function cleanupSync() {
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

process.on('exit', cleanupSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    log(`received ${sig}, cleaning up`);
    cleanupSync();
    process.exit(128 + (os.constants.signals[sig] ?? 1));
  });
}

/**
 * Spawn a long-running process (a server) with output appended to logPath.
 * Returns the ChildProcess with `.exited` (a promise of {code, signal}).
 */
function spawnServer(cmd, args, { logPath, cwd, env, description = cmd, onStdoutLine } = {}) {
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
function runTool(cmd, args, { timeoutMs = 120_000, cwd, onSpawn } = {}) {
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

function tail(text, lines = 15) {
  return String(text).trimEnd().split('\n').slice(-lines).join('\n');
}

function logTail(logPath, lines = 15) {
  try {
    return tail(fs.readFileSync(logPath, 'utf8'), lines);
  } catch {
    return '(no log)';
  }
}

// ---------------------------------------------------------------------------
// Network helpers

/** A port that was free a moment ago (bind to port 0 and let the kernel pick). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, HOST, () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function tryConnect(port, timeoutMs = 1000) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: HOST, port });
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/**
 * Wait until something accepts TCP connections on port. `alive()` is polled so
 * a server that dies during startup fails fast instead of timing out.
 */
async function waitForPort(port, { alive = () => true, timeoutMs = SETTINGS.startTimeoutMs, what = `port ${port}` } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await tryConnect(port)) return;
    if (!alive()) throw new Error(`${what} exited before accepting connections`);
    if (Date.now() > deadline) throw new Error(`${what} did not accept connections within ${timeoutMs} ms`);
    await sleep(100);
  }
}

// ---------------------------------------------------------------------------
// Server handles
//
// A server handle is { name, port, exportName, uri, pid, logPath, stop() }.

function makeHandle({ name, port, exportName = EXPORT_NAME, pid, logPath, stop }) {
  let stopped = false;
  return {
    name,
    port,
    exportName,
    uri: `nbd://${HOST}:${port}/${exportName}`,
    pid,
    logPath,
    async stop() {
      if (stopped) return;
      stopped = true;
      await stop();
    },
  };
}

/** Start a child-process server and wait for its port. Stops it again if startup fails. */
async function startProcessServer({ name, cmd, args, port, logPath, cwd, env, onStdoutLine, exportName }) {
  const child = spawnServer(cmd, args, { logPath, cwd, env, description: name, onStdoutLine });
  const stop = async () => {
    await terminate(child.pid);
    await Promise.race([child.exited, sleep(1000)]);
  };
  try {
    const died = child.exited.then(({ code, signal: sig, error }) => {
      throw new Error(error ? `${cmd}: ${error.message}` : `${name} exited during startup (code ${code}, signal ${sig})`);
    });
    died.catch(() => {}); // only matters while racing below
    await Promise.race([
      waitForPort(port, { alive: () => child.exitCode === null && child.signalCode === null && !child.spawnError, what: name }),
      died,
    ]);
  } catch (err) {
    await stop();
    err.message += `\n--- ${name} log ---\n${logTail(logPath)}`;
    throw err;
  }
  return makeHandle({ name, port, exportName, pid: child.pid, logPath, stop });
}

/**
 * A combined handle: clients talk to `front`; stopping it stops front first,
 * then the others (e.g. a mirrored primary and its secondary).
 */
function combineServers(front, others) {
  return makeHandle({
    name: front.name,
    port: front.port,
    exportName: front.exportName,
    pid: front.pid,
    logPath: front.logPath,
    stop: async () => {
      await front.stop();
      for (const s of others) await s.stop();
    },
  });
}

// --- nbd-mirror --------------------------------------------------------------

/**
 * Build an nbd-mirror config object. `luns` defaults to a single standalone
 * primary LUN on the bench image.
 */
function nbdMirrorConfig({ site = 'bench', port, adminPort, dataDir, luns, logLevel = 'warn', mirror, shutdownTimeoutMs }) {
  return {
    site,
    listen: { host: HOST, port },
    dataDir,
    admin: { host: HOST, port: adminPort },
    luns,
    log: { level: logLevel },
    ...(mirror ? { mirror } : {}),
    ...(shutdownTimeoutMs !== undefined ? { shutdownTimeoutMs } : {}),
  };
}

/**
 * Start `node dist/cli.js serve --config FILE` with the given config object
 * (shape as in nbdMirrorConfig). Resolves to a server handle once the listen
 * port accepts connections (a "ready" log line is noted but not required).
 */
async function startNbdMirror(config, { name = 'nbd-mirror', tmpDir = currentTmpDir() } = {}) {
  if (!fs.existsSync(CLI_JS)) throw new Error(`${path.relative(process.cwd(), CLI_JS) || CLI_JS} not found (run npm run build)`);
  const tag = `${name.replace(/[^a-z0-9]+/gi, '-')}-${config.site}-${config.listen.port}`;
  const configPath = path.join(tmpDir, `${tag}.json`);
  if (config.dataDir) fs.mkdirSync(config.dataDir, { recursive: true });
  fs.writeFileSync(configPath, JSON.stringify(config, null, 2));
  let sawReady = false;
  const handle = await startProcessServer({
    name,
    cmd: process.execPath,
    args: [CLI_JS, 'serve', '--config', configPath],
    port: config.listen.port,
    exportName: config.luns?.[0]?.name ?? EXPORT_NAME,
    logPath: path.join(tmpDir, `${tag}.log`),
    cwd: REPO_ROOT,
    onStdoutLine: (line) => {
      if (!sawReady && /ready/i.test(line)) sawReady = true;
    },
  });
  handle.sawReady = () => sawReady;
  return handle;
}

// --- nbd-mirror mirrored pair --------------------------------------------------

/** n distinct ports that were free a moment ago. */
async function freePorts(n) {
  const ports = new Set();
  for (let i = 0; ports.size < n; i++) {
    if (i > 20 * n) throw new Error(`could not find ${n} distinct free ports`);
    ports.add(await freePort());
  }
  return [...ports];
}

/** GET http://127.0.0.1:adminPort/status (no keep-alive, so nothing lingers). */
function fetchStatus(adminPort, timeoutMs = 2000) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: HOST, port: adminPort, path: '/status', agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`GET /status: HTTP ${res.statusCode}`));
        try {
          resolve(JSON.parse(body));
        } catch (err) {
          reject(new Error(`GET /status: bad JSON: ${err.message}`));
        }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET /status: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

/** The status object of one LUN of a site. */
async function lunStatus(adminPort, lun = EXPORT_NAME) {
  const st = await fetchStatus(adminPort);
  const l = st.luns?.find((x) => x.name === lun);
  if (!l) throw new Error(`status has no LUN ${lun}`);
  return l;
}

/**
 * Poll a LUN's status every intervalMs until its state is one of `states`.
 * Resolves { status, atMs } (atMs = Date.now() of the poll that saw it).
 * onPoll(status, now) sees every successful poll (for timelines).
 */
async function waitForLunState(adminPort, states, { timeoutMs = 30_000, intervalMs = 50, alive = () => true, onPoll, what = 'LUN' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last = null;
  let lastErr = null;
  for (;;) {
    try {
      last = await lunStatus(adminPort);
      const now = Date.now();
      onPoll?.(last, now);
      if (states.includes(last.state)) return { status: last, atMs: now };
    } catch (err) {
      lastErr = err;
    }
    if (!alive()) throw new Error(`${what}: site exited while waiting for state ${states.join('|')}`);
    if (Date.now() > deadline) {
      const seen = last ? `state ${last.state} (${last.reason ?? ''})` : `no status (${lastErr?.message ?? '?'})`;
      throw new Error(`${what}: not ${states.join('|')} within ${timeoutMs} ms; last ${seen}`);
    }
    await sleep(intervalMs);
  }
}

/** Records distinct consecutive LUN states with their time relative to t0. */
function stateTimeline(t0) {
  const events = [];
  return {
    events,
    onPoll(st, now) {
      const last = events[events.length - 1];
      if (!last || last.state !== st.state) events.push({ atS: +((now - t0) / 1000).toFixed(3), state: st.state, reason: st.reason ?? '' });
    },
    text() {
      return events.map((e) => `${e.atS.toFixed(2)}s ${e.state}`).join(' → ');
    },
  };
}

/** The second image (secondary LUN), created once per run and shared by all mirrored setups. */
function secondaryImage(ctx) {
  ctx.secondaryImagePromise ??= ctx.extraImage('secondary.img').then((file) => (ctx.secondaryImagePath = file));
  return ctx.secondaryImagePromise;
}

/**
 * Two nbd-mirror sites on 127.0.0.1: a (primary lun0 on the bench image, mirror
 * `mode`) and b (secondary lun0 on a second image of the same size); each one's
 * mirror.peer points at the other's mirror port. Waits until a's lun0 is
 * `uptodate`. The handle talks to site a; stopping it stops a, then b. Extra
 * fields: adminPort (a), adminPortB, primary, secondary (handles).
 */
async function startMirrorPair(ctx, { name, mode, heartbeat, reconnectMs, journalMaxBytes, connections = 4, tls = 'psk' }) {
  const remoteImage = await secondaryImage(ctx);
  const [portA, adminA, mirrorA, portB, adminB, mirrorB] = await freePorts(6);
  const tag = name.replace(/[^a-z0-9]+/gi, '-');
  // The default, secure link: TLS 1.3 with a pre-shared key both sites read from one file.
  const pskFile = path.join(ctx.tmpDir, 'mirror.psk');
  if (!fs.existsSync(pskFile)) fs.writeFileSync(pskFile, `bench:${crypto.randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
  const mirror = (listen, peer, peerSite) => ({
    listen: { host: HOST, port: listen },
    peer: { host: HOST, port: peer, site: peerSite },
    tls,
    ...(tls === 'off' ? {} : { credentials: { pskFile } }),
    connections,
    ...(reconnectMs !== undefined ? { reconnectMs } : {}),
    ...(heartbeat ? { heartbeat } : {}),
    ...(journalMaxBytes ? { journal: { maxBytes: journalMaxBytes } } : {}),
  });
  const secondary = await startNbdMirror(nbdMirrorConfig({
    site: 'b', port: portB, adminPort: adminB, dataDir: path.join(ctx.tmpDir, `${tag}-b`), shutdownTimeoutMs: 5000,
    mirror: mirror(mirrorB, mirrorA, 'a'),
    luns: [{ name: EXPORT_NAME, path: remoteImage, role: 'secondary' }],
  }), { name: `${name} (secondary b)` });
  let primary;
  try {
    primary = await startNbdMirror(nbdMirrorConfig({
      site: 'a', port: portA, adminPort: adminA, dataDir: path.join(ctx.tmpDir, `${tag}-a`), shutdownTimeoutMs: 5000,
      mirror: mirror(mirrorA, mirrorB, 'b'),
      luns: [{ name: EXPORT_NAME, path: ctx.image, role: 'primary', mirror: mode }],
    }), { name });
    const t0 = Date.now();
    await waitForLunState(adminA, ['uptodate'], {
      timeoutMs: SETTINGS.startTimeoutMs,
      intervalMs: 100,
      alive: () => isAlive(primary.pid) && isAlive(secondary.pid),
      what: `${name}: site a lun0`,
    });
    log(`${name}: site a lun0 uptodate ${((Date.now() - t0) / 1000).toFixed(1)} s after start`);
  } catch (err) {
    if (primary) {
      err.message += `\n--- site a log ---\n${logTail(primary.logPath)}`;
      await primary.stop().catch(() => {});
    }
    err.message += `\n--- site b log ---\n${logTail(secondary.logPath)}`;
    await secondary.stop().catch(() => {});
    throw err;
  }
  const handle = combineServers(primary, [secondary]);
  return Object.assign(handle, { adminPort: adminA, adminPortB: adminB, primary, secondary, sawReady: primary.sawReady });
}

// --- nbdkit ------------------------------------------------------------------

async function startNbdkit(ctx) {
  const port = await freePort();
  // file plugin, default cache=default (buffered I/O through the page cache).
  // nbdkit ignores the export name, so nbd://.../lun0 works.
  return startProcessServer({
    name: 'nbdkit',
    cmd: 'nbdkit',
    args: ['--foreground', '--exit-with-parent', '-p', String(port), '-i', HOST,
      `--threads=${SETTINGS.nbdkitThreads}`, 'file', ctx.image],
    port,
    logPath: path.join(ctx.tmpDir, 'nbdkit.log'),
  });
}

// --- nbd-server --------------------------------------------------------------

async function startNbdServer(ctx) {
  const port = await freePort();
  const conf = path.join(ctx.tmpDir, 'nbd-server.conf');
  const pidFile = path.join(ctx.tmpDir, 'nbd-server.pid');
  const logPath = path.join(ctx.tmpDir, 'nbd-server.log');
  // No user/group: runs as the current user. max_threads left at its default (4).
  // Buffered I/O through the page cache; flush/fua advertised like the others.
  fs.writeFileSync(conf, [
    '[generic]',
    `port = ${port}`,
    `listenaddr = ${HOST}`,
    'allowlist = true',
    `[${EXPORT_NAME}]`,
    `exportname = ${ctx.image}`,
    'flush = true',
    'fua = true',
    '',
  ].join('\n'));
  fs.rmSync(pidFile, { force: true });
  // nbd-server 3.24's -d ("don't fork") serves a single connection and exits,
  // which does not work for nbdinfo + fio + nbdcopy. So it daemonizes; we take
  // its pid from the pid file and stop it by that pid.
  const launcher = spawnServer('nbd-server', ['-C', conf, '-p', pidFile], { logPath, description: 'nbd-server launcher' });
  const { code, signal: sig, error } = await launcher.exited;
  tracked.delete(launcher.pid);
  if (error) throw new Error(`nbd-server: ${error.message}`);
  if (code !== 0) throw new Error(`nbd-server exited with code ${code} signal ${sig}\n${logTail(logPath)}`);
  let pid = 0;
  const deadline = Date.now() + 5000;
  while (!pid && Date.now() < deadline) {
    try {
      pid = Number.parseInt(fs.readFileSync(pidFile, 'utf8').trim(), 10) || 0;
    } catch {
      /* not written yet */
    }
    if (!pid) await sleep(50);
  }
  if (!pid) throw new Error(`nbd-server did not write ${pidFile}\n${logTail(logPath)}`);
  tracked.set(pid, 'nbd-server');
  const stop = () => terminate(pid);
  try {
    await waitForPort(port, { alive: () => isAlive(pid), what: 'nbd-server' });
  } catch (err) {
    await stop();
    throw err;
  }
  return makeHandle({ name: 'nbd-server', port, pid, logPath, stop });
}

// --- qemu-nbd ----------------------------------------------------------------

async function startQemuNbd(ctx) {
  const port = await freePort();
  // --cache=writeback: buffered I/O through the host page cache with flushes
  // honoured, i.e. the same as nbdkit's file plugin, nbd-server and nbd-mirror
  // (--cache=none would be O_DIRECT and measure the disk instead).
  return startProcessServer({
    name: 'qemu-nbd',
    cmd: 'qemu-nbd',
    args: ['-f', 'raw', '-x', EXPORT_NAME, '-p', String(port), '-b', HOST, '-t', '-e', '16',
      '--cache=writeback', '--aio=threads', ctx.image],
    port,
    logPath: path.join(ctx.tmpDir, 'qemu-nbd.log'),
  });
}

// ---------------------------------------------------------------------------
// Targets (table columns, in order). Add entries here to benchmark more setups.

const TARGETS = [
  {
    name: 'nbd-mirror',
    start: async (ctx) =>
      startNbdMirror(
        nbdMirrorConfig({
          port: await freePort(),
          adminPort: await freePort(),
          dataDir: path.join(ctx.tmpDir, 'nbd-mirror-data'),
          luns: [{ name: EXPORT_NAME, path: ctx.image, role: 'primary', mirror: 'none' }],
        }),
      ),
  },
  { name: 'nbdkit', start: startNbdkit },
  { name: 'nbd-server', start: startNbdServer },
  { name: 'qemu-nbd', start: startQemuNbd },
  // Mirrored: two sites (see startMirrorPair), jobs against the primary site a.
  // Default heartbeat settings; `seconds` = measured seconds per fio job.
  {
    name: 'nbd-mirror sync',
    seconds: SETTINGS.mirrorSeconds,
    start: (ctx) => startMirrorPair(ctx, { name: 'nbd-mirror sync', mode: 'sync' }),
  },
  {
    name: 'nbd-mirror async',
    seconds: SETTINGS.mirrorSeconds,
    start: (ctx) => startMirrorPair(ctx, { name: 'nbd-mirror async', mode: 'async' }),
  },
  // The cost of the mirror link's TLS: the sync pair again over plain TCP (mirror.tls "off").
  {
    name: 'nbd-mirror sync plain',
    seconds: SETTINGS.mirrorSeconds,
    start: (ctx) => startMirrorPair(ctx, { name: 'nbd-mirror sync plain', mode: 'sync', tls: 'off' }),
  },
];

// Ratio columns: [ours, reference] (label "ours/reference", oriented so that
// > 1 means ours is better), or an object { label, ours, ref, jobs?, metrics?,
// plain? } limited to some rows (other cells stay empty); plain: true is the
// plain quotient ours/ref without orientation. Entries naming a target that is
// not in TARGETS (or filtered out by BENCH_TARGETS) are dropped.
const RATIOS = [
  ['nbd-mirror', 'nbdkit'],
  ['nbd-mirror', 'nbd-server'],
  ['nbd-mirror', 'qemu-nbd'],
  ['nbd-mirror sync', 'nbdkit'],
  ['nbd-mirror async', 'nbdkit'],
  // TLS on the mirror link vs plain TCP (< 1: what TLS costs).
  { label: 'sync TLS/plain', ours: 'nbd-mirror sync', ref: 'nbd-mirror sync plain', plain: true },
  // The cost of synchronous mirroring at QD1: sync latency / unmirrored latency (lower is better).
  {
    label: 'sync QD1 latency / nbd-mirror QD1 latency',
    ours: 'nbd-mirror sync',
    ref: 'nbd-mirror',
    jobs: ['randwrite-4k-qd1'],
    metrics: ['latMeanUs', 'latP99Us'],
    plain: true,
  },
];

function normalizeRatio(r) {
  return Array.isArray(r) ? { label: `${r[0]}/${r[1]}`, ours: r[0], ref: r[1] } : r;
}

// Targets of the issue, checked below the table: value = [ours, ref, job, metric]
// quotient (plain, not oriented), compared with `limit`.
const TARGET_CHECKS = [
  {
    text: 'sync-mirrored 4k randwrite QD16 IOPS >= 0.5x nbdkit (unmirrored)',
    ours: 'nbd-mirror sync', ref: 'nbdkit', job: 'randwrite-4k-qd16', metric: 'iops', op: '>=', limit: 0.5,
  },
  {
    text: 'sync-mirrored 4k randwrite QD1 mean latency <= 2x nbd-mirror unmirrored',
    ours: 'nbd-mirror sync', ref: 'nbd-mirror', job: 'randwrite-4k-qd1', metric: 'latMeanUs', op: '<=', limit: 2,
  },
];

/** The issue's targets that can be judged with the targets run (ours present). */
function checkTargets(results) {
  const ran = new Set(results.map((r) => r.name));
  return TARGET_CHECKS.filter((c) => ran.has(c.ours)).map((c) => {
    const a = metricValue(results, c.ours, c.job, c.metric);
    const b = metricValue(results, c.ref, c.job, c.metric);
    const value = a !== null && b !== null && b > 0 ? a / b : null;
    const met = value === null ? null : c.op === '>=' ? value >= c.limit : value <= c.limit;
    const verdict = met === null ? `not measured (needs "${c.ours}" and "${c.ref}" in BENCH_TARGETS)` : `${met ? 'met' : 'not met'} (${fmt(value, 2)}x)`;
    return { ...c, value, met, line: `target: ${c.text}: ${verdict}` };
  });
}

/** Name of the outage bench in BENCH_TARGETS. */
const OUTAGE_NAME = 'outage';

// ---------------------------------------------------------------------------
// Jobs

const METRICS = {
  iops: { label: 'IOPS', higherIsBetter: true, digits: 0 },
  latMeanUs: { label: 'mean lat µs', higherIsBetter: false, digits: 1 },
  latP99Us: { label: 'p99 lat µs', higherIsBetter: false, digits: 1 },
  MBps: { label: 'MB/s', higherIsBetter: true, digits: 1 },
};

function fioJob(id, title, { rw, bs, iodepth }, metrics) {
  return { id, title, kind: 'fio', params: { rw, bs, iodepth }, metrics };
}

const JOBS = [
  fioJob('randwrite-4k-qd16', '4k randwrite QD16', { rw: 'randwrite', bs: '4k', iodepth: 16 }, ['iops', 'latMeanUs', 'latP99Us']),
  fioJob('randread-4k-qd16', '4k randread QD16', { rw: 'randread', bs: '4k', iodepth: 16 }, ['iops', 'latMeanUs', 'latP99Us']),
  fioJob('randwrite-4k-qd1', '4k randwrite QD1', { rw: 'randwrite', bs: '4k', iodepth: 1 }, ['iops', 'latMeanUs', 'latP99Us']),
  fioJob('seqwrite-1m-qd4', '1M seq write QD4', { rw: 'write', bs: '1M', iodepth: 4 }, ['MBps']),
  { id: 'nbdcopy', title: 'nbdcopy file→export', kind: 'nbdcopy', metrics: ['MBps'] },
];

async function runFio(job, server, ctx, { seconds = SETTINGS.seconds } = {}) {
  const out = path.join(ctx.tmpDir, `fio-${job.id}.json`);
  fs.rmSync(out, { force: true });
  const { rw, bs, iodepth } = job.params;
  const args = [
    `--name=${job.id}`,
    '--ioengine=nbd',
    `--uri=${server.uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${iodepth}`,
    '--numjobs=1',
    '--time_based',
    `--runtime=${seconds}`,
    `--ramp_time=${SETTINGS.rampSeconds}`,
    '--norandommap',
    '--randrepeat=1', // same offsets for every server
    '--lat_percentiles=1', // percentiles of total latency (submit + completion)
    '--output-format=json',
    `--output=${out}`, // fio's nbd engine prints "connected" on stdout
  ];
  const timeoutMs = (seconds + SETTINGS.rampSeconds + 60) * 1000;
  const r = await runTool('fio', args, { timeoutMs });
  let report;
  try {
    report = JSON.parse(fs.readFileSync(out, 'utf8'));
  } catch {
    throw new Error(`fio exited with code ${r.code} and no JSON report\n${tail(r.stderr + r.stdout)}`);
  }
  const j = report.jobs?.[0];
  if (!j) throw new Error('fio report has no jobs');
  if (r.code !== 0 || j.error) throw new Error(`fio failed (code ${r.code}, job error ${j.error})\n${tail(r.stderr)}`);
  const d = rw.includes('read') ? j.read : j.write;
  if (!d || !d.total_ios) throw new Error(`fio completed no I/O\n${tail(r.stderr)}`);
  const pct = d.lat_ns?.percentile ?? d.clat_ns?.percentile ?? {};
  return {
    iops: d.iops,
    latMeanUs: d.lat_ns.mean / 1000,
    latP99Us: pct['99.000000'] !== undefined ? pct['99.000000'] / 1000 : null,
    MBps: d.bw_bytes / 1e6,
    ios: d.total_ios,
    runtimeMs: d.runtime,
  };
}

async function runNbdcopy(job, server, ctx) {
  // Default nbdcopy settings (multi-conn up to 4 connections if the server
  // advertises it, 64 x 256k requests in flight per connection), no --flush.
  const r = await runTool('nbdcopy', [ctx.source, server.uri], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`nbdcopy failed (code ${r.code})\n${tail(r.stderr + r.stdout)}`);
  const bytes = ctx.sourceBytes;
  return { MBps: bytes / 1e6 / (r.ms / 1000), seconds: r.ms / 1000, bytes };
}

const JOB_RUNNERS = { fio: runFio, nbdcopy: runNbdcopy };

// ---------------------------------------------------------------------------
// Per-target run

/** Check the export is reachable and record what it advertises. */
async function probeExport(server) {
  let lastErr = '';
  for (let attempt = 0; attempt < 10; attempt++) {
    const r = await runTool('nbdinfo', ['--size', server.uri], { timeoutMs: 15_000 }).catch((e) => ({ code: -1, stderr: e.message }));
    if (r.code === 0) {
      const size = Number(r.stdout.trim());
      const info = { size };
      // Flags (e.g. can_multi_conn, which decides nbdcopy's connection count).
      // nbd-server 3.24 reports export-size 0 via NBD_OPT_INFO, so size comes from --size.
      const j = await runTool('nbdinfo', ['--json', '--no-content', server.uri], { timeoutMs: 15_000 }).catch(() => null);
      if (j && j.code === 0) {
        try {
          const exp = JSON.parse(j.stdout).exports?.[0] ?? {};
          for (const k of ['can_multi_conn', 'can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero']) {
            if (k in exp) info[k] = exp[k];
          }
          info.protocol = JSON.parse(j.stdout).protocol;
        } catch {
          /* flags are informational only */
        }
      }
      return info;
    }
    lastErr = tail(r.stderr, 5);
    await sleep(500);
  }
  throw new Error(`nbdinfo could not open ${server.uri}: ${lastErr}`);
}

function fsyncFile(file) {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function runTarget(target, ctx) {
  const result = { name: target.name, status: 'ok', error: null, export: null, jobs: {}, fioSeconds: target.seconds ?? SETTINGS.seconds };
  // Write back everything dirty (the previous server's pages, and the random source file written
  // during preparation) so background writeback does not land on whichever server runs next.
  fsyncFile(ctx.image);
  if (ctx.secondaryImagePath) fsyncFile(ctx.secondaryImagePath);
  execFileSync('sync');
  let server = null;
  const started = Date.now();
  try {
    log(`${target.name}: starting`);
    server = await target.start(ctx);
    result.export = await probeExport(server);
    if (typeof server.sawReady === 'function') result.sawReadyLine = server.sawReady();
    if (result.export.size < ctx.imageBytes) throw new Error(`export size ${result.export.size} < image size ${ctx.imageBytes}`);
    log(`${target.name}: ready on ${server.uri} (multi-conn: ${result.export.can_multi_conn ?? '?'})`);
  } catch (err) {
    result.status = 'n/a';
    result.error = String(err?.message ?? err);
    log(`${target.name}: not available: ${result.error}`);
    if (server) await server.stop().catch(() => {});
    return result;
  }
  try {
    for (const job of JOBS) {
      log(`${target.name}: ${job.title}`);
      try {
        result.jobs[job.id] = await JOB_RUNNERS[job.kind](job, server, ctx, { seconds: target.seconds ?? SETTINGS.seconds });
        log(`${target.name}: ${job.title}: ${job.metrics.map((m) => `${METRICS[m].label} ${fmt(result.jobs[job.id][m], METRICS[m].digits)}`).join(', ')}`);
      } catch (err) {
        result.jobs[job.id] = { error: String(err?.message ?? err) };
        log(`${target.name}: ${job.title} failed: ${result.jobs[job.id].error}`);
        // A dead server fails all remaining jobs; don't wait for each to time out.
        if (server.pid && !isAlive(server.pid)) {
          result.status = 'crashed';
          result.error = `server exited during ${job.title}\n${logTail(server.logPath)}`;
          break;
        }
      }
    }
  } finally {
    await server.stop();
    result.seconds = (Date.now() - started) / 1000;
    log(`${target.name}: stopped after ${result.seconds.toFixed(0)} s`);
  }
  return result;
}

// ---------------------------------------------------------------------------
// Outage bench (not fio): a mirrored pair whose link is cut by SIGSTOPping the
// secondary site b. A stopped process keeps its TCP sockets open and silent and
// sends no heartbeats: a black-holed link, detected by a's heartbeat timeout.

const OUTAGE_HEARTBEAT = { intervalMs: 200, timeoutMs: 600, probationMs: 1000 };
const OUTAGE_TARGET_REPLAY_MBPS = 500;
const OUTAGE_CONVERGE_SLACK_S = 5;

/** Run fio against a URI with extra args; resolves the parsed JSON job (write side) and wall ms. */
async function runFioRaw(name, uri, extraArgs, { timeoutMs, ctx, onSpawn, allowSignal = false }) {
  const out = path.join(ctx.tmpDir, `fio-${name}.json`);
  fs.rmSync(out, { force: true });
  const args = [`--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, '--numjobs=1', '--output-format=json', `--output=${out}`, ...extraArgs];
  const r = await runTool('fio', args, { timeoutMs, onSpawn });
  let j;
  try {
    // A fio stopped by a signal prefixes the report with "fio: terminating on signal N".
    const text = fs.readFileSync(out, 'utf8');
    j = JSON.parse(text.slice(text.indexOf('{'))).jobs?.[0];
  } catch {
    throw new Error(`fio ${name} exited with code ${r.code} and no JSON report\n${tail(r.stderr + r.stdout)}`);
  }
  if (!j || (r.code !== 0 && !allowSignal) || (j.error && !allowSignal)) throw new Error(`fio ${name} failed (code ${r.code}, job error ${j?.error})\n${tail(r.stderr)}`);
  return { write: j.write, ms: r.ms };
}

/**
 * Poll a's lun0 every 50 ms until `uptodate`. Returns timestamps (Date.now())
 * of the first poll in `replaying`, of the first poll where every replayed
 * record was acked, of `uptodate`, and the last replaying status.
 */
async function watchCatchUp(pair, timeline, { timeoutMs }) {
  const seen = { replayingAt: null, ackedAt: null, uptodateAt: null, resyncing: false, lastReplaying: null, last: null };
  const { status, atMs } = await waitForLunState(pair.adminPort, ['uptodate'], {
    timeoutMs,
    intervalMs: 50,
    alive: () => isAlive(pair.primary.pid) && isAlive(pair.secondary.pid),
    what: 'outage: site a lun0',
    onPoll: (st, now) => {
      timeline.onPoll(st, now);
      seen.last = st;
      if (st.state === 'replaying') {
        seen.replayingAt ??= now;
        seen.lastReplaying = st;
        const p = st.progress ?? {};
        if (!seen.ackedAt && p.replayTotal > 0 && p.replayDone >= p.replayTotal) seen.ackedAt = now;
      }
      if (st.state === 'resyncing') seen.resyncing = true;
    },
  });
  seen.uptodateAt = atMs;
  seen.last = status;
  return seen;
}

/** live | journal | bitmap: 'writePath' in the status ('path' before it named the backing file). */
function writePathOf(st) {
  return st.writePath ?? (['live', 'journal', 'bitmap'].includes(st.path) ? st.path : null);
}

/** A site's JSON log lines (level warn and up in the bench) logged at or after sinceMs. */
function siteLogEvents(logPath, sinceMs) {
  let text = '';
  try {
    text = fs.readFileSync(logPath, 'utf8');
  } catch {
    return [];
  }
  return text.split('\n').flatMap((line) => {
    if (!line.startsWith('{')) return [];
    try {
      const e = JSON.parse(line);
      return Date.parse(e.timestamp) >= sinceMs ? [e] : [];
    } catch {
      return [];
    }
  });
}

async function runOutage(ctx) {
  const result = { name: 'outage', status: 'ok', error: null, settings: { heartbeat: OUTAGE_HEARTBEAT, reconnectMs: 100 } };
  const journalBytesWanted = SETTINGS.journalMiB * MiB;
  // 2 GiB as asked; more if BENCH_JOURNAL_MB would not fit (records carry headers).
  const journalMaxBytes = Math.max(2048 * MiB, Math.ceil(journalBytesWanted * 1.25));
  result.settings.journalMaxBytes = journalMaxBytes;
  fsyncFile(ctx.image);
  if (ctx.secondaryImagePath) fsyncFile(ctx.secondaryImagePath);
  const started = Date.now();
  let pair = null;
  try {
    log('outage: starting sites a (primary lun0, async) and b (secondary)');
    pair = await startMirrorPair(ctx, {
      name: 'nbd-mirror outage', mode: 'async', heartbeat: OUTAGE_HEARTBEAT, reconnectMs: 100, journalMaxBytes,
    });
    const pidB = pair.secondary.pid;
    if (ctx.secondaryImagePath) fsyncFile(ctx.secondaryImagePath);
    await sleep(1000); // a few heartbeats on the fresh session first

    // --- a. journal replay throughput ---------------------------------------
    const replay = (result.replay = { journalMiBWanted: SETTINGS.journalMiB });
    {
      let contAt = null;
      const t0 = Date.now();
      const timeline = stateTimeline(t0);
      replay.timeline = timeline.events;
      try {
        log(`outage: SIGSTOP site b (pid ${pidB})`);
        pauseProcess(pidB);
        const down = await waitForLunState(pair.adminPort, ['journaling'], {
          timeoutMs: 15_000, intervalMs: 50, onPoll: timeline.onPoll, alive: () => isAlive(pair.primary.pid), what: 'outage: site a lun0',
        });
        replay.detectSeconds = (down.atMs - t0) / 1000;
        log(`outage: a journaling after ${replay.detectSeconds.toFixed(2)} s; writing ${SETTINGS.journalMiB} MiB (fio seq write 1M QD4)`);
        // Sequential 1M writes; wraps around if the journal is to be larger than the image.
        const w = await runFioRaw('journal-fill', pair.uri, [
          '--rw=write', '--bs=1M', '--iodepth=4', `--size=${Math.min(journalBytesWanted, ctx.imageBytes)}`,
          `--io_size=${journalBytesWanted}`,
        ], { timeoutMs: 600_000, ctx });
        replay.writeMBps = w.write.bw_bytes / 1e6;
        const st = await lunStatus(pair.adminPort);
        timeline.onPoll(st, Date.now());
        replay.journal = st.journal;
        replay.writePathBefore = writePathOf(st);
        log(`outage: wrote at ${fmt(replay.writeMBps, 1)} MB/s; a's journal ${fmt(st.journal.bytes / MiB, 1)} MiB in ${st.journal.records} records (state ${st.state}, write path ${writePathOf(st)})`);
        if (st.journal.bytes < 0.95 * journalBytesWanted) {
          replay.note = `journal holds ${fmt(st.journal.bytes / MiB, 1)} MiB, expected ≈ ${SETTINGS.journalMiB} MiB (write path ${writePathOf(st)})`;
          log(`outage: warning: ${replay.note}`);
        }
        log('outage: SIGCONT site b');
        contAt = Date.now();
        resumeProcess(pidB);
      } finally {
        resumeProcess(pidB);
      }
      const seen = await watchCatchUp(pair, timeline, { timeoutMs: 120_000 + (replay.journal.bytes / (20 * 1e6)) * 1000 });
      // If the replay ended between two polls, a's own record of its start (same host clock) stands in.
      let startAt = seen.replayingAt;
      const startedMs = seen.lastReplaying?.progress?.startedMs ?? seen.last?.progress?.startedMs;
      if (startAt === null && startedMs && startedMs >= contAt) {
        startAt = startedMs;
        replay.startFrom = "a's progress.startedMs (replaying never seen by a poll)";
      }
      replay.resyncing = seen.resyncing;
      replay.probationSeconds = startAt !== null ? (startAt - contAt) / 1000 : null;
      replay.seconds = startAt !== null ? (seen.uptodateAt - startAt) / 1000 : null;
      replay.sendSeconds = startAt !== null && seen.ackedAt !== null ? (seen.ackedAt - startAt) / 1000 : null;
      replay.serverSeconds = startedMs ? (seen.uptodateAt - startedMs) / 1000 : null;
      replay.replayedBytes = seen.last?.mirrored?.replayedBytes ?? null;
      replay.MBps = replay.seconds > 0 ? replay.journal.bytes / 1e6 / replay.seconds : null;
      replay.target = `>= ${OUTAGE_TARGET_REPLAY_MBPS} MB/s`;
      replay.met = replay.MBps !== null ? replay.MBps >= OUTAGE_TARGET_REPLAY_MBPS : null;
      log(`outage: timeline ${timeline.text()}`);
      log(`outage: replay ${fmt(replay.journal.bytes / MiB, 1)} MiB in ${fmt(replay.seconds, 2)} s = ${fmt(replay.MBps, 1)} MB/s` +
        ` (all records acked after ${fmt(replay.sendSeconds, 2)} s; SIGCONT → replaying ${fmt(replay.probationSeconds, 2)} s)`);
    }

    // --- b. convergence after an outage under a writer -----------------------
    const conv = (result.converge = { outageSeconds: SETTINGS.outageSeconds, probationMs: OUTAGE_HEARTBEAT.probationMs });
    {
      if (ctx.secondaryImagePath) fsyncFile(ctx.secondaryImagePath);
      fsyncFile(ctx.image);
      const warmupS = 2;
      const convergeTimeoutS = OUTAGE_HEARTBEAT.probationMs / 1000 + OUTAGE_CONVERGE_SLACK_S + 45;
      const runtimeS = Math.ceil(warmupS + SETTINGS.outageSeconds + convergeTimeoutS + 10);
      const writerArgs = ['--rw=randwrite', '--bs=64k', '--iodepth=4', '--time_based', `--runtime=${runtimeS}`,
        '--norandommap', '--randrepeat=1', ...(SETTINGS.outageRate ? [`--rate=${SETTINGS.outageRate}`] : [])];
      log(`outage: writer fio randwrite 64k QD4${SETTINGS.outageRate ? ` rate ${SETTINGS.outageRate}` : ''}; ` +
        `SIGSTOP b for ${SETTINGS.outageSeconds} s after ${warmupS} s`);
      const writerStarted = Date.now();
      let writerChild = null;
      const writer = runFioRaw('outage-writer', pair.uri, writerArgs, {
        timeoutMs: (runtimeS + 60) * 1000, ctx, allowSignal: true, onSpawn: (c) => (writerChild = c),
      });
      writer.catch(() => {}); // awaited below
      const writerPid = () => (writerChild && writerChild.exitCode === null && writerChild.signalCode === null ? writerChild.pid : null);
      const t0 = Date.now();
      const timeline = stateTimeline(t0);
      conv.timeline = timeline.events;
      let contAt = null;
      let replayedBefore = null;
      try {
        const warmEnd = Date.now() + warmupS * 1000;
        while (Date.now() < warmEnd) {
          const st = await lunStatus(pair.adminPort).catch(() => null);
          if (st) timeline.onPoll(st, Date.now());
          await sleep(100);
        }
        const before = await lunStatus(pair.adminPort).catch(() => null);
        conv.stateBefore = before?.state ?? null;
        replayedBefore = before?.mirrored?.replayedBytes ?? null;
        log(`outage: SIGSTOP site b (pid ${pidB}) for ${SETTINGS.outageSeconds} s`);
        const stopAt = Date.now();
        pauseProcess(pidB);
        conv.maxJournalBytes = 0;
        while (Date.now() < stopAt + SETTINGS.outageSeconds * 1000) {
          const st = await lunStatus(pair.adminPort).catch(() => null);
          if (st) {
            timeline.onPoll(st, Date.now());
            conv.maxJournalBytes = Math.max(conv.maxJournalBytes, st.journal?.bytes ?? 0);
            conv.writePathAtEnd = writePathOf(st);
          }
          await sleep(100);
        }
        log('outage: SIGCONT site b');
        contAt = Date.now();
        resumeProcess(pidB);
        conv.contAtS = (contAt - t0) / 1000;
      } finally {
        resumeProcess(pidB);
      }
      try {
        const seen = await watchCatchUp(pair, timeline, { timeoutMs: convergeTimeoutS * 1000 });
        conv.seconds = (seen.uptodateAt - contAt) / 1000;
        conv.writerRunning = writerPid() !== null;
        conv.resyncing = seen.resyncing;
        const after = seen.last?.mirrored?.replayedBytes;
        if (replayedBefore !== null && typeof after === 'number') conv.replayedBytes = after - replayedBefore;
        if (seen.replayingAt !== null) conv.replaySeconds = (seen.uptodateAt - seen.replayingAt) / 1000;
      } catch (err) {
        conv.seconds = null;
        conv.error = String(err.message).split('\n')[0];
        log(`outage: ${conv.error}; stopping the writer and waiting again`);
        const pid = writerPid();
        if (pid) await terminate(pid, 5000);
        const t1 = Date.now();
        const seen = await watchCatchUp(pair, timeline, { timeoutMs: 45_000 }).catch((e) => ({ error: e }));
        if (!seen.error) conv.secondsAfterWriterStopped = (seen.uptodateAt - t1) / 1000;
      }
      // What a's log says happened after SIGCONT: link-downs nobody caused, journal overflow.
      const events = contAt ? siteLogEvents(pair.primary.logPath, contAt) : [];
      conv.linkDownsAfterResume = events.filter((e) => e.message === 'mirror link down').map((e) => e.reason);
      conv.journalCollapsed = events.some((e) => /collapsed into the dirty bitmap/.test(e.message));
      conv.limitSeconds = OUTAGE_HEARTBEAT.probationMs / 1000 + OUTAGE_CONVERGE_SLACK_S;
      conv.target = `<= probation + ${OUTAGE_CONVERGE_SLACK_S} s = ${conv.limitSeconds} s`;
      conv.met = conv.seconds !== null ? conv.seconds <= conv.limitSeconds : false;
      // Stop the writer (it is time-based) and keep its numbers.
      const pid = writerPid();
      if (pid) signal(pid, 'SIGINT');
      try {
        const w = await writer;
        conv.writerMBps = w.write.bw_bytes / 1e6;
        conv.writerSeconds = (Date.now() - writerStarted) / 1000;
      } catch (err) {
        conv.writerError = String(err.message).split('\n')[0];
      }
      log(`outage: timeline ${timeline.text()}`);
      log(`outage: converged ${conv.seconds !== null ? `in ${fmt(conv.seconds, 2)} s` : 'not'} after SIGCONT` +
        ` (writer ${fmt(conv.writerMBps, 1)} MB/s, max journal ${fmt((conv.maxJournalBytes ?? 0) / MiB, 1)} MiB)`);
    }
  } catch (err) {
    result.status = 'failed';
    result.error = String(err?.message ?? err);
    log(`outage: failed: ${result.error}`);
  } finally {
    if (pair) {
      resumeProcess(pair.secondary.pid);
      // The sites log at warn: link and state changes worth keeping with the numbers.
      result.logs = { a: logTail(pair.primary.logPath, 40).split('\n'), b: logTail(pair.secondary.logPath, 20).split('\n') };
      await pair.stop().catch((e) => log(`outage: stopping sites: ${e.message}`));
    }
    result.seconds = (Date.now() - started) / 1000;
    log(`outage: done after ${result.seconds.toFixed(0)} s`);
  }
  return result;
}

function outageTable(o) {
  const rows = [];
  const r = o.replay;
  if (r) {
    rows.push([
      `journal replay (${fmt((r.journal?.bytes ?? 0) / MiB, 0)} MiB journal, async)`,
      r.MBps !== null && r.MBps !== undefined ? `${fmt(r.MBps, 1)} MB/s (${fmt(r.seconds, 2)} s replaying → uptodate)` : 'n/a',
      r.target ?? `>= ${OUTAGE_TARGET_REPLAY_MBPS} MB/s`,
      r.met === null || r.met === undefined ? 'n/a' : r.met ? 'met' : 'not met',
    ]);
  }
  const c = o.converge;
  if (c) {
    rows.push([
      `converge after ${c.outageSeconds} s outage under a writer`,
      c.seconds !== null && c.seconds !== undefined ? `${fmt(c.seconds, 2)} s after SIGCONT` : 'not converged',
      c.target ?? '',
      c.seconds === null || c.seconds === undefined ? 'not met' : c.met ? 'met' : 'not met',
    ]);
  }
  const header = ['measurement', 'value', 'target', 'result'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((x) => x[i].length)));
  const line = (cells) => `| ${cells.map((x, i) => x.padEnd(widths[i])).join(' | ')} |`;
  const sep = `|${widths.map((w) => ':' + '-'.repeat(w + 1)).join('|')}|`;
  const out = [line(header), sep, ...rows.map(line), ''];
  if (r && r.MBps !== undefined) {
    out.push(`target: journal replay >= ${OUTAGE_TARGET_REPLAY_MBPS} MB/s on loopback: ${r.met === null ? 'n/a' : r.met ? 'met' : 'not met'} (${fmt(r.MBps, 1)} MB/s)`);
    out.push(`  detection ${fmt(r.detectSeconds, 2)} s after SIGSTOP; written at ${fmt(r.writeMBps, 1)} MB/s into the journal; ` +
      `SIGCONT → replaying ${fmt(r.probationSeconds, 2)} s; all records acked after ${fmt(r.sendSeconds, 2)} s of replay` +
      `${r.resyncing ? '; a resync followed' : ''}${r.note ? `; ${r.note}` : ''}`);
  }
  if (c && c.target) {
    out.push(`converged in ${c.seconds !== null ? `${fmt(c.seconds, 2)} s` : 'n/a (not within the timeout)'} (target <= probation + ${OUTAGE_CONVERGE_SLACK_S} s = ${c.limitSeconds} s): ${c.met ? 'met' : 'not met'}`);
    out.push(`  writer ${fmt(c.writerMBps, 1)} MB/s (whole run); max journal during the outage ${fmt((c.maxJournalBytes ?? 0) / MiB, 1)} MiB` +
      (c.replayedBytes !== undefined && c.replaySeconds ? `; replayed ${fmt(c.replayedBytes / MiB, 1)} MiB in ${fmt(c.replaySeconds, 2)} s while the writer ran` : '') +
      `${c.journalCollapsed ? '; the journal overflowed journal.maxBytes during catch-up → collapsed into the bitmap → resync' : c.resyncing ? '; a resync happened' : ''}` +
      `${c.linkDownsAfterResume?.length ? `; ${c.linkDownsAfterResume.length} more link-down(s) after SIGCONT (${c.linkDownsAfterResume.join('; ')})` : ''}` +
      `${c.secondsAfterWriterStopped !== undefined ? `; converged ${fmt(c.secondsAfterWriterStopped, 2)} s after the writer was stopped` : ''}`);
  }
  if (o.error) out.push(`- outage: ${o.status}: ${o.error.split('\n')[0]}`);
  return out.join('\n');
}

// ---------------------------------------------------------------------------
// Preparation

let tmpDirForDefaults = null;
function currentTmpDir() {
  if (!tmpDirForDefaults) throw new Error('temp dir not created yet');
  return tmpDirForDefaults;
}

/** Preallocate `bytes` with fallocate and fill it with the contents of `fillFrom` (repeated). */
async function createImage(file, bytes, fillFrom) {
  fs.rmSync(file, { force: true });
  try {
    execFileSync('fallocate', ['-l', String(bytes), file], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    log(`fallocate failed (${String(err.stderr ?? err.message).trim()}), using a sparse file`);
    fs.writeFileSync(file, '');
    fs.truncateSync(file, bytes);
  }
  if (fillFrom) {
    // Write real data once so every server reads allocated blocks and overwrites
    // existing data (otherwise the first server would pay for unwritten extents).
    const fd = fs.openSync(file, 'r+');
    const src = fs.openSync(fillFrom, 'r');
    try {
      const buf = Buffer.allocUnsafe(4 * MiB);
      const srcSize = fs.fstatSync(src).size;
      for (let off = 0; off < bytes; off += buf.length) {
        const n = Math.min(buf.length, bytes - off);
        fs.readSync(src, buf, 0, n, off % srcSize);
        fs.writeSync(fd, buf, 0, n, off);
      }
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(src);
      fs.closeSync(fd);
    }
  }
  return file;
}

function createRandomFile(file, bytes) {
  const fd = fs.openSync(file, 'w');
  try {
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (let off = 0; off < bytes; off += buf.length) {
      const n = Math.min(buf.length, bytes - off);
      crypto.randomFillSync(buf, 0, n);
      fs.writeSync(fd, buf, 0, n, off);
    }
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

function toolVersion(cmd, args = ['--version']) {
  try {
    const out = execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
    return out.trim().split('\n')[0];
  } catch (err) {
    const text = `${err.stdout ?? ''}${err.stderr ?? ''}`.trim();
    const line = text.split('\n').find((l) => /version|\d+\.\d+/i.test(l));
    return line ?? null;
  }
}

function requireTool(cmd) {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
  } catch {
    throw new Error(`${cmd} not found; run: bash scripts/setup.sh nbd-server`);
  }
}

// ---------------------------------------------------------------------------
// Report

function fmt(v, digits) {
  if (v === null || v === undefined || !Number.isFinite(v)) return 'n/a';
  return v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function metricValue(results, targetName, jobId, metric) {
  const r = results.find((x) => x.name === targetName);
  const v = r?.jobs?.[jobId]?.[metric];
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

/** Ratio oriented so that > 1 means `ours` is better (inverted for latency). */
function ratio(ours, ref, higherIsBetter) {
  if (ours === null || ref === null || ours <= 0 || ref <= 0) return null;
  return higherIsBetter ? ours / ref : ref / ours;
}

function buildTable(results, ratios) {
  const names = results.map((r) => r.name);
  const header = ['job', 'metric', ...names, ...ratios.map((r) => r.label)];
  const rows = [];
  const data = [];
  for (const job of JOBS) {
    for (const m of job.metrics) {
      const def = METRICS[m];
      const vals = names.map((n) => metricValue(results, n, job.id, m));
      const applies = ratios.map((r) => (!r.jobs || r.jobs.includes(job.id)) && (!r.metrics || r.metrics.includes(m)));
      const rs = ratios.map((r, i) => (applies[i]
        ? ratio(metricValue(results, r.ours, job.id, m), metricValue(results, r.ref, job.id, m), r.plain ? true : def.higherIsBetter)
        : null));
      rows.push([job.title, def.label + (def.higherIsBetter ? '' : ' (ratio inverted)'), ...vals.map((v) => fmt(v, def.digits)),
        ...rs.map((r, i) => (applies[i] ? fmt(r, 2) : ''))]);
      data.push({
        job: job.id,
        title: job.title,
        metric: m,
        higherIsBetter: def.higherIsBetter,
        values: Object.fromEntries(names.map((n, i) => [n, vals[i]])),
        ratios: Object.fromEntries(ratios.flatMap((r, i) => (applies[i] ? [[r.label, rs[i]]] : []))),
      });
    }
  }
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells) => `| ${cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ')} |`;
  const sep = `|${widths.map((w, i) => (i < 2 ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`;
  return { markdown: [line(header), sep, ...rows.map(line)].join('\n'), data };
}

// ---------------------------------------------------------------------------
// Main

async function main() {
  const benchStarted = Date.now();
  for (const t of ['fio', 'nbdcopy', 'nbdinfo']) requireTool(t);

  let targets = TARGETS;
  let runOutageBench = true;
  if (process.env.BENCH_TARGETS) {
    const wanted = process.env.BENCH_TARGETS.split(',').map((s) => s.trim()).filter(Boolean);
    const unknown = wanted.filter((w) => w !== OUTAGE_NAME && !TARGETS.some((t) => t.name === w));
    if (unknown.length) {
      throw new Error(`unknown BENCH_TARGETS: ${unknown.join(', ')} (known: ${[...TARGETS.map((t) => t.name), OUTAGE_NAME].join(', ')})`);
    }
    targets = TARGETS.filter((t) => wanted.includes(t.name));
    runOutageBench = wanted.includes(OUTAGE_NAME);
  }
  const names = new Set(targets.map((t) => t.name));
  const ratios = RATIOS.map(normalizeRatio).filter((r) => names.has(r.ours) && names.has(r.ref));

  const baseTmp = process.env.BENCH_TMPDIR || os.tmpdir();
  const tmpDir = fs.mkdtempSync(path.join(baseTmp, 'nbd-mirror-bench-'));
  tempDirs.add(tmpDir);
  tmpDirForDefaults = tmpDir;

  const results = [];
  let meta;
  let outage = null;
  try {
    const imageBytes = SETTINGS.sizeMiB * MiB;
    const sourceBytes = SETTINGS.copyMiB * MiB;
    const ctx = {
      tmpDir,
      image: path.join(tmpDir, 'lun0.img'),
      imageBytes,
      source: path.join(tmpDir, 'source.bin'),
      sourceBytes,
      /** Another image of the same size (e.g. for a mirror secondary). */
      extraImage: (name) => createImage(path.join(tmpDir, name), imageBytes, ctx.source),
    };
    log(`temp dir ${tmpDir}`);
    log(`creating ${SETTINGS.copyMiB} MiB random source file`);
    createRandomFile(ctx.source, sourceBytes);
    log(`creating ${SETTINGS.sizeMiB} MiB preallocated image`);
    await createImage(ctx.image, imageBytes, ctx.source);

    meta = {
      date: new Date().toISOString(),
      host: os.hostname(),
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? null,
      memGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
      loadavgAtStart: os.loadavg().map((x) => +x.toFixed(2)),
      node: process.version,
      versions: {
        fio: toolVersion('fio'),
        nbdcopy: toolVersion('nbdcopy'),
        nbdkit: toolVersion('nbdkit'),
        'nbd-server': toolVersion('nbd-server', ['-V']),
        'qemu-nbd': toolVersion('qemu-nbd'),
        'nbd-mirror': (() => {
          try {
            return JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')).version;
          } catch {
            return null;
          }
        })(),
      },
      settings: { ...SETTINGS },
      notes: [
        'All servers use buffered I/O (host page cache, writeback); qemu-nbd runs with --cache=writeback --aio=threads -t -e 16.',
        `nbdkit file plugin with --threads=${SETTINGS.nbdkitThreads}; nbd-server default max_threads (4), flush/fua on.`,
        `fio ioengine=nbd, one connection per job, ${SETTINGS.seconds} s measured after ${SETTINGS.rampSeconds} s ramp; latency = fio total latency (lat_ns).`,
        'nbdcopy with defaults (multi-conn up to 4 connections if advertised), no --flush; MB/s = bytes / wall time.',
        'MB/s = 10^6 bytes/s. Ratios: > 1 means nbd-mirror is better; latency ratios are inverted (reference/nbd-mirror).',
      ],
    };

    if (targets.some((t) => t.name.startsWith('nbd-mirror ')) || runOutageBench) {
      meta.notes.push('Mirrored targets: two nbd-mirror sites on 127.0.0.1 (a: primary lun0 on the bench image; b: secondary lun0 on a second ' +
        `image of the same size), 4 pool connections, default heartbeat; jobs run against site a once its lun0 is uptodate; ${SETTINGS.mirrorSeconds} s per fio job.`);
    }
    for (const target of targets) results.push(await runTarget(target, ctx));
    if (runOutageBench) {
      meta.notes.push(`Outage: async pair, heartbeat ${JSON.stringify(OUTAGE_HEARTBEAT)}, reconnectMs 100; the link is cut by SIGSTOPping site b ` +
        '(sockets stay open and silent); replay MB/s = journal bytes / (first poll in replaying → first poll in uptodate), 50 ms polls.');
      outage = await runOutage(ctx);
    }
  } finally {
    // Servers are stopped by runTarget; this catches anything left over.
    for (const pid of [...tracked.keys()]) await terminate(pid);
    fs.rmSync(tmpDir, { recursive: true, force: true });
    tempDirs.delete(tmpDir);
  }

  const table = buildTable(results, ratios);
  const totalSeconds = (Date.now() - benchStarted) / 1000;
  const copyTitle = `nbdcopy = ${SETTINGS.copyMiB} MiB random file → export`;
  const out = [
    '',
    `## nbd-mirror benchmark (${meta.date}, ${meta.cpus} CPUs, load ${meta.loadavgAtStart.join('/')} at start)`,
    '',
    `Image ${SETTINGS.sizeMiB} MiB (preallocated, page cache), fio ${SETTINGS.seconds} s per job; ${copyTitle}.`,
    'Ratio columns "X/Y": X relative to Y, > 1 means X is better',
    '(throughput rows: X/Y; latency rows are inverted: Y/X).',
    ...(ratios.some((r) => r.plain)
      ? [`Plain ratio columns (${ratios.filter((r) => r.plain).map((r) => `"${r.label}"`).join(', ')}): the quotient as named, not inverted (lower latency ratio is better).`]
      : []),
    ...(targets.some((t) => t.seconds !== undefined && t.seconds !== SETTINGS.seconds)
      ? [`Mirrored targets ran ${SETTINGS.mirrorSeconds} s per fio job.`]
      : []),
    '',
    ...(results.length ? [table.markdown, ''] : ['(no fio targets selected)', '']),
  ];
  const checks = checkTargets(results);
  for (const c of checks) out.push(c.line);
  if (checks.length) out.push('');
  if (outage) {
    out.push('### Outage (async mirror, link cut by SIGSTOP of the secondary site)', '', outageTable(outage), '');
  }
  const failed = results.filter((r) => r.status !== 'ok' || Object.values(r.jobs).some((j) => j.error));
  for (const r of failed) {
    if (r.error) out.push(`- ${r.name}: ${r.status}: ${r.error.split('\n')[0]}`);
    for (const [id, j] of Object.entries(r.jobs)) if (j.error) out.push(`- ${r.name} ${id}: ${j.error.split('\n')[0]}`);
  }
  if (failed.length) out.push('');
  out.push(`Total bench time ${totalSeconds.toFixed(0)} s. Results written to ${path.relative(process.cwd(), OUTPUT_PATH) || OUTPUT_PATH}.`);
  process.stdout.write(out.join('\n') + '\n');

  const json = {
    meta: { ...meta, totalSeconds },
    jobs: JOBS.map(({ id, title, kind, params, metrics }) => ({ id, title, kind, params, metrics })),
    targets: results,
    table: table.data,
    targetChecks: checks.map(({ line, ...c }) => c),
    outage,
  };
  fs.writeFileSync(OUTPUT_PATH, JSON.stringify(json, null, 2) + '\n');
}

main().catch((err) => {
  log(`fatal: ${err?.stack ?? err}`);
  cleanupSync();
  process.exit(1);
});
