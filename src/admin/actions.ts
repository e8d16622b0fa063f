// What an operator can ask a running site to do (through the admin endpoint and the CLI).
// The site implements it; the admin server only routes and reports.

import { NbdMirrorError, type ErrorCode } from '../errors.js';

const ACTION_CODES = { 400: 'bad-request', 404: 'not-found', 409: 'refused' } as const satisfies Record<number, ErrorCode>;

/** A refused action: `status` is the HTTP status the admin endpoint answers with (its code says so). */
export class ActionError extends NbdMirrorError {
  constructor(message: string, readonly status: 400 | 404 | 409 = 409) {
    super(message, { code: ACTION_CODES[status] });
  }
}

export interface VerifyReport {
  lun: string;
  /** Bytes compared, and the granularity differences are reported at. */
  bytes: number;
  regionSize: number;
  /** Ranges whose contents differ between the two sites. */
  differing: Array<{ offset: number; length: number }>;
  /** With repair: ranges resent from the primary (equal to `differing`). */
  repaired: number;
  durationMs: number;
}

export interface RoleChange {
  lun: string;
  role: 'primary' | 'secondary';
  /** What happened, for the operator (e.g. "rolled back an interrupted resync first"). */
  notes: string[];
}

export interface SiteActions {
  /**
   * Make a secondary writable for hosts; refused while the peer is reachable and primary, unless
   * force; refused for a copy that never completed an initial sync, unless neverSynced.
   */
  promote(lun: string, opts: PromoteOptions): Promise<RoleChange>;
  /** Make a primary a secondary (hosts' connections to it are closed; it then takes the peer's data). */
  demote(lun: string): Promise<RoleChange>;
  /** End a split brain: discard this site's changes (local) or the peer's (remote). */
  resolve(lun: string, discard: 'local' | 'remote'): Promise<RoleChange>;
  /** Compare both copies by range hashes while hosts keep writing; with repair, resend what differs. */
  verify(lun: string, opts: { repair: boolean }): Promise<VerifyReport>;
}

/**
 * force: promote although the peer is connected and primary. neverSynced: promote a copy that never
 * completed an initial sync (its data is not a state of the old primary; status keeps saying so).
 */
export interface PromoteOptions { force: boolean; neverSynced?: boolean }
