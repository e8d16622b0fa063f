// judgeFreshness (src/health/heartbeat-freshness.ts): which authentic heartbeat is accepted and
// why the others are ignored, as a table over what the receiver remembers of the peer — with a
// key (boot nonces) and without (counters and the sender's clock only).
import { expect } from 'chai';
import { judgeFreshness, type Freshness, type FreshnessInput, type PeerMemory } from '../../src/health/heartbeat-freshness.js';

// Boot nonces, named for readability: A the current peer boot, R an earlier (retired) one, N a new one.
const A = Buffer.alloc(8, 0xaa);
const R = Buffer.alloc(8, 0x11);
const N = Buffer.alloc(8, 0x77);

/** The current boot A: last accepted counter 10, sent at t=5000. */
const KNOWN_A: PeerMemory = { last: { nonce: A, counter: 10, sentAtMs: 5000 }, retired: [R], unprovenSentAtMs: null };
/** We just started: no boot known, nothing echoed yet. */
const NONE: PeerMemory = { last: null, retired: [], unprovenSentAtMs: null };
/** No boot known, already echoing an unproven datagram sent at t=5000. */
const ECHOING: PeerMemory = { last: null, retired: [], unprovenSentAtMs: 5000 };
/** Without a key: last accepted counter 10, sent at t=5000. */
const PLAIN: PeerMemory = { last: { nonce: null, counter: 10, sentAtMs: 5000 }, retired: [], unprovenSentAtMs: null };

function dg(nonce: Buffer | null, counter: number, sentAtMs: number, echoesUs = false): FreshnessInput {
  return { nonce, counter, sentAtMs, echoesUs };
}

const ACCEPT = (boot: 'same' | 'first' | 'restart'): Freshness => ({ accept: true, boot });
const REPLAY = (why: 'not-ahead' | 'retired' | 'older-boot'): Freshness => ({ accept: false, reason: 'replay', why });
const UNPROVEN = (echo: boolean): Freshness => ({ accept: false, reason: 'unproven', echo });

const CASES: { name: string; peer: PeerMemory; d: FreshnessInput; verdict: Freshness }[] = [
  // ---- with a key, the current boot ----
  { name: 'current nonce, next counter', peer: KNOWN_A, d: dg(A, 11, 5100), verdict: ACCEPT('same') },
  { name: 'current nonce, a counter far ahead (a delayed genuine datagram), whatever its clock', peer: KNOWN_A, d: dg(A, 99, 1), verdict: ACCEPT('same') },
  { name: 'current nonce, the same counter: a duplicate', peer: KNOWN_A, d: dg(A, 10, 5000), verdict: REPLAY('not-ahead') },
  { name: 'current nonce, an older counter, even sent later', peer: KNOWN_A, d: dg(A, 9, 9000), verdict: REPLAY('not-ahead') },
  { name: 'current nonce, an older counter that echoes us: still a replay', peer: KNOWN_A, d: dg(A, 9, 9000, true), verdict: REPLAY('not-ahead') },
  // ---- with a key, an earlier boot ----
  { name: 'a retired nonce, sent later and echoing us: never again', peer: KNOWN_A, d: dg(R, 50, 9000, true), verdict: REPLAY('retired') },
  // ---- with a key, a new boot while one is known ----
  { name: 'new nonce sent later than the last accepted: a restart (b)', peer: KNOWN_A, d: dg(N, 1, 5001), verdict: ACCEPT('restart') },
  { name: 'new nonce sent earlier, but echoing us: a restart (a), the clock stepped back', peer: KNOWN_A, d: dg(N, 1, 4000, true), verdict: ACCEPT('restart') },
  { name: 'new nonce sent at the same ms, not echoing us: an older boot replayed', peer: KNOWN_A, d: dg(N, 1, 5000), verdict: REPLAY('older-boot') },
  { name: 'new nonce sent earlier, not echoing us: an older boot replayed', peer: KNOWN_A, d: dg(N, 40, 100), verdict: REPLAY('older-boot') },
  // ---- with a key, no boot known (we just started) ----
  { name: 'no boot known, echoes us: the first boot proven (a)', peer: NONE, d: dg(N, 3, 100, true), verdict: ACCEPT('first') },
  { name: 'no boot known, echoes us, even while echoing a newer unproven one', peer: ECHOING, d: dg(N, 3, 100, true), verdict: ACCEPT('first') },
  { name: 'no boot known, no echo, nothing echoed yet: unproven, echo it', peer: NONE, d: dg(N, 1, 100), verdict: UNPROVEN(true) },
  { name: 'no boot known, no echo, sent after the one echoed: unproven, echo it instead', peer: ECHOING, d: dg(N, 2, 5001), verdict: UNPROVEN(true) },
  { name: 'no boot known, no echo, sent at the same ms as the one echoed: echo it', peer: ECHOING, d: dg(N, 2, 5000), verdict: UNPROVEN(true) },
  { name: 'no boot known, no echo, sent before the one echoed (a replay): unproven, keep the echo', peer: ECHOING, d: dg(R, 9, 4999), verdict: UNPROVEN(false) },
  { name: 'no boot known: a retired nonce is still refused first', peer: { ...NONE, retired: [R] }, d: dg(R, 1, 9000, true), verdict: REPLAY('retired') },
  // ---- without a key ----
  { name: 'unsigned, nothing accepted yet: the first datagram', peer: NONE, d: dg(null, 500, 1), verdict: ACCEPT('first') },
  { name: 'unsigned, a higher counter, whatever its clock', peer: PLAIN, d: dg(null, 11, 1), verdict: ACCEPT('same') },
  { name: 'unsigned, the same counter sent later: a duplicate', peer: PLAIN, d: dg(null, 10, 9000), verdict: REPLAY('not-ahead') },
  { name: 'unsigned, a lower counter sent later: a counter reset (restart)', peer: PLAIN, d: dg(null, 1, 5001), verdict: ACCEPT('restart') },
  { name: 'unsigned, a lower counter sent at the same ms: a replay', peer: PLAIN, d: dg(null, 1, 5000), verdict: REPLAY('not-ahead') },
  { name: 'unsigned, a lower counter sent earlier: a replay', peer: PLAIN, d: dg(null, 9, 4000), verdict: REPLAY('not-ahead') },
  { name: 'unsigned: "echoes us" proves nothing without a key', peer: PLAIN, d: dg(null, 9, 4000, true), verdict: REPLAY('not-ahead') },
];

describe('health/heartbeat-freshness: judgeFreshness', () => {
  for (const c of CASES) {
    it(c.name, () => {
      expect(judgeFreshness(c.d, c.peer)).to.deep.equal(c.verdict);
    });
  }

  it('every verdict of the table occurs (the table covers each outcome)', () => {
    const seen = new Set(CASES.map((c) => JSON.stringify(judgeFreshness(c.d, c.peer))));
    const all = [ACCEPT('same'), ACCEPT('first'), ACCEPT('restart'), REPLAY('not-ahead'), REPLAY('retired'),
      REPLAY('older-boot'), UNPROVEN(true), UNPROVEN(false)].map((v) => JSON.stringify(v));
    expect([...seen].sort()).to.deep.equal(all.sort());
  });

  it('does not change what it is given', () => {
    const peer: PeerMemory = { last: { nonce: Buffer.from(A), counter: 10, sentAtMs: 5000 }, retired: [Buffer.from(R)], unprovenSentAtMs: null };
    const before = JSON.stringify(peer);
    for (const c of CASES) judgeFreshness(c.d, peer);
    expect(JSON.stringify(peer)).to.equal(before);
  });
});
