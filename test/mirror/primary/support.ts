// Test doubles for the primary's mirror: a link that behaves like MirrorPool (ops fail with
// ENOTCONN while it is down, a disconnect fails every unanswered op and then reports the
// outage), a peer that applies what it is sent into memory and answers HASH from it, and a
// LunMirror over temp files (backing, journal, bitmap, metadata) wired to that link.
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import fs from 'node:fs/promises';
import winston from 'winston';
import type { Logger } from '../../../src/log.js';
import type { MirrorOp } from '../../../src/mirror/peer-connection.js';
import { ENOTCONN } from '../../../src/mirror/peer-connection.js';
import type { MirrorLink } from '../../../src/mirror/pool.js';
import { LunMirror } from '../../../src/mirror/primary/lun-mirror.js';
import { RateLimiter } from '../../../src/mirror/primary/rate-limit.js';
import { MIRROR_OP, PAIR, SYNC, type LunAnswer } from '../../../src/mirror/wire.js';
import { RegionBitmap } from '../../../src/persist/bitmap.js';
import { Journal } from '../../../src/persist/journal.js';
import { LunMeta } from '../../../src/persist/lun-meta.js';
import { Backing } from '../../../src/storage/backing.js';
import { sparseFile, tmpDir, type TmpDir } from '../../helpers/tmp.js';

/** What the fake peer holds of the LUN, and how it answers. */
export class FakePeer {
  readonly data: Buffer;
  /** Hold WRITE/WRITE_ZEROES answers (the test answers them); control ops are always answered. */
  hold = false;
  constructor(size: number) {
    this.data = Buffer.alloc(size);
  }

  apply(op: MirrorOp): void {
    if (op.type === MIRROR_OP.WRITE) op.payload!.copy(this.data, op.offset);
    else if (op.type === MIRROR_OP.WRITE_ZEROES) this.data.fill(0, op.offset, op.offset + op.length);
  }

  digest(offset: number, length: number): Buffer {
    return createHash('sha256').update(this.data.subarray(offset, offset + length)).digest();
  }
}

export class FakeLink extends EventEmitter<{ sent: [op: MirrorOp] }> implements MirrorLink {
  up = false;
  downReason = '';
  /** Every op sent while up, in order. */
  readonly sent: MirrorOp[] = [];
  /** Ops sent while down (they fail with ENOTCONN). */
  readonly sentWhileDown: MirrorOp[] = [];
  /** Sent and not answered. */
  readonly unanswered = new Set<MirrorOp>();
  /** The LUN's outage handler (the sender's pool 'down' → linkDown). */
  onDown: ((reason: string) => void) | null = null;

  constructor(readonly peer: FakePeer) {
    super();
  }

  send(op: MirrorOp): void {
    if (!this.up) {
      this.sentWhileDown.push(op);
      queueMicrotask(() => op.done(ENOTCONN));
      return;
    }
    this.sent.push(op);
    this.unanswered.add(op);
    this.emit('sent', op);
    const isWrite = op.type === MIRROR_OP.WRITE || op.type === MIRROR_OP.WRITE_ZEROES;
    if (!isWrite || !this.peer.hold) queueMicrotask(() => { if (this.unanswered.has(op)) this.answer(op); });
  }

  /** Answer `op` as the peer would (applying it first), or with `errno`. */
  answer(op: MirrorOp, errno = 0): void {
    if (!this.unanswered.delete(op)) throw new Error(`op ${op.seq} is not waiting for an answer`);
    if (errno !== 0) return op.done(errno);
    this.peer.apply(op);
    op.done(0, op.type === MIRROR_OP.HASH ? this.peer.digest(op.offset, op.length) : undefined);
  }

  disconnect(reason: string): void {
    if (!this.up) return;
    this.up = false;
    this.downReason = reason;
    const ops = [...this.unanswered];
    this.unanswered.clear();
    for (const op of ops) op.done(ENOTCONN);
    this.onDown?.(reason);
  }

  /** Resolves once `n` ops have been sent in all (counting from the start). */
  sentCount(n: number): Promise<void> {
    if (this.sent.length >= n) return Promise.resolve();
    return new Promise((resolve) => {
      const on = () => {
        if (this.sent.length < n) return;
        this.off('sent', on);
        resolve();
      };
      this.on('sent', on);
    });
  }

  /** Resolves with the first op sent from now on that `match` accepts. */
  next(match: (op: MirrorOp) => boolean): Promise<MirrorOp> {
    return new Promise((resolve) => {
      const on = (op: MirrorOp) => {
        if (!match(op)) return;
        this.off('sent', on);
        resolve(op);
      };
      this.on('sent', on);
    });
  }
}

export interface StoreOptions {
  size?: number;
  regionSize?: number;
  /** Before the backing is opened: local data to write, and bitmap regions to mark (a crashed run's leftovers). */
  prepare?: (f: { file: string; bitmap: RegionBitmap }) => Promise<void>;
}

/** A LUN's files (backing, journal, bitmap, metadata) in a temp dir, a fake peer and a link to it. */
export interface Store {
  dir: TmpDir;
  file: string;
  size: number;
  backing: Backing;
  journal: Journal;
  bitmap: RegionBitmap;
  meta: LunMeta;
  peer: FakePeer;
  link: FakeLink;
  close(): Promise<void>;
}

export async function openStore(opts: StoreOptions = {}): Promise<Store> {
  const size = opts.size ?? 1024 * 1024;
  const dir = await tmpDir('nbd-lun-mirror-test-');
  const file = await sparseFile(dir.join('lun.img'), size);
  const bitmap = await RegionBitmap.open(dir.join('lun.bitmap'), size, opts.regionSize ?? 64 * 1024);
  await opts.prepare?.({ file, bitmap });
  const backing = await Backing.open(file, false);
  const { journal } = await Journal.open(dir.join('lun.journal'), 'lun0', size);
  const meta = await LunMeta.open(dir.join('lun.meta'), 'lun0', size, 'primary');
  const peer = new FakePeer(size);
  const link = new FakeLink(peer);
  return {
    dir, file, size, backing, journal, bitmap, meta, peer, link,
    async close() {
      link.onDown = null;
      link.disconnect('test over');
      await Promise.allSettled([journal.close(), bitmap.close(), backing.close()]);
      await dir.cleanup();
    },
  };
}

export const silent = (): Logger => winston.createLogger({ silent: true });

export interface Fixture extends Store {
  mirror: LunMirror;
  /** Bring the link up and answer the pairing (OK unless told otherwise). */
  pair(answer?: Partial<LunAnswer>): void;
}

export interface FixtureOptions extends StoreOptions {
  mode?: 'sync' | 'async';
  windowBytes?: number;
  maxJournalBytes?: number;
  /** Call recover() as the site does after opening the store. */
  recover?: boolean;
}

/** A LunMirror over a Store, wired to its link as the sender wires it to the pool. */
export async function fixture(opts: FixtureOptions = {}): Promise<Fixture> {
  const st = await openStore(opts);
  const { size, backing, journal, bitmap, meta, link } = st;
  const mirror = new LunMirror('lun0', opts.mode ?? 'sync', backing, link, { journal, bitmap, maxJournalBytes: opts.maxJournalBytes ?? 256 * 1024 * 1024 },
    opts.windowBytes ?? 8 * 1024 * 1024, silent(), meta, new RateLimiter(1024 * 1024 * 1024));
  link.onDown = (reason) => mirror.linkDown(reason);
  mirror.renegotiate = (reason) => link.disconnect(`renegotiating: ${reason}`);
  if (opts.recover) mirror.recover();
  return {
    ...st, mirror,
    pair(answer = {}) {
      link.up = true;
      mirror.offer(0, size);
      mirror.paired({ id: 0, status: PAIR.OK, size, sync: SYNC.INCREMENTAL, current: meta.current, applied: 0, copy: 'copy-1', ...answer });
    },
  };
}

/** Write `data` at `offset` of a file (local data as a crashed run left it). */
export async function writeAt(file: string, offset: number, data: Buffer): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

/** A buffer of `n` bytes all `byte`. */
export function filled(n: number, byte: number): Buffer {
  return Buffer.alloc(n, byte);
}
