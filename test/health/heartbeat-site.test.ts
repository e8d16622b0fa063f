// Authenticated heartbeats between two real sites (dist/, `npm run build` first): b's
// heartbeats are captured over two boots of b (b restarts in between); after the link is cut
// and site a sees it down, the captured datagrams replayed toward a's mirror port (the earlier
// boot's with counters above the current boot's, which the old unauthenticated rule accepted)
// and forged ones, for longer than the probation would need, leave a "down"; the real b is
// accepted again when the link heals.
import dgram from 'node:dgram';
import { setTimeout as delay } from 'node:timers/promises';
import { expect } from 'chai';
import { decodeHeartbeat, encodeHeartbeat, HEARTBEAT_FLAG_SIGNED, HeartbeatKey } from '../../src/health/heartbeat-wire.js';
import { OutagePair, SHORT_HEARTBEAT } from '../helpers/outage-pair.js';
import { Cleanup, pollUntil, tmpDir } from '../helpers/site.js';

interface HeartbeatStatus { received: number; ignored: Record<string, number>; lastReceivedMs: number | null; peerRestarts: number }

async function heartbeatOf(pair: OutagePair): Promise<{ health: string; hb: HeartbeatStatus }> {
  const st = await pair.status('a');
  const m = st.mirror as unknown as { health: string; heartbeat: HeartbeatStatus };
  return { health: m.health, hb: m.heartbeat };
}

describe('heartbeats between real sites: replays after a cut (heartbeat 200/600/1000 ms)', function () {
  this.timeout(60_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  it('captured heartbeats of two boots of b replayed to a while the link is cut never leave "down"; the real b is accepted after heal', async () => {
    const dir = await tmpDir('nbd-mirror-hb-replay-');
    cleanup.add('remove temp dir', () => dir.cleanup());
    const pair = await OutagePair.start(dir, { mode: 'async', connections: 1 });
    cleanup.add('stop sites and proxies', () => pair.stop());
    const attacker = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => attacker.bind(0, '127.0.0.1', () => resolve()));
    cleanup.add('close attacker socket', () => new Promise<void>((resolve) => attacker.close(() => resolve())));
    const aMirrorPort = (pair.inputs.a.mirror as { listen: { port: number } }).listen.port;

    // Record b's heartbeats to a as proxy BA forwards them. (FaultProxy has no public tap: we
    // listen on its UDP socket too; it forwards what it receives in 'pass' mode.)
    const udp = (pair.proxyBA as unknown as { udp?: dgram.Socket }).udp;
    if (!(udp instanceof dgram.Socket)) throw new Error('FaultProxy has no UDP socket to tap (test helper changed?)');
    const captured: Buffer[] = [];
    const tap = (m: Buffer) => { if (pair.proxyBA.mode === 'pass') captured.push(Buffer.from(m)); };
    udp.on('message', tap);
    cleanup.add('untap', () => udp.off('message', tap));

    await pair.waitLun((l) => l.health === 'up' && l.state === 'uptodate', 'link up, lun0 uptodate');
    // b's first boot runs until its counter reaches 40 (8 s), so that its captured datagrams
    // carry counters above those of the second boot when they are replayed.
    const counterOf = (m: Buffer) => decodeHeartbeat(m)?.counter ?? 0;
    await pollUntil(() => captured.length > 0 && counterOf(captured[captured.length - 1]) >= 40,
      { timeoutMs: 20_000, intervalMs: 100, what: 'b\'s counter at 40' });
    await pair.kill('b');
    await pair.restart('b');
    await pollUntil(async () => {
      const { health, hb } = await heartbeatOf(pair);
      return health === 'up' && hb.peerRestarts === 1;
    }, { timeoutMs: 15_000, what: 'a accepts the restarted b and the link is up again' });
    // Let a take the last captured ones (two intervals), then cut both directions.
    await delay(2 * SHORT_HEARTBEAT.intervalMs);
    udp.off('message', tap);
    const boots = new Map<string, number>();
    for (const m of captured) {
      const d = decodeHeartbeat(m)!;
      expect(d.flags & HEARTBEAT_FLAG_SIGNED, 'b signs its heartbeats').to.not.equal(0);
      const n = d.auth!.nonce.toString('hex');
      boots.set(n, Math.max(boots.get(n) ?? 0, d.counter));
    }
    const [firstBootMax, secondBootMax] = [...boots.values()];
    expect(boots.size, 'datagrams of two boots of b captured').to.equal(2);
    expect(firstBootMax, 'the earlier boot counted further than the current one').to.be.greaterThan(secondBootMax);
    pair.cut();
    await pair.waitLun((l) => l.health === 'down', 'a sees the link down after the cut', 5000);
    const before = await heartbeatOf(pair);
    const tReplay = Date.now();

    // Replay b's datagrams toward a's mirror port, one every half interval, plus forgeries, for
    // 3 × (timeout + probation); sample a's link health all the while.
    const send = (m: Buffer) => new Promise<void>((resolve, reject) => attacker.send(m, aMirrorPort, '127.0.0.1', (e) => (e ? reject(e) : resolve())));
    const last = decodeHeartbeat(captured[captured.length - 1])!;
    const wrongKey = new HeartbeatKey(Buffer.from('a7'.repeat(32), 'hex'));
    const healthSeen = new Set<string>();
    let replayed = 0;
    let forged = 0;
    const durationMs = 3 * (SHORT_HEARTBEAT.timeoutMs + SHORT_HEARTBEAT.probationMs);
    const sampler = (async () => {
      while (Date.now() - tReplay < durationMs) {
        healthSeen.add((await heartbeatOf(pair)).health);
        await delay(50);
      }
    })();
    // Newest first: the current boot's, then the earlier boot's highest counters.
    const order = [...captured].reverse();
    for (let i = 0; Date.now() - tReplay < durationMs; i++) {
      await send(order[i % order.length]);
      replayed++;
      if (i % 4 === 0) {
        // The current boot's nonce, a higher counter, now: under another key, and unsigned.
        await send(encodeHeartbeat({
          counter: last.counter + 1 + i, sentAtMs: Date.now(), echoCounter: 0, echoHeldMs: 0, site: 'b', nonce: last.auth!.nonce,
        }, wrongKey));
        await send(encodeHeartbeat({ counter: last.counter + 1000 + i, sentAtMs: Date.now(), echoCounter: 0, echoHeldMs: 0, site: 'b' }));
        forged += 2;
      }
      await delay(SHORT_HEARTBEAT.intervalMs / 2);
    }
    await sampler;
    await delay(100);   // the last datagrams are counted
    const after = await heartbeatOf(pair);
    expect([...healthSeen], 'a\'s link health while replaying').to.deep.equal(['down']);
    expect(after.health).to.equal('down');
    expect(after.hb.received, 'datagrams accepted while replaying').to.equal(before.hb.received);
    expect(after.hb.lastReceivedMs).to.equal(before.hb.lastReceivedMs);
    expect((after.hb.ignored.replay ?? 0) - (before.hb.ignored.replay ?? 0), 'replays counted').to.equal(replayed);
    expect((after.hb.ignored.auth ?? 0) - (before.hb.ignored.auth ?? 0), 'forgeries counted').to.equal(forged);
    const transitions = pair.logLines('a', 'mirror link state').filter((l) => Date.parse(l.timestamp) >= tReplay);
    expect(transitions.map((l) => l.to), 'link state changes on a while replaying').to.deep.equal([]);

    // The real b, still running, is accepted again once the link heals: probation, then up.
    pair.heal();
    await pair.waitLun((l) => l.health === 'up', 'link up again after heal', 15_000);
    const healed = await heartbeatOf(pair);
    expect(healed.hb.received).to.be.greaterThan(after.hb.received);
    const toStates = pair.logLines('a', 'mirror link state').filter((l) => Date.parse(l.timestamp) >= tReplay).map((l) => l.to);
    expect(toStates.slice(0, 2)).to.deep.equal(['probation', 'ready']);
    console.log(`      [replay] captured=${captured.length} (boot counters up to ${firstBootMax} and ${secondBootMax}) replayed=${replayed} forged=${forged} health=${[...healthSeen]} over ${durationMs} ms`);
  });
});
