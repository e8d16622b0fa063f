// UDP heartbeats without a key: the datagram format, two endpoints exchanging beats, and
// everything the receiver must ignore (garbage, wrong site, replays) or accept (a restarted
// peer). Signed datagrams and their freshness rules: heartbeat-auth.test.ts.
import { once } from 'node:events';
import { expect } from 'chai';
import winston from 'winston';
import { Heartbeat, type HeartbeatOptions } from '../../src/health/heartbeat.js';
import {
  decodeHeartbeat, encodeHeartbeat, HEARTBEAT_HEADER_SIZE,
  HEARTBEAT_MAGIC, HEARTBEAT_VERSION, parseHeartbeat, type HeartbeatDatagram,
} from '../../src/health/heartbeat-wire.js';
import { RawPeer } from './raw-peer.js';

const HOST = '127.0.0.1';
const silent = winston.createLogger({ silent: true });

function datagram(over: Partial<Omit<HeartbeatDatagram, 'auth'>> = {}): Buffer {
  return encodeHeartbeat({ counter: 1, sentAtMs: Date.now(), echoCounter: 0, echoHeldMs: 0, site: 'b', ...over });
}

describe('health/heartbeat', () => {
  describe('datagram format', () => {
    it('encodes the documented layout and decodes it back', () => {
      const d = { counter: 2 ** 40 + 3, sentAtMs: 1_700_000_000_123, echoCounter: 77, echoHeldMs: 0xfffffffe, site: 'site-ä' };
      const buf = encodeHeartbeat(d);
      expect(buf.length).to.equal(HEARTBEAT_HEADER_SIZE + Buffer.byteLength('site-ä'));
      expect(buf.subarray(0, 8).equals(HEARTBEAT_MAGIC)).to.equal(true);
      expect(HEARTBEAT_MAGIC.toString('latin1')).to.equal('NBDMHB01');
      expect(buf.readUInt16BE(8)).to.equal(HEARTBEAT_VERSION);
      expect(buf.readUInt16BE(10)).to.equal(0);
      expect(buf.readUInt32BE(12) * 2 ** 32 + buf.readUInt32BE(16)).to.equal(d.counter);
      expect(buf.readUInt32BE(20) * 2 ** 32 + buf.readUInt32BE(24)).to.equal(d.sentAtMs);
      expect(buf.readUInt32BE(28) * 2 ** 32 + buf.readUInt32BE(32)).to.equal(77);
      expect(buf.readUInt32BE(36)).to.equal(0xfffffffe);
      expect(buf.readUInt16BE(40)).to.equal(Buffer.byteLength('site-ä'));
      expect(decodeHeartbeat(buf)).to.deep.equal({ version: 1, flags: 0, ...d, auth: null });
    });

    it('rejects anything that does not parse exactly, with a reason', () => {
      const good = datagram({ site: 'abc' });
      const reason = (b: Buffer) => {
        const r = parseHeartbeat(b);
        return r.ok ? 'ok' : r.reason;
      };
      expect(reason(good)).to.equal('ok');
      expect(reason(Buffer.alloc(0))).to.equal('length');
      expect(reason(good.subarray(0, HEARTBEAT_HEADER_SIZE - 1))).to.equal('length');
      expect(reason(good.subarray(0, good.length - 1))).to.equal('length');
      expect(reason(Buffer.concat([good, Buffer.from([0])]))).to.equal('length');
      const badMagic = Buffer.from(good);
      badMagic[0] ^= 0xff;
      expect(reason(badMagic)).to.equal('magic');
      const badVersion = Buffer.from(good);
      badVersion.writeUInt16BE(2, 8);
      expect(reason(badVersion)).to.equal('version');
      const longSite = Buffer.concat([Buffer.from(good.subarray(0, HEARTBEAT_HEADER_SIZE)), Buffer.alloc(129, 0x61)]);
      longSite.writeUInt16BE(129, 40);
      expect(reason(longSite)).to.equal('siteLen');
      const huge = Buffer.from(good);
      huge.writeUInt32BE(0x200000, 12);   // counter >= 2^53
      expect(reason(huge)).to.equal('range');
      const badUtf8 = Buffer.from(good);
      badUtf8[HEARTBEAT_HEADER_SIZE] = 0xff;
      expect(reason(badUtf8)).to.equal('utf8');
      expect(decodeHeartbeat(badMagic)).to.equal(null);
    });

    it('refuses to encode what the format cannot carry', () => {
      expect(() => datagram({ site: 'x'.repeat(129) })).to.throw(RangeError);
      expect(() => datagram({ counter: -1 })).to.throw(RangeError);
      expect(() => datagram({ sentAtMs: 2 ** 53 })).to.throw(RangeError);
      expect(() => datagram({ echoHeldMs: 2 ** 32 })).to.throw(RangeError);
      expect(() => datagram({ site: 'x'.repeat(128) })).to.not.throw();
    });

    it('never throws on random input (small fuzz)', () => {
      let seed = 12345;
      const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
      for (let i = 0; i < 2000; i++) {
        const b = Buffer.from(datagram({ site: 'b'.repeat(Math.floor(rnd() * 10)) }));
        const flips = 1 + Math.floor(rnd() * 4);
        for (let j = 0; j < flips; j++) b[Math.floor(rnd() * b.length)] = Math.floor(rnd() * 256);
        const cut = rnd() < 0.2 ? b.subarray(0, Math.floor(rnd() * b.length)) : b;
        const r = parseHeartbeat(cut);
        if (r.ok) expect(encodeHeartbeat({ ...r.datagram }).equals(cut)).to.equal(true);
      }
    });
  });

  describe('endpoint', () => {
    const cleanup: (() => Promise<void>)[] = [];
    /** Where endpoints send until a test tells them otherwise. */
    let sink: RawPeer;
    before(async () => { sink = await new RawPeer().bind(); });
    after(async () => { await sink.close(); });
    afterEach(async () => {
      while (cleanup.length) await cleanup.pop()!();
    });

    async function rawPeer(): Promise<RawPeer> {
      const p = await new RawPeer().bind();
      cleanup.push(() => p.close());
      return p;
    }

    async function heartbeat(over: Partial<HeartbeatOptions>): Promise<Heartbeat> {
      const hb = new Heartbeat({
        site: 'a', peerSite: 'b', bindHost: HOST, port: 0, peerHost: HOST, peerPort: sink.port, intervalMs: 50, ...over,
      }, silent);
      await hb.start();
      cleanup.push(() => hb.stop());
      return hb;
    }

    it('sends one datagram at once and then every interval, counting up, with a tick after each', async () => {
      const peer = await rawPeer();
      const ticks: number[] = [];
      const hb = new Heartbeat({
        site: 'a', peerSite: 'b', bindHost: HOST, port: 0, peerHost: HOST, peerPort: peer.port, intervalMs: 50,
      }, silent);
      hb.on('tick', (t) => ticks.push(t));
      await hb.start();
      cleanup.push(() => hb.stop());
      expect(ticks, 'the first send happens in start()').to.have.length(1);
      const first = await peer.nextHeartbeat();
      expect(first).to.include({ counter: 1, echoCounter: 0, echoHeldMs: 0, site: 'a', flags: 0 });
      expect(Math.abs(first.sentAtMs - Date.now())).to.be.below(5000);
      const second = await peer.nextHeartbeat();
      const third = await peer.nextHeartbeat();
      expect([second.counter, third.counter]).to.deep.equal([2, 3]);
      expect(third.sentAtMs).to.be.at.least(second.sentAtMs);
      expect(hb.stats.sent).to.be.at.least(3);
      expect(ticks.length).to.be.at.least(3);
    });

    it('echoes the last accepted counter with its hold time, and measures the rtt from echoes', async () => {
      const peer = await rawPeer();
      const hb = await heartbeat({ peerPort: peer.port });
      const beat = once(hb, 'beat');
      await peer.send(datagram({ counter: 41 }), hb.address().port);
      await beat;
      // The next datagram from hb echoes 41.
      let d = await peer.nextHeartbeat();
      while (d.echoCounter === 0) d = await peer.nextHeartbeat();
      expect(d.echoCounter).to.equal(41);
      expect(d.echoHeldMs).to.be.within(0, 1000);
      expect(hb.stats.rttMs).to.equal(null);
      // Echo one of hb's counters back: the rtt is known.
      const beat2 = once(hb, 'beat');
      await peer.send(datagram({ counter: 42, echoCounter: d.counter, echoHeldMs: 0 }), hb.address().port);
      await beat2;
      expect(hb.stats.rttMs).to.be.a('number').within(0, 2000);
      expect(hb.stats.received).to.equal(2);
      expect(hb.stats.lastReceivedMs).to.be.a('number');
    });

    it('two endpoints exchange beats and measure the rtt', async () => {
      const a = await heartbeat({ site: 'a', peerSite: 'b' });
      const b = await heartbeat({ site: 'b', peerSite: 'a', peerPort: a.address().port });
      a.setPeer(HOST, b.address().port);
      const nowA = await once(a, 'beat');
      await once(b, 'beat');
      expect(Math.abs((nowA[0] as number) - Date.now())).to.be.below(5000);
      // An rtt needs a round trip: a sends, b echoes in its next datagram.
      for (let i = 0; i < 20 && (a.stats.rttMs === null || b.stats.rttMs === null); i++) {
        await Promise.race([once(a, 'beat'), once(b, 'beat')]);
      }
      expect(a.stats.rttMs).to.be.a('number').within(0, 1000);
      expect(b.stats.rttMs).to.be.a('number').within(0, 1000);
      expect(a.stats.ignored).to.deep.equal({});
      expect(b.stats.ignored).to.deep.equal({});
      expect(a.stats.sendErrors).to.equal(0);
    });

    it('ignores (and counts) datagrams from another site name', async () => {
      const a = await heartbeat({ site: 'a', peerSite: 'b' });
      const c = await heartbeat({ site: 'c', peerSite: 'a', peerPort: a.address().port });
      const [reason] = await once(a, 'ignored');
      expect(reason).to.equal('site');
      expect(a.stats.ignored.site).to.be.at.least(1);
      expect(a.stats.received).to.equal(0);
      expect(c.stats.sent).to.be.at.least(1);
    });

    it('with peerSite "" accepts any name but our own', async () => {
      const peer = await rawPeer();
      const a = await heartbeat({ site: 'a', peerSite: '', peerPort: peer.port });
      const ignored = once(a, 'ignored');
      await peer.send(datagram({ site: 'a', counter: 1 }), a.address().port);
      expect((await ignored)[0]).to.equal('site');
      const beat = once(a, 'beat');
      await peer.send(datagram({ site: 'anything', counter: 2 }), a.address().port);
      await beat;
      expect(a.stats).to.include({ received: 1 });
      expect(a.stats.ignored).to.deep.equal({ site: 1 });
    });

    it('ignores garbage and counts it by reason', async () => {
      const peer = await rawPeer();
      const a = await heartbeat({ peerPort: peer.port });
      const reasons: string[] = [];
      a.on('ignored', (r) => reasons.push(r));
      const badVersion = datagram();
      badVersion.writeUInt16BE(9, 8);
      const inputs = [Buffer.from('hello'), Buffer.alloc(60, 0xee), badVersion, Buffer.concat([datagram(), Buffer.from('x')])];
      for (const b of inputs) {
        const ignored = once(a, 'ignored');
        await peer.send(b, a.address().port);
        await ignored;
      }
      expect(reasons).to.deep.equal(['length', 'magic', 'version', 'length']);
      expect(a.stats.ignored).to.deep.equal({ length: 2, magic: 1, version: 1 });
      // Still works afterwards.
      const beat = once(a, 'beat');
      await peer.send(datagram(), a.address().port);
      await beat;
      expect(a.stats.received).to.equal(1);
    });

    it('ignores duplicate and replayed counters, accepts a counter reset with a later sentAt', async () => {
      const peer = await rawPeer();
      const a = await heartbeat({ peerPort: peer.port });
      const port = a.address().port;
      const t0 = Date.now();
      /** Send d and say what a made of it: 'beat' or the reason it was ignored. */
      const verdict = async (d: Buffer): Promise<string> => {
        const ac = new AbortController();
        const p = Promise.race([
          once(a, 'beat', { signal: ac.signal }).then(() => 'beat'),
          once(a, 'ignored', { signal: ac.signal }).then(([reason]) => reason as string),
        ]);
        await peer.send(d, port);
        const v = await p;
        ac.abort();
        return v;
      };
      const expectBeat = async (d: Buffer) => expect(await verdict(d)).to.equal('beat');
      const expectIgnored = async (d: Buffer, reason: string) => expect(await verdict(d)).to.equal(reason);
      await expectBeat(datagram({ counter: 5, sentAtMs: t0 }));
      await expectIgnored(datagram({ counter: 5, sentAtMs: t0 }), 'replay');          // duplicate
      await expectIgnored(datagram({ counter: 5, sentAtMs: t0 + 10 }), 'replay');     // equal counter
      await expectIgnored(datagram({ counter: 4, sentAtMs: t0 - 100 }), 'replay');    // older datagram
      await expectIgnored(datagram({ counter: 4, sentAtMs: t0 }), 'replay');          // not later
      await expectBeat(datagram({ counter: 6, sentAtMs: t0 + 50 }));
      expect(a.stats.peerRestarts).to.equal(0);
      // The peer restarted: counter 1 again, sent later.
      await expectBeat(datagram({ counter: 1, sentAtMs: t0 + 1000 }));
      expect(a.stats.peerRestarts).to.equal(1);
      await expectIgnored(datagram({ counter: 1, sentAtMs: t0 + 1000 }), 'replay');
      await expectBeat(datagram({ counter: 2, sentAtMs: t0 + 1050 }));
      expect(a.stats.received).to.equal(4);
      expect(a.stats.ignored).to.deep.equal({ replay: 5 });
    });

    it('accepts a real peer that restarts on the same port', async () => {
      const a = await heartbeat({ site: 'a', peerSite: 'b' });
      const b1 = new Heartbeat({ site: 'b', peerSite: 'a', bindHost: HOST, port: 0, peerHost: HOST, peerPort: a.address().port, intervalMs: 20 }, silent);
      await b1.start();
      const bPort = b1.address().port;
      a.setPeer(HOST, bPort);
      try {
        for (let i = 0; i < 4; i++) await once(a, 'beat');
      } finally {
        await b1.stop();
      }
      const b2 = await heartbeat({ site: 'b', peerSite: 'a', port: bPort, peerPort: a.address().port, intervalMs: 20 });
      // (A datagram b1 sent just before stopping may still be delivered first.)
      for (let i = 0; i < 10 && a.stats.peerRestarts === 0; i++) await once(a, 'beat');
      expect(a.stats.peerRestarts).to.equal(1);
      expect(a.stats.received).to.be.at.least(5);
      // b2 in turn hears a.
      await once(b2, 'beat');
    });

    it('rejects start() with a clear error when the port is taken', async () => {
      const peer = await rawPeer();
      const hb = new Heartbeat({ site: 'a', peerSite: 'b', bindHost: HOST, port: peer.port, peerHost: HOST, peerPort: sink.port, intervalMs: 50 }, silent);
      let error: Error | null = null;
      try {
        await hb.start();
      } catch (err) {
        error = err as Error;
      }
      expect(error?.message).to.match(new RegExp(`cannot bind UDP 127\\.0\\.0\\.1:${peer.port}: the port is already in use`));
      await hb.stop();   // harmless after a failed start
    });

    it('keeps sending to an unreachable peer without throwing', async () => {
      // A port that was free a moment ago: nothing listens there.
      const gone = await rawPeer();
      const port = gone.port;
      await gone.close();
      cleanup.pop();
      const a = await heartbeat({ peerPort: port, intervalMs: 10 });
      for (let i = 0; i < 5; i++) await once(a, 'tick');
      expect(a.stats.sent).to.be.at.least(6);
      expect(a.stats.received).to.equal(0);
      // A destination the socket refuses synchronously (port 0) does not throw out of the timer.
      const b = await heartbeat({ peerPort: 0, intervalMs: 10 });
      for (let i = 0; i < 3; i++) await once(b, 'tick');
      expect(b.stats.sendErrors).to.be.at.least(4);
      expect(b.stats.sent).to.equal(0);
    });

    it('stop() closes the socket and is idempotent; start() may not be called twice', async () => {
      const a = await heartbeat({});
      let error: Error | null = null;
      await a.start().catch((err: Error) => { error = err; });
      expect(error).to.be.an('error');
      const { port } = a.address();
      await a.stop();
      await a.stop();
      expect(() => a.address()).to.throw(/not started/);
      // The port is free again.
      const again = await heartbeat({ port });
      expect(again.address().port).to.equal(port);
    });
  });
});
