// What the catch-up workers (replay.ts, compare.ts, resync.ts, verify.ts) need of the CatchUp
// that runs them: its own type, so the workers and catch-up.ts do not import each other.
import type { RateLimiter } from './rate-limit.js';
import type { Replicator } from './replicator.js';

export interface WorkerContext {
  readonly r: Replicator;
  readonly rate: RateLimiter;
  /** The worker under way, if any. */
  readonly worker: Promise<void> | null;
  /** Start the worker, or have the running one start over when it ends. */
  kick(): void;
  logProgress(what: 'replay' | 'resync' | 'sync' | 'verify', done: number, total: number): void;
}
