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
//
// Extending: add an entry to TARGETS (a name and an async start(ctx) returning a
// server handle, see startNbdMirror / combineServers) and, if wanted, a pair to
// RATIOS. Mirrored nbd-mirror setups are sketched next to TARGETS.

import { spawn, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
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
};
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

/** SIGTERM, wait up to timeoutMs, then SIGKILL. */
async function terminate(pid, timeoutMs = SETTINGS.stopTimeoutMs) {
  if (!pid) return;
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
function runTool(cmd, args, { timeoutMs = 120_000, cwd } = {}) {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    if (child.pid) tracked.set(child.pid, cmd);
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
function nbdMirrorConfig({ site = 'bench', port, adminPort, dataDir, luns, logLevel = 'warn' }) {
  return {
    site,
    listen: { host: HOST, port },
    dataDir,
    admin: { host: HOST, port: adminPort },
    luns,
    log: { level: logLevel },
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
  // Sketch for mirrored setups (two nbd-mirror sites; the peer/role fields
  // depend on the final config schema):
  // {
  //   name: 'nbd-mirror sync-mirrored',
  //   start: async (ctx) => {
  //     const remoteImage = await ctx.extraImage('secondary.img');
  //     const secondary = await startNbdMirror(nbdMirrorConfig({ site: 'b', port: await freePort(),
  //       adminPort: await freePort(), dataDir: path.join(ctx.tmpDir, 'site-b'),
  //       luns: [{ name: EXPORT_NAME, path: remoteImage, role: 'secondary', mirror: 'sync' }] }),
  //       { name: 'nbd-mirror secondary' });
  //     const primary = await startNbdMirror(nbdMirrorConfig({ site: 'a', port: await freePort(),
  //       adminPort: await freePort(), dataDir: path.join(ctx.tmpDir, 'site-a'),
  //       luns: [{ name: EXPORT_NAME, path: ctx.image, role: 'primary', mirror: 'sync',
  //                peer: `nbd://${HOST}:${secondary.port}/${EXPORT_NAME}` }] }),
  //       { name: 'nbd-mirror sync-mirrored' });
  //     return combineServers(primary, [secondary]);
  //   },
  // },
  // ... and the same with mirror: 'async' as 'nbd-mirror async-mirrored'.
];

// Ratio columns: [ours, reference]. Pairs naming a target that is not in
// TARGETS (or filtered out by BENCH_TARGETS) are dropped. A later issue can add
// e.g. ['nbd-mirror sync-mirrored', 'nbd-mirror'] to show the mirroring cost.
const RATIOS = [
  ['nbd-mirror', 'nbdkit'],
  ['nbd-mirror', 'nbd-server'],
  ['nbd-mirror', 'qemu-nbd'],
];

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

async function runFio(job, server, ctx) {
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
    `--runtime=${SETTINGS.seconds}`,
    `--ramp_time=${SETTINGS.rampSeconds}`,
    '--norandommap',
    '--randrepeat=1', // same offsets for every server
    '--lat_percentiles=1', // percentiles of total latency (submit + completion)
    '--output-format=json',
    `--output=${out}`, // fio's nbd engine prints "connected" on stdout
  ];
  const timeoutMs = (SETTINGS.seconds + SETTINGS.rampSeconds + 60) * 1000;
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
  const result = { name: target.name, status: 'ok', error: null, export: null, jobs: {} };
  // Write back the previous server's dirty pages so they don't slow this one.
  fsyncFile(ctx.image);
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
        result.jobs[job.id] = await JOB_RUNNERS[job.kind](job, server, ctx);
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
  const header = ['job', 'metric', ...names, ...ratios.map(([a, b]) => `${a}/${b}`)];
  const rows = [];
  const data = [];
  for (const job of JOBS) {
    for (const m of job.metrics) {
      const def = METRICS[m];
      const vals = names.map((n) => metricValue(results, n, job.id, m));
      const rs = ratios.map(([a, b]) => ratio(metricValue(results, a, job.id, m), metricValue(results, b, job.id, m), def.higherIsBetter));
      rows.push([job.title, def.label + (def.higherIsBetter ? '' : ' (ratio inverted)'), ...vals.map((v) => fmt(v, def.digits)), ...rs.map((r) => fmt(r, 2))]);
      data.push({
        job: job.id,
        title: job.title,
        metric: m,
        higherIsBetter: def.higherIsBetter,
        values: Object.fromEntries(names.map((n, i) => [n, vals[i]])),
        ratios: Object.fromEntries(ratios.map(([a, b], i) => [`${a}/${b}`, rs[i]])),
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
  if (process.env.BENCH_TARGETS) {
    const wanted = process.env.BENCH_TARGETS.split(',').map((s) => s.trim()).filter(Boolean);
    const unknown = wanted.filter((w) => !TARGETS.some((t) => t.name === w));
    if (unknown.length) throw new Error(`unknown BENCH_TARGETS: ${unknown.join(', ')} (known: ${TARGETS.map((t) => t.name).join(', ')})`);
    targets = TARGETS.filter((t) => wanted.includes(t.name));
  }
  const names = new Set(targets.map((t) => t.name));
  const ratios = RATIOS.filter(([a, b]) => names.has(a) && names.has(b));

  const baseTmp = process.env.BENCH_TMPDIR || os.tmpdir();
  const tmpDir = fs.mkdtempSync(path.join(baseTmp, 'nbd-mirror-bench-'));
  tempDirs.add(tmpDir);
  tmpDirForDefaults = tmpDir;

  const results = [];
  let meta;
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

    for (const target of targets) results.push(await runTarget(target, ctx));
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
    'Ratio columns: nbd-mirror relative to each server, > 1 means nbd-mirror is better',
    '(throughput rows: nbd-mirror/other; latency rows are inverted: other/nbd-mirror).',
    '',
    table.markdown,
    '',
  ];
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
  };
  fs.writeFileSync(OUTPUT_PATH, JSON.stringify(json, null, 2) + '\n');
}

main().catch((err) => {
  log(`fatal: ${err?.stack ?? err}`);
  cleanupSync();
  process.exit(1);
});
