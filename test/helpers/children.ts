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

/** Call `onLine` for each complete line the stream emits (UTF-8); returns what follows the last newline so far. */
export function onLines(stream: NodeJS.ReadableStream, onLine: (line: string) => void): () => string {
  let partial = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    partial += chunk;
    let i: number;
    while ((i = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, i);
      partial = partial.slice(i + 1);
      onLine(line);
    }
  });
  return () => partial;
}
