// The secondary SIGKILLed at random instants of the riskiest phases (issues 19 and 15.1), checked
// block by block with test/helpers/causality.ts: a QD8 writer over 2 connections puts its write id
// in every 4 KiB block it writes (FLUSH every 250 writes), and every block of the secondary's copy
// is decoded right after the kill (before the restart) and after convergence.
//
// Kill instants come from a seeded PRNG: the seed is printed; KILL_SEED=n reproduces a run,
// KILL_ITERATIONS=n changes the number of iterations of the repeated cases (default 20).
// One pair is reused across the iterations of a case (the secondary is killed and restarted in it);
// a pair that stops converging is replaced, so later iterations still test something.
import { expect } from 'chai';
import fs from 'node:fs/promises';
import http from 'node:http';
import { setTimeout as delay } from 'node:timers/promises';
import { checkCausality, decodeCopy, describeReport, startCausalWriter, type CausalRun, type CausalWriter, type Decoded } from '../helpers/causality.js';
import { OutagePair, SHORT_HEARTBEAT, type OutagePairOptions } from '../helpers/outage-pair.js';
import { Cleanup, cliPath, execNoThrow, pollUntil, sparseFile, tmpDir, type Site } from '../helpers/site.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const ITERATIONS = Number(process.env.KILL_ITERATIONS ?? 20);
const SEED = process.env.KILL_SEED !== undefined ? Number(process.env.KILL_SEED) : Math.floor(Math.random() * 2 ** 31);
/** A host FLUSH must be answered within the heartbeat timeout plus this, whatever the peer does. */
const FLUSH_BOUND_MS = SHORT_HEARTBEAT.timeoutMs + 2000;
const CONVERGE_MS = 30_000;
/** The flag that forces a promote of a copy that never completed an initial sync (see `promote --help`). */
const FORCE_NEVER_SYNCED = '--force-never-synced';

/** mulberry32: a small seeded PRNG. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function report(name: string, fields: Record<string, unknown>): void {
  console.log(`      [${name}] ${Object.entries(fields).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ')}`);
}

/** Resolve `p`, or reject after `ms` with `what`. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms); })]);
  } finally {
    clearTimeout(timer);
  }
}

/** Index of the first JSON log line of `lines` at or after `from` whose message starts with `msg`, once there is one. */
async function waitLogLine(lines: string[], from: number, msg: string, timeoutMs: number, also?: () => Promise<boolean>): Promise<number> {
  const needle = `"message":"${msg}`;
  let i = from;
  return pollUntil(async () => {
    for (; i < lines.length; i++) if (lines[i].includes(needle)) return i + 1;
    if (also && (await also())) return -1;
    return false;
  }, { timeoutMs, intervalMs: 5, what: `log line "${msg}"` });
}

/** The secondary's lun0 status, as JSON. */
async function secondaryLun(pair: OutagePair): Promise<Record<string, unknown> & { generation?: { consistent?: boolean }; state?: string }> {
  const st = await pair.status('b');
  return st.luns.find((l) => l.name === 'lun0') as unknown as Record<string, unknown> & { generation?: { consistent?: boolean } };
}

/** a's last state changes and pairing lines, for a failure message. */
function lastLines(pair: OutagePair): string {
  const lines = pair.logLines('a').filter((x) => /LUN mirror state|full sync|paired|refused|journal|peer lost|link/.test(x.message)).slice(-8)
    .map((x) => `${x.timestamp.slice(11)} ${x.message}${x.to ? ` -> ${String(x.to)}` : ''}${x.reason ? ` (${String(x.reason).slice(0, 80)})` : ''}`);
  return `a's last lines: ${lines.join(' | ')}`;
}

/** POST an operator action to a site's admin socket (actions over TCP are refused). */
function postAction(site: Site, verb: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: site.adminSocket, method: 'POST', path: `/luns/lun0/${verb}` }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** A pair plus the writer runs whose writes its copies hold (in order). */
class Rig {
  runs: CausalRun[] = [];
  nextId = 1;
  writer: CausalWriter | null = null;
  constructor(readonly pair: OutagePair) {}

  async startWriter(rate = 0): Promise<CausalWriter> {
    // Each run's ids come after the previous run's: one history over the pair's life.
    this.writer = await startCausalWriter(this.pair.a.uri('lun0'), {
      qd: 8, conns: 2, span: SIZE, rate, flushEvery: 250, firstId: this.nextId, drainS: 8,
    });
    return this.writer;
  }

  async stopWriter(): Promise<CausalRun> {
    const w = this.writer!;
    this.writer = null;
    const r = await within(w.stop(), 20_000, 'the writer to drain and exit');
    this.runs.push(r);
    const last = r.writes[r.writes.length - 1];
    if (last) this.nextId = last[0] + 1;
    return r;
  }

  /** Throw away b's copy and dataDir: b starts as a brand-new secondary (b must be down). */
  async wipeB(): Promise<void> {
    await fs.rm(this.pair.files.b, { force: true });
    await sparseFile(this.pair.files.b, SIZE);
    await fs.rm(this.pair.dataDirs.b, { recursive: true, force: true });
    await fs.mkdir(this.pair.dataDirs.b, { recursive: true });
  }
}

describe(`kill consistency: the secondary SIGKILLed at random instants (seed ${SEED}, KILL_SEED to repeat)`, function () {
  this.timeout(600_000);
  const cleanup = new Cleanup();
  const rand = prng(SEED);
  before(() => console.log(`      kill-consistency seed ${SEED} (KILL_SEED=${SEED} to repeat), ${ITERATIONS} iterations`));
  afterEach(() => cleanup.run());

  async function newRig(mode: 'sync' | 'async', mirrorA: OutagePairOptions['mirrorA'], cl = cleanup): Promise<Rig> {
    const dir = await tmpDir('nbd-mirror-killc-');
    cl.add('remove temp dir', () => dir.cleanup());
    const pair = await OutagePair.start(dir, { mode, size: SIZE, mirrorA, connections: 2 });
    const rig = new Rig(pair);
    cl.add('stop writer', async () => { await rig.writer?.kill(); });
    cl.add('stop sites and proxies', () => pair.stop());
    await pair.waitLun((l) => l.state === 'uptodate', 'lun0 uptodate at start', 30_000);
    return rig;
  }

  function journalAppendFailures(pair: OutagePair): string[] {
    return pair.logLines('a').filter((l) => /journal append failed/.test(l.message)).map((l) => JSON.stringify(l));
  }

  // ---- a. end of a journal replay, start of live mirroring ------------------------------------

  // A replay that loops keeps journaling new writes: the rate and the journal cap bound the disk used.
  const REPLAY_MIRROR = { syncRateBytes: 64 * MiB, journal: { maxBytes: 256 * MiB } };
  const REPLAY_WRITE_RATE = 2000;

  for (const mode of ['sync', 'async'] as const) {
    it(`${mode}: SIGKILL of the secondary at the end of a journal replay (+0..300 ms): causality at the kill and after the restart, the replay converges${mode === 'sync' ? ', every acked write present' : ''}`, async function () {
      let rig = await newRig(mode, REPLAY_MIRROR);
      const failures: string[] = [];
      const stats = { iterations: 0, checkedAtKill: 0, stillReplaying: 0, replacedPairs: 0, maxConvergeMs: 0 };
      for (let it = 0; it < ITERATIONS; it++) {
        const pair = rig.pair;
        // Half the kills land right at the end of the replay (0-30 ms), half into live mirroring (0-300 ms).
        const extraMs = it % 2 === 0 ? Math.floor(rand() * 31) : Math.floor(rand() * 301);
        const records = 300 + Math.floor(rand() * 1200);
        const tag = `iteration ${it} (journal ${records} records, kill ${extraMs} ms after "journal replayed")`;
        try {
          const w = await rig.startWriter(REPLAY_WRITE_RATE);
          const base = (await pair.lun()).counters.writeOps;
          await pair.waitLun((l) => l.counters.writeOps >= base + 100, 'live writes before the cut');
          pair.cut();
          await pair.waitLun((l) => l.state === 'journaling' && l.journal.records >= records, `${records} journal records during the cut`, 20_000);
          const from = pair.a.logs.length;
          pair.heal();
          await waitLogLine(pair.a.logs, from, 'journal replayed', 20_000);
          if (extraMs) await delay(extraMs);   // the kill instant (not a synchronisation)
          const atKill = pair.lunTransitions().slice(-1)[0];
          await pair.kill('b');
          if (atKill === 'replaying') stats.stillReplaying++;
          const copyAtKill: Decoded = await decodeCopy(pair.files.b);
          await pair.restart('b');
          const tRestart = Date.now();
          await pair.waitLun((l) => l.state === 'uptodate', 'uptodate after the secondary restarted', 20_000);
          const up = (await pair.lun()).counters.writeOps;
          await pair.waitLun((l) => l.counters.writeOps >= up + 100, 'live writes after the restart');
          const res = await rig.stopWriter();
          expect(res.error, `${tag}: writer error`).to.equal(null);
          expect(w.flushes.length, `${tag}: FLUSHes completed`).to.be.greaterThan(0);
          const conv = await pair.waitConverged(CONVERGE_MS);
          stats.maxConvergeMs = Math.max(stats.maxConvergeMs, Date.now() - tRestart);
          const atKillReport = checkCausality(copyAtKill, rig.runs);
          stats.checkedAtKill += atKillReport.required;
          expect(atKillReport.violations, `${tag}: causality on the secondary's copy right after the kill (${describeReport(atKillReport)})`).to.deep.equal([]);
          const final = checkCausality(await decodeCopy(pair.files.b), rig.runs, { upToDate: mode === 'sync' });
          expect(final.violations, `${tag}: the secondary's copy after convergence (${describeReport(final)})`).to.deep.equal([]);
          expect(conv.hash).to.be.a('string');
          stats.iterations++;
        } catch (err) {
          failures.push(`${tag}: ${(err as Error).message.split('\n')[0].slice(0, 1500)}`);
          await rig.writer?.kill();
          rig.writer = null;
          // The pair may be stuck (a replay that loops): start over on a new one.
          await rig.pair.stop().catch(() => undefined);
          rig = await newRig(mode, REPLAY_MIRROR);
          stats.replacedPairs++;
        }
      }
      report(`${mode} end-of-replay kills`, { seed: SEED, ...stats, failed: failures.length });
      expect(journalAppendFailures(rig.pair), '"journal append failed" on the primary').to.deep.equal([]);
      // A killed process keeps its page cache: no kill here may look like a reboot that lost writes.
      expect(rig.pair.logLines('a').filter((l) => l.message.startsWith('the peer lost writes')).length, 'a resync for writes lost by a reboot').to.equal(0);
      expect(failures, `${failures.length} of ${ITERATIONS} iterations failed (seed ${SEED})`).to.deep.equal([]);
    });
  }

  // ---- b. a brand-new secondary killed during the initial sync -------------------------------

  it('a brand-new secondary SIGKILLed during the initial sync (compare and copy phases) says never synced, and promote refuses it unless forced', async function () {
    // 8 MiB/s of background work: the compare and the copy of 16 MiB take seconds each, the kills land inside them.
    const rig = await newRig('sync', { syncRateBytes: 8 * MiB });
    const pair = rig.pair;
    // Fill the primary so that every region differs from an empty copy.
    const fill = await startCausalWriter(pair.a.uri('lun0'), { qd: 8, conns: 2, span: SIZE, count: 4000, firstId: 1 });
    const filled = await within(fill.result, 60_000, 'filling the primary');
    expect(filled.error).to.equal(null);
    // Every bit cleared (after a peer flush): the first new secondary has every region to compare, none already marked to copy.
    await pair.waitLun((l) => l.dirtyRegions === 0, 'the fill mirrored and its dirty bits cleared', 20_000);
    const failures: string[] = [];
    const seen: Record<string, number> = { syncing: 0, resyncing: 0 };
    const promoteCli = (flags: string[]) => execNoThrow(process.execPath, [cliPath(), 'promote', 'lun0', '--config', pair.b.configPath, '--json', ...flags], { timeoutMs: 20_000 });
    // ITERATIONS kills in the compare phase, then ITERATIONS in the copy phase (regions found to
    // differ stay to copy, so a compare after a copy-phase kill would have little left to compare).
    for (let it = 0; it < 2 * ITERATIONS; it++) {
      const phase = it < ITERATIONS ? 'syncing' : 'resyncing';
      // Strike the compare in its first 100 ms (found-different regions pile up over the iterations), the copy in its first 400 ms.
      const extraMs = Math.floor(rand() * (phase === 'syncing' ? 100 : 400));
      const tag = `iteration ${it} (${phase} + ${extraMs} ms)`;
      try {
        // A brand-new secondary: empty file, fresh dataDir.
        await pair.kill('b');
        await rig.wipeB();
        // Regions found to differ by earlier compares stay to copy (in a's memory): a restarted
        // primary compares every region again, so each compare-phase kill has a whole compare to strike.
        if (phase === 'syncing') {
          await pair.a.stop();
          await pair.restart('a');
        }
        const from = pair.a.logs.length;
        await pair.restart('b');
        // The phase's start from a's log (a compare can be shorter than a status poll).
        await pollUntil(() => pair.a.logs.slice(from).some((x) => x.includes('"LUN mirror state"') && x.includes(`"to":"${phase}"`)),
          { timeoutMs: 20_000, intervalMs: 5, what: `a's "LUN mirror state" to ${phase} with the new secondary` });
        if (extraMs) await delay(extraMs);   // the kill instant
        const atKill = pair.lunTransitions().slice(-1)[0];
        await pair.kill('b');
        seen[atKill as 'syncing' | 'resyncing'] = (seen[atKill as 'syncing' | 'resyncing'] ?? 0) + 1;
        if (atKill !== 'syncing' && atKill !== 'resyncing') continue;   // the sync had finished: a synced copy (counted in seen)
        pair.cut();   // b comes back alone: nothing may finish its sync now
        await pair.restart('b');
        const l = await secondaryLun(pair);
        expect(l.generation?.consistent, `${tag}: b's status generation.consistent (${JSON.stringify(l)})`).to.equal(false);
        expect(JSON.stringify(l), `${tag}: b's status says it never synced`).to.match(/never.?synced/i);
        const refused = await promoteCli([]);
        expect(refused.code, `${tag}: promote of a never-synced copy must be refused (stdout ${refused.stdout.trim()} stderr ${refused.stderr.trim()})`).to.not.equal(0);
        expect(`${refused.stdout}${refused.stderr}`, `${tag}: the refusal says why`).to.match(/never.?synced/i);
        const http409 = await postAction(pair.b, 'promote');
        expect(http409.status, `${tag}: POST promote of a never-synced copy (${http409.body})`).to.equal(409);
        const forced = await promoteCli([FORCE_NEVER_SYNCED]);
        expect(forced.code, `${tag}: promote ${FORCE_NEVER_SYNCED} (stdout ${forced.stdout.trim()} stderr ${forced.stderr.trim()})`).to.equal(0);
        const after = await secondaryLun(pair);
        expect(JSON.stringify(after), `${tag}: after a forced promote the status still says never synced`).to.match(/never.?synced/i);
      } catch (err) {
        failures.push(`${tag}: ${(err as Error).message.split('\n')[0].slice(0, 800)}; ${lastLines(pair)}`);
      } finally {
        pair.heal();
      }
    }
    // Leave with a synced secondary, and check it.
    try {
      await pair.kill('b');
      await rig.wipeB();
      await pair.restart('b');
      await pair.waitConverged(CONVERGE_MS);
      const final = checkCausality(await decodeCopy(pair.files.b), [filled], { upToDate: true });
      expect(final.violations, `the copy after a complete initial sync (${describeReport(final)})`).to.deep.equal([]);
    } catch (err) {
      failures.push(`a complete initial sync of a brand-new secondary after the iterations: ${(err as Error).message.split('\n')[0].slice(0, 1500)}`);
    }
    report('initial-sync kills', { seed: SEED, killedIn: seen, failed: failures.length });
    expect(failures, `${failures.length} failures in ${2 * ITERATIONS} iterations (seed ${SEED})`).to.deep.equal([]);
    expect(seen.syncing, `kills in the compare phase (${JSON.stringify(seen)})`).to.be.at.least(ITERATIONS);
    expect(seen.resyncing, `kills in the copy phase (${JSON.stringify(seen)})`).to.be.at.least(Math.ceil(ITERATIONS * 0.75));
  });

  // ---- c. a host FLUSH outstanding while the secondary dies ----------------------------------

  describe(`a host FLUSH outstanding while the secondary dies is answered within ${FLUSH_BOUND_MS} ms (issue 15.1)`, function () {
    // async, a 16 MiB journal (an outage of more than that overflows into the bitmap), 8 MiB/s of
    // background work (16 MiB: about 2 s of compare, copy or verify).
    const mirrorA = { journal: { maxBytes: 16 * MiB }, syncRateBytes: 8 * MiB };
    type Phase = 'replay' | 'bitmap resync' | 'initial sync compare' | 'initial sync copy' | 'verify' | 'pool reconnect';
    const phases: Phase[] = ['replay', 'bitmap resync', 'initial sync compare', 'initial sync copy', 'verify', 'pool reconnect'];

    /** Bring the pair (writer running) into `phase`; resolves at the instant to strike. */
    async function enter(rig: Rig, phase: Phase): Promise<string> {
      const pair = rig.pair;
      const outage = async (bytes: number) => {
        pair.cut();
        await pair.waitLun((l) => l.state === 'journaling', 'journaling after the cut', 5000);
        const w0 = (await pair.lun()).counters.writeBytes;
        await pair.waitLun((l) => l.counters.writeBytes >= w0 + bytes, `${bytes} bytes written during the cut`, 30_000);
      };
      switch (phase) {
        case 'replay': {
          // Well inside the 16 MiB journal: the writer keeps writing through the probation after the heal.
          await outage(2 * MiB);
          const from = pair.a.logs.length;
          pair.heal();
          let st = '';
          await waitLogLine(pair.a.logs, from, 'journal replayed', 20_000, async () => (st = (await pair.lun()).state) === 'replaying');
          return st === 'replaying' ? 'replaying' : 'journal replayed';
        }
        case 'bitmap resync': {
          await outage(20 * MiB);
          await pair.waitLun((l) => l.writePath === 'bitmap', 'the journal overflowed into the bitmap', 10_000);
          pair.heal();
          const l = await pair.waitLun((x) => x.state === 'resyncing' && x.progress.resyncDone > 0, 'resyncing', 20_000);
          return `resyncing ${l.progress.resyncDone}/${l.progress.resyncTotal}`;
        }
        case 'initial sync compare':
        case 'initial sync copy': {
          await pair.kill('b');
          await rig.wipeB();
          await pair.restart('b');
          const want = phase === 'initial sync compare' ? 'syncing' : 'resyncing';
          await pair.waitLun((l) => l.state === want, want, 20_000);
          return want;
        }
        case 'verify': {
          const verify = postAction(pair.a, 'verify');
          verify.catch(() => undefined);
          await pair.waitLun((l) => (l as unknown as { verify: unknown }).verify !== null, 'a verify under way', 10_000);
          return 'verifying';
        }
        case 'pool reconnect': {
          pair.cut();
          await pair.waitLun((l) => l.health === 'down', 'link down', 5000);
          const from = pair.a.logs.length;
          pair.heal();
          await waitLogLine(pair.a.logs, from, 'mirror link up', 20_000);
          return 'mirror link up';
        }
      }
    }

    let rig: Rig;
    /** A scenario left the pair unable to converge: the next phase starts on a new pair. */
    let broken = false;
    // One pair for the whole block while it works (its own cleanup, run after the block's last test).
    const blockCleanup = new Cleanup();
    async function freshRig(): Promise<Rig> {
      const r = await newRig('async', mirrorA, blockCleanup);
      // Data on the primary, so that an initial sync has regions to copy.
      const fill = await startCausalWriter(r.pair.a.uri('lun0'), { qd: 8, conns: 2, span: SIZE, count: 4000, firstId: 1 });
      const fillRun = await within(fill.result, 60_000, 'filling the primary');
      expect(fillRun.error, 'filling the primary').to.equal(null);
      r.runs.push(fillRun);
      r.nextId = 4001;
      return r;
    }
    before(async function () {
      rig = await freshRig();
    });
    after(() => blockCleanup.run());
    beforeEach(async function () {
      if (!broken) return;
      await rig.writer?.kill();
      await rig.pair.stop().catch(() => undefined);
      rig = await freshRig();
      broken = false;
    });

    for (const phase of phases) {
      it(`${phase}: SIGKILL of the secondary, then a link cut, each with a FLUSH outstanding`, async function () {
        const pair = rig.pair;
        const results: Record<string, unknown>[] = [];
        const failures: string[] = [];
        const appendFailuresBefore = journalAppendFailures(pair).length;
        for (const how of ['kill', 'cut'] as const) {
          const tag = `${phase} / ${how}`;
          try {
            const w = await rig.startWriter(1500);
            await pair.waitLun((l) => l.state === 'uptodate', 'uptodate before the phase', CONVERGE_MS);
            const at = await enter(rig, phase);
            const f = w.flush();
            await within(f.issued, 2000, 'the writer to issue the FLUSH');
            if (how === 'kill') await pair.kill('b');
            else pair.cut();
            let ms: number | null = null;
            try {
              ms = (await within(f.done, FLUSH_BOUND_MS + 3000, 'the FLUSH reply')).ms;
            } catch { /* no reply */ }
            results.push({ how, at, flushMs: ms });
            if (how === 'kill') await pair.restart('b');
            else pair.heal();
            await pair.waitLun((l) => l.state === 'uptodate', 'uptodate after the secondary is back', CONVERGE_MS);
            const res = await rig.stopWriter();
            expect(ms, `${tag} (at ${at}): the outstanding FLUSH's reply (ms), bound ${FLUSH_BOUND_MS}`).to.be.a('number');
            expect(ms!, `${tag} (at ${at}): the outstanding FLUSH's latency`).to.be.at.most(FLUSH_BOUND_MS);
            expect(res.error, `${tag}: writer error (every write and FLUSH answered)`).to.equal(null);
            expect(res.flushes.filter((x) => x[2] < 0), `${tag}: FLUSHes never answered`).to.deep.equal([]);
            await pair.waitConverged(CONVERGE_MS);
          } catch (err) {
            failures.push(`${tag}: ${(err as Error).message.split('\n')[0].slice(0, 800)}; ${lastLines(pair)}`);
            // KILL_LOG_DUMP=prefix: both sites' whole logs go to prefix.a and prefix.b, for a failure to be read.
            const dump = process.env.KILL_LOG_DUMP;
            if (dump) for (const w of ['a', 'b'] as const) await fs.writeFile(`${dump}.${w}`, pair.logLines(w).map((x) => JSON.stringify(x)).join('\n'));
            await rig.writer?.kill();
            rig.writer = null;
            if (!pair.b.isAlive()) await pair.restart('b').catch(() => undefined);
            pair.heal();
            // Go on only with a pair that converges; the next phase gets a new one otherwise.
            const ok = await pair.waitConverged(CONVERGE_MS).then(() => true, () => false);
            if (!ok) { broken = true; break; }
          }
        }
        const appendFailures = journalAppendFailures(pair).slice(appendFailuresBefore);
        if (appendFailures.length) failures.push(`${appendFailures.length} "journal append failed" lines on the primary, the first: ${appendFailures[0]}`);
        report(`flush during ${phase}`, { results, failed: failures.length });
        expect(failures).to.deep.equal([]);
      });
    }
  });
});
