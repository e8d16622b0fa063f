// Client side of the admin endpoint, for `nbd-mirror status`.
import http from 'node:http';

export function fetchStatus(host: string, port: number, timeoutMs = 5000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host, port, path: '/status', timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
  });
}

interface LunStatus { name: string; role: string; mode: string; state: string; size: number; hosts: number;
  counters: { writeOps: number; writeBytes: number; readOps: number } }

/** A readable table of the status JSON. */
export function formatStatus(body: unknown): string {
  const s = body as { site: string; luns: LunStatus[] };
  const rows = [['LUN', 'ROLE', 'MODE', 'STATE', 'SIZE', 'HOSTS', 'WRITES', 'WRITTEN', 'READS']];
  for (const l of s.luns) {
    rows.push([l.name, l.role, l.mode, l.state, bytes(l.size), String(l.hosts), String(l.counters.writeOps),
      bytes(l.counters.writeBytes), String(l.counters.readOps)]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  const table = rows.map((r) => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd()).join('\n');
  return `site ${s.site}\n${table}`;
}

function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}
