// A LUN's persistent identity under dataDir (<lun>.meta, JSON, 0600), in DRBD's manner: a
// generation id that changes whenever the data starts a new line of history, the ids it had
// before, and what the site must remember across restarts (its role after promote/demote, an
// unfinished sync, a split brain). Both sites compare these on every pairing (pairing.ts).
//
// Written atomically: a temporary file, fsync, rename, fsync of the directory.
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import { replaceFileAtomic } from './file-io.js';
import { SerialWriter } from './serial-writer.js';

/** "Never had a copy": a secondary created empty, or one whose changes were discarded. */
export const NO_GENERATION = '0000000000000000';
const HISTORY = 16;

export interface LunMetaData {
  version: 1;
  lun: string;
  size: number;
  /** Role from the last promote/demote (overrides the configured role), or null: as configured. */
  role: 'primary' | 'secondary' | null;
  current: string;
  history: string[];
  /**
   * Secondary: false from the first write of a resync or initial sync until it completed
   * (the data is then no copy of any state of the primary; the undo log can roll it back).
   */
  consistent: boolean;
  /** Writes were made here that the peer may lack when this LUN was demoted: resync it whole. */
  localChanges: boolean;
  /** Set when both sites wrote as primary while apart; cleared by `resolve`. */
  splitBrain: { detectedMs: number; peerCurrent: string } | null;
  /** After `resolve --discard-remote`: the next pairing overrides the peer's data. */
  discardPeer: boolean;
  /**
   * Primary: the generation the peer had when it last caught up (or this LUN's generation when
   * it was promoted): the journal and bitmap hold every change since. '' if none.
   */
  peerBase: string;
  /** Primary: the bits of the bitmap are regions to compare first (an initial sync under way). */
  syncCompare: boolean;
  /** Primary: the peer's copy that compare runs against (a different copy starts it over). */
  syncPeerCopy?: string;
  /**
   * This copy's identity, told to the primary in the pairing answer: new when the metadata is
   * created and at every promote or demote (the copy then changes by other means than mirroring).
   */
  copyId?: string;
  /**
   * When this copy was promoted although it had never completed an initial sync (forced): its
   * data is no state of the old primary, and status says so from then on. Absent/null: never.
   */
  promotedNeverSynced?: number | null;
  updatedMs: number;
}

export class LunMeta {
  private constructor(private readonly file: string, public data: LunMetaData) {}

  static async open(file: string, lun: string, size: number, configuredRole: 'primary' | 'secondary'): Promise<LunMeta> {
    let data: LunMetaData | null = null;
    try {
      data = JSON.parse(await fs.readFile(file, 'utf8')) as LunMetaData;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new Error(`${file}: unreadable LUN metadata: ${(err as Error).message}`);
    }
    if (data && (data.version !== 1 || data.lun !== lun || typeof data.current !== 'string')) {
      throw new Error(`${file}: metadata of another LUN or version (${data.lun}, v${data.version})`);
    }
    const meta = new LunMeta(file, data ?? {
      version: 1, lun, size, role: null,
      // A new primary starts a history; a new secondary has no copy of anything yet.
      current: configuredRole === 'primary' ? newGeneration() : NO_GENERATION,
      history: [], consistent: true, localChanges: false, splitBrain: null, discardPeer: false,
      peerBase: '', syncCompare: false, copyId: newGeneration(), updatedMs: Date.now(),
    });
    if (!data || !data.copyId) {
      meta.data.copyId ??= newGeneration();
      await meta.save();
    }
    return meta;
  }

  get current(): string { return this.data.current; }

  /** A secondary that never completed an initial sync (or whose copy was discarded) holds no state of any primary. */
  get neverSynced(): boolean { return this.data.current === NO_GENERATION; }

  /** Consistent: some past state of the primary (false while a resync runs, and for a never-synced copy). */
  get consistent(): boolean { return this.data.consistent && !this.neverSynced; }

  /** Start a new generation (promotion; a primary's first write the peer does not have). */
  rotate(): Promise<void> {
    this.data.history = [this.data.current, ...this.data.history].filter((g) => g !== NO_GENERATION).slice(0, HISTORY);
    this.data.current = newGeneration();
    return this.save();
  }

  /** A secondary that caught up with the primary takes its generation and history. */
  adopt(current: string, history: string[]): Promise<void> {
    this.data.current = current;
    this.data.history = history.slice(0, HISTORY);
    this.data.consistent = true;
    this.data.localChanges = false;
    return this.save();
  }

  async update(change: Partial<LunMetaData>): Promise<void> {
    Object.assign(this.data, change);
    await this.save();
  }

  /**
   * Saves run one at a time (each writes the latest data), so none renames another's temporary
   * file. A failed save is the caller's to handle: later saves still run (nothing is latched).
   */
  save(): Promise<void> {
    return this.writer.barrier(() => this.write());
  }

  private readonly writer = new SerialWriter();

  private async write(): Promise<void> {
    this.data.updatedMs = Date.now();
    await replaceFileAtomic(this.file, `${this.file}.tmp`, Buffer.from(JSON.stringify(this.data, null, 2) + '\n', 'utf8'));
  }
}

export function newGeneration(): string {
  let g: string;
  do g = crypto.randomBytes(8).toString('hex'); while (g === NO_GENERATION);
  return g;
}
