// The outage bench (not fio; "outage" in BENCH_TARGETS): journal replay throughput, and the
// time to converge after an outage under a writer. Its table is outageTable in report.js.
import fs from 'node:fs';
import { MiB, SETTINGS, fmt, fsyncFile, log, logTail, sleep } from './common.js';
import { runFioRaw } from './jobs.js';
import { lunStatus, stateTimeline, waitForLunState } from './net.js';
import { isAlive, pauseProcess, resumeProcess, signal, terminate } from './proc.js';
import { startMirrorPair } from './nbd-mirror.js';

// Outage bench (not fio): a mirrored pair whose link is cut by SIGSTOPping the
// secondary site b. A stopped process keeps its TCP sockets open and silent and
// sends no heartbeats: a black-holed link, detected by a's heartbeat timeout.

export const OUTAGE_HEARTBEAT = { intervalMs: 200, timeoutMs: 600, probationMs: 1000 };
export const OUTAGE_TARGET_REPLAY_MBPS = 500;
export const OUTAGE_CONVERGE_SLACK_S = 5;

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

export async function runOutage(ctx) {
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
