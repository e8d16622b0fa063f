// Opening, re-rolling and closing a site's LUNs: each LUN gets its role object (a primary's
// mirror, a secondary's SecondaryLun with its undo log and applied point) before hosts see it.
import type { LunConfig, SiteConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../admin/metrics.js';
import { Lun } from '../lun/lun.js';
import { PrimaryRole, SecondaryRole } from '../lun/roles.js';
import type { LunRegistry } from '../lun/registry.js';
import type { LunMirror } from '../mirror/primary/lun-mirror.js';
import type { MirrorReceiver } from '../mirror/secondary/receiver.js';
import { SecondaryLun } from '../mirror/secondary/secondary-lun.js';
import type { MirrorSender } from '../mirror/sender.js';
import type { NbdServer } from '../nbd/server.js';
import { AppliedPoint } from '../persist/applied-point.js';
import { LunMeta } from '../persist/lun-meta.js';
import { UndoLog } from '../persist/undo-log.js';
import { Backing } from '../storage/backing.js';
import type { DataDir } from './data-dir.js';
import type { MirrorStores } from './mirror-stores.js';

export interface SiteParts {
  config: SiteConfig;
  luns: LunRegistry;
  nbd: NbdServer;
  metrics: Metrics;
  sender: MirrorSender | null;
  receiver: MirrorReceiver | null;
  stores: MirrorStores;
  files: DataDir;
  log: Logger;
}

export class SiteLuns {
  constructor(private readonly site: SiteParts) {}

  async open(lc: LunConfig): Promise<void> {
    const { config, log } = this.site;
    const backing = await Backing.open(lc.path, lc.readOnly && lc.role !== 'secondary');
    backing.fastPath = config.io.fastPath;
    let meta: LunMeta | null = null;
    let role = lc.role;
    try {
      if (config.mirror) {
        meta = await LunMeta.open(this.site.files.meta(lc.name), lc.name, backing.size, lc.role);
        if (meta.data.role && meta.data.role !== lc.role) {
          log.warn('LUN role from its last promote/demote differs from the configuration; the promote/demote stands', {
            lun: lc.name, role: meta.data.role, configured: lc.role,
          });
          role = meta.data.role;
        }
      }
    } catch (err) {
      await backing.close().catch(() => undefined);
      throw err;
    }
    const mirror = role === 'secondary' ? 'none' : lc.role === 'primary' ? lc.mirror : 'sync';
    const lun = new Lun({ ...lc, role, mirror }, backing, meta);
    // Exported only once everything it needs is open: a LUN that cannot mirror is not served at all.
    try {
      if (role === 'primary' && mirror !== 'none' && this.site.sender) await this.attachMirror(lun);
      if (role === 'secondary' && meta) lun.become(new SecondaryRole(await this.openSecondary(lun)));
    } catch (err) {
      await backing.close().catch(() => undefined);
      throw err;
    }
    this.site.luns.add(lun);
    this.site.metrics.instrument(lun.stats);
    log.info('LUN opened', {
      lun: lc.name, path: lc.path, size: backing.size, role, mirror,
      blockDevice: backing.isBlockDevice, readOnly: lun.readOnly, generation: meta?.current,
    });
    if (meta?.data.promotedNeverSynced) {
      log.warn('this LUN was promoted from a copy that never completed an initial sync: its data is not a state of the old primary', { lun: lc.name });
    }
    if (meta && role === 'secondary' && meta.neverSynced) {
      log.warn('secondary never completed an initial sync: it is no state of the primary until one completes', { lun: lc.name });
    } else if (meta && role === 'secondary' && !meta.data.consistent) {
      log.warn('secondary is inconsistent (a resync was interrupted): the primary completes it on reconnect, or promote rolls it back', {
        lun: lc.name, undoRegions: lun.secondary?.undoRegions,
      });
    }
  }

  /** A secondary's side of a LUN of a mirrored site, with its undo log and applied point opened. */
  async openSecondary(lun: Lun): Promise<SecondaryLun> {
    const { files, log } = this.site;
    const undo = await UndoLog.open(files.undo(lun.name), lun.name, lun.size);
    let applied: AppliedPoint;
    try {
      applied = await AppliedPoint.open(files.applied(lun.name), (reason) => {
        log.warn('the secondary\'s applied point is damaged; the primary\'s offer decides where it resumes', { lun: lun.name, reason });
      });
    } catch (err) {
      await undo.close().catch(() => undefined);
      throw err;
    }
    return new SecondaryLun(lun.name, lun.backing, lun.meta!, undo, applied, log);
  }

  /** Open (and recover) a mirrored primary's journal and bitmap, and give it its mirror. */
  async attachMirror(lun: Lun, fresh = false): Promise<void> {
    const mode = lun.mode;
    if (lun.role !== 'primary' || mode === 'none') return;
    // A promoted LUN starts a new line of history: what an earlier primary life left is void.
    const store = await this.site.stores.open(lun, fresh);
    const mirror = this.site.sender!.attach({ name: lun.name, mode, backing: lun.backing, meta: lun.meta! }, store);
    lun.become(new PrimaryRole(mode, mirror));
    mirror.recover();
  }

  /**
   * Stop mirroring a LUN (demote, removal): in-flight requests get up to the shutdown timeout.
   * Returns the mirror it had, for the caller to look at what it left unsent.
   */
  async detachMirror(lun: Lun): Promise<LunMirror | null> {
    const m = lun.mirror;
    if (!m) return null;
    await m.drain(this.site.config.shutdownTimeoutMs);
    this.site.sender?.detach(m);
    await this.site.stores.close(m.storeRef);
    lun.become(new PrimaryRole(lun.mode));
    return m;
  }

  async remove(name: string): Promise<void> {
    const { luns, nbd, metrics, receiver, log } = this.site;
    const lun = luns.get(name);
    if (!lun) return;
    nbd.dropLun(name);
    luns.remove(name);
    metrics.forget(name);
    if (lun.mirror) {
      await lun.mirror.drain(this.site.config.shutdownTimeoutMs);
      const journal = lun.mirror.journalStatus();
      if (journal.records > 0) {
        log.warn('removed LUN still has journaled changes the peer lacks; they are kept and sent if it is added back', {
          lun: name, records: journal.records,
        });
      }
      await this.detachMirror(lun);
    }
    if (lun.role === 'secondary') receiver?.requestReoffer(`secondary LUN ${name} removed`, name);
    await lun.close();
    log.info('LUN removed', { lun: name });
  }
}
