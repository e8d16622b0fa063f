// `nbd-mirror status`: the running site's status, as a table or JSON, once or redrawn.
import { fetchStatus, formatStatus, type AdminTarget } from '../admin/client.js';
import { loadConfig } from '../config/load.js';
import { EXIT } from '../errors.js';
import { adminTarget, notReachable } from './admin-target.js';
import { HELP } from './help.js';
import { options, UsageError } from './options.js';

export async function status(args: string[]): Promise<number> {
  const opts = options(args, {
    config: { type: 'string', short: 'c' }, admin: { type: 'string' }, json: { type: 'boolean' }, watch: { type: 'boolean', short: 'w' },
  }, HELP.status);
  if (!opts) return EXIT.ok;
  let target: AdminTarget;
  let who: string;
  if (opts.values.admin !== undefined) {
    target = adminTarget(opts.values.admin as string, HELP.status);
    who = 'site';
  } else if (opts.values.config) {
    const cfg = loadConfig(opts.values.config as string, { machine: false });
    target = { host: cfg.admin.host, port: cfg.admin.port };
    who = `site "${cfg.site}"`;
  } else {
    throw new UsageError(`status needs --config FILE or --admin ADDR\n\n${HELP.status}`);
  }
  const once = async (): Promise<number> => {
    let body: unknown;
    try {
      body = await fetchStatus(target);
    } catch (err) {
      return notReachable(who, target, err as Error);
    }
    console.log(opts.values.json ? JSON.stringify(body, null, 2) : formatStatus(body));
    return EXIT.ok;
  };
  if (!opts.values.watch) return once();
  const seconds = Number(opts.positionals[0] ?? 2);
  if (!(seconds > 0)) throw new UsageError(`--watch takes a number of seconds\n\n${HELP.status}`);
  for (;;) {
    if (process.stdout.isTTY) process.stdout.write('\x1b[H\x1b[2J');
    console.log(new Date().toISOString());
    await once();
    await new Promise((r) => setTimeout(r, seconds * 1000));
  }
}
