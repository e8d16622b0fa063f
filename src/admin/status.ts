// The site's status snapshot: what GET /status returns and what the metrics read at scrape
// time (one type for both, built by site/status.ts).
import type { HeartbeatStats } from '../health/heartbeat.js';
import type { LunCounters } from '../lun/lun.js';
import type { LunMirror } from '../mirror/primary/lun-mirror.js';
import type { Protection } from '../mirror/primary/protection.js';
import type { SecondaryStatus } from '../mirror/secondary/secondary-lun.js';
import type { LunMetaData } from '../persist/lun-meta.js';
import type { JournalRecovery } from '../persist/journal.js';
import type { MirrorTlsStats } from '../security/mirror-tls.js';
import type { HostTlsStats } from '../nbd/tls.js';

export interface SiteStatus {
  site: string;
  version: string;
  process: {
    pid: number; uptimeSeconds: number; node: string; rssBytes: number; eventLoopDelayMaxMs: number;
    heapUsedBytes: number; heapTotalBytes: number; externalBytes: number; arrayBuffersBytes: number;
  };
  listen: { address: string; family: string; port: number } | null;
  hostTls: ({ mode: string } & HostTlsStats) | null;
  mirror: MirrorLinkStatus | null;
  luns: LunStatus[];
  summary: { luns: number; states: Record<string, number>; localOnly: string[]; journalBytes: number };
}

export interface MirrorLinkStatus {
  listen: { address: string; family: string; port: number } | null;
  peer: string;
  link: string;
  health: string;
  tls: string;
  authentication: MirrorTlsStats;
  heartbeat: HeartbeatStats | undefined;
  connections: Array<{ index: number; status: string; lastSeen: number; inflight: number }>;
}

/** A LUN's generation record as status shows it. */
export interface GenerationStatus {
  current: string; history: string[]; consistent: boolean; localChanges: boolean;
  splitBrain: LunMetaData['splitBrain']; peerBase: string | null; neverSynced: boolean;
  promotedNeverSynced?: string; dataOrigin?: string;
}

interface LunStatusBase {
  name: string; path: string; size: number; role: 'primary' | 'secondary'; mode: string; readOnly: boolean; hosts: number;
  counters: LunCounters; state: string; generation?: GenerationStatus;
}

export interface StandaloneLunStatus extends LunStatusBase { state: 'standalone' }

export interface PrimaryLunStatus extends LunStatusBase {
  reason: string; writePath: LunMirror['path'];
  protection: Protection; protectionReason: string | null;
  catchup: { done: number; total: number; percent: number } | null;
  etaSeconds: number | null;
  mirrored: LunMirror['stats']; inflight: number; lagBytes: number;
  journal: { records: number; bytes: number; oldestAgeMs: number | null };
  dirtyRegions: number; resyncPending: number;
  progress: LunMirror['progress']; sync: LunMirror['sync']; verify: LunMirror['verifying'];
  recovery: JournalRecovery | null;
}

/** A secondary: the common fields, then its SecondaryLun's own (mirror/secondary/secondary-lun.ts). */
export interface SecondaryLunStatus extends LunStatusBase, SecondaryStatus {
  mode: 'secondary'; state: SecondaryStatus['state'];
}

export type LunStatus = StandaloneLunStatus | PrimaryLunStatus | SecondaryLunStatus;
