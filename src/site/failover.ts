// Operator actions on a mirrored LUN (admin endpoint, CLI): promote, demote, resolve a split
// brain, verify. Each checks what it may do first, then changes the LUN's role and metadata.
import { ActionError, type PromoteOptions, type RoleChange, type VerifyReport } from '../admin/actions.js';
import type { Lun } from '../lun/lun.js';
import { PrimaryRole, SecondaryRole } from '../lun/roles.js';
import { newGeneration, NO_GENERATION, type LunMeta } from '../persist/lun-meta.js';
import type { SiteLuns, SiteParts } from './site-luns.js';

export class Failover {
  constructor(private readonly site: SiteParts, private readonly lunsOf: SiteLuns) {}

  private target(name: string): { lun: Lun; meta: LunMeta } {
    const { luns, config, receiver, sender } = this.site;
    const lun = luns.get(name);
    if (!lun) throw new ActionError(`no LUN "${name}" on site ${config.site}`, 404);
    if (!lun.meta || !receiver || !sender) throw new ActionError(`site ${config.site} has no mirror section: LUN roles are fixed`, 409);
    return { lun, meta: lun.meta };
  }

  async promote(name: string, opts: PromoteOptions): Promise<RoleChange> {
    const { lun, meta } = this.target(name);
    const { receiver, sender, nbd, config, log } = this.site;
    if (lun.role === 'primary') throw new ActionError(`LUN ${name} is already primary here`);
    if (meta.neverSynced && !opts.neverSynced) {
      throw new ActionError(`LUN ${name} here never completed an initial sync: its data is no state of the primary ` +
        '(--force-never-synced promotes it anyway, and its status keeps saying so)');
    }
    const secondary = lun.secondary;
    const feeder = secondary?.feeder ?? null;
    if (feeder && !opts.force) {
      throw new ActionError(`site ${feeder} is connected and primary for ${name}: demote it there first (or --force if it must be cut off)`);
    }
    const notes: string[] = [];
    if (feeder) {
      receiver!.requestReoffer(`LUN ${name} promoted`, name);
      notes.push(`the connected primary (site ${feeder}) no longer feeds this LUN`);
    }
    // The secondary rolls an interrupted resync back and lets go of what only it needed.
    const took = secondary ? await secondary.leave() : { neverSynced: meta.neverSynced, rolledBack: null };
    if (took.neverSynced) {
      notes.push('this copy never completed an initial sync: its data is NOT a state of the old primary');
      log.error('promote of a copy that never completed an initial sync: its data is not a state of the old primary', { lun: name });
    } else if (took.rolledBack !== null) {
      const regions = took.rolledBack;
      notes.push(`rolled back an interrupted resync (${regions} regions) to the last consistent state`);
      log.warn('promote: rolled back an interrupted resync', { lun: name, regions });
    }
    const base = meta.current;
    await meta.rotate();
    await meta.update({
      role: 'primary', peerBase: base === NO_GENERATION ? '' : base, syncCompare: false, localChanges: false, discardPeer: false, copyId: newGeneration(),
    });
    const configured = config.luns.find((l) => l.name === name);
    lun.become(new PrimaryRole(configured?.role === 'primary' && configured.mirror !== 'none' ? configured.mirror : 'sync'));
    await secondary?.close();
    await this.lunsOf.attachMirror(lun, true);
    nbd.dropLun(name);   // hosts attached read-only reattach read-write
    sender!.resession(`LUN ${name} promoted`);
    log.warn('LUN promoted to primary', { lun: name, generation: meta.current, mirror: lun.mode, forced: opts.force });
    return { lun: name, role: 'primary', notes };
  }

  async demote(name: string): Promise<RoleChange> {
    const { lun, meta } = this.target(name);
    const { receiver, sender, nbd, config, files, log } = this.site;
    if (lun.role === 'secondary') throw new ActionError(`LUN ${name} is already secondary here`);
    const notes: string[] = [];
    nbd.dropLun(name);
    let unsent = false;
    if (lun.mirror) {
      const m = lun.mirror;
      await m.drain(config.shutdownTimeoutMs);
      unsent = m.state !== 'uptodate' || m.journalStatus().records > 0;
      await this.lunsOf.detachMirror(lun);
      // Changes relative to a line of history this site no longer leads.
      files.dropPrimaryFiles(name);
    }
    if (unsent) notes.push('this site had writes the peer may lack: they are overwritten by a full compare with the new primary');
    await meta.update({
      role: 'secondary', localChanges: unsent || meta.data.localChanges, consistent: true, syncCompare: false, discardPeer: false, copyId: newGeneration(),
    });
    // Read-only for hosts at once; fed only once its undo log and applied point are open.
    lun.become(new SecondaryRole());
    lun.become(new SecondaryRole(await this.lunsOf.openSecondary(lun)));
    sender!.resession(`LUN ${name} demoted`);
    receiver!.requestReoffer(`LUN ${name} demoted`);
    log.warn('LUN demoted to secondary', { lun: name, unsentChanges: unsent });
    return { lun: name, role: 'secondary', notes };
  }

  async resolve(name: string, discard: 'local' | 'remote'): Promise<RoleChange> {
    const { lun, meta } = this.target(name);
    const { receiver, sender, log } = this.site;
    if (!meta.data.splitBrain && lun.mirror?.state !== 'split-brain') throw new ActionError(`no split brain recorded for LUN ${name} here`);
    const notes: string[] = [];
    if (discard === 'local') {
      if (lun.role === 'primary') notes.push(...(await this.demote(name)).notes);
      // A copy with no generation: the peer's next offer is taken whole (compared region by region).
      await meta.update({ splitBrain: null, current: NO_GENERATION, history: [], localChanges: false, consistent: true });
      receiver!.requestReoffer(`split brain of ${name} resolved: this copy is discarded`);
      notes.push('this site\'s changes are discarded: the peer\'s copy overwrites this one');
    } else {
      if (lun.role !== 'primary') throw new ActionError(`LUN ${name} is secondary here: promote it first to keep this site's copy`);
      await meta.update({ splitBrain: null, discardPeer: true });
      sender!.resession(`split brain of ${name} resolved: the peer's copy is discarded`);
      notes.push('the peer\'s changes are discarded: this copy overwrites it (its LUN is demoted there if it is primary)');
    }
    log.warn('split brain resolved', { lun: name, discard });
    return { lun: name, role: lun.role, notes };
  }

  async verify(name: string, opts: { repair: boolean }): Promise<VerifyReport> {
    const { lun } = this.target(name);
    const { log } = this.site;
    if (!lun.mirror) throw new ActionError(`LUN ${name} is not a mirrored primary here: run verify on the primary site`);
    const started = Date.now();
    log.info('verify started', { lun: name, repair: opts.repair });
    let regions: number[];
    try {
      regions = await lun.mirror.verify(opts.repair);
    } catch (err) {
      throw new ActionError(`verify of ${name}: ${(err as Error).message}`);
    }
    const rs = lun.mirror.storeRef.bitmap.regionSize;
    const differing: VerifyReport['differing'] = [];
    for (const r of regions) {
      const last = differing[differing.length - 1];
      const offset = r * rs;
      const length = Math.min(rs, lun.size - offset);
      if (last && last.offset + last.length === offset) last.length += length;
      else differing.push({ offset, length });
    }
    const report = {
      lun: name, bytes: lun.size, regionSize: rs, differing, repaired: opts.repair ? regions.length : 0, durationMs: Date.now() - started,
    };
    log.log(differing.length ? 'warn' : 'info', 'verify finished', { ...report, differing: differing.slice(0, 20) });
    return report;
  }
}
