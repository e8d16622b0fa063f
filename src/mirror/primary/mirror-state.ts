// The states of a primary LUN's mirror and the transitions between them; the table and the
// events behind each transition are in lun-mirror.ts's header. transition() checks every change
// against ALLOWED, so a state the code cannot justify is an error, not a status line.

/** Pairing states (the peer has not taken this LUN) and replication states (it has, or had). */
export type MirrorState = 'connecting' | 'uptodate' | 'journaling' | 'replaying' | 'syncing' | 'resyncing' | 'unpaired' | 'split-brain';
/** Where new writes go: to the peer, into the journal, or only into the bitmap (journal overflowed). */
export type WritePath = 'live' | 'journal' | 'bitmap';

const REFUSED = ['unpaired', 'split-brain'] as const;

/** to-states allowed from each state (a state may always stay, with a new reason). */
export const ALLOWED: Readonly<Record<MirrorState, readonly MirrorState[]>> = {
  'connecting': ['journaling', 'replaying', 'syncing', 'resyncing', 'uptodate', ...REFUSED],
  'unpaired': ['journaling', 'replaying', 'syncing', 'resyncing', 'uptodate', ...REFUSED],
  'split-brain': ['journaling', ...REFUSED],
  'journaling': ['replaying', 'syncing', 'resyncing', 'uptodate', ...REFUSED],
  'replaying': ['journaling', 'syncing', 'resyncing', 'uptodate', ...REFUSED],
  'syncing': ['journaling', 'resyncing', 'uptodate', ...REFUSED],
  'resyncing': ['journaling', 'syncing', 'uptodate', ...REFUSED],
  'uptodate': ['journaling', 'syncing', 'resyncing', ...REFUSED],
};

export class IllegalTransition extends Error {}

/** Throws IllegalTransition unless from → to is in the table. */
export function checkTransition(from: MirrorState, to: MirrorState, reason: string): void {
  if (from !== to && !ALLOWED[from].includes(to)) throw new IllegalTransition(`mirror state ${from} → ${to} is not allowed (${reason})`);
}
