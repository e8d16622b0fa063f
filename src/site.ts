// A running site: its LUNs, the NBD listener for hosts, and the admin endpoint.
import fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import { Metrics, type MetricsSnapshot } from './admin/metrics.js';
import { AdminServer } from './admin/server.js';
import type { LunConfig, SiteConfig } from './config/schema.js';
import type { Logger } from './log.js';
import type { MirrorStore } from './lun/lun-mirror.js';
import { Lun } from './lun/lun.js';
import { LunRegistry } from './lun/registry.js';
import { Heartbeat } from './health/heartbeat.js';
import { BitmapError, RegionBitmap } from './journal/bitmap.js';
import { Journal, type JournalRecovery } from './journal/journal.js';
import { MirrorReceiver } from './mirror/receiver.js';
import { MirrorSender } from './mirror/sender.js';
import { NbdServer } from './nbd/server.js';
import { loadHostCredentials, loadMirrorCredentials, type Credentials } from './security/credentials.js';
import { prepareDataDir } from './security/files.js';
import { MirrorTransport } from './security/mirror-tls.js';
import { Backing } from './storage/backing.js';

export class Site {
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
    this.admin = new AdminServer(() => this.status(), () => this.metrics.text());
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
    } catch (err) {
      await site.stop();
      throw err;
    }
    return site;
  }

  private async openLun(lc: LunConfig): Promise<void> {
    const readOnly = lc.readOnly || lc.role === 'secondary';
    const backing = await Backing.open(lc.path, readOnly && lc.role !== 'secondary');
    backing.fastPath = this.config.io.fastPath;
    const lun = new Lun({ ...lc }, backing);
    // Exported only once everything it needs is open: a LUN that cannot mirror is not served at all.
    try {
      if (lc.role === 'primary' && lc.mirror !== 'none' && this.sender) await this.attachMirror(lun);
    } catch (err) {
      await backing.close().catch(() => undefined);
      throw err;
    }
    this.luns.add(lun);
    this.metrics.instrument(lun);
    this.log.info('LUN opened', {
      lun: lc.name, path: lc.path, size: backing.size, role: lc.role, mirror: lc.mirror,
      blockDevice: backing.isBlockDevice, readOnly,
    });
  }

  /**
   * SIGHUP: add the LUNs new in `next`, remove those gone from it; other LUNs and their hosts are
   * untouched. A LUN whose settings changed, or other changed keys, need a restart (logged).
   */
  async reload(next: SiteConfig): Promise<{ added: string[]; removed: string[]; unchanged: string[] }> {
    const { luns: _old, ...oldRest } = this.config;
    const { luns: _new, ...newRest } = next;
    if (JSON.stringify(oldRest) !== JSON.stringify(newRest)) {
      this.log.warn('reload: only LUNs are added or removed; other changed keys take effect at the next restart');
    }
    const before = new Map(this.config.luns.map((l) => [l.name, l]));
    const after = new Map(next.luns.map((l) => [l.name, l]));
    const added: string[] = [];
    const removed: string[] = [];
    const unchanged: string[] = [];
    for (const [name, lc] of before) {
      const n = after.get(name);
      if (!n) continue;
      if (JSON.stringify(n) !== JSON.stringify(lc)) {
        this.log.warn('reload: LUN settings changed; remove and re-add it, or restart, to apply', { lun: name });
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
    if (mirrorChanged) this.sender?.resession('the mirrored LUNs changed');
    if (secondaryAdded) this.receiver?.requestReoffer('a secondary LUN was added');
    this.log.info('reloaded', { added, removed, unchanged });
    return { added, removed, unchanged };
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
      this.sender?.detach(lun);
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
  private async attachMirror(lun: Lun): Promise<void> {
    const m = this.config.mirror!;
    const base = `${this.config.dataDir}/${lun.name}`;
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
    const mirror = this.sender!.attach(lun, store)!;
    mirror.recover();
  }

  status() {
    return {
      site: this.config.site,
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
      luns: this.luns.all().map((lun) => this.lunStatus(lun)),
    };
  }

  private lunStatus(lun: Lun) {
    const base = {
      name: lun.name, path: lun.backing.path, size: lun.size, role: lun.spec.role, mode: lun.spec.mirror,
      readOnly: lun.readOnly, hosts: this.nbd.connectionCount(lun.name), counters: lun.counters,
    };
    if (lun.spec.role === 'secondary') {
      const s = this.receiver!.stateOf(lun.name);
      return {
        ...base, mode: 'secondary', state: s.feeder ? 'secondary-uptodate' : 'secondary-waiting',
        peer: s.feeder, appliedSeq: s.order.appliedPrefix, applied: s.applied,
      };
    }
    const m = lun.mirror;
    if (!m) return { ...base, state: 'standalone' };
    const journal = m.journalStatus();
    // While the link waits out its probation, a LUN with changes to send shows it.
    const state = m.state === 'journaling' && this.sender!.monitor.state === 'probation' ? 'probation' : m.state;
    return {
      ...base, state, reason: m.reason, writePath: m.path,
      mirrored: m.stats, inflight: m.inflight, lagBytes: m.inflightBytes,
      journal, dirtyRegions: m.dirtyRegions, resyncPending: m.resyncNeeded.size,
      progress: m.progress,
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
