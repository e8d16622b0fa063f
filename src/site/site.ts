// A running site: its LUNs, the NBD listener for hosts, the mirror and the admin endpoint.
// Starting and stopping them in order is this file's job; opening LUNs (site-luns.ts), the
// operator actions (failover.ts) and the status snapshot (status.ts) have their own.
import type { AddressInfo } from 'node:net';
import { Metrics } from '../admin/metrics.js';
import { AdminServer } from '../admin/server.js';
import type { SiteStatus } from '../admin/status.js';
import { loadAdminToken } from '../config/load.js';
import { adminSocketPath, type SiteConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import { LunRegistry } from '../lun/registry.js';
import { Heartbeat } from '../health/heartbeat.js';
import type { PromoteOptions, RoleChange, SiteActions, VerifyReport } from '../admin/actions.js';
import { MirrorReceiver } from '../mirror/secondary/receiver.js';
import { MirrorSender } from '../mirror/sender.js';
import { NbdServer } from '../nbd/server.js';
import { loadHostCredentials, loadMirrorCredentials, type Credentials } from '../security/credentials.js';
import { prepareDataDir } from '../security/files.js';
import { MirrorTransport } from '../security/mirror-tls.js';
import { DataDir } from './data-dir.js';
import { Failover } from './failover.js';
import { MirrorStores } from './mirror-stores.js';
import { changedKeys } from './reload.js';
import { SiteLuns, type SiteParts } from './site-luns.js';
import { siteStatus } from './status.js';

export class Site implements SiteActions, SiteParts {
  readonly luns = new LunRegistry();
  readonly nbd: NbdServer;
  readonly metrics: Metrics;
  readonly receiver: MirrorReceiver | null = null;
  readonly sender: MirrorSender | null = null;
  readonly files: DataDir;
  readonly stores: MirrorStores;
  private readonly admin: AdminServer;
  private readonly lunsOf: SiteLuns;
  private readonly failover: Failover;
  private heartbeat: Heartbeat | null = null;
  private readonly mirrorCredentials: Credentials | null = null;
  private readonly transport: MirrorTransport | null = null;
  nbdAddress: AddressInfo | null = null;
  adminAddress: AddressInfo | null = null;
  mirrorAddress: AddressInfo | null = null;

  private constructor(public config: SiteConfig, readonly log: Logger) {
    this.files = new DataDir(config.dataDir);
    this.stores = new MirrorStores(this.files, {
      regionSize: config.mirror?.journal.regionSize ?? 0, maxBytes: config.mirror?.journal.maxBytes ?? 0,
    }, log);
    this.nbd = new NbdServer(this.luns, log, { mode: config.listen.tls, credentials: loadHostCredentials(config.listen) });
    this.metrics = new Metrics(() => this.status());
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
    this.lunsOf = new SiteLuns(this);
    this.failover = new Failover(this, this.lunsOf);
  }

  static async start(config: SiteConfig, log: Logger): Promise<Site> {
    const site = new Site(config, log);
    try {
      const oldMode = prepareDataDir(config.dataDir);
      if (oldMode !== null) {
        log.warn('dataDir was open to other users: set to 0700', { dataDir: config.dataDir, was: oldMode.toString(8) });
      }
      for (const lc of config.luns) await site.lunsOf.open(lc);
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

  promote(name: string, opts: PromoteOptions): Promise<RoleChange> { return this.failover.promote(name, opts); }
  demote(name: string): Promise<RoleChange> { return this.failover.demote(name); }
  resolve(name: string, discard: 'local' | 'remote'): Promise<RoleChange> { return this.failover.resolve(name, discard); }
  verify(name: string, opts: { repair: boolean }): Promise<VerifyReport> { return this.failover.verify(name, opts); }

  status(): SiteStatus {
    return siteStatus({
      config: this.config, luns: this.luns, nbd: this.nbd, nbdAddress: this.nbdAddress, mirrorAddress: this.mirrorAddress,
      sender: this.sender, receiver: this.receiver, heartbeat: this.heartbeat, transport: this.transport, stores: this.stores,
    });
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
      await this.lunsOf.remove(name);
      removed.push(name);
    }
    for (const [name, lc] of after) {
      if (before.has(name)) continue;
      try {
        await this.lunsOf.open(lc);
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

  async stop(): Promise<void> {
    await this.nbd.shutdown(this.config.shutdownTimeoutMs);
    await this.sender?.drain(this.config.shutdownTimeoutMs);
    this.sender?.stop();
    await this.heartbeat?.stop();
    await this.receiver?.close();
    await this.stores.closeAll();
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
