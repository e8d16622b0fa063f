// A running site: its LUNs, the NBD listener for hosts, and the admin endpoint.
import fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import { AdminServer } from './admin/server.js';
import type { LunConfig, SiteConfig } from './config/schema.js';
import type { Logger } from './log.js';
import { Lun } from './lun/lun.js';
import { LunRegistry } from './lun/registry.js';
import { NbdServer } from './nbd/server.js';
import { Backing } from './storage/backing.js';

export class Site {
  readonly luns = new LunRegistry();
  private readonly nbd: NbdServer;
  private readonly admin: AdminServer;
  nbdAddress: AddressInfo | null = null;
  adminAddress: AddressInfo | null = null;

  private constructor(readonly config: SiteConfig, private readonly log: Logger) {
    this.nbd = new NbdServer(this.luns, log);
    this.admin = new AdminServer(() => this.status());
  }

  static async start(config: SiteConfig, log: Logger): Promise<Site> {
    const site = new Site(config, log);
    try {
      fs.mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
      for (const lc of config.luns) await site.openLun(lc);
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
    this.luns.add(new Lun({ ...lc }, backing));
    this.log.info('LUN opened', {
      lun: lc.name, path: lc.path, size: backing.size, role: lc.role, mirror: lc.mirror,
      blockDevice: backing.isBlockDevice, readOnly,
    });
  }

  status() {
    return {
      site: this.config.site,
      listen: this.nbdAddress,
      luns: this.luns.all().map((lun) => ({
        name: lun.name,
        path: lun.backing.path,
        size: lun.size,
        role: lun.spec.role,
        mode: lun.spec.mirror,
        readOnly: lun.readOnly,
        state: lun.spec.mirror === 'none' ? 'standalone' : 'connecting',
        hosts: this.nbd.connectionCount(lun.name),
        counters: lun.counters,
      })),
    };
  }

  async stop(): Promise<void> {
    await this.nbd.shutdown(this.config.shutdownTimeoutMs);
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
