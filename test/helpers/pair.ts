// Start two mirrored nbd-mirror sites ("a" and "b") on 127.0.0.1 that name each other as peer,
// and read their status from the admin endpoint.
import http from 'node:http';
import { freePorts, pollUntil, startSite, type LunConfig, type Site } from './site.js';

export interface MirrorConnectionStatus {
  index: number;
  status: 'down' | 'connecting' | 'up';
  lastSeen: number;
  inflight: number;
}

export interface LunStatus {
  name: string;
  path: string;
  size: number;
  role: 'primary' | 'secondary';
  mode: string;
  state: string;
  reason?: string;
  readOnly: boolean;
  /** Host connections to this export. */
  hosts: number;
  counters: {
    readOps: number; readBytes: number; writeOps: number; writeBytes: number;
    trimOps: number; zeroOps: number; flushOps: number; errors: number;
  };
  mirrored?: { ops: number; bytes: number; failures: number };
  inflight?: number;
  lagBytes?: number;
  peer?: string | null;
  appliedSeq?: number;
  applied?: { ops: number; bytes: number; flushes: number; errors: number };
}

export interface SiteStatus {
  site: string;
  mirror: {
    link: 'up' | 'down' | 'connecting';
    peer: string;
    connections: MirrorConnectionStatus[];
  } | null;
  luns: LunStatus[];
}

export interface PairSideInput {
  luns: LunConfig[];
  /** Extra keys merged into the site's "mirror" section (e.g. asyncWindowBytes). */
  mirror?: Record<string, unknown>;
}

export interface PairOptions {
  a: PairSideInput;
  b: PairSideInput;
  /** Pool size of both sites. Default 4. */
  connections?: number;
  /** Reconnect pause. Default 200 ms. */
  reconnectMs?: number;
}

export interface Pair {
  a: Site;
  b: Site;
  /** Mirror listener ports of a and b. */
  mirA: number;
  mirB: number;
  /** Stop both sites (idempotent; a stop failure of one does not skip the other). */
  stop(): Promise<void>;
}

/**
 * Start sites a and b, each with its mirror listener on a free port and the other as peer.
 * Both are started together (each retries the pool every reconnectMs until the other listens).
 */
export async function startPair(opts: PairOptions): Promise<Pair> {
  // All six ports at once, so none of them can collide with another.
  const [nbdA, admA, mirA, nbdB, admB, mirB] = await freePorts(6);
  const connections = opts.connections ?? 4;
  const reconnectMs = opts.reconnectMs ?? 200;
  const mirror = (listen: number, peer: number, peerSite: string, extra?: Record<string, unknown>) => ({
    listen: { host: '127.0.0.1', port: listen },
    peer: { host: '127.0.0.1', port: peer, site: peerSite },
    connections,
    reconnectMs,
    ...extra,
  });
  const started = await Promise.allSettled([
    startSite({
      site: 'a', listen: { host: '127.0.0.1', port: nbdA }, admin: { host: '127.0.0.1', port: admA },
      mirror: mirror(mirA, mirB, 'b', opts.a.mirror), luns: opts.a.luns,
    }),
    startSite({
      site: 'b', listen: { host: '127.0.0.1', port: nbdB }, admin: { host: '127.0.0.1', port: admB },
      mirror: mirror(mirB, mirA, 'a', opts.b.mirror), luns: opts.b.luns,
    }),
  ]);
  const sites = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) {
    await Promise.allSettled(sites.map((s) => s.stop()));
    throw failed.reason;
  }
  const [a, b] = sites;
  return {
    a, b, mirA, mirB,
    stop: async () => {
      const results = await Promise.allSettled([a.stop(), b.stop()]);
      const err = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (err) throw err.reason;
    },
  };
}

/** GET /status from a site's admin endpoint. */
export function siteStatus(site: Site, timeoutMs = 5000): Promise<SiteStatus> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: site.adminPort, path: '/status', timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        if (res.statusCode !== 200) {
          reject(new Error(`GET /status: HTTP ${res.statusCode}`));
          return;
        }
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')) as SiteStatus);
        } catch (err) {
          reject(err as Error);
        }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('GET /status timed out')));
    req.on('error', reject);
  });
}

/** One LUN's status; throws if the site does not list it. */
export async function lunStatus(site: Site, name: string): Promise<LunStatus> {
  const st = await siteStatus(site);
  const lun = st.luns.find((l) => l.name === name);
  if (!lun) throw new Error(`site ${st.site} has no LUN "${name}" in its status`);
  return lun;
}

/**
 * Poll until every named LUN is in the given state; resolves with the site's last status.
 * On timeout the error names the states actually seen.
 */
export async function waitLunStates(site: Site, want: Record<string, string>, timeoutMs = 15_000): Promise<SiteStatus> {
  let last: SiteStatus | null = null;
  try {
    return await pollUntil(async () => {
      last = await siteStatus(site);
      const st = last;
      return Object.entries(want).every(([name, state]) => st.luns.find((l) => l.name === name)?.state === state) && st;
    }, { timeoutMs, intervalMs: 50, what: `LUN states ${JSON.stringify(want)} on site ${site.config.site}` });
  } catch (err) {
    const seen = last ? JSON.stringify((last as SiteStatus).luns.map((l) => ({ name: l.name, state: l.state, reason: l.reason }))) : 'no status';
    throw new Error(`${(err as Error).message}; last seen: ${seen}`);
  }
}

/** Poll until a primary LUN has no mirror request in flight (async lag drained). */
export function waitDrained(site: Site, name: string, timeoutMs = 15_000): Promise<LunStatus> {
  return pollUntil(async () => {
    const l = await lunStatus(site, name);
    return l.inflight === 0 && l.lagBytes === 0 && l;
  }, { timeoutMs, intervalMs: 50, what: `${name} on site ${site.config.site} to drain its mirror lag` });
}
