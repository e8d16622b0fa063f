// `nbd-mirror serve`: run a site until SIGTERM/SIGINT; SIGHUP reloads the configuration.
import { ConfigError, loadConfig } from '../config/load.js';
import { adminSocketPath, type SiteConfig } from '../config/schema.js';
import { EXIT } from '../errors.js';
import { createLogger } from '../log.js';
import { Site } from '../site/site.js';
import { notify, startWatchdog } from '../admin/systemd.js';
import { HELP } from './help.js';
import { options, UsageError } from './options.js';

export async function serve(args: string[]): Promise<number> {
  const opts = options(args, { config: { type: 'string', short: 'c' } }, HELP.serve);
  if (!opts) return EXIT.ok;
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
        () => { log.info('stopped'); resolve(EXIT.ok); },
        (err: Error) => { log.error('shutdown failed', { error: err.message }); resolve(EXIT.fail); },
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
