// The jobs run against every target (fio and nbdcopy), and the run of one target.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { SETTINGS, fmt, fsyncFile, log, logTail, sleep, tail } from './common.js';
import { isAlive, runTool } from './proc.js';

export const METRICS = {
  iops: { label: 'IOPS', higherIsBetter: true, digits: 0 },
  latMeanUs: { label: 'mean lat µs', higherIsBetter: false, digits: 1 },
  latP99Us: { label: 'p99 lat µs', higherIsBetter: false, digits: 1 },
  MBps: { label: 'MB/s', higherIsBetter: true, digits: 1 },
};

function fioJob(id, title, { rw, bs, iodepth }, metrics) {
  return { id, title, kind: 'fio', params: { rw, bs, iodepth }, metrics };
}

/** Table rows, in order: one per job and metric. */
export const JOBS = [
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

/** Run fio against a URI with extra args; resolves the parsed JSON job (write side) and wall ms. */
export async function runFioRaw(name, uri, extraArgs, { timeoutMs, ctx, onSpawn, allowSignal = false }) {
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

/** Start a target, run every job against it, stop it. Never throws: failures go into the result. */
export async function runTarget(target, ctx) {
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
