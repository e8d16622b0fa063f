// `nbd-mirror promote|demote|resolve|verify`: ask the running site through its admin endpoint.
import {
  formatRoleChange, formatVerify, postAction, verifyLeftDifferences, type AdminTarget,
} from '../admin/client.js';
import type { VerifyReport } from '../admin/actions.js';
import { loadConfig } from '../config/load.js';
import { adminSocketPath } from '../config/schema.js';
import { codeOfStatus, ERROR_CODES, errorCode, EXIT, exitCodeOf } from '../errors.js';
import { adminTarget, notReachable, readToken } from './admin-target.js';
import { HELP } from './help.js';
import { options, UsageError, type OptionSpec } from './options.js';

export type Action = 'promote' | 'demote' | 'resolve' | 'verify';

/** Actions other than verify answer within this; verify has no limit (it reads the whole LUN). */
const ACTION_TIMEOUT_MS = 60_000;

/** promote / demote / resolve / verify LUN --config FILE: POST /luns/LUN/ACTION to the site's admin endpoint. */
export async function action(name: Action, args: string[]): Promise<number> {
  const help = HELP[name];
  const spec: OptionSpec = {
    config: { type: 'string', short: 'c' }, admin: { type: 'string' }, 'token-file': { type: 'string' }, json: { type: 'boolean' },
  };
  if (name === 'promote') {
    spec.force = { type: 'boolean' };
    spec['force-never-synced'] = { type: 'boolean' };
  }
  if (name === 'resolve') {
    spec['discard-local'] = { type: 'boolean' };
    spec['discard-remote'] = { type: 'boolean' };
  }
  if (name === 'verify') spec.repair = { type: 'boolean' };
  const opts = options(args, spec, help);
  if (!opts) return EXIT.ok;
  const [lun, ...extra] = opts.positionals;
  if (!lun) throw new UsageError(`${name} needs a LUN name\n\n${help}`);
  if (extra.length) throw new UsageError(`${name}: unexpected argument "${extra[0]}"\n\n${help}`);
  if (!opts.values.config && opts.values.admin === undefined) throw new UsageError(`${name} needs --config FILE or --admin ADDR\n\n${help}`);
  const query: Record<string, string> = {};
  let discard: 'local' | 'remote' | undefined;
  if (name === 'promote' && opts.values.force) query.force = '1';
  if (name === 'promote' && opts.values['force-never-synced']) query['never-synced'] = '1';
  if (name === 'verify' && opts.values.repair) query.repair = '1';
  if (name === 'resolve') {
    const local = Boolean(opts.values['discard-local']);
    const remote = Boolean(opts.values['discard-remote']);
    if (local === remote) {
      throw new UsageError(`resolve needs exactly one of --discard-local and --discard-remote\n\n${help}`);
    }
    discard = local ? 'local' : 'remote';
    query.discard = discard;
  }
  let target: AdminTarget;
  let who: string;
  let statusHint: string;
  if (opts.values.admin !== undefined) {
    target = adminTarget(opts.values.admin as string, help);
    who = 'site';
    statusHint = `--admin ${opts.values.admin as string}`;
  } else {
    // Only what the socket needs: the action does not read the LUNs or the key files.
    const cfg = loadConfig(opts.values.config as string, { machine: false });
    target = { socketPath: adminSocketPath(cfg) };
    who = `site "${cfg.site}"`;
    statusHint = `--config ${opts.values.config as string}`;
  }
  if (opts.values['token-file'] !== undefined) {
    if ('socketPath' in target) throw new UsageError(`${name}: --token-file goes with --admin HOST:PORT (the socket needs none)\n\n${help}`);
    target.token = readToken(opts.values['token-file'] as string);
  }
  let answer;
  try {
    answer = await postAction(target, lun, name, query, name === 'verify' ? 0 : ACTION_TIMEOUT_MS);
  } catch (err) {
    if (errorCode(err) === 'unreachable') return notReachable(who, target, err as Error);
    // Connected but no usable answer: the action may have happened.
    console.error(`nbd-mirror: ${name} ${lun}: ${(err as Error).message}; check 'nbd-mirror status ${statusHint}'`);
    return exitCodeOf(err);
  }
  const { status: code, body } = answer;
  if (code !== 200) {
    const message = (body as { error?: unknown } | null)?.error;
    console.error(`nbd-mirror: ${name} ${lun} refused by ${who} (HTTP ${code}): ${typeof message === 'string' ? message : JSON.stringify(body)}`);
    // 400/404: a bad or unknown LUN; 401/403: not authorised: usage-like, retrying does not help.
    return ERROR_CODES[codeOfStatus(code)].exit;
  }
  if (name === 'verify') {
    const repair = Boolean(opts.values.repair);
    console.log(opts.values.json ? JSON.stringify(body, null, 2) : formatVerify(body, repair));
    return verifyLeftDifferences(body as VerifyReport, repair) ? EXIT.fail : EXIT.ok;
  }
  console.log(opts.values.json ? JSON.stringify(body, null, 2) : formatRoleChange(name, body, { discard }));
  return EXIT.ok;
}
