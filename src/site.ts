// A running site: its LUNs, the NBD listener for hosts, and the admin endpoint.
import fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import { AdminServer } from './admin/server.js';
import type { LunConfig, SiteConfig } from './config/schema.js';
import type { Logger } from './log.js';
import { Lun } from './lun/lun.js';
import { LunRegistry } from './lun/registry.js';
import { MirrorReceiver } from './mirror/receiver.js';
import { MirrorSender } from './mirror/sender.js';
import { NbdServer } from './nbd/server.js';
import { Backing } from './storage/backing.js';

export class Site {
  readonly luns = new LunRegistry();
  private readonly nbd: NbdServer;
  private readonly admin: AdminServer;
  private readonly receiver: MirrorReceiver | null = null;
  private readonly sender: MirrorSender | null = null;
  nbdAddress: AddressInfo | null = null;
  adminAddress: AddressInfo | null = null;
  mirrorAddress: AddressInfo | null = null;

  private constructor(readonly config: SiteConfig, private readonly log: Logger) {
    this.nbd = new NbdServer(this.luns, log);
    this.admin = new AdminServer(() => this.status());
    if (config.mirror) {
      this.receiver = new MirrorReceiver(this.luns, { site: config.site, peerSite: config.mirror.peer.site }, log);
      this.sender = new MirrorSender(config.site, config.mirror, log);
    }
  }

  static async start(config: SiteConfig, log: Logger): Promise<Site> {
    const site = new Site(config, log);
    try {
      fs.mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
      for (const lc of config.luns) await site.openLun(lc);
      if (site.receiver) site.mirrorAddress = await site.receiver.listen(config.mirror!.listen.host, config.mirror!.listen.port);
      site.sender?.start();
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
    const lun = new Lun({ ...lc }, backing);
    this.luns.add(lun);
    if (lc.role === 'primary') this.sender?.attach(lun);
    this.log.info('LUN opened', {
      lun: lc.name, path: lc.path, size: backing.size, role: lc.role, mirror: lc.mirror,
      blockDevice: backing.isBlockDevice, readOnly,
    });
  }

  status() {
    return {
      site: this.config.site,
      listen: this.nbdAddress,
      mirror: this.sender && {
        listen: this.mirrorAddress,
        peer: this.sender.pool.peerSite || this.config.mirror!.peer.site,
        link: this.sender.pool.state,
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
    return {
      ...base, state: m.state, reason: m.reason,
      mirrored: { ops: m.stats.ops, bytes: m.stats.bytes, failures: m.stats.failures },
      inflight: m.inflight, lagBytes: m.inflightBytes,
    };
  }

  async stop(): Promise<void> {
    await this.nbd.shutdown(this.config.shutdownTimeoutMs);
    await this.sender?.drain(this.config.shutdownTimeoutMs);
    this.sender?.stop();
    await this.receiver?.close();
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
