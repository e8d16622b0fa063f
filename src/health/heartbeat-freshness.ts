// Which authentic heartbeat datagram from the peer is accepted, and why the others are ignored
// (the rules: docs/heartbeat.md, "Freshness"). Pure: the endpoint passes what it remembers of the
// peer and applies the verdict, so every rule is tested by a table (test/health/heartbeat-freshness.test.ts).

/** A datagram from the peer, as far as freshness goes: its MAC verified if signed, its site checked. */
export interface FreshnessInput {
  counter: number;
  sentAtMs: number;
  /** The sender's boot nonce; null for an unsigned datagram (we have no key). */
  nonce: Buffer | null;
  /** It echoes our own nonce with a counter among our last datagrams: made after we sent that one. */
  echoesUs: boolean;
}

/** What the receiver remembers of the peer. */
export interface PeerMemory {
  /** The last datagram accepted (of the current peer boot); null if none yet. */
  last: { nonce: Buffer | null; counter: number; sentAtMs: number } | null;
  /** Nonces of earlier peer boots, accepted once and since replaced. */
  retired: readonly Buffer[];
  /** While no boot is known: sentAtMs of the 'unproven' datagram our datagrams echo, null if none. */
  unprovenSentAtMs: number | null;
}

/** Why a datagram is a replay. */
export type ReplayWhy =
  /** The current boot (or, without a key, any datagram): a counter not ahead of the last accepted. */
  | 'not-ahead'
  /** The nonce of an earlier peer boot. */
  | 'retired'
  /** A new nonce, not echoing us and sent no later than the last datagram accepted. */
  | 'older-boot';

export type Freshness =
  /** same: the current boot goes on (or the first datagram, without a key); first: the first
   * peer boot proven (with a key); restart: a new peer boot replaces the current one. */
  | { accept: true; boot: 'same' | 'first' | 'restart' }
  | { accept: false; reason: 'replay'; why: ReplayWhy }
  /** With a key, no boot known and no proof: echo it (`echo`) if it is the newest such datagram. */
  | { accept: false; reason: 'unproven'; echo: boolean };

/** The log text of each kind of replay (not-ahead logs the counters instead). */
export const REPLAY_WHY: Record<Exclude<ReplayWhy, 'not-ahead'>, string> = {
  retired: 'an earlier boot of the peer',
  'older-boot': 'a new boot nonce, sent earlier than the last datagram accepted',
};

/** Is `d` fresh, given what we remember of the peer? */
export function judgeFreshness(d: FreshnessInput, peer: PeerMemory): Freshness {
  const { last } = peer;
  if (d.nonce) {
    // Authenticated: by boot nonce and counter.
    const nonce = d.nonce;
    if (last?.nonce?.equals(nonce)) {
      return d.counter > last.counter ? { accept: true, boot: 'same' } : replay('not-ahead');
    }
    if (peer.retired.some((n) => n.equals(nonce))) return replay('retired');
    if (d.echoesUs || (last !== null && d.sentAtMs > last.sentAtMs)) return { accept: true, boot: last ? 'restart' : 'first' };
    if (last) return replay('older-boot');
    // Keep echoing the newest unproven datagram: a replay of an older boot cannot displace it.
    return { accept: false, reason: 'unproven', echo: peer.unprovenSentAtMs === null || d.sentAtMs >= peer.unprovenSentAtMs };
  }
  // Unauthenticated: a higher counter is fresh; a lower one sent later is a counter reset.
  if (!last) return { accept: true, boot: 'first' };
  if (d.counter > last.counter) return { accept: true, boot: 'same' };
  if (d.counter === last.counter || d.sentAtMs <= last.sentAtMs) return replay('not-ahead');
  return { accept: true, boot: 'restart' };
}

function replay(why: ReplayWhy): Freshness {
  return { accept: false, reason: 'replay', why };
}
