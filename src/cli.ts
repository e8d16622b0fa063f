#!/usr/bin/env node
import './threadpool.js';
import { parseArgs } from 'node:util';
import { ConfigError, loadConfig } from './config/load.js';
import { createLogger } from './log.js';
import { Site } from './site.js';
import { formatStatus, fetchStatus } from './admin/client.js';
import { notify, startWatchdog } from './admin/systemd.js';
import { describeSchema, formatSchema } from './config/describe.js';
import { formatJournalReport, inspectJournal } from './journal/inspect.js';
import { JournalError } from './journal/journal.js';
import { SecurityError } from './security/files.js';

/** Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error, 3 admin endpoint unreachable. */
const EXIT_OK = 0;
const EXIT_FAIL = 1;
const EXIT_USAGE = 2;
const EXIT_UNREACHABLE = 3;

const HELP: Record<string, string> = {
  main: `nbd-mirror — NBD block storage mirrored between two sites

Usage:
  nbd-mirror serve --config FILE                     run a site (NBD listener, mirror, admin endpoint)
  nbd-mirror status --config FILE [--json] [--watch] show LUN roles, modes, states and counters
  nbd-mirror config check FILE                       validate a configuration without serving
  nbd-mirror config schema [--json]                  every configuration key: doc, default, env variable
  nbd-mirror journal inspect LUN --config FILE [--json]  a LUN's journal: records, bytes, oldest age

Exit codes: 0 ok, 1 failure, 2 usage or configuration error, 3 site not reachable.
Run 'nbd-mirror COMMAND --help' for a command's options.`,
  serve: `Usage: nbd-mirror serve --config FILE

Serves the site's LUNs over NBD until SIGTERM/SIGINT, then finishes in-flight requests and exits 0.
Logs go to stdout (JSON lines unless log.format is pretty or stdout is a terminal).`,
  status: `Usage: nbd-mirror status --config FILE [--json] [--watch [SECONDS]]

Asks the running site's admin endpoint (admin.host:admin.port of FILE) for its status.
--watch redraws the table every 2 seconds (or SECONDS) until interrupted.`,
  config: `Usage: nbd-mirror config check FILE
       nbd-mirror config schema [--json]

check: validates FILE against the schema and checks every LUN path; prints "FILE: ok" or
one line naming the key and the problem (exit 2).
schema: prints every key with its doc, default and environment variable.`,
  journal: `Usage: nbd-mirror journal inspect LUN --config FILE [--json]

Reads the LUN's journal under dataDir (read-only, safe while the site runs) and prints its
records, bytes and the age of the oldest record; --json adds every record's header.`,
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
  const site = await Site.start(cfg, log);
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
        next = loadConfig(opts.values.config as string);
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
      luns: site.luns.all().map((l) => l.name),
    });
    // systemd (Type=notify): ready once every LUN is open and the listeners are bound; the
    // watchdog is fed only while the event loop keeps up (a stuck loop gets the service restarted).
    notify(`READY=1\nSTATUS=serving ${site.luns.all().length} LUNs`);
    stopWatchdog = startWatchdog(() => performance.now() - lastTick < 5000);
  });
}

async function status(args: string[]): Promise<number> {
  const opts = options(args, {
    config: { type: 'string', short: 'c' }, json: { type: 'boolean' }, watch: { type: 'boolean', short: 'w' },
  }, HELP.status);
  if (!opts) return EXIT_OK;
  if (!opts.values.config) throw new UsageError(`status needs --config FILE\n\n${HELP.status}`);
  const cfg = loadConfig(opts.values.config as string);
  const once = async (): Promise<number> => {
    let body: unknown;
    try {
      body = await fetchStatus(cfg.admin.host, cfg.admin.port);
    } catch (err) {
      console.error(`nbd-mirror: site "${cfg.site}" not reachable at ${cfg.admin.host}:${cfg.admin.port}: ${(err as Error).message}`);
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
  const report = await inspectJournal(`${cfg.dataDir}/${lunName}.journal`, lunName, lun.path);
  console.log(opts.values.json ? JSON.stringify(report, null, 2) : formatJournalReport(report));
  return report.corrupt ? EXIT_FAIL : EXIT_OK;
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
