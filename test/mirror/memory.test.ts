// Memory under load (issue 15.3): a sync pair, one 64 MiB LUN, a QD16 writer on the primary; the
// link is cut long enough to journal a backlog (~70 MiB), then healed: the replay runs while the
// writer keeps writing. Each site's RSS, sampled from its /status every 100 ms, stays within
// 150 MiB. Also: the primary reports local-only protection from the cut until it is uptodate.
import { expect } from 'chai';
import { OutagePair } from '../helpers/outage-pair.js';
import { siteStatus } from '../helpers/pair.js';
import { Cleanup, tmpDir } from '../helpers/site.js';
import { startWriter, type Writer } from '../helpers/writer.js';

const MiB = 1024 * 1024;
const RSS_LIMIT = 150 * MiB;

interface ProcStatus { process: { rssBytes: number; heapUsedBytes: number }; luns: Array<{ state: string; protection?: string; etaSeconds?: number | null }> }

describe('memory: QD16 writes with a journal backlog to replay stay within 150 MiB RSS per site', function () {
  this.timeout(120_000);
  const cleanup = new Cleanup();
  after(async function () { await cleanup.run(); });

  it('RSS of a and b at most 150 MiB throughout; protection local-only from the cut until uptodate, then peer', async function () {
    const dir = await tmpDir('nbd-memory-');
    cleanup.add('tmp dir', () => dir.cleanup());
    const pair = await OutagePair.start(dir, { mode: 'sync', size: 64 * MiB });
    cleanup.add('pair', () => pair.stop());
    await pair.waitLun((l) => l.state === 'uptodate', 'uptodate', 30_000);

    const peak = { a: 0, b: 0 };
    const protections = new Set<string>();
    let sampling = true;
    let samples = 0;
    const sampler = (async () => {
      while (sampling) {
        const [a, b] = (await Promise.all([siteStatus(pair.a), siteStatus(pair.b)])) as unknown as ProcStatus[];
        peak.a = Math.max(peak.a, a.process.rssBytes);
        peak.b = Math.max(peak.b, b.process.rssBytes);
        protections.add(`${a.luns[0].state}:${a.luns[0].protection}`);
        samples++;
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    cleanup.add('sampler', async () => { sampling = false; await sampler.catch(() => undefined); });

    let writer: Writer | null = await startWriter(pair.a.uri('lun0'), { qd: 16, len: 64 * 1024, span: 64 * MiB, rate: 200 });
    cleanup.add('writer', () => writer?.kill() ?? Promise.resolve());
    await pair.waitLun((l) => l.counters.writeOps >= 200, '200 writes mirrored live');
    pair.cut();
    const cutAt = Date.now();
    const journaled = await pair.waitLun((l) => l.journal.bytes >= 64 * MiB, 'a 64 MiB backlog in the journal', 30_000);
    expect(journaled.writePath).to.equal('journal');
    const during = (await pair.status('a')) as unknown as ProcStatus;
    expect(during.luns[0].protection, `${during.luns[0].state}: writes are on this site only`).to.equal('local-only');
    pair.heal();
    await pair.waitLun((l) => l.state === 'replaying' || l.state === 'uptodate', 'the replay', 30_000);
    await pair.waitLun((l) => l.state === 'uptodate' && l.journal.records === 0, 'uptodate after the replay', 60_000);
    const result = await writer.stop();
    writer = null;
    expect(result.error).to.equal(null);
    sampling = false;
    await sampler;
    const after = (await pair.status('a')) as unknown as ProcStatus;
    expect(after.luns[0].protection).to.equal('peer');
    // The log says it too: each state line carries the protection (and why, when local-only).
    const states = pair.logLines('a', 'LUN mirror state');
    const toJournaling = states.find((l) => l.to === 'journaling');
    expect(toJournaling, 'a "LUN mirror state" line to journaling').to.not.equal(undefined);
    expect(toJournaling!.protection).to.equal('local-only');
    expect(String(toJournaling!.protectionReason)).to.include('not reachable');
    const last = states.at(-1)!;
    expect([last.to, last.protection, last.protectionReason]).to.deep.equal(['uptodate', 'peer', undefined]);
    console.log(`      peak RSS a ${(peak.a / MiB).toFixed(1)} MiB, b ${(peak.b / MiB).toFixed(1)} MiB over ${samples} samples; `
      + `${result.writes} writes; cut to uptodate ${((Date.now() - cutAt) / 1000).toFixed(1)} s`);
    expect(samples).to.be.above(20);
    expect([...protections].filter((p) => p.startsWith('uptodate:')).every((p) => p === 'uptodate:peer')).to.equal(true);
    expect([...protections].filter((p) => !p.startsWith('uptodate:')).every((p) => p.endsWith(':local-only')), [...protections].join(' ')).to.equal(true);
    expect(peak.a, 'peak RSS of a (primary: journal, replay)').to.be.at.most(RSS_LIMIT);
    expect(peak.b, 'peak RSS of b (secondary: applying the replay)').to.be.at.most(RSS_LIMIT);
  });
});
