// The journal and dirty bitmap of each mirrored primary LUN: opened (and recovered) under
// dataDir, closed once, whichever of demote, removal or shutdown comes first.
import fs from 'node:fs';
import type { Logger } from '../log.js';
import type { MirrorStore } from '../mirror/primary/lun-mirror.js';
import { BitmapError, RegionBitmap } from '../persist/bitmap.js';
import { Journal, type JournalRecovery } from '../persist/journal.js';
import type { DataDir } from './data-dir.js';

export class MirrorStores {
  private readonly stores: MirrorStore[] = [];
  private readonly recoveries = new Map<string, JournalRecovery>();

  constructor(
    private readonly files: DataDir,
    private readonly cfg: { regionSize: number; maxBytes: number },
    private readonly log: Logger,
  ) {}

  /** What the journal's recovery found when the LUN's mirror was opened (status shows it). */
  recovery(lun: string): JournalRecovery | null {
    return this.recoveries.get(lun) ?? null;
  }

  /** Open (and recover) a LUN's journal and bitmap; `fresh` first drops what an earlier primary life left. */
  async open(lun: { name: string; size: number }, fresh: boolean): Promise<MirrorStore> {
    if (fresh) this.files.dropPrimaryFiles(lun.name);
    const { journal, recovery } = await Journal.open(this.files.journal(lun.name), lun.name, lun.size);
    let bitmap: RegionBitmap;
    try {
      bitmap = await this.openBitmap(this.files.bitmap(lun.name), lun);
    } catch (err) {
      await journal.close().catch(() => undefined);
      throw err;
    }
    const store: MirrorStore = { journal, bitmap, maxJournalBytes: this.cfg.maxBytes };
    this.stores.push(store);
    this.recoveries.set(lun.name, recovery);
    if (recovery.corrupt) {
      this.log.error('journal corrupt: valid records kept, the rest is resynced from the dirty bitmap', {
        lun: lun.name, offset: recovery.corrupt.offset, reason: recovery.corrupt.reason, savedAs: recovery.corrupt.savedAs,
      });
    } else if (recovery.tornTailBytes > 0) {
      this.log.info('journal had a torn tail (a write cut off by a crash); dropped', { lun: lun.name, bytes: recovery.tornTailBytes });
    }
    return store;
  }

  async close(store: MirrorStore): Promise<void> {
    const i = this.stores.indexOf(store);
    if (i < 0) return;
    this.stores.splice(i, 1);
    await store.bitmap.close().catch(() => undefined);
    await store.journal.close().catch(() => undefined);
  }

  async closeAll(): Promise<void> {
    for (const st of [...this.stores]) await this.close(st);
  }

  /**
   * The LUN's dirty bitmap. One written for another region size (config changed) cannot be
   * read: it is set aside and replaced by one with every region marked, so the LUN resyncs whole
   * rather than the site refusing to start.
   */
  private async openBitmap(path: string, lun: { name: string; size: number }): Promise<RegionBitmap> {
    try {
      return await RegionBitmap.open(path, lun.size, this.cfg.regionSize);
    } catch (err) {
      if (!(err instanceof BitmapError)) throw err;
      const aside = `${path}.unusable-${Date.now()}`;
      fs.renameSync(path, aside);
      const bitmap = await RegionBitmap.open(path, lun.size, this.cfg.regionSize);
      await bitmap.mark(0, lun.size);
      await bitmap.sync();
      this.log.warn('dirty bitmap unusable (region size or LUN size changed): every region marked for resync', {
        lun: lun.name, error: err.message, savedAs: aside,
      });
      return bitmap;
    }
  }
}
