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
// "sync" (not a fio target either) times bulk mirror work on pairs started on fresh dataDirs:
// initial sync of differing data, full compare of equal copies next to a one-core SHA-256 rate,
// an empty sparse 64 GiB pair, host 4k randwrite QD16 during a background sync; its table also
// holds the replay row (from "outage") and the mirrored 1M seq write rows, each with its target.
//
// Mirrored targets: "nbd-mirror sync" and "nbd-mirror async" run two nbd-mirror
// sites on 127.0.0.1 (a: primary lun0 on the bench image, b: secondary lun0 on a
// second image of the same size) and run the jobs against site a.
// "outage" (not a fio target; selectable in BENCH_TARGETS like one) SIGSTOPs the
// secondary site to black-hole the link and measures journal replay throughput
// and the time to converge after an outage under a writer; printed as a second table.
//
// Comparing two revisions in one sitting (e.g. the acceptance check "no row more than 5%
// below the previous main"):
//   scripts/bench-compare.sh OLD NEW     (default: main HEAD; BENCH_ROUNDS rounds, default 2)
// builds each revision in a temporary worktree and runs THIS bench script against each
// one's dist/cli.js (BENCH_NBD_MIRROR_CLI), interleaved A B A B, with the same settings;
// it prints old median, new median and new/old per row and flags rows > 5% worse.
// See the header of scripts/bench-compare.sh.
//
// Layout (scripts/bench/):
//   common.js     settings from the environment, constants, log/format helpers
//   proc.js       process bookkeeping (tracked pids, SIGSTOP/SIGCONT, cleanup), spawning
//   net.js        free ports, waiting for a port, an nbd-mirror site's admin status
//   servers.js    server handles; nbdkit, nbd-server, qemu-nbd
//   nbd-mirror.js nbd-mirror configs, a standalone site, a mirrored pair of sites
//   targets.js    TARGETS (table columns), RATIOS, TARGET_CHECKS, BENCH_TARGETS selection
//   jobs.js       JOBS (table rows: fio, nbdcopy) and the run of one target
//   outage.js     the outage bench
//   prepare.js    tools, image and source file, run metadata
//   report.js     table, ratios, checks, outage table, stdout and bench-results.json
//
// Extending: add an entry to TARGETS in scripts/bench/targets.js (a name, an async
// start(ctx) returning a server handle, see startNbdMirror / combineServers /
// startMirrorPair, and optionally `seconds` to override BENCH_SECONDS for its fio jobs)
// and, if wanted, an entry to RATIOS (and TARGET_CHECKS).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MiB, SETTINGS, log } from './bench/common.js';
import { OUTAGE_HEARTBEAT, runOutage } from './bench/outage.js';
import { buildMeta, createImage, createRandomFile, requireTool } from './bench/prepare.js';
import { cleanupSync, installCleanupHandlers, tempDirs, terminateAll } from './bench/proc.js';
import { runTarget } from './bench/jobs.js';
import { writeReport } from './bench/report.js';
import { runSync } from './bench/sync.js';
import { selectTargets } from './bench/targets.js';

installCleanupHandlers();

async function main() {
  const benchStarted = Date.now();
  for (const t of ['fio', 'nbdcopy', 'nbdinfo']) requireTool(t);
  const { targets, runOutage: runOutageBench, runSync: runSyncBench, ratios } = selectTargets();

  const baseTmp = process.env.BENCH_TMPDIR || os.tmpdir();
  const tmpDir = fs.mkdtempSync(path.join(baseTmp, 'nbd-mirror-bench-'));
  tempDirs.add(tmpDir);

  const results = [];
  let meta;
  let outage = null;
  let sync = null;
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

    meta = buildMeta({ targets, runOutage: runOutageBench });
    for (const target of targets) results.push(await runTarget(target, ctx));
    if (runOutageBench) {
      meta.notes.push(`Outage: async pair, heartbeat ${JSON.stringify(OUTAGE_HEARTBEAT)}, reconnectMs 100; the link is cut by SIGSTOPping site b ` +
        '(sockets stay open and silent); replay MB/s = journal bytes / (first poll in replaying → first poll in uptodate), 50 ms polls.');
      outage = await runOutage(ctx);
    }
    if (runSyncBench) sync = await runSync(ctx);
  } finally {
    // Servers are stopped by runTarget; this catches anything left over.
    await terminateAll();
    fs.rmSync(tmpDir, { recursive: true, force: true });
    tempDirs.delete(tmpDir);
  }

  writeReport({ meta, targets, results, ratios, outage, sync, totalSeconds: (Date.now() - benchStarted) / 1000 });
}

main().catch((err) => {
  log(`fatal: ${err?.stack ?? err}`);
  cleanupSync();
  process.exit(1);
});
