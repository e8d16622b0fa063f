// A running site: its LUNs, the NBD listener for hosts, and the admin endpoint.
import fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import { Metrics, VERSION, type MetricsSnapshot } from './admin/metrics.js';
import { AdminServer } from './admin/server.js';
import { loadAdminToken } from './config/load.js';
import { adminSocketPath, type LunConfig, type SiteConfig } from './config/schema.js';
import type { Logger } from './log.js';
import type { MirrorStore } from './mirror/primary/lun-mirror.js';
import { Lun } from './lun/lun.js';
import { catchup, protectionOf, protectionReason } from './mirror/primary/protection.js';
import { LunRegistry } from './lun/registry.js';
import { Heartbeat } from './health/heartbeat.js';
import { processStatus } from './health/process-stats.js';
import { BitmapError, RegionBitmap } from './persist/bitmap.js';
import { Journal, type JournalRecovery } from './persist/journal.js';
import { ActionError, type PromoteOptions, type RoleChange, type SiteActions, type VerifyReport } from './admin/actions.js';
import { AppliedPoint } from './persist/applied-point.js';
import { UndoLog } from './persist/undo-log.js';
import { LunMeta, newGeneration, NO_GENERATION } from './persist/lun-meta.js';
import { MirrorReceiver } from './mirror/secondary/receiver.js';
import { MirrorSender } from './mirror/sender.js';
import { NbdServer } from './nbd/server.js';
import { loadHostCredentials, loadMirrorCredentials, type Credentials } from './security/credentials.js';
import { prepareDataDir } from './security/files.js';
import { MirrorTransport } from './security/mirror-tls.js';
import { Backing } from './storage/backing.js';

export class Site implements SiteActions {
  readonly luns = new LunRegistry();
  private readonly nbd: NbdServer;
  private readonly admin: AdminServer;
  private readonly metrics: Metrics;
  private readonly receiver: MirrorReceiver | null = null;
  private readonly sender: MirrorSender | null = null;
  private heartbeat: Heartbeat | null = null;
  private readonly mirrorCredentials: Credentials | null = null;
  private readonly transport: MirrorTransport | null = null;
  private readonly recoveries = new Map<string, JournalRecovery>();
  private readonly stores: MirrorStore[] = [];
  nbdAddress: AddressInfo | null = null;
  adminAddress: AddressInfo | null = null;
  mirrorAddress: AddressInfo | null = null;

  private constructor(public config: SiteConfig, private readonly log: Logger) {
    this.nbd = new NbdServer(this.luns, log, { mode: config.listen.tls, credentials: loadHostCredentials(config.listen) });
    this.metrics = new Metrics(() => this.status() as unknown as MetricsSnapshot);
    this.admin = new AdminServer(() => this.status(), () => this.metrics.text(), this,
      { token: loadAdminToken(config), socketPath: adminSocketPath(config) });
    if (config.mirror) {
      const m = config.mirror;
      this.mirrorCredentials = loadMirrorCredentials(m);
      this.transport = new MirrorTransport(m.tls, this.mirrorCredentials, log);
      if (m.tls === 'off') {
        log.warn('mirror.tls is "off": mirror links are plain TCP, and anyone who can reach the mirror port can overwrite secondary LUNs', {
          heartbeats: this.mirrorCredentials.psk ? 'authenticated' : 'unauthenticated',
        });
      }
      this.sender = new MirrorSender(config.site, m, this.transport, log);
      const monitor = this.sender.monitor;
      this.receiver = new MirrorReceiver(this.luns, {
        site: config.site, peerSite: m.peer.site, idleCheckMs: m.heartbeat.intervalMs,
        peerAlive: () => monitor.silentForMs() <= m.heartbeat.timeoutMs, transport: this.transport,
        demoteForPeer: async (lun) => { await this.demote(lun); },
      }, log);
    }
  }

  static async start(config: SiteConfig, log: Logger): Promise<Site> {
    const site = new Site(config, log);
    try {
      const oldMode = prepareDataDir(config.dataDir);
      if (oldMode !== null) {
        log.warn('dataDir was open to other users: set to 0700', { dataDir: config.dataDir, was: oldMode.toString(8) });
      }
      for (const lc of config.luns) await site.openLun(lc);
      if (site.receiver) {
        const m = config.mirror!;
        site.mirrorAddress = await site.receiver.listen(m.listen.host, m.listen.port);
        // Heartbeats use UDP on the same port number as the mirror's TCP listener.
        site.heartbeat = new Heartbeat({
          site: config.site, peerSite: m.peer.site, bindHost: m.listen.host, port: site.mirrorAddress.port,
          peerHost: m.peer.host, peerPort: m.peer.port, intervalMs: m.heartbeat.intervalMs,
          key: site.mirrorCredentials!.psk?.first.key ?? null,
        }, log);
        site.sender!.start(site.heartbeat);
        await site.heartbeat.start();
      }
      site.nbdAddress = await site.nbd.listen(config.listen.host, config.listen.port);
      site.adminAddress = await site.admin.listen(config.admin.host, config.admin.port);
      await site.admin.listenSocket(adminSocketPath(config));
    } catch (err) {
      await site.stop();
      throw err;
    }
    return site;
  }

  private async openLun(lc: LunConfig): Promise<void> {
    const backing = await Backing.open(lc.path, lc.readOnly && lc.role !== 'secondary');
    backing.fastPath = this.config.io.fastPath;
    let meta: LunMeta | null = null;
    let role = lc.role;
    try {
      if (this.config.mirror) {
        meta = await LunMeta.open(`${this.config.dataDir}/${lc.name}.meta`, lc.name, backing.size, lc.role);
        if (meta.data.role && meta.data.role !== lc.role) {
          this.log.warn('LUN role from its last promote/demote differs from the configuration; the promote/demote stands', {
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
    const lun = new Lun({ ...lc, role, mirror }, backing);
    lun.meta = meta;
    // Exported only once everything it needs is open: a LUN that cannot mirror is not served at all.
    try {
      if (role === 'primary' && mirror !== 'none' && this.sender) await this.attachMirror(lun);
      if (role === 'secondary' && meta) await this.openUndo(lun);
    } catch (err) {
      await backing.close().catch(() => undefined);
      throw err;
    }
    this.luns.add(lun);
    this.metrics.instrument(lun);
    this.log.info('LUN opened', {
      lun: lc.name, path: lc.path, size: backing.size, role, mirror,
      blockDevice: backing.isBlockDevice, readOnly: lun.readOnly, generation: meta?.current,
    });
    if (meta?.data.promotedNeverSynced) {
      this.log.warn('this LUN was promoted from a copy that never completed an initial sync: its data is not a state of the old primary', { lun: lc.name });
    }
    if (meta && role === 'secondary' && meta.neverSynced) {
      this.log.warn('secondary never completed an initial sync: it is no state of the primary until one completes', { lun: lc.name });
    } else if (meta && role === 'secondary' && !meta.data.consistent) {
      this.log.warn('secondary is inconsistent (a resync was interrupted): the primary completes it on reconnect, or promote rolls it back', {
        lun: lc.name, undoRegions: lun.undo?.saved,
      });
    }
  }

  private async openUndo(lun: Lun): Promise<void> {
    lun.undo ??= await UndoLog.open(`${this.config.dataDir}/${lun.name}.undo`, lun.name, lun.size);
    lun.applied ??= await AppliedPoint.open(`${this.config.dataDir}/${lun.name}.applied`, (reason) => {
      this.log.warn('the secondary\'s applied point is damaged; the primary\'s offer decides where it resumes', { lun: lun.name, reason });
    });
  }

  // ---- operator actions (admin endpoint, CLI) ------------------------------------------------

  private actionTarget(name: string): { lun: Lun; meta: LunMeta } {
    const lun = this.luns.get(name);
    if (!lun) throw new ActionError(`no LUN "${name}" on site ${this.config.site}`, 404);
    if (!lun.meta || !this.receiver || !this.sender) throw new ActionError(`site ${this.config.site} has no mirror section: LUN roles are fixed`, 409);
    return { lun, meta: lun.meta };
  }

  async promote(name: string, opts: PromoteOptions): Promise<RoleChange> {
    const { lun, meta } = this.actionTarget(name);
    if (lun.spec.role === 'primary') throw new ActionError(`LUN ${name} is already primary here`);
    if (meta.neverSynced && !opts.neverSynced) {
      throw new ActionError(`LUN ${name} here never completed an initial sync: its data is no state of the primary ` +
        '(--force-never-synced promotes it anyway, and its status keeps saying so)');
    }
    const feeder = this.receiver!.stateOf(name).feeder;
    if (feeder && !opts.force) {
      throw new ActionError(`site ${feeder} is connected and primary for ${name}: demote it there first (or --force if it must be cut off)`);
    }
    const notes: string[] = [];
    if (feeder) {
      this.receiver!.requestReoffer(`LUN ${name} promoted`, name);
      notes.push(`the connected primary (site ${feeder}) no longer feeds this LUN`);
    }
    if (meta.neverSynced) {
      // Nothing to roll back to: an undo log of a never-synced copy holds no state of the primary either.
      await meta.update({ consistent: true, promotedNeverSynced: Date.now() });
      notes.push('this copy never completed an initial sync: its data is NOT a state of the old primary');
      this.log.error('promote of a copy that never completed an initial sync: its data is not a state of the old primary', { lun: name });
    } else if (!meta.data.consistent) {
      const regions = lun.undo ? await lun.undo.rollback(lun.backing) : 0;
      await meta.update({ consistent: true });
      notes.push(`rolled back an interrupted resync (${regions} regions) to the last consistent state`);
      this.log.warn('promote: rolled back an interrupted resync', { lun: name, regions });
    }
    await lun.undo?.discard();
    lun.applied?.clear();
    const base = meta.current;
    await meta.rotate();
    await meta.update({
      role: 'primary', peerBase: base === NO_GENERATION ? '' : base, syncCompare: false, localChanges: false, discardPeer: false, copyId: newGeneration(),
    });
    const configured = this.config.luns.find((l) => l.name === name);
    lun.spec.role = 'primary';
    lun.spec.mirror = configured?.role === 'primary' && configured.mirror !== 'none' ? configured.mirror : 'sync';
    await this.attachMirror(lun, true);
    this.nbd.dropLun(name);   // hosts attached read-only reattach read-write
    this.sender!.resession(`LUN ${name} promoted`);
    this.log.warn('LUN promoted to primary', { lun: name, generation: meta.current, mirror: lun.spec.mirror, forced: opts.force });
    return { lun: name, role: 'primary', notes };
  }

  async demote(name: string): Promise<RoleChange> {
    const { lun, meta } = this.actionTarget(name);
    if (lun.spec.role === 'secondary') throw new ActionError(`LUN ${name} is already secondary here`);
    const notes: string[] = [];
    this.nbd.dropLun(name);
    let unsent = false;
    if (lun.mirror) {
      const m = lun.mirror;
      await m.drain(this.config.shutdownTimeoutMs);
      unsent = m.state !== 'uptodate' || m.journalStatus().records > 0;
      this.sender!.detach(m);
      const i = this.stores.findIndex((st) => st === m.storeRef);
      if (i >= 0) {
        const [st] = this.stores.splice(i, 1);
        await st.bitmap.close().catch(() => undefined);
        await st.journal.close().catch(() => undefined);
      }
      // Changes relative to a line of history this site no longer leads.
      for (const ext of ['journal', 'bitmap']) fs.rmSync(`${this.config.dataDir}/${name}.${ext}`, { force: true });
      lun.mirror = null;
    }
    if (unsent) notes.push('this site had writes the peer may lack: they are overwritten by a full compare with the new primary');
    await meta.update({
      role: 'secondary', localChanges: unsent || meta.data.localChanges, consistent: true, syncCompare: false, discardPeer: false, copyId: newGeneration(),
    });
    lun.spec.role = 'secondary';
    lun.spec.mirror = 'none';
    await this.openUndo(lun);
    this.sender!.resession(`LUN ${name} demoted`);
    this.receiver!.requestReoffer(`LUN ${name} demoted`);
    this.log.warn('LUN demoted to secondary', { lun: name, unsentChanges: unsent });
    return { lun: name, role: 'secondary', notes };
  }

  async resolve(name: string, discard: 'local' | 'remote'): Promise<RoleChange> {
    const { lun, meta } = this.actionTarget(name);
    if (!meta.data.splitBrain && lun.mirror?.state !== 'split-brain') throw new ActionError(`no split brain recorded for LUN ${name} here`);
    const notes: string[] = [];
    if (discard === 'local') {
      if (lun.spec.role === 'primary') notes.push(...(await this.demote(name)).notes);
      // A copy with no generation: the peer's next offer is taken whole (compared region by region).
      await meta.update({ splitBrain: null, current: NO_GENERATION, history: [], localChanges: false, consistent: true });
      this.receiver!.requestReoffer(`split brain of ${name} resolved: this copy is discarded`);
      notes.push('this site\'s changes are discarded: the peer\'s copy overwrites this one');
    } else {
      if (lun.spec.role !== 'primary') throw new ActionError(`LUN ${name} is secondary here: promote it first to keep this site's copy`);
      await meta.update({ splitBrain: null, discardPeer: true });
      this.sender!.resession(`split brain of ${name} resolved: the peer's copy is discarded`);
      notes.push('the peer\'s changes are discarded: this copy overwrites it (its LUN is demoted there if it is primary)');
    }
    this.log.warn('split brain resolved', { lun: name, discard });
    return { lun: name, role: lun.spec.role, notes };
  }

  async verify(name: string, opts: { repair: boolean }): Promise<VerifyReport> {
    const { lun } = this.actionTarget(name);
    if (!lun.mirror) throw new ActionError(`LUN ${name} is not a mirrored primary here: run verify on the primary site`);
    const started = Date.now();
    this.log.info('verify started', { lun: name, repair: opts.repair });
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
    this.log.log(differing.length ? 'warn' : 'info', 'verify finished', { ...report, differing: differing.slice(0, 20) });
    return report;
  }

  /**
   * SIGHUP: add the LUNs new in `next`, remove those gone from it; other LUNs and their hosts are
   * untouched. A LUN whose settings changed, or other changed keys, need a restart (logged).
   */
  async reload(next: SiteConfig): Promise<{ added: string[]; removed: string[]; unchanged: string[]; changed: string[] }> {
    const { luns: _old, ...oldRest } = this.config;
    const { luns: _new, ...newRest } = next;
    const before = new Map(this.config.luns.map((l) => [l.name, l]));
    const after = new Map(next.luns.map((l) => [l.name, l]));
    // Every key whose value differs, dotted (`log.level`, `luns[lun0].mirror`, `luns[lun2]` for a
    // LUN added or removed).
    const changed = changedKeys(oldRest, newRest, '');
    for (const name of new Set([...before.keys(), ...after.keys()])) {
      const o = before.get(name);
      const n = after.get(name);
      if (!o || !n) changed.push(`luns[${name}]`);
      else changed.push(...changedKeys(o, n, `luns[${name}].`));
    }
    const notApplied = changed.filter((k) => !/^luns\[[^\]]*\]$/.test(k));
    if (notApplied.length) {
      this.log.warn('reload: only LUNs are added or removed; other changed keys take effect at the next restart', { keys: notApplied });
    }
    const added: string[] = [];
    const removed: string[] = [];
    const unchanged: string[] = [];
    for (const [name, lc] of before) {
      const n = after.get(name);
      if (!n) continue;
      if (JSON.stringify(n) !== JSON.stringify(lc)) {
        this.log.warn('reload: LUN settings changed; remove and re-add it, or restart, to apply', {
          lun: name, keys: changedKeys(lc, n, ''),
        });
      }
      unchanged.push(name);
    }
    let mirrorChanged = false;
    let secondaryAdded = false;
    for (const [name, lc] of before) {
      if (after.has(name)) continue;
      mirrorChanged ||= lc.role === 'primary' && lc.mirror !== 'none';
      await this.removeLun(name);
      removed.push(name);
    }
    for (const [name, lc] of after) {
      if (before.has(name)) continue;
      try {
        await this.openLun(lc);
        added.push(name);
        mirrorChanged ||= lc.role === 'primary' && lc.mirror !== 'none';
        secondaryAdded ||= lc.role === 'secondary';
      } catch (err) {
        this.log.error('reload: cannot add LUN', { lun: name, error: (err as Error).message });
      }
    }
    this.config = { ...this.config, luns: this.config.luns.filter((l) => after.has(l.name)).concat(next.luns.filter((l) => added.includes(l.name))) };
    // Only a change of what this site offers (its mirrored primaries) renegotiates its session,
    // and only an added secondary asks the peer to offer again; other LUNs are not touched.
    if (mirrorChanged) this.sender?.resession(`the mirrored LUNs changed (${[...added, ...removed].join(', ')})`);
    if (secondaryAdded) this.receiver?.requestReoffer(`a secondary LUN was added (${added.join(', ')})`);
    this.log.info('reloaded', { added, removed, unchanged, changed });
    return { added, removed, unchanged, changed };
  }

  private async removeLun(name: string): Promise<void> {
    const lun = this.luns.get(name);
    if (!lun) return;
    this.nbd.dropLun(name);
    this.luns.remove(name);
    this.metrics.forget(name);
    if (lun.mirror) {
      await lun.mirror.drain(this.config.shutdownTimeoutMs);
      const journal = lun.mirror.journalStatus();
      if (journal.records > 0) {
        this.log.warn('removed LUN still has journaled changes the peer lacks; they are kept and sent if it is added back', {
          lun: name, records: journal.records,
        });
      }
      this.sender?.detach(lun.mirror);
      const i = this.stores.findIndex((st) => st === lun.mirror!.storeRef);
      if (i >= 0) {
        const [st] = this.stores.splice(i, 1);
        await st.bitmap.close().catch(() => undefined);
        await st.journal.close().catch(() => undefined);
      }
    }
    if (lun.spec.role === 'secondary') this.receiver?.requestReoffer(`secondary LUN ${name} removed`, name);
    await lun.close();
    this.log.info('LUN removed', { lun: name });
  }

  /**
   * The LUN's dirty bitmap. One written for another region size (config changed) cannot be
   * read: it is set aside and replaced by one with every region marked, so the LUN resyncs whole
   * rather than the site refusing to start.
   */
  private async openBitmap(path: string, lun: Lun, regionSize: number): Promise<RegionBitmap> {
    try {
      return await RegionBitmap.open(path, lun.size, regionSize);
    } catch (err) {
      if (!(err instanceof BitmapError)) throw err;
      const aside = `${path}.unusable-${Date.now()}`;
      fs.renameSync(path, aside);
      const bitmap = await RegionBitmap.open(path, lun.size, regionSize);
      await bitmap.mark(0, lun.size);
      await bitmap.sync();
      this.log.warn('dirty bitmap unusable (region size or LUN size changed): every region marked for resync', {
        lun: lun.name, error: err.message, savedAs: aside,
      });
      return bitmap;
    }
  }

  /** Open (and recover) a mirrored LUN's journal and bitmap under dataDir. */
  private async attachMirror(lun: Lun, fresh = false): Promise<void> {
    const m = this.config.mirror!;
    const base = `${this.config.dataDir}/${lun.name}`;
    // A promoted LUN starts a new line of history: what an earlier primary life left is void.
    if (fresh) for (const ext of ['journal', 'bitmap']) fs.rmSync(`${base}.${ext}`, { force: true });
    const { journal, recovery } = await Journal.open(`${base}.journal`, lun.name, lun.size);
    let bitmap: RegionBitmap;
    try {
      bitmap = await this.openBitmap(`${base}.bitmap`, lun, m.journal.regionSize);
    } catch (err) {
      await journal.close().catch(() => undefined);
      throw err;
    }
    const store: MirrorStore = { journal, bitmap, maxJournalBytes: m.journal.maxBytes };
    this.stores.push(store);
    this.recoveries.set(lun.name, recovery);
    if (recovery.corrupt) {
      this.log.error('journal corrupt: valid records kept, the rest is resynced from the dirty bitmap', {
        lun: lun.name, offset: recovery.corrupt.offset, reason: recovery.corrupt.reason, savedAs: recovery.corrupt.savedAs,
      });
    } else if (recovery.tornTailBytes > 0) {
      this.log.info('journal had a torn tail (a write cut off by a crash); dropped', { lun: lun.name, bytes: recovery.tornTailBytes });
    }
    if (lun.spec.mirror === 'none') return;
    const mirror = this.sender!.attach({ name: lun.name, mode: lun.spec.mirror, backing: lun.backing, meta: lun.meta! }, store);
    lun.mirror = mirror;
    mirror.recover();
  }

  status() {
    const mem = process.memoryUsage();
    const luns = this.luns.all().map((lun) => this.lunStatus(lun));
    const states = new Map<string, number>();
    for (const l of luns) states.set(l.state, (states.get(l.state) ?? 0) + 1);
    return {
      site: this.config.site,
      version: VERSION,
      process: {
        pid: process.pid, uptimeSeconds: Math.round(process.uptime()), node: process.version,
        ...processStatus(), heapUsedBytes: mem.heapUsed, heapTotalBytes: mem.heapTotal,
        externalBytes: mem.external, arrayBuffersBytes: mem.arrayBuffers,
      },
      listen: this.nbdAddress,
      hostTls: this.config.listen.tls === 'off' ? null : { mode: this.config.listen.tls, ...this.nbd.tlsStats },
      mirror: this.sender && {
        listen: this.mirrorAddress,
        peer: this.sender.pool.peerSite || this.config.mirror!.peer.site,
        link: this.sender.pool.state,
        health: this.sender.monitor.state,
        tls: this.transport!.mode,
        authentication: this.transport!.stats,
        heartbeat: this.heartbeat?.stats,
        connections: this.sender.pool.elements.map((e) => ({ index: e.index, status: e.status, lastSeen: e.lastSeen, inflight: e.inflight })),
      },
      luns,
      summary: {
        luns: luns.length,
        states: Object.fromEntries(states),
        localOnly: luns.flatMap((l) => ('protection' in l && l.protection === 'local-only' ? [l.name] : [])),
        journalBytes: luns.reduce((sum, l) => sum + ('journal' in l && l.journal ? l.journal.bytes : 0), 0),
      },
    };
  }

  private lunStatus(lun: Lun) {
    const base = {
      name: lun.name, path: lun.backing.path, size: lun.size, role: lun.spec.role, mode: lun.spec.mirror,
      readOnly: lun.readOnly, hosts: this.nbd.connectionCount(lun.name), counters: lun.counters,
    };
    const meta = lun.meta?.data;
    const lm = lun.meta;
    const neverSynced = lun.spec.role === 'secondary' && !!lm?.neverSynced;
    const generation = meta && {
      current: meta.current, history: meta.history.slice(0, 4), consistent: neverSynced ? false : meta.consistent, localChanges: meta.localChanges,
      splitBrain: meta.splitBrain, peerBase: meta.peerBase || null, neverSynced,
      // A forced promote of a never-synced copy is remembered: this data is no state of the old primary.
      ...(meta.promotedNeverSynced ? { promotedNeverSynced: new Date(meta.promotedNeverSynced).toISOString(), dataOrigin: 'promoted without a completed initial sync: not a state of the old primary' } : {}),
    };
    if (lun.spec.role === 'secondary') {
      const s = this.receiver!.stateOf(lun.name);
      const state = meta?.splitBrain ? 'split-brain'
        : lm && !lm.consistent ? (s.feeder ? 'secondary-syncing' : 'secondary-inconsistent')
        : s.feeder ? 'secondary-uptodate' : 'secondary-waiting';
      const reason = neverSynced ? 'never synced: no initial sync has completed, so this copy is no state of the primary'
        : lm && !lm.consistent ? 'an interrupted resync: promote rolls back to the last consistent state' : undefined;
      return {
        ...base, mode: 'secondary', state, ...(reason ? { reason } : {}), peer: s.feeder, appliedSeq: s.order.appliedPrefix, applied: s.applied,
        generation, pairing: s.pairing, undoRegions: lun.undo?.saved ?? 0,
      };
    }
    const m = lun.mirror;
    if (!m) return { ...base, state: 'standalone', generation };
    const journal = m.journalStatus();
    // While the link waits out its probation, a LUN with changes to send shows it.
    const state = m.state === 'journaling' && this.sender!.monitor.state === 'probation' ? 'probation' : m.state;
    const work = catchup(state, m.progress);
    return {
      ...base, state, reason: m.reason, writePath: m.path,
      protection: protectionOf(state, m.mode), protectionReason: protectionReason(state),
      catchup: work && { done: work.done, total: work.total, percent: Math.floor((100 * work.done) / work.total) },
      etaSeconds: work?.etaSeconds ?? null,
      mirrored: m.stats, inflight: m.inflight, lagBytes: m.inflightBytes,
      journal, dirtyRegions: m.dirtyRegions, resyncPending: m.resyncNeeded.size,
      progress: m.progress, sync: m.sync, verify: m.verifying, generation,
      recovery: this.recoveries.get(lun.name) ?? null,
    };
  }

  async stop(): Promise<void> {
    await this.nbd.shutdown(this.config.shutdownTimeoutMs);
    await this.sender?.drain(this.config.shutdownTimeoutMs);
    this.sender?.stop();
    await this.heartbeat?.stop();
    await this.receiver?.close();
    for (const st of this.stores) {
      await st.bitmap.close().catch(() => undefined);
      await st.journal.close().catch(() => undefined);
    }
    await this.admin.close();
    for (const lun of this.luns.all()) {
      try {
        await lun.close();
      } catch (err) {
        this.log.error('closing LUN failed', { lun: lun.name, error: (err as Error).message });
      }
    }
  }
}

/** Dotted paths of the keys whose values differ between two configuration objects. */
export function changedKeys(a: unknown, b: unknown, prefix: string): string[] {
  const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  if (!isObj(a) || !isObj(b)) return JSON.stringify(a) === JSON.stringify(b) ? [] : [prefix.replace(/\.$/, '')];
  const out: string[] = [];
  for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const [x, y] = [a[k], b[k]];
    if (isObj(x) && isObj(y)) out.push(...changedKeys(x, y, `${prefix}${k}.`));
    else if (JSON.stringify(x) !== JSON.stringify(y)) out.push(`${prefix}${k}`);
  }
  return out;
}
