// Link outages between two real sites, with a FaultProxy in each direction (TCP pool and UDP
// heartbeats): a cut while a writer runs (sync and async), a link that flaps during probation,
// and a journal that overflows into the dirty bitmap. Every scenario ends with the primary
// uptodate and byte-identical backing files, and every acknowledged write on both copies.
import { expect } from 'chai';
import { setTimeout as delay } from 'node:timers/promises';
import { OutagePair, SHORT_HEARTBEAT, StatusRecorder } from '../helpers/outage-pair.js';
import { Cleanup, tmpDir } from '../helpers/site.js';
import { checkAcked, startWriter, type WriterResult } from '../helpers/writer.js';

const MiB = 1024 * 1024;
/** The longest a host write may wait during an outage: the link is declared dead by then. */
const MAX_STALL_MS = SHORT_HEARTBEAT.timeoutMs + 1000;
const CONVERGE_MS = 30_000;

/** `want` appears in `seq` in this order (not necessarily adjacent). */
function inOrder(seq: string[], want: string[]): boolean {
  let i = 0;
  for (const s of seq) if (s === want[i]) i++;
  return i === want.length;
}

async function expectAckedOnBoth(pair: OutagePair, results: WriterResult[]): Promise<number> {
  let checked = 0;
  for (const [side, file] of [['primary a', pair.files.a], ['secondary b', pair.files.b]] as const) {
    const r = await checkAcked(file, results);
    expect(r.missing, `acknowledged writes missing on the ${side}`).to.deep.equal([]);
    checked = r.checked;
  }
  return checked;
}

function report(name: string, fields: Record<string, unknown>): void {
  console.log(`      [${name}] ${Object.entries(fields).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(' ')}`);
}

describe('mirror outages through fault proxies (heartbeat 200/600/1000 ms)', function () {
  this.timeout(90_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  async function newPair(mode: 'sync' | 'async', mirrorA?: Record<string, unknown>): Promise<OutagePair> {
    const dir = await tmpDir('nbd-mirror-outage-');
    cleanup.add('remove temp dir', () => dir.cleanup());
    const pair = await OutagePair.start(dir, { mode, mirrorA });
    cleanup.add('stop sites and proxies', () => pair.stop());
    await pair.waitLun((l) => l.state === 'uptodate', 'lun0 uptodate at start');
    return pair;
  }

  for (const mode of ['sync', 'async'] as const) {
    it(`${mode}: a 2 s cut of both directions while writing: writes keep completing, journal, probation, replay, converged`, async function () {
      const pair = await newPair(mode);
      const writer = await startWriter(pair.a.uri('lun0'), { qd: 4, rate: 200, flush: true });
      cleanup.add('kill writer', () => writer.kill());
      const base = (await pair.lun()).counters.writeOps;
      await pair.waitLun((l) => l.counters.writeOps >= base + 40, 'writes mirrored live before the cut');
      const rec = new StatusRecorder(pair);
      cleanup.add('stop recorder', () => rec.stop());

      const tCut = Date.now();
      pair.cut();
      const j = await pair.waitLun((l) => l.state === 'journaling' && l.writePath === 'journal' && l.journal.records > 0,
        'journaling with journal records', 5000);
      const detectMs = Date.now() - tCut;
      // Hold the cut for at least 2 s (> timeoutMs); the host's writes must keep completing.
      const during = await pair.waitLun((l) => Date.now() - tCut >= 2000 && l.counters.writeOps >= j.counters.writeOps + 50,
        'host writes completing during the cut', 8000);
      expect(during.state, 'state during the cut').to.equal('journaling');
      expect(during.health, 'link health during the cut').to.equal('down');
      const journaled = during.journal.records;

      const tHeal = Date.now();
      pair.heal();
      await pair.waitLun((l) => l.state === 'uptodate', 'uptodate after the heal', 20_000);
      const upMs = Date.now() - tHeal;
      // Some writes mirrored live again before stopping.
      const up = await pair.lun();
      await pair.waitLun((l) => l.counters.writeOps >= up.counters.writeOps + 20, 'live writes after catching up');

      const res = await writer.stop();
      expect(res.error, 'writer error').to.equal(null);
      expect(res.flushed).to.equal(true);
      expect(res.unknown).to.deep.equal([]);
      const conv = await pair.waitConverged(CONVERGE_MS);
      await rec.stop();

      expect(res.maxLatencyMs, `longest write (slowest: ${JSON.stringify(res.slow.slice(0, 5))})`).to.be.below(MAX_STALL_MS);
      const states = rec.sequence('state', tCut);
      expect(inOrder(states, ['journaling', 'probation']), `polled LUN states ${states.join(' -> ')}`).to.equal(true);
      const transitions = pair.lunTransitions();
      expect(inOrder(transitions, ['uptodate', 'journaling', 'replaying', 'uptodate']),
        `"LUN mirror state" transitions ${transitions.join(' -> ')}`).to.equal(true);
      const link = pair.logLines('a', 'mirror link state').map((l) => String(l.to));
      expect(inOrder(link, ['up', 'down', 'probation', 'ready', 'up']), `link states ${link.join(' -> ')}`).to.equal(true);
      const ups = pair.logLines('a', 'mirror link up').map((l) => Date.parse(l.timestamp));
      const reconnectMs = ups[ups.length - 1] - tHeal;
      expect(reconnectMs, 'pool reconnected only after a full probation').to.be.at.least(SHORT_HEARTBEAT.probationMs - 50);
      const final = await pair.lun();
      expect(final.journal.records, 'journal reclaimed after the replay').to.equal(0);
      expect(final.mirrored.replayed, 'records replayed').to.be.at.least(journaled);
      const checked = await expectAckedOnBoth(pair, [res]);

      report(`${mode} cut`, {
        writes: res.writes, maxStallMs: res.maxLatencyMs, detectMs, journaled, replayed: final.mirrored.replayed,
        healToLinkUpMs: reconnectMs, healToUptodateMs: upMs, convergeAfterStopMs: conv.ms, slotsChecked: checked,
      });
    });
  }

  it('sync: a link flapping faster than the probation never brings the pool up; after a quiet probation it converges', async function () {
    const pair = await newPair('sync');
    const writer = await startWriter(pair.a.uri('lun0'), { qd: 2, rate: 100, flush: true });
    cleanup.add('kill writer', () => writer.kill());
    const rec = new StatusRecorder(pair);
    cleanup.add('stop recorder', () => rec.stop());

    pair.cut();
    await pair.waitLun((l) => l.state === 'journaling' && l.journal.records > 0, 'journaling with journal records', 5000);
    const upsBefore = pair.logLines('a', 'mirror link up').length;
    const connectionsBefore = pair.proxyAB.stats.connections;
    const udpBefore = pair.proxyBA.stats.udpDatagrams;
    const tFlap = Date.now();
    // heal/cut every 300 ms (< probationMs 1000) for 3 s: heartbeats get through in bursts only.
    let heals = 0;
    while (Date.now() - tFlap < 3000) {
      pair.heal();
      heals++;
      await delay(300);
      pair.cut();
      await delay(300);
    }
    const flapSamples = rec.since(tFlap);
    const healthSeen = [...new Set(flapSamples.map((s) => s.health))];
    const statesSeen = [...new Set(flapSamples.map((s) => s.state))];
    const upsDuring = pair.logLines('a', 'mirror link up').length - upsBefore;
    const connectionsDuring = pair.proxyAB.stats.connections - connectionsBefore;
    const probationStarts = pair.logLines('a', 'mirror link state')
      .filter((l) => l.to === 'probation' && Date.parse(l.timestamp) >= tFlap).length;
    const heartbeatsThrough = pair.proxyBA.stats.udpDatagrams - udpBefore;
    expect(heartbeatsThrough, 'heartbeats forwarded during the heal windows').to.be.greaterThan(0);
    expect(upsDuring, '"mirror link up" during the flapping').to.equal(0);
    expect(healthSeen, 'link health during the flapping').to.not.include('up');
    expect(healthSeen).to.not.include('ready');
    expect(connectionsDuring, 'pool connection attempts during the flapping').to.equal(0);
    expect(probationStarts, 'probation (re)starts during the flapping').to.be.at.least(2);
    expect(statesSeen.every((s) => s === 'journaling' || s === 'probation'), `LUN states during flapping: ${statesSeen}`).to.equal(true);

    const tHeal = Date.now();
    pair.heal();
    await pair.waitLun((l) => l.state === 'uptodate', 'uptodate after the final heal', 20_000);
    const upMs = Date.now() - tHeal;
    const ups = pair.logLines('a', 'mirror link up').map((l) => Date.parse(l.timestamp));
    expect(ups.length).to.equal(upsBefore + 1);
    expect(ups[ups.length - 1] - tHeal, 'reconnect only after a full quiet probation').to.be.at.least(SHORT_HEARTBEAT.probationMs - 50);
    const res = await writer.stop();
    expect(res.error).to.equal(null);
    const conv = await pair.waitConverged(CONVERGE_MS);
    await rec.stop();
    await expectAckedOnBoth(pair, [res]);
    report('flap', {
      heals, heartbeatsThrough, probationStarts, healthSeen, maxStallMs: res.maxLatencyMs,
      healToUptodateMs: upMs, convergeAfterStopMs: conv.ms, writes: res.writes,
    });
  });

  it('sync: 8 MiB written during a cut with journal.maxBytes 2 MiB collapses into the bitmap; resync converges', async function () {
    const pair = await newPair('sync', { journal: { maxBytes: 2 * MiB } });
    const rec = new StatusRecorder(pair);
    cleanup.add('stop recorder', () => rec.stop());
    pair.cut();
    await pair.waitLun((l) => l.state === 'journaling' && l.writePath === 'journal', 'journaling after the cut', 5000);

    const writer = await startWriter(pair.a.uri('lun0'), { qd: 4, rate: 0, count: 128, flush: true });
    cleanup.add('kill writer', () => writer.kill());
    const res = await writer.result;
    expect(res.error).to.equal(null);
    expect(res.writes).to.equal(128);
    const slots = new Set(res.acked.map((w) => w[0])).size;

    const over = await pair.lun();
    expect(over.writePath, 'write path after overflow').to.equal('bitmap');
    expect(over.state).to.be.oneOf(['journaling', 'probation']);
    expect(over.journal.records, 'journal dropped').to.equal(0);
    expect(over.dirtyRegions, 'dirty regions (64 KiB each) cover every written slot').to.be.at.least(slots);
    const collapsed = pair.logLines('a', 'LUN journal collapsed into the dirty bitmap');
    expect(collapsed, 'collapse log line').to.have.length(1);
    expect(res.maxLatencyMs, `longest write (slowest: ${JSON.stringify(res.slow.slice(0, 5))})`).to.be.below(MAX_STALL_MS);

    const tHeal = Date.now();
    pair.heal();
    await pair.waitLun((l) => l.state === 'uptodate', 'uptodate after the resync', 20_000);
    const upMs = Date.now() - tHeal;
    const conv = await pair.waitConverged(CONVERGE_MS);
    await rec.stop();
    const transitions = pair.lunTransitions();
    expect(inOrder(transitions, ['uptodate', 'journaling', 'resyncing', 'uptodate']),
      `"LUN mirror state" transitions ${transitions.join(' -> ')}`).to.equal(true);
    // Bits are cleared once their region has been quiet for 2 s (hot regions stay marked).
    const final = await pair.waitLun((l) => l.dirtyRegions === 0, 'the dirty bitmap empties after the regions go quiet', 10_000);
    expect(final.dirtyRegions, 'bitmap clean once uptodate and quiet').to.equal(0);
    expect(final.resyncPending).to.equal(0);
    expect(final.progress.resyncDone).to.equal(final.progress.resyncTotal);
    expect(final.progress.resyncTotal).to.be.at.least(slots);
    await expectAckedOnBoth(pair, [res]);
    report('overflow', {
      slots, dirtyRegions: over.dirtyRegions, resynced: final.progress.resyncTotal, maxStallMs: res.maxLatencyMs,
      healToUptodateMs: upMs, convergeMs: conv.ms,
    });
  });
});
