// Crashes (SIGKILL) of either site of a mirrored pair, and damaged journals found on restart.
// The pair runs with a FaultProxy in each direction (see test/helpers/outage-pair.ts); a site is
// restarted with the same configuration and dataDir. Every scenario ends with the primary
// uptodate, byte-identical backing files and every write the writer saw acknowledged on both.
import { expect } from 'chai';
import fs from 'node:fs/promises';
import { journalRecords, OutagePair, RECORD_HEADER, SHORT_HEARTBEAT, StatusRecorder } from '../helpers/outage-pair.js';
import { Cleanup, pathExists, tmpDir } from '../helpers/site.js';
import { checkAcked, startWriter, type WriterResult } from '../helpers/writer.js';

const MAX_STALL_MS = SHORT_HEARTBEAT.timeoutMs + 1000;
const CONVERGE_MS = 30_000;

async function expectAckedOnBoth(pair: OutagePair, results: WriterResult[]): Promise<{ checked: number; ambiguous: number }> {
  let out = { checked: 0, ambiguous: 0 };
  for (const [side, file] of [['primary a', pair.files.a], ['secondary b', pair.files.b]] as const) {
    const r = await checkAcked(file, results);
    expect(r.missing, `acknowledged writes missing on the ${side}`).to.deep.equal([]);
    out = { checked: r.checked, ambiguous: r.ambiguous };
  }
  return out;
}

function report(name: string, fields: Record<string, unknown>): void {
  console.log(`      [${name}] ${Object.entries(fields).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ')}`);
}

/** Resolve `p`, or fail after `ms` with `what`. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms); }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** `want` appears in `seq` in this order (not necessarily adjacent). */
function inOrder(seq: string[], want: string[]): boolean {
  let i = 0;
  for (const s of seq) if (s === want[i]) i++;
  return i === want.length;
}

/** The `to` states of the "LUN mirror state" lines of a's latest run. */
function restartTransitions(pair: OutagePair): string[] {
  const run = pair.history.a[pair.history.a.length - 1];
  return run.logs.filter((l) => l.includes('"LUN mirror state"')).map((l) => String((JSON.parse(l) as { to: unknown }).to));
}

/** The "recovered N journal records and M dirty regions" transition of a's latest run, if any. */
function recoveredLine(pair: OutagePair): { records: number; regions: number } | null {
  const run = pair.history.a[pair.history.a.length - 1];
  for (const line of run.logs) {
    if (!line.includes('LUN mirror state')) continue;
    const m = /recovered (\d+) journal records and (\d+) dirty regions/.exec(line);
    if (m) return { records: Number(m[1]), regions: Number(m[2]) };
  }
  return null;
}

describe('mirror crashes and damaged journals (SIGKILL, restart with the same config)', function () {
  this.timeout(90_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  async function newPair(mode: 'sync' | 'async'): Promise<OutagePair> {
    const dir = await tmpDir('nbd-mirror-crash-');
    cleanup.add('remove temp dir', () => dir.cleanup());
    const pair = await OutagePair.start(dir, { mode });
    cleanup.add('stop sites and proxies', () => pair.stop());
    await pair.waitLun((l) => l.state === 'uptodate', 'lun0 uptodate at start');
    return pair;
  }

  it('sync: SIGKILL of the secondary while writing; the writer keeps going; restarted, it catches up', async function () {
    const pair = await newPair('sync');
    const writer = await startWriter(pair.a.uri('lun0'), { qd: 4, rate: 200, flush: true });
    cleanup.add('kill writer', () => writer.kill());
    const base = (await pair.lun()).counters.writeOps;
    await pair.waitLun((l) => l.counters.writeOps >= base + 50, 'writes mirrored before the kill');

    const tKill = Date.now();
    await pair.kill('b');
    const j = await pair.waitLun((l) => l.state === 'journaling' && l.journal.records > 0, 'journaling after the secondary died', 5000);
    const detectMs = Date.now() - tKill;
    await pair.waitLun((l) => l.counters.writeOps >= j.counters.writeOps + 50, 'host writes completing while b is down', 8000);

    const tRestart = Date.now();
    await pair.restart('b');
    const up = await pair.waitLun((l) => l.state === 'uptodate', 'uptodate after b restarted', 20_000);
    const upMs = Date.now() - tRestart;
    await pair.waitLun((l) => l.counters.writeOps >= up.counters.writeOps + 20, 'live writes after catching up');
    const res = await writer.stop();
    expect(res.error, 'writer error').to.equal(null);
    expect(res.unknown).to.deep.equal([]);
    const conv = await pair.waitConverged(CONVERGE_MS);

    expect(res.maxLatencyMs, `longest write (slowest: ${JSON.stringify(res.slow.slice(0, 5))})`).to.be.below(MAX_STALL_MS);
    const transitions = pair.lunTransitions();
    expect(transitions.slice(-3), `"LUN mirror state" transitions ${transitions.join(' -> ')}`).to.deep.equal(['journaling', 'replaying', 'uptodate']);
    const final = await pair.lun();
    expect(final.journal.records).to.equal(0);
    const acked = await expectAckedOnBoth(pair, [res]);
    report('kill secondary', {
      writes: res.writes, maxStallMs: res.maxLatencyMs, detectMs, replayed: final.mirrored.replayed,
      restartToUptodateMs: upMs, convergeAfterStopMs: conv.ms, slotsChecked: acked.checked,
    });
  });

  for (const mode of ['sync', 'async'] as const) {
    it(`${mode}: SIGKILL of the primary while writing at full speed; restarted on the same dataDir it recovers the dirty regions; every acknowledged write reaches both copies`, async function () {
      const pair = await newPair(mode);
      const writer = await startWriter(pair.a.uri('lun0'), { qd: 4, rate: 0 });
      cleanup.add('kill writer', () => writer.kill());
      const base = (await pair.lun()).counters.writeOps;
      const before = await pair.waitLun((l) => l.counters.writeOps >= base + 300, 'writes before the kill');

      await pair.kill('a');
      const res = await within(writer.result, 10_000, 'the writer to notice the primary is gone');
      expect(res.error, 'the writer lost its connection').to.be.a('string');
      expect(res.writes).to.be.greaterThan(0);

      const tRestart = Date.now();
      await pair.restart('a');
      const first = await pair.lun();
      expect(first.recovery, 'status.recovery after the restart').to.not.equal(null);
      expect(first.recovery!.corrupt).to.equal(null);
      const recovered = recoveredLine(pair);
      expect(recovered, 'a "LUN mirror state" line "recovered N journal records and M dirty regions"').to.not.equal(null);
      expect(recovered!.regions, 'dirty regions found on restart').to.be.greaterThan(0);

      const conv = await pair.waitConverged(CONVERGE_MS);
      const restartToConvergedMs = Date.now() - tRestart;
      // Bits are cleared once their region has been quiet for 2 s (hot regions stay marked).
      const final = await pair.waitLun((l) => l.dirtyRegions === 0, 'the dirty bitmap empties after the regions go quiet', 10_000);
      expect(final.dirtyRegions).to.equal(0);
      const acked = await expectAckedOnBoth(pair, [res]);
      report(`kill primary ${mode}`, {
        writes: res.writes, unknown: res.unknown.length, inflightAtKill: before.inflight, lagAtKill: before.lagBytes,
        recoveredRegions: recovered!.regions, resynced: final.progress.resyncTotal, restartToConvergedMs,
        convergeMs: conv.ms, slotsChecked: acked.checked, ambiguousSlots: acked.ambiguous,
      });
    });
  }

  /**
   * Cut the link, have 20 writes journaled, SIGKILL the primary, damage its journal with
   * `damage`, restart it (still cut). Returns what is needed to finish.
   */
  async function journalThenKill(pair: OutagePair): Promise<{ res: WriterResult; journal: string }> {
    pair.cut();
    await pair.waitLun((l) => l.state === 'journaling' && l.writePath === 'journal', 'journaling after the cut', 5000);
    const writer = await startWriter(pair.a.uri('lun0'), { qd: 4, rate: 0, count: 20, flush: true });
    cleanup.add('kill writer', () => writer.kill());
    const res = await writer.result;
    expect(res.error).to.equal(null);
    expect(res.writes).to.equal(20);
    const l = await pair.lun();
    expect(l.journal.records, 'journaled records').to.equal(20);
    await pair.kill('a');
    return { res, journal: `${pair.dataDirs.a}/lun0.journal` };
  }

  /**
   * The restarted primary (link still cut) has noticed the outage: link health 'down'. Then heal,
   * recording a's LUN states from then on.
   */
  async function healAfterOutageSeen(pair: OutagePair): Promise<{ tHeal: number; states: () => string[] }> {
    await pair.waitLun((l) => l.health === 'down', 'the restarted primary to see the link down', 5000);
    const rec = new StatusRecorder(pair);
    cleanup.add('stop recorder', () => rec.stop());
    const tHeal = Date.now();
    pair.heal();
    return { tHeal, states: () => rec.sequence('state', tHeal) };
  }

  it('sync: a torn last journal record (SIGKILL, then the file cut inside it) is dropped on restart; heal converges', async function () {
    const pair = await newPair('sync');
    const { res, journal } = await journalThenKill(pair);
    const { records, size } = await journalRecords(journal);
    expect(records).to.have.length(20);
    const lastRec = records[records.length - 1];
    const cutAt = lastRec.start + RECORD_HEADER + Math.floor(lastRec.dataLen / 2);
    await fs.truncate(journal, cutAt);

    await pair.restart('a');
    const l = await pair.lun();
    expect(pair.a.isAlive()).to.equal(true);
    expect(l.recovery, 'status.recovery').to.deep.equal({
      records: 19, bytes: lastRec.start - records[0].start, tornTailBytes: cutAt - lastRec.start, corrupt: null,
    });
    expect(l.state).to.be.oneOf(['journaling', 'probation']);
    expect(l.journal.records).to.equal(19);
    const torn = pair.logLines('a').filter((x) => /torn tail/.test(x.message));
    expect(torn, 'torn tail log line').to.have.length(1);
    expect((await fs.stat(journal)).size, 'journal truncated to the last whole record').to.equal(lastRec.start);

    const { tHeal, states } = await healAfterOutageSeen(pair);
    const conv = await pair.waitConverged(CONVERGE_MS);
    expect(inOrder(states(), ['probation', 'uptodate']), `polled LUN states after the heal: ${states().join(' -> ')}`).to.equal(true);
    expect(restartTransitions(pair), 'transitions of the restarted primary').to.include('replaying');
    const acked = await expectAckedOnBoth(pair, [res]);
    const final = await pair.lun();
    report('torn tail', {
      fileBytes: size, tornTailBytes: l.recovery!.tornTailBytes, keptRecords: l.recovery!.records,
      replayed: final.mirrored.replayed, resynced: final.mirrored.resynced, healToConvergedMs: Date.now() - tHeal,
      convergeMs: conv.ms, slotsChecked: acked.checked,
    });
  });

  it('sync: a CRC error in an early journal record is reported (status and error log), nothing after it is lost: heal converges', async function () {
    const pair = await newPair('sync');
    const { res, journal } = await journalThenKill(pair);
    const { records } = await journalRecords(journal);
    expect(records).to.have.length(20);
    const bad = records[1];
    const fh = await fs.open(journal, 'r+');
    try {
      const b = Buffer.alloc(1);
      const at = bad.start + RECORD_HEADER + 1000;
      await fh.read(b, 0, 1, at);
      b[0] ^= 0xff;
      await fh.write(b, 0, 1, at);
    } finally {
      await fh.close();
    }

    await pair.restart('a');
    const l = await pair.lun();
    expect(pair.a.isAlive()).to.equal(true);
    expect(l.recovery, 'status.recovery').to.not.equal(null);
    const corrupt = l.recovery!.corrupt;
    expect(corrupt, 'status.recovery.corrupt').to.not.equal(null);
    expect(corrupt!.offset, 'corrupt offset = the damaged record').to.equal(bad.start);
    expect(corrupt!.reason).to.match(/crc/i);
    expect(l.recovery!.records, 'records kept before the bad one').to.equal(1);
    expect(await pathExists(corrupt!.savedAs), `saved copy ${corrupt!.savedAs}`).to.equal(true);
    const errors = pair.logLines('a').filter((x) => x.level === 'error' && /journal/i.test(x.message));
    expect(errors, 'error log line about the journal').to.have.length.at.least(1);
    expect(JSON.stringify(errors[0]), 'the error line names the journal file').to.include(journal);
    expect(l.dirtyRegions, 'the bitmap still marks every journaled region').to.be.at.least(new Set(res.acked.map((w) => w[0])).size);

    const { tHeal, states } = await healAfterOutageSeen(pair);
    const conv = await pair.waitConverged(CONVERGE_MS);
    expect(inOrder(states(), ['probation', 'uptodate']), `polled LUN states after the heal: ${states().join(' -> ')}`).to.equal(true);
    expect(restartTransitions(pair), 'transitions of the restarted primary').to.include.members(['replaying', 'resyncing']);
    const acked = await expectAckedOnBoth(pair, [res]);
    const final = await pair.lun();
    report('corrupt record', {
      corruptOffset: corrupt!.offset, keptRecords: l.recovery!.records, dirtyRegions: l.dirtyRegions,
      replayed: final.mirrored.replayed, resynced: final.mirrored.resynced, healToConvergedMs: Date.now() - tHeal,
      convergeMs: conv.ms, slotsChecked: acked.checked,
    });
  });
});
