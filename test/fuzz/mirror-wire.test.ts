// Fuzz: the mirror wire codecs (src/mirror/wire.ts). decodeHello throws nothing but HelloError
// on any body and round-trips every valid hello; readRequestHeader never throws on any 40 bytes
// and round-trips every header whose u64 fields are below 2^53.
import { expect } from 'chai';
import fc from 'fast-check';
import {
  PROTOCOL_VERSION,
  decodeHello, encodeHello, HELLO_ANSWER, HELLO_OFFER, HelloError, readRequestHeader, REQUEST_HEADER_SIZE,
  REQUEST_MAGIC, writeRequestHeader, type Hello, type MirrorRequestHeader,
} from '../../src/mirror/wire.js';
import { bytes, fuzz, timeoutFor, type TargetBudget } from './harness.js';
import { helloArb, helloBodyArb } from './mirror-arbs.js';

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const u64 = fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: MAX_SAFE }), fc.constant(MAX_SAFE));
const u16 = fc.integer({ min: 0, max: 0xffff });

const BUDGET: TargetBudget = { runs: 3000, capMs: 2500 };

describe('fuzz: mirror wire', function () {
  this.timeout(timeoutFor(BUDGET));

  it('decodeHello throws nothing but HelloError, and what it accepts is a well-formed hello', async function () {
    await fuzz('mirror decodeHello', fc.property(helloBodyArb, (body) => {
      let h: Hello;
      try {
        h = decodeHello(body);
      } catch (err) {
        if (!(err instanceof HelloError)) throw new Error(`decodeHello threw ${(err as Error)?.constructor?.name}: ${(err as Error)?.message}`);
        return;
      }
      expect(h.version).to.equal(PROTOCOL_VERSION);
      expect([HELLO_OFFER, HELLO_ANSWER]).to.include(h.kind);
      expect(h.session.length).to.equal(8);
      if (h.kind === HELLO_OFFER) expect(h.answers).to.deep.equal([]);
      else expect(h.offers).to.deep.equal([]);
      for (const o of h.offers) {
        expect(o.instance.length).to.equal(8);
        expect(Number.isInteger(o.id) && o.id >= 0 && o.id <= 0xffff).to.equal(true);
      }
      // What was accepted re-encodes to the same bytes when nothing was lossy (UTF-8, u64 < 2^53).
      const lossless = wellFormed(h.site) && Buffer.byteLength(h.site) === body.readUInt16BE(18)
        && h.offers.every((o) => Number.isSafeInteger(o.size) && Number.isSafeInteger(o.nextSeq))
        && h.answers.every((a) => Number.isSafeInteger(a.size));
      const names = h.offers.every((o) => !o.name.includes('\ufffd')) && !h.site.includes('\ufffd');
      if (lossless && names) expect(encodeHello(h).subarray(4).toString('hex')).to.equal(body.toString('hex'));
    }), BUDGET);
  });

  it('encodeHello/decodeHello round-trip every valid hello', async function () {
    await fuzz('mirror hello round trip', fc.property(helloArb, (h) => {
      const buf = encodeHello(h);
      expect(buf.readUInt32BE(0)).to.equal(buf.length - 4);
      expect(decodeHello(buf.subarray(4))).to.deep.equal({ version: PROTOCOL_VERSION, ...h });
    }), BUDGET);
  });

  it('readRequestHeader never throws on any 40 bytes and rejects exactly bad magic / u64 >= 2^53', async function () {
    const arb = fc.tuple(bytes(REQUEST_HEADER_SIZE + 16, REQUEST_HEADER_SIZE), fc.nat(), fc.boolean()).map(([b, at, magic]) => {
      const off = at % (b.length - REQUEST_HEADER_SIZE + 1);
      if (magic) b.writeUInt32BE(REQUEST_MAGIC, off);
      return { b, off };
    });
    await fuzz('mirror readRequestHeader', fc.property(arb, ({ b, off }) => {
      const h = readRequestHeader(b, off);
      const magicOk = b.readUInt32BE(off) === REQUEST_MAGIC;
      const rangeOk = [12, 20, 28].every((o) => b.readUInt32BE(off + o) < 0x200000);
      expect(h !== null).to.equal(magicOk && rangeOk);
      if (!h) return;
      const again = Buffer.alloc(REQUEST_HEADER_SIZE);
      writeRequestHeader(again, h);
      expect(again.toString('hex')).to.equal(b.subarray(off, off + REQUEST_HEADER_SIZE).toString('hex'));
    }), BUDGET);
  });

  it('writeRequestHeader/readRequestHeader round-trip every header with u64 fields < 2^53', async function () {
    const arb: fc.Arbitrary<MirrorRequestHeader> = fc.record({
      type: fc.integer({ min: 0, max: 255 }), flags: fc.integer({ min: 0, max: 255 }), lunId: u16,
      reqId: fc.integer({ min: 0, max: 0xffffffff }), seq: u64, dep: u64, offset: u64, length: fc.integer({ min: 0, max: 0xffffffff }),
    });
    await fuzz('mirror request header round trip', fc.property(arb, fc.nat(8), (r, at) => {
      const buf = Buffer.alloc(at + REQUEST_HEADER_SIZE);
      writeRequestHeader(buf.subarray(at), r);
      expect(readRequestHeader(buf, at)).to.deep.equal(r);
    }), BUDGET);
  });
});

function wellFormed(s: string): boolean {
  return Buffer.from(s, 'utf8').toString('utf8') === s;
}
