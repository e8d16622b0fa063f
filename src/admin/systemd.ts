// systemd integration: sd_notify(3) readiness/status/watchdog messages, through koffi.
//
// systemd hands a Type=notify service the path of a unix DATAGRAM socket in NOTIFY_SOCKET
// (a file path, or "@name" in the abstract namespace). Node's dgram module speaks only UDP, so
// the message goes through libsystemd's own sd_notify(), loaded lazily the first time it is
// needed. Everything here is best effort: with no NOTIFY_SOCKET (not started by systemd, or
// Type=simple), without libsystemd, or if sending fails, notify() returns false and never throws.
//
// Typical use by `serve`:
//   notify('READY=1');                         after the listeners are bound
//   const stop = startWatchdog(() => healthy); pings WATCHDOG=1 while healthy (WatchdogSec=)
//   notify('STOPPING=1');                      on SIGTERM, before the graceful shutdown
//   notify('RELOADING=1'), then notify('READY=1') around a SIGHUP reload
import koffi from 'koffi';

export const LIBSYSTEMD = 'libsystemd.so.0';

type SdNotifyFn = (unsetEnvironment: number, state: string) => number;

/** Returns a notify function bound to `library` (loaded on the first call that needs it). */
export function createNotifier(library = LIBSYSTEMD): (state: string) => boolean {
  // undefined: not tried yet; null: tried and failed (not retried).
  let fn: SdNotifyFn | null | undefined;
  const load = (): SdNotifyFn | null => {
    if (fn !== undefined) return fn;
    try {
      const lib = koffi.load(library);
      fn = lib.func('int sd_notify(int unset_environment, const char *state)') as SdNotifyFn;
    } catch {
      fn = null;
    }
    return fn;
  };
  return (state: string): boolean => {
    if (!process.env.NOTIFY_SOCKET) return false;
    const sdNotify = load();
    if (!sdNotify) return false;
    try {
      // > 0 sent; 0 NOTIFY_SOCKET unset (as libsystemd sees it); < 0 -errno.
      return sdNotify(0, state) > 0;
    } catch {
      return false;
    }
  };
}

const defaultNotify = createNotifier();

/**
 * Send `state` (newline-separated assignments such as "READY=1", "STATUS=…", "WATCHDOG=1",
 * "STOPPING=1") to the service manager. False when not under systemd, when libsystemd cannot be
 * loaded, or when sending failed; never throws.
 */
export function notify(state: string): boolean {
  return defaultNotify(state);
}

/**
 * How often to send WATCHDOG=1: half of WATCHDOG_USEC (set by WatchdogSec=), in ms. null when
 * the watchdog is off for this process: WATCHDOG_USEC unset, not a positive integer, or
 * WATCHDOG_PID set to another process's pid.
 */
export function watchdogIntervalMs(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): number | null {
  const usecText = env.WATCHDOG_USEC;
  if (!usecText || !/^\d+$/.test(usecText.trim())) return null;
  const usec = Number(usecText.trim());
  if (!Number.isSafeInteger(usec) || usec <= 0) return null;
  const pidText = env.WATCHDOG_PID;
  if (pidText !== undefined && pidText !== '') {
    if (!/^\d+$/.test(pidText.trim()) || Number(pidText.trim()) !== pid) return null;
  }
  return Math.max(1, Math.floor(usec / 2000));
}

/**
 * Ping the systemd watchdog at watchdogIntervalMs() while `isHealthy()` returns true (a check
 * that throws counts as unhealthy). If the watchdog is off, does nothing. The timer does not
 * keep the process alive. Returns a function that stops the pings.
 */
export function startWatchdog(isHealthy: () => boolean, send: (state: string) => boolean = notify): () => void {
  const interval = watchdogIntervalMs();
  if (interval === null) return () => undefined;
  const timer = setInterval(() => {
    let healthy = false;
    try {
      healthy = isHealthy();
    } catch {
      healthy = false;
    }
    if (healthy) send('WATCHDOG=1');
  }, interval);
  timer.unref();
  return () => clearInterval(timer);
}
