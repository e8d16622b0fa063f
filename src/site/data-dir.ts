// The one place that names the files a site keeps under dataDir, per LUN.
import fs from 'node:fs';

export class DataDir {
  constructor(readonly dir: string) {}

  private file(lun: string, ext: string): string {
    return `${this.dir.replace(/\/+$/, '')}/${lun}.${ext}`;
  }

  /** Generation ids and role (both roles of a mirrored site). */
  meta(lun: string): string { return this.file(lun, 'meta'); }
  /** Primary: the outage journal and the dirty-region bitmap. */
  journal(lun: string): string { return this.file(lun, 'journal'); }
  bitmap(lun: string): string { return this.file(lun, 'bitmap'); }
  /** Secondary: the undo log of a resync, and how far it applied the primary's requests. */
  undo(lun: string): string { return this.file(lun, 'undo'); }
  applied(lun: string): string { return this.file(lun, 'applied'); }

  /** A primary's journal and bitmap describe changes along one line of history: void after a role change. */
  dropPrimaryFiles(lun: string): void {
    for (const path of [this.journal(lun), this.bitmap(lun)]) fs.rmSync(path, { force: true });
  }
}
