// Fuzz: the heartbeat datagram parser (src/health/heartbeat.ts). parseHeartbeat/decodeHeartbeat
// never throw on any datagram, accept only what encodeHeartbeat would produce (re-encoding an
// accepted datagram gives back the same bytes), and round-trip every valid datagram.
import { expect } from 'chai';
import fc from 'fast-check';
import {
  decodeHeartbeat, encodeHeartbeat, HEARTBEAT_HEADER_SIZE, HEARTBEAT_MAGIC, parseHeartbeat, type HeartbeatInput,
} from '../../src/health/heartbeat.js';
import { bytes, fuzz, timeoutFor, utf8String, type TargetBudget } from './harness.js';

const REASONS = ['length', 'magic', 'version', 'siteLen', 'range', 'utf8'];
const MAX_SAFE = Number.MAX_SAFE_INTEGER;

const u64 = fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: MAX_SAFE }),
  fc.constant(MAX_SAFE));

const validArb: fc.Arbitrary<HeartbeatInput> = fc.record({
  counter: u64,
  sentAtMs: u64,
  echoCounter: u64,
  echoHeldMs: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffffffff })),
  site: utf8String(128),
  flags: fc.integer({ min: 0, max: 0xffff }),
});

/** A datagram: random bytes, a valid one mutated (bytes overwritten, cut, extended), or a header with garbage. */
const datagramArb = fc.oneof(
  bytes(200),
  fc.tuple(validArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
    fc.option(fc.nat()), bytes(8)).map(([v, edits, cut, extra]) => {
    let b = Buffer.from(encodeHeartbeat(v));
    for (const [at, val] of edits) b[at % b.length] = val;
    if (cut !== null) b = b.subarray(0, cut % (b.length + 1));
    return extra.length && cut === null ? Buffer.concat([b, extra]) : b;
  }),
  fc.tuple(bytes(HEARTBEAT_HEADER_SIZE + 140, HEARTBEAT_HEADER_SIZE), fc.integer({ min: 0, max: 200 })).map(([b, siteLen]) => {
    HEARTBEAT_MAGIC.copy(b, 0);
    b.writeUInt16BE(1, 8);
    b.writeUInt16BE(siteLen, 40);
    return b;
  }),
);

const BUDGET: TargetBudget = { runs: 3000, capMs: 2500 };

describe('fuzz: heartbeat parser', function () {
  this.timeout(timeoutFor(BUDGET));

  it('never throws, and accepts only datagrams that re-encode to the same bytes', async function () {
    await fuzz('heartbeat parse', fc.property(datagramArb, (buf) => {
      const copy = Buffer.from(buf);
      const r = parseHeartbeat(buf);
      const d = decodeHeartbeat(buf);
      expect(buf.equals(copy), 'the parser modified its input').to.equal(true);
      if (!r.ok) {
        expect(REASONS).to.include(r.reason);
        expect(d).to.equal(null);
        return;
      }
      expect(d).to.deep.equal(r.datagram);
      const g = r.datagram;
      expect(g.version).to.equal(1);
      for (const k of ['counter', 'sentAtMs', 'echoCounter'] as const) expect(Number.isSafeInteger(g[k]) && g[k] >= 0, k).to.equal(true);
      expect(Number.isInteger(g.echoHeldMs) && g.echoHeldMs >= 0 && g.echoHeldMs <= 0xffffffff).to.equal(true);
      expect(Buffer.byteLength(g.site, 'utf8')).to.be.at.most(128);
      const again = encodeHeartbeat({ ...g });
      expect(again.toString('hex')).to.equal(buf.toString('hex'));
    }), BUDGET);
  });

  it('round-trips every valid datagram through encodeHeartbeat/parseHeartbeat', async function () {
    await fuzz('heartbeat round trip', fc.property(validArb, (v) => {
      const buf = encodeHeartbeat(v);
      const r = parseHeartbeat(buf);
      expect(r.ok, JSON.stringify(r)).to.equal(true);
      if (!r.ok) return;
      expect(r.datagram).to.deep.equal({ version: 1, ...v, flags: v.flags ?? 0 });
      expect(decodeHeartbeat(buf)).to.deep.equal(r.datagram);
    }), BUDGET);
  });
});
