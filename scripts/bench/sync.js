// The sync bench ("sync" in BENCH_TARGETS; not fio targets): how fast the mirror moves bulk data
// when it catches up — initial sync of differing data, full compare of equal copies (next to a
// one-core SHA-256 rate measured here), an empty sparse 64 GiB pair, and host 4k randwrite QD16
// IOPS while a background sync runs (default rate) next to the same pair once uptodate.
// Each pair is started on fresh dataDirs (so it pairs as new) and timed to `uptodate` by its
// progress: it may take as long as it keeps moving. Its table is syncTable in report.js.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { MiB, SETTINGS, fmt, fsyncFile, log } from './common.js';
import { runFioRaw } from './jobs.js';
import { waitUptodateByProgress } from './net.js';
import { startMirrorPair } from './nbd-mirror.js';
import { createImage, createRandomFile } from './prepare.js';
import { SYNC_NAME } from './targets.js';

const SPARSE_BYTES = 64 * 1024 ** 3;
/** The rate cap raised for the throughput rows (they measure the data path, not the limiter). */
const RAISED_RATE = 64 * 1024 ** 3;

/** SHA-256 of 256 MiB in 4 MiB pieces on this thread: the one-core hash rate (MB/s). */
function oneCoreHashMBps() {
  const buf = crypto.randomBytes(4 * MiB);
  const rounds = 64;
  const t0 = performance.now();
  for (let i = 0; i < rounds; i++) crypto.createHash('sha256').update(buf).digest();
  return (rounds * buf.length) / 1e6 / ((performance.now() - t0) / 1000);
}

/**
 * Start a pair on fresh dataDirs over the two images; resolves once uptodate with { pair,
 * seconds: start → uptodate, workSeconds: first poll (50 ms) in a catch-up state → uptodate }.
 */
async function timedPair(ctx, name, primaryImage, secondaryImage, extra = {}) {
  const t0 = Date.now();
  const pair = await startMirrorPair(ctx, { name, mode: 'sync', primaryImage, secondaryImage, fresh: true, ...extra });
  const { atMs, catchUpAt } = pair.uptodate;
  return { pair, seconds: (atMs - t0) / 1000, workSeconds: catchUpAt !== null ? (atMs - catchUpAt) / 1000 : null };
}

/** One row: start a pair, time it to uptodate, stop it; failures go into the row. */
async function measure(row, fn) {
  try {
    await fn(row);
  } catch (err) {
    row.error = String(err?.message ?? err).split('\n')[0];
    log(`sync: ${row.id} failed: ${row.error}`);
  }
  return row;
}

export async function runSync(ctx) {
  const started = Date.now();
  const bytes = ctx.imageBytes;
  const result = { name: SYNC_NAME, bytes, rows: [] };
  const dir = path.join(ctx.tmpDir, 'sync');
  fs.mkdirSync(dir, { recursive: true });
  result.hashMBps = oneCoreHashMBps();
  log(`sync: one-core SHA-256 ${fmt(result.hashMBps, 0)} MB/s`);

  // a. Initial sync of differing data: the bench image against an image of other random data.
  const other = path.join(dir, 'other.img');
  const otherSource = createRandomFile(path.join(dir, 'other-source.bin'), Math.min(ctx.sourceBytes, 256 * MiB));
  result.rows.push(await measure({ id: 'initial-sync', title: `initial sync, ${bytes / MiB} MiB differing` }, async (row) => {
    await createImage(other, bytes, otherSource);
    const { pair, seconds, workSeconds } = await timedPair(ctx, 'sync initial', ctx.image, other, { syncRateBytes: RAISED_RATE });
    await pair.stop();
    Object.assign(row, { seconds, workSeconds, MBps: bytes / 1e6 / (workSeconds ?? seconds) });
  }));

  // b. Full compare of equal copies: the synced copy again, both sides on fresh dataDirs.
  result.rows.push(await measure({ id: 'full-compare', title: `full compare, ${bytes / MiB} MiB equal` }, async (row) => {
    fsyncFile(other);
    const { pair, seconds, workSeconds } = await timedPair(ctx, 'sync compare', ctx.image, other, { syncRateBytes: RAISED_RATE });
    await pair.stop();
    Object.assign(row, { seconds, workSeconds, MBps: bytes / 1e6 / (workSeconds ?? seconds) });
  }));

  // c. An empty sparse 64 GiB pair.
  result.rows.push(await measure({ id: 'sparse-64g', title: 'empty sparse 64 GiB pair' }, async (row) => {
    const a = path.join(dir, 'sparse-a.img');
    const b = path.join(dir, 'sparse-b.img');
    for (const f of [a, b]) {
      fs.rmSync(f, { force: true });
      fs.writeFileSync(f, '');
      fs.truncateSync(f, SPARSE_BYTES);
    }
    const { pair, seconds } = await timedPair(ctx, 'sync sparse', a, b);
    await pair.stop();
    fs.rmSync(a, { force: true });
    fs.rmSync(b, { force: true });
    row.seconds = seconds;
  }));

  // d. Host 4k randwrite QD16 while a background sync runs at the default rate, then once uptodate.
  result.rows.push(await measure({ id: 'host-during-sync', title: 'host 4k randwrite QD16 IOPS during a background sync' }, async (row) => {
    await createImage(other, bytes, otherSource);
    const pair = await startMirrorPair(ctx, { name: 'sync host', mode: 'sync', secondaryImage: other, fresh: true, waitUptodate: false });
    try {
      const fio = ['--rw=randwrite', '--bs=4k', '--iodepth=16', '--time_based', `--runtime=${SETTINGS.seconds}`, '--norandommap', '--randrepeat=1'];
      const during = await runFioRaw('host-during-sync', pair.uri, fio, { timeoutMs: (SETTINGS.seconds + 60) * 1000, ctx });
      row.duringIops = during.write.iops;
      await waitUptodateByProgress(pair.adminPort, { what: 'sync host: site a lun0' });
      const after = await runFioRaw('host-after-sync', pair.uri, fio, { timeoutMs: (SETTINGS.seconds + 60) * 1000, ctx });
      row.withoutIops = after.write.iops;
      row.ratio = row.duringIops / row.withoutIops;
    } finally {
      await pair.stop();
    }
  }));
  fs.rmSync(dir, { recursive: true, force: true });
  result.seconds = (Date.now() - started) / 1000;
  log(`sync: done after ${result.seconds.toFixed(0)} s`);
  return result;
}
