// Shared fast-check arbitraries for the mirror wire (hellos), used by several fuzz targets.
import fc from 'fast-check';
import {
  encodeHello, HELLO_ANSWER, HELLO_MAGIC, HELLO_OFFER, MAX_HISTORY, OFFER_FLAG, PROTOCOL_VERSION, SYNC,
  type Hello, type Lineage, type LunAnswer, type LunOffer,
} from '../../src/mirror/wire.js';
import { bytes, utf8String } from './harness.js';

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const u64 = fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: MAX_SAFE }), fc.constant(MAX_SAFE));
const u16 = fc.integer({ min: 0, max: 0xffff });
const u8 = fc.integer({ min: 0, max: 0xff });
const id8 = bytes(8, 8);

const ZERO_GEN = '0000000000000000';
/** A generation id as it comes off the wire: 16 lowercase hex digits (all zeros included). */
export const genArb: fc.Arbitrary<string> = fc.oneof(
  { weight: 8, arbitrary: id8.map((b) => b.toString('hex')) },
  { weight: 1, arbitrary: fc.constantFrom(ZERO_GEN, 'ffffffffffffffff', '0000000000000001') },
);
/** A non-zero generation id (what a peerBase that is set looks like after decoding). */
const setGenArb = genArb.filter((g) => g !== ZERO_GEN);

/**
 * Lineages that round-trip exactly: history of 0..MAX_HISTORY ids, peerBase '' (none) or a
 * non-zero id (an all-zero peerBase decodes to '').
 */
export const lineageArb: fc.Arbitrary<Lineage> = fc.record({
  current: genArb,
  history: fc.oneof(
    { weight: 4, arbitrary: fc.array(genArb, { maxLength: 4 }) },
    { weight: 1, arbitrary: fc.array(genArb, { minLength: MAX_HISTORY - 1, maxLength: MAX_HISTORY }) },
  ),
  peerBase: fc.oneof(fc.constant(''), setGenArb),
});

export const offerFlagsArb = fc.oneof({ weight: 3, arbitrary: fc.constantFrom(0, OFFER_FLAG.FORCE) }, { weight: 1, arbitrary: u16 });

export const helloOfferArb: fc.Arbitrary<LunOffer> = fc.record({
  id: u16, name: utf8String(64), size: u64, instance: id8, nextSeq: u64, lineage: lineageArb, flags: offerFlagsArb,
});
export const answerArb: fc.Arbitrary<LunAnswer> = fc.record({
  id: u16, status: u16, size: u64,
  sync: fc.oneof({ weight: 3, arbitrary: fc.constantFrom(SYNC.INCREMENTAL, SYNC.FULL) }, { weight: 1, arbitrary: u8 }),
  current: genArb, applied: u64,
});

export const helloArb: fc.Arbitrary<Omit<Hello, 'version'>> = fc.oneof(
  fc.record({ kind: fc.constant(HELLO_OFFER), site: utf8String(64), session: id8, offers: fc.array(helloOfferArb, { maxLength: 6 }), answers: fc.constant<LunAnswer[]>([]) }),
  fc.record({ kind: fc.constant(HELLO_ANSWER), site: utf8String(64), session: id8, offers: fc.constant<LunOffer[]>([]), answers: fc.array(answerArb, { maxLength: 6 }) }),
);

/** A hello body (no length prefix): random, or a valid one with bytes overwritten / cut / extended. */
export const helloBodyArb = fc.oneof(
  bytes(120),
  fc.tuple(bytes(100), fc.integer({ min: 0, max: 3 }), u16).map(([rest, kind, siteLen]) => {
    const b = Buffer.concat([HELLO_MAGIC, Buffer.from([PROTOCOL_VERSION >> 8, PROTOCOL_VERSION & 0xff, 0, kind]), Buffer.alloc(8), Buffer.from([siteLen >> 8, siteLen & 0xff]), rest]);
    return b;
  }),
  fc.tuple(helloArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }), fc.option(fc.nat()), bytes(6))
    .map(([h, edits, cut, extra]) => {
      let b = Buffer.from(encodeHello(h).subarray(4));
      for (const [at, v] of edits) b[at % b.length] = v;
      if (cut !== null) b = b.subarray(0, cut % (b.length + 1));
      else if (extra.length) b = Buffer.concat([b, extra]);
      return b;
    }),
);
