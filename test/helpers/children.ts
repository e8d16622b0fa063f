// Child processes a test helper starts (libnbd writers): SIGKILLed if the test process exits
// while they still run, so an aborted run leaves no writer behind.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';

const live = new Set<ChildProcess>();
let hooked = false;

export function spawnTracked(command: string, args: string[], opts: SpawnOptions): ChildProcess {
  if (!hooked) {
    hooked = true;
    process.on('exit', () => {
      for (const p of live) {
        try { p.kill('SIGKILL'); } catch { /* gone */ }
      }
    });
  }
  const proc = spawn(command, args, opts);
  live.add(proc);
  proc.once('exit', () => live.delete(proc));
  return proc;
}
