// The process's own health for /status: resident memory and the longest event-loop stall since
// start (a stall delays heartbeats, host replies and the systemd watchdog alike).
import { monitorEventLoopDelay } from 'node:perf_hooks';

const loopDelay = monitorEventLoopDelay({ resolution: 10 });
loopDelay.enable();

export function processStatus(): { rssBytes: number; eventLoopDelayMaxMs: number } {
  return { rssBytes: process.memoryUsage.rss(), eventLoopDelayMaxMs: Math.round(loopDelay.max / 1e4) / 100 };
}
