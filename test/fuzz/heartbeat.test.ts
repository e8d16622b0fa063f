// Fuzz: the heartbeat datagram parser and authentication (src/health/heartbeat-wire.ts).
// parseHeartbeat/decodeHeartbeat never throw on any datagram, accept only what encodeHeartbeat
// would produce (re-encoding an accepted datagram gives back the same bytes; for a signed one,
// the same bytes but the MAC), and round-trip every valid datagram. authenticateHeartbeat
// accepts a signed datagram only with the genuine MAC under the receiver's key: random, mutated,
// downgraded or other-key datagrams never. A receiving Heartbeat endpoint fed random, mutated,
// forged and replayed datagrams accepts (emits 'beat' for) only genuine ones, never the same
// (nonce, counter) twice, never a lower counter of the current boot, never an earlier boot.
import dgram from 'node:dgram';
import { expect } from 'chai';
import fc from 'fast-check';
import winston from 'winston';
import { Heartbeat } from '../../src/health/heartbeat.js';
import {
  authenticateHeartbeat, decodeHeartbeat, encodeHeartbeat, HEARTBEAT_FLAG_SIGNED, HEARTBEAT_HEADER_SIZE,
  HEARTBEAT_MAC_SIZE, HEARTBEAT_MAGIC, HEARTBEAT_TRAILER_SIZE, HeartbeatKey, parseHeartbeat, type HeartbeatInput,
} from '../../src/health/heartbeat-wire.js';
import { bytes, fuzz, timeoutFor, utf8String, type TargetBudget } from './harness.js';

const REASONS = ['length', 'magic', 'version', 'siteLen', 'range', 'utf8'];
const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const PSK = Buffer.from('5e'.repeat(32), 'hex');
const KEY = new HeartbeatKey(PSK);
const OTHER_KEY = new HeartbeatKey(Buffer.from('a7'.repeat(32), 'hex'));

const u64 = fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: MAX_SAFE }),
  fc.constant(MAX_SAFE));

const validArb: fc.Arbitrary<HeartbeatInput> = fc.record({
  counter: u64,
  sentAtMs: u64,
  echoCounter: u64,
  echoHeldMs: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffffffff })),
  site: utf8String(128),
  // Reserved bits only: SIGNED comes from signing.
  flags: fc.integer({ min: 0, max: 0xffff }).map((f) => f & ~HEARTBEAT_FLAG_SIGNED),
});

const nonceArb = bytes(8, 8);
const signedInputArb: fc.Arbitrary<HeartbeatInput> = fc.tuple(validArb, nonceArb, nonceArb)
  .map(([v, nonce, echoNonce]) => ({ ...v, nonce, echoNonce }));

/** Overwrite bytes (possibly with the same value), cut, or extend. */
type Mutation = { edits: [number, number][]; cut: number | null; extra: Buffer };
const mutationArb: fc.Arbitrary<Mutation> = fc.record({
  edits: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
  cut: fc.option(fc.nat()),
  extra: bytes(8),
});

function mutate(orig: Buffer, m: Mutation): Buffer {
  let b = Buffer.from(orig);
  for (const [at, val] of m.edits) b[at % b.length] = val;
  if (m.cut !== null) b = b.subarray(0, m.cut % (b.length + 1));
  return m.extra.length && m.cut === null ? Buffer.concat([b, m.extra]) : b;
}

/** A signed datagram, genuine under KEY or under another key, and a mutation of it. */
const signedCaseArb = fc.record({ v: signedInputArb, own: fc.boolean(), mutation: mutationArb, randomMac: fc.option(bytes(32, 32)) })
  .map(({ v, own, mutation, randomMac }) => {
    const genuine = encodeHeartbeat(v, own ? KEY : OTHER_KEY);
    let buf = genuine;
    if (randomMac) {
      buf = Buffer.from(genuine);
      randomMac.copy(buf, buf.length - HEARTBEAT_MAC_SIZE);
    }
    return { genuine, own, buf: mutate(buf, mutation) };
  });

/** A datagram: random bytes, a valid one mutated (bytes overwritten, cut, extended), a header with garbage, or a signed one mutated. */
const datagramArb = fc.oneof(
  bytes(200),
  fc.tuple(validArb, mutationArb).map(([v, m]) => mutate(encodeHeartbeat(v), m)),
  fc.tuple(bytes(HEARTBEAT_HEADER_SIZE + 140 + HEARTBEAT_TRAILER_SIZE, HEARTBEAT_HEADER_SIZE), fc.integer({ min: 0, max: 200 }),
    fc.boolean()).map(([b, siteLen, sign]) => {
    HEARTBEAT_MAGIC.copy(b, 0);
    b.writeUInt16BE(1, 8);
    if (sign) b.writeUInt16BE(b.readUInt16BE(10) | HEARTBEAT_FLAG_SIGNED, 10);
    b.writeUInt16BE(siteLen, 40);
    return b;
  }),
  signedCaseArb.map((c) => c.buf),
);

const BUDGET: TargetBudget = { runs: 3000, capMs: 2500 };
const RECEIVER_BUDGET: TargetBudget = { runs: 1500, capMs: 4000 };

describe('fuzz: heartbeat parser', function () {
  this.timeout(timeoutFor(BUDGET));

  it('never throws, and accepts only datagrams that re-encode to the same bytes', async function () {
    await fuzz('heartbeat parse', fc.property(datagramArb, (buf) => {
      const copy = Buffer.from(buf);
      const r = parseHeartbeat(buf);
      const d = decodeHeartbeat(buf);
      const withKey = authenticateHeartbeat(buf, KEY);
      const withoutKey = authenticateHeartbeat(buf, null);
      expect(buf.equals(copy), 'the parser modified its input').to.equal(true);
      if (!r.ok) {
        expect(REASONS).to.include(r.reason);
        expect(d).to.equal(null);
        expect(withKey).to.deep.equal(r);
        expect(withoutKey).to.deep.equal(r);
        return;
      }
      expect(d).to.deep.equal(r.datagram);
      const g = r.datagram;
      expect(g.version).to.equal(1);
      for (const k of ['counter', 'sentAtMs', 'echoCounter'] as const) expect(Number.isSafeInteger(g[k]) && g[k] >= 0, k).to.equal(true);
      expect(Number.isInteger(g.echoHeldMs) && g.echoHeldMs >= 0 && g.echoHeldMs <= 0xffffffff).to.equal(true);
      expect(Buffer.byteLength(g.site, 'utf8')).to.be.at.most(128);
      const { auth, flags, ...fields } = g;
      expect(auth !== null).to.equal((flags & HEARTBEAT_FLAG_SIGNED) !== 0);
      if (!auth) {
        const again = encodeHeartbeat({ ...fields, flags });
        expect(again.toString('hex')).to.equal(buf.toString('hex'));
        expect(withKey).to.deep.equal({ ok: false, reason: 'auth', detail: 'unsigned' });
        expect(withoutKey.ok).to.equal(true);
        return;
      }
      // Signed: the same bytes but the MAC, which verifies exactly when it is the genuine one.
      const again = encodeHeartbeat({ ...fields, flags: flags & ~HEARTBEAT_FLAG_SIGNED, nonce: auth.nonce, echoNonce: auth.echoNonce }, KEY);
      const body = buf.length - HEARTBEAT_MAC_SIZE;
      expect(again.subarray(0, body).toString('hex')).to.equal(buf.subarray(0, body).toString('hex'));
      expect(withKey.ok, 'accepted under the key iff the MAC is the genuine one').to.equal(again.equals(buf));
      if (!withKey.ok) expect(withKey).to.deep.equal({ ok: false, reason: 'auth', detail: 'mac' });
      expect(withoutKey).to.deep.equal({ ok: false, reason: 'auth', detail: 'signed' });
    }), BUDGET);
  });

  it('round-trips every valid datagram through encodeHeartbeat/parseHeartbeat, unsigned and signed', async function () {
    await fuzz('heartbeat round trip', fc.property(validArb, nonceArb, nonceArb, (v, nonce, echoNonce) => {
      const buf = encodeHeartbeat(v);
      const r = parseHeartbeat(buf);
      expect(r.ok, JSON.stringify(r)).to.equal(true);
      if (!r.ok) return;
      expect(r.datagram).to.deep.equal({ version: 1, ...v, flags: v.flags ?? 0, auth: null });
      expect(decodeHeartbeat(buf)).to.deep.equal(r.datagram);
      const sbuf = encodeHeartbeat({ ...v, nonce, echoNonce }, KEY);
      expect(sbuf.length).to.equal(buf.length + HEARTBEAT_TRAILER_SIZE);
      const s = authenticateHeartbeat(sbuf, KEY);
      expect(s.ok, JSON.stringify(s)).to.equal(true);
      if (!s.ok) return;
      expect(s.datagram).to.deep.equal({
        version: 1, ...v, flags: (v.flags ?? 0) | HEARTBEAT_FLAG_SIGNED,
        auth: { nonce, echoNonce, mac: sbuf.subarray(sbuf.length - HEARTBEAT_MAC_SIZE) },
      });
    }), BUDGET);
  });

  it('never authenticates a mutated, re-MACed or other-key signed datagram', async function () {
    let mutatedRejected = 0;
    await fuzz('heartbeat authentication', fc.property(signedCaseArb, ({ genuine, own, buf }) => {
      const ok = authenticateHeartbeat(buf, KEY).ok;
      expect(ok, 'accepted only byte-identical genuine datagrams under our key').to.equal(own && buf.equals(genuine));
      if (!buf.equals(genuine)) mutatedRejected++;
      expect(authenticateHeartbeat(buf, null).ok && parseHeartbeat(buf).ok && decodeHeartbeat(buf)!.auth !== null).to.equal(false);
    }), BUDGET);
    expect(mutatedRejected, 'the generator produced mutated signed datagrams').to.be.greaterThan(0);
  });
});

// ---- a receiving endpoint ------------------------------------------------------------------

/** How one fed datagram is made: a genuine one (mutated or not) from a spec, or an exact replay. */
interface ItemSpec {
  /** 0: the primed boot's nonce, 1: another fixed one, 2: a random one. */
  nonce: 0 | 1 | 2;
  randomNonce: Buffer;
  counter: number;
  /** sentAtMs relative to the primed datagram. */
  dt: number;
  /** Echo the receiver's nonce and its counter 1 (a proof of freshness), else a random echo. */
  echoUs: boolean;
  signer: 'key' | 'other' | 'none';
  mutation: Mutation | null;
  /** Replay an earlier fed datagram (index modulo their number) instead. */
  replay: number | null;
}

const itemArb: fc.Arbitrary<ItemSpec> = fc.record({
  nonce: fc.constantFrom(0 as const, 1 as const, 2 as const),
  randomNonce: nonceArb,
  counter: fc.oneof(fc.integer({ min: 0, max: 30 }), u64),
  dt: fc.integer({ min: -5000, max: 5000 }),
  echoUs: fc.boolean(),
  signer: fc.constantFrom('key' as const, 'key' as const, 'other' as const, 'none' as const),
  mutation: fc.option(mutationArb, { freq: 2 }),
  replay: fc.option(fc.nat(), { freq: 3 }),
});

const PRIMED_NONCE = Buffer.from('0102030405060708', 'hex');
const OTHER_NONCE = Buffer.from('1111111111111111', 'hex');
const T0 = 1_700_000_000_000;

describe('fuzz: heartbeat receiver', function () {
  this.timeout(timeoutFor(RECEIVER_BUDGET));
  const silent = winston.createLogger({ silent: true });
  let sink: dgram.Socket;
  before(async () => {
    sink = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => sink.bind(0, '127.0.0.1', () => resolve()));
  });
  after(async () => {
    await new Promise<void>((resolve) => sink.close(() => resolve()));
  });

  it('accepts only genuine, fresh datagrams: never forged, mutated, replayed, lower-counter or earlier-boot ones', async function () {
    const totals = { accepted: 0, forgedOrMutated: 0, replays: 0 };
    await fuzz('heartbeat receiver', fc.asyncProperty(fc.integer({ min: 1, max: 1000 }), fc.array(itemArb, { minLength: 1, maxLength: 8 }),
      async (c0, items) => {
        // A started endpoint (one datagram, counter 1, sent to the sink), primed with a genuine
        // first contact that echoes it.
        const r = new Heartbeat({
          site: 'a', peerSite: 'b', bindHost: '127.0.0.1', port: 0, peerHost: '127.0.0.1', peerPort: sink.address().port,
          intervalMs: 3_600_000, key: PSK,
        }, silent);
        await r.start();
        try {
          const ours = r.bootNonce!;
          const g0 = encodeHeartbeat({ counter: c0, sentAtMs: T0, echoCounter: 1, echoHeldMs: 0, site: 'b', nonce: PRIMED_NONCE, echoNonce: ours }, KEY);
          r.receive(g0);
          expect(r.stats.received, 'the primed first contact').to.equal(1);
          const fed: Buffer[] = [g0];
          const accepted: { nonce: string; counter: number }[] = [{ nonce: PRIMED_NONCE.toString('hex'), counter: c0 }];
          let beats = 0;
          r.on('beat', () => beats++);
          for (const it of items) {
            let m: Buffer;
            let genuine: Buffer | null = null;
            if (it.replay !== null) {
              m = fed[it.replay % fed.length];
            } else {
              const nonce = [PRIMED_NONCE, OTHER_NONCE, it.randomNonce][it.nonce];
              const fields = {
                counter: it.counter, sentAtMs: Math.max(0, T0 + it.dt), echoHeldMs: 0, site: 'b',
                echoCounter: it.echoUs ? 1 : it.counter % 3, echoNonce: it.echoUs ? ours : it.randomNonce,
              };
              genuine = it.signer === 'none'
                ? encodeHeartbeat({ ...fields, echoNonce: undefined })
                : encodeHeartbeat({ ...fields, nonce }, it.signer === 'key' ? KEY : OTHER_KEY);
              m = it.mutation ? mutate(genuine, it.mutation) : genuine;
            }
            const before = { received: r.stats.received, last: r.stats.lastReceivedMs, beats };
            r.receive(m);
            const took = r.stats.received - before.received;
            expect(took).to.be.oneOf([0, 1]);
            expect(beats - before.beats, "one 'beat' per accepted datagram").to.equal(took);
            const authentic = authenticateHeartbeat(m, KEY);
            if (genuine && (it.signer !== 'key' || !m.equals(genuine))) {
              if (!authentic.ok) totals.forgedOrMutated++;
            }
            if (!took) {
              expect(r.stats.lastReceivedMs).to.equal(before.last);
              if (it.replay !== null) totals.replays++;
              fed.push(m);
              continue;
            }
            totals.accepted++;
            expect(authentic.ok, 'accepted only with the genuine MAC under our key').to.equal(true);
            if (!authentic.ok) return;
            const d = authentic.datagram;
            const nonce = d.auth!.nonce.toString('hex');
            const last = accepted[accepted.length - 1];
            expect(accepted.some((x) => x.nonce === nonce && x.counter === d.counter), 'the same (nonce, counter) twice').to.equal(false);
            if (nonce === last.nonce) expect(d.counter, 'counter of the current boot').to.be.greaterThan(last.counter);
            else expect(accepted.some((x) => x.nonce === nonce), 'an earlier boot accepted again').to.equal(false);
            accepted.push({ nonce, counter: d.counter });
            fed.push(m);
          }
        } finally {
          await r.stop();
        }
      }), RECEIVER_BUDGET);
    if (process.env.HB_TOTALS) console.log(totals);
    expect(totals.accepted, 'some fed datagrams were genuine and fresh').to.be.greaterThan(0);
    expect(totals.forgedOrMutated, 'forged or mutated datagrams were fed').to.be.greaterThan(0);
    expect(totals.replays, 'replays were fed').to.be.greaterThan(0);
  });
});
