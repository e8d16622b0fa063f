#!/usr/bin/env node
import './threadpool.js';
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { ConfigError, loadConfig } from './config/load.js';
import { adminSocketPath, type SiteConfig } from './config/schema.js';
import { createLogger } from './log.js';
import { Site } from './site/site.js';
import { DataDir } from './site/data-dir.js';
import {
  AdminUnreachableError, describeTarget, formatRoleChange, formatStatus, formatVerify, fetchStatus, parseAdminAddress, postAction,
  verifyLeftDifferences, type AdminTarget,
} from './admin/client.js';
import type { VerifyReport } from './admin/actions.js';
import { notify, startWatchdog } from './admin/systemd.js';
import { describeSchema, formatSchema } from './config/describe.js';
import { formatJournalReport, inspectJournal } from './persist/inspect.js';
import { JournalError } from './persist/journal.js';
import { SecurityError } from './security/files.js';

/** Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error, 3 admin endpoint unreachable. */
const EXIT_OK = 0;
const EXIT_FAIL = 1;
const EXIT_USAGE = 2;
const EXIT_UNREACHABLE = 3;

const ACTION_EXITS = `Exit codes: 0 done, 1 refused by the site (409: not possible in the current state) or failed,
2 usage error, not authorised (401/403), or the site answered 400/404 (bad or unknown LUN), 3 site not reachable.`;

const ACTION_TARGET = `The site is asked on its admin socket (admin.socket of FILE, by default admin.sock in dataDir,
mode 0600: run as the site's user, root under systemd). --admin SOCKET names the socket without a
configuration file; --admin HOST:PORT --token-file FILE uses TCP with the token of admin.tokenFile.`;

const HELP: Record<string, string> = {
  main: `nbd-mirror — NBD block storage mirrored between two sites

Usage:
  nbd-mirror serve --config FILE                     run a site (NBD listener, mirror, admin endpoint)
  nbd-mirror status --config FILE [--json] [--watch] show LUN roles, modes, states and counters
                                                     (--admin HOST:PORT instead: no config file needed)
  nbd-mirror config check FILE                       validate a configuration without serving
  nbd-mirror config schema [--json]                  every configuration key: doc, default, env variable
  nbd-mirror journal inspect LUN --config FILE [--json]  a LUN's journal: records, bytes, oldest age

Failover (ask the running site, through its admin socket; ADDR: the socket path, or HOST:PORT with --token-file):
  nbd-mirror promote LUN --config FILE [--force]     make this site's copy the primary
  nbd-mirror demote LUN --config FILE                make this site's copy a secondary
  nbd-mirror resolve LUN --config FILE (--discard-local | --discard-remote)   end a split brain
  nbd-mirror verify LUN --config FILE [--repair] [--json]   compare both copies (and resend what differs)

Exit codes: 0 ok, 1 failure, 2 usage or configuration error, 3 site not reachable.
Failover commands: 1 also when the site refuses (HTTP 409) or verify finds differences it did not
repair; 2 also when the site answers 400/404 (bad or unknown LUN).
Run 'nbd-mirror COMMAND --help' for a command's options.`,
  serve: `Usage: nbd-mirror serve --config FILE

Serves the site's LUNs over NBD until SIGTERM/SIGINT, then finishes in-flight requests and exits 0.
Logs go to stdout (JSON lines unless log.format is pretty or stdout is a terminal).`,
  status: `Usage: nbd-mirror status --config FILE [--json] [--watch [SECONDS]]
       nbd-mirror status --admin HOST:PORT|SOCKET [--json] [--watch [SECONDS]]

Asks the running site's admin endpoint (admin.host:admin.port of FILE, or ADDR) for its status.
--admin needs no configuration file (no LUN paths or key files).
--watch redraws the table every 2 seconds (or SECONDS) until interrupted.`,
  config: `Usage: nbd-mirror config check FILE
       nbd-mirror config schema [--json]

check: validates FILE against the schema and checks every LUN path; prints "FILE: ok" or
one line naming the key and the problem (exit 2).
schema: prints every key with its doc, default and environment variable.`,
  journal: `Usage: nbd-mirror journal inspect LUN --config FILE [--json]

Reads the LUN's journal under dataDir (read-only, safe while the site runs) and prints its
records, bytes and the age of the oldest record; --json adds every record's header.`,
  promote: `Usage: nbd-mirror promote LUN --config FILE [--force] [--force-never-synced] [--json]
       nbd-mirror promote LUN --admin SOCKET|HOST:PORT [--token-file FILE] [--force] [--force-never-synced] [--json]

${ACTION_TARGET}

Asks the running site to make its copy of LUN the primary, writable
for hosts. Refused (exit 1) while the peer is reachable and primary for LUN; --force promotes anyway
(both sites are then primary: a split brain, ended with 'nbd-mirror resolve'). A copy that never
completed an initial sync is no state of the old primary: promoting it is refused (exit 1) unless
--force-never-synced says that is accepted; its status then keeps saying so.
${ACTION_EXITS}`,
  demote: `Usage: nbd-mirror demote LUN --config FILE [--json]
       nbd-mirror demote LUN --admin SOCKET|HOST:PORT [--token-file FILE] [--json]

${ACTION_TARGET}

Asks the running site to make its copy of LUN a secondary: hosts' connections to it are closed and
it then takes the peer's data.
${ACTION_EXITS}`,
  resolve: `Usage: nbd-mirror resolve LUN --config FILE (--discard-local | --discard-remote) [--json]
       nbd-mirror resolve LUN --admin SOCKET|HOST:PORT [--token-file FILE] (--discard-local | --discard-remote) [--json]

${ACTION_TARGET}

Ends a split brain of LUN: --discard-local drops this site's changes (it takes the peer's data),
--discard-remote drops the peer's. Exactly one of the two.
${ACTION_EXITS}`,
  verify: `Usage: nbd-mirror verify LUN --config FILE [--repair] [--json]
       nbd-mirror verify LUN --admin SOCKET|HOST:PORT [--token-file FILE] [--repair] [--json]

${ACTION_TARGET}

Compares both sites' copies of LUN by range hashes while hosts keep writing (this can take minutes;
there is no time limit). --repair resends the differing ranges from the primary. --json prints the
report (bytes, regionSize, differing ranges, repaired, durationMs).
Exit codes: 0 identical (or every difference repaired), 1 differences left (without --repair) or
refused by the site (409), 2 usage error or the site answered 400/404, 3 site not reachable.`,
};

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    console.log(HELP.main);
    return command ? EXIT_OK : EXIT_USAGE;
  }
  switch (command) {
    case 'serve': return serve(rest);
    case 'status': return status(rest);
    case 'config': return config(rest);
    case 'journal': return journal(rest);
    case 'promote':
    case 'demote':
    case 'resolve':
    case 'verify':
      return action(command, rest);
    default:
      console.error(`nbd-mirror: unknown command "${command}"\n\n${HELP.main}`);
      return EXIT_USAGE;
  }
}

type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
interface Parsed { values: Record<string, string | boolean | undefined>; positionals: string[] }

function options(args: string[], spec: OptionSpec, help: string): Parsed | null {
  try {
    const parsed = parseArgs({ args, options: { ...spec, help: { type: 'boolean', short: 'h' } }, allowPositionals: true });
    if (parsed.values.help) {
      console.log(help);
      return null;
    }
    return parsed as Parsed;
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${help}`);
  }
}

class UsageError extends Error {}

async function serve(args: string[]): Promise<number> {
  const opts = options(args, { config: { type: 'string', short: 'c' } }, HELP.serve);
  if (!opts) return EXIT_OK;
  if (!opts.values.config) throw new UsageError(`serve needs --config FILE\n\n${HELP.serve}`);
  const cfg = loadConfig(opts.values.config as string);
  const log = createLogger(cfg.log.level, cfg.log.format, cfg.site);
  // A reload asked for while starting must not kill the process (SIGHUP's default action).
  const earlyHup = () => log.warn('SIGHUP while starting: ignored; send it again once ready');
  process.on('SIGHUP', earlyHup);
  let site: Site;
  try {
    site = await Site.start(cfg, log);
  } catch (err) {
    throw bindError(err, cfg, opts.values.config as string) ?? err;
  }
  process.off('SIGHUP', earlyHup);
  let lastTick = performance.now();
  const lagTimer = setInterval(() => { lastTick = performance.now(); }, 500);
  lagTimer.unref();
  let stopWatchdog: () => void = () => undefined;
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      notify('STOPPING=1');
      stopWatchdog();
      clearInterval(lagTimer);
      log.info('shutting down', { signal });
      site.stop().then(
        () => { log.info('stopped'); resolve(EXIT_OK); },
        (err: Error) => { log.error('shutdown failed', { error: err.message }); resolve(EXIT_FAIL); },
      );
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGHUP', () => {
      // Reload: a bad file is refused and the site keeps running with what it has.
      let next;
      notify('RELOADING=1');
      try {
        // The site holds its LUNs' devices exclusively: that is not "busy" for a reload.
        next = loadConfig(opts.values.config as string, { heldPaths: new Set(site.luns.all().map((l) => l.backing.path)) });
      } catch (err) {
        log.error('reload refused: configuration invalid', { error: (err as Error).message });
        notify('READY=1');
        return;
      }
      site.reload(next)
        .catch((err: Error) => log.error('reload failed', { error: err.message }))
        .finally(() => notify(`READY=1\nSTATUS=serving ${site.luns.all().length} LUNs`));
    });
    // Handlers first, then "ready": a signal right after readiness must find them installed.
    log.info('ready', {
      nbd: `${site.nbdAddress!.address}:${site.nbdAddress!.port}`,
      admin: `${site.adminAddress!.address}:${site.adminAddress!.port}`,
      adminSocket: adminSocketPath(cfg),
      luns: site.luns.all().map((l) => l.name),
    });
    // systemd (Type=notify): ready once every LUN is open and the listeners are bound; the
    // watchdog is fed only while the event loop keeps up (a stuck loop gets the service restarted).
    notify(`READY=1\nSTATUS=serving ${site.luns.all().length} LUNs`);
    stopWatchdog = startWatchdog(() => performance.now() - lastTick < 5000);
  });
}

/**
 * A listener that cannot bind (port taken, address not local, privileged port) is a configuration
 * problem: restarting does not help, so it exits 2 naming the keys, not 1.
 */
function bindError(err: unknown, cfg: SiteConfig, file: string): ConfigError | null {
  const e = err as NodeJS.ErrnoException & { port?: number; address?: string };
  if (!e || !['EADDRINUSE', 'EADDRNOTAVAIL', 'EACCES'].includes(e.code ?? '') || !['listen', 'bind'].includes(e.syscall ?? '')) return null;
  const keys = [
    ['listen', cfg.listen], ['admin', cfg.admin], ...(cfg.mirror ? [['mirror.listen', cfg.mirror.listen] as const] : []),
  ].filter(([, l]) => typeof l !== 'string' && l.port === e.port).map(([k]) => `${k}.host/${k}.port`);
  if (e.address === adminSocketPath(cfg)) keys.push('admin.socket');
  const what = e.code === 'EADDRINUSE' ? 'already in use' : e.code === 'EACCES' ? 'not permitted' : 'not an address of this machine';
  return new ConfigError(`${file}: ${keys.join(', ') || 'a listener'}: cannot bind ${e.address ?? '?'}${e.port === undefined ? '' : `:${e.port}`}: ${what} (${e.code})`);
}

async function status(args: string[]): Promise<number> {
  const opts = options(args, {
    config: { type: 'string', short: 'c' }, admin: { type: 'string' }, json: { type: 'boolean' }, watch: { type: 'boolean', short: 'w' },
  }, HELP.status);
  if (!opts) return EXIT_OK;
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
      console.error(`nbd-mirror: ${who} not reachable at ${describeTarget(target)}: ${reachMessage(err as Error)}`);
      return EXIT_UNREACHABLE;
    }
    console.log(opts.values.json ? JSON.stringify(body, null, 2) : formatStatus(body));
    return EXIT_OK;
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

async function config(args: string[]): Promise<number> {
  const opts = options(args, { json: { type: 'boolean' } }, HELP.config);
  if (!opts) return EXIT_OK;
  const [sub, file] = opts.positionals;
  if (sub === 'schema') {
    const keys = describeSchema();
    console.log(opts.values.json ? JSON.stringify(keys, null, 2) : formatSchema(keys));
    return EXIT_OK;
  }
  if (sub !== 'check' || !file) throw new UsageError(HELP.config);
  loadConfig(file);
  console.log(`${file}: ok`);
  return EXIT_OK;
}

async function journal(args: string[]): Promise<number> {
  const opts = options(args, { config: { type: 'string', short: 'c' }, json: { type: 'boolean' } }, HELP.journal);
  if (!opts) return EXIT_OK;
  const [sub, lunName] = opts.positionals;
  if (sub !== 'inspect' || !lunName || !opts.values.config) throw new UsageError(HELP.journal);
  const cfg = loadConfig(opts.values.config as string);
  const lun = cfg.luns.find((l) => l.name === lunName);
  if (!lun) throw new UsageError(`no LUN "${lunName}" in ${opts.values.config}`);
  const report = await inspectJournal(new DataDir(cfg.dataDir).journal(lunName), lunName, lun.path);
  console.log(opts.values.json ? JSON.stringify(report, null, 2) : formatJournalReport(report));
  return report.corrupt ? EXIT_FAIL : EXIT_OK;
}

type Action = 'promote' | 'demote' | 'resolve' | 'verify';

/** Actions other than verify answer within this; verify has no limit (it reads the whole LUN). */
const ACTION_TIMEOUT_MS = 60_000;

/** promote / demote / resolve / verify LUN --config FILE: POST /luns/LUN/ACTION to the site's admin endpoint. */
async function action(name: Action, args: string[]): Promise<number> {
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
  if (!opts) return EXIT_OK;
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
    if (err instanceof AdminUnreachableError) {
      console.error(`nbd-mirror: ${who} not reachable at ${describeTarget(target)}: ${reachMessage(err)}`);
      return EXIT_UNREACHABLE;
    }
    // Connected but no usable answer: the action may have happened.
    console.error(`nbd-mirror: ${name} ${lun}: ${(err as Error).message}; check 'nbd-mirror status ${statusHint}'`);
    return EXIT_FAIL;
  }
  const { status: code, body } = answer;
  if (code !== 200) {
    const message = (body as { error?: unknown } | null)?.error;
    console.error(`nbd-mirror: ${name} ${lun} refused by ${who} (HTTP ${code}): ${typeof message === 'string' ? message : JSON.stringify(body)}`);
    // 400/404: a bad or unknown LUN; 401/403: not authorised: usage-like, retrying does not help.
    return [400, 401, 403, 404].includes(code) ? EXIT_USAGE : EXIT_FAIL;
  }
  if (name === 'verify') {
    const repair = Boolean(opts.values.repair);
    console.log(opts.values.json ? JSON.stringify(body, null, 2) : formatVerify(body, repair));
    return verifyLeftDifferences(body as VerifyReport, repair) ? EXIT_FAIL : EXIT_OK;
  }
  console.log(opts.values.json ? JSON.stringify(body, null, 2) : formatRoleChange(name, body, { discard }));
  return EXIT_OK;
}

function adminTarget(text: string, help: string): AdminTarget {
  const t = parseAdminAddress(text);
  if (!t) throw new UsageError(`--admin takes HOST:PORT or the path of the admin socket (got "${text}")\n\n${help}`);
  return t;
}

function readToken(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new UsageError(`--token-file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** A connect failure, with what to do about a socket the user may not open. */
function reachMessage(err: Error): string {
  return /EACCES/.test(err.message)
    ? `${err.message} (the admin socket is for the site's user only: run as that user, e.g. root)`
    : err.message;
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err: Error) => {
    if (err instanceof ConfigError || err instanceof SecurityError) {
      console.error(`nbd-mirror: config error: ${err.message}`);
      process.exitCode = EXIT_USAGE;
    } else if (err instanceof JournalError) {
      // A journal for another LUN or size: restarting cannot help (the unit does not restart on 2).
      console.error(`nbd-mirror: ${err.message}; move the journal aside (its changes are then resynced from the dirty bitmap) or restore the LUN`);
      process.exitCode = EXIT_USAGE;
    } else if (err instanceof UsageError) {
      console.error(`nbd-mirror: ${err.message}`);
      process.exitCode = EXIT_USAGE;
    } else {
      console.error(`nbd-mirror: ${err.message}`);
      process.exitCode = EXIT_FAIL;
    }
  },
);
