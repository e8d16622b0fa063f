// Temporary directories/files and a LIFO cleanup stack for after()/afterEach() hooks.
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

export interface TmpDir {
  path: string;
  /** Join `parts` onto the temp dir. */
  join(...parts: string[]): string;
  /** Remove the directory recursively (idempotent). */
  cleanup(): Promise<void>;
}

/** Create a fresh directory under os.tmpdir(). */
export async function tmpDir(prefix = 'nbd-mirror-test-'): Promise<TmpDir> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  return {
    path: dir,
    join: (...parts: string[]) => path.join(dir, ...parts),
    cleanup: () => fs.rm(dir, { recursive: true, force: true, maxRetries: 3 }),
  };
}

/**
 * A stack of cleanup actions, run in reverse order. Every action runs even if an earlier one
 * fails; the failures are reported together at the end.
 */
export class Cleanup {
  private readonly actions: { label: string; fn: () => unknown }[] = [];

  /** Register `fn` (run by run(), last registered first). */
  add(label: string, fn: () => unknown): void {
    this.actions.push({ label, fn });
  }

  get size(): number {
    return this.actions.length;
  }

  async run(): Promise<void> {
    const errors: string[] = [];
    while (this.actions.length > 0) {
      const { label, fn } = this.actions.pop()!;
      try {
        await fn();
      } catch (err) {
        errors.push(`${label}: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
    if (errors.length > 0) throw new Error(`cleanup failed:\n${errors.join('\n')}`);
  }
}

/** Create (or truncate) a sparse file of `size` bytes. */
export async function sparseFile(file: string, size: number): Promise<string> {
  const fh = await fs.open(file, 'w');
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
  return file;
}

/** Write `size` bytes of random data to `file` (in 4 MiB chunks). */
export async function randomFile(file: string, size: number): Promise<string> {
  const fh = await fs.open(file, 'w');
  try {
    const chunk = 4 * 1024 * 1024;
    for (let off = 0; off < size; off += chunk) {
      const n = Math.min(chunk, size - off);
      await fh.write(randomBytes(n), 0, n, off);
    }
  } finally {
    await fh.close();
  }
  return file;
}

/** sha256 (hex) of a file, or of its first `length` bytes. */
export function sha256File(file: string, length?: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    const stream = createReadStream(file, length === undefined ? {} : { start: 0, end: length - 1 });
    stream.on('error', reject);
    stream.on('data', (d) => hash.update(d));
    stream.on('end', () => resolve(hash.digest('hex')));
  });
}

/** Read `length` bytes at `offset` from a file or block device. */
export async function readAt(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

export async function pathExists(p: string): Promise<boolean> {
  try {
    await fs.access(p);
    return true;
  } catch {
    return false;
  }
}

export interface PollOptions {
  timeoutMs?: number;
  intervalMs?: number;
  what?: string;
}

/**
 * Poll `check` until it returns a truthy value or the deadline passes. Only for conditions with
 * no event to wait on (a file appearing, a mount becoming ready...).
 */
export async function pollUntil<T>(check: () => Promise<T | undefined | null | false> | T | undefined | null | false, opts: PollOptions = {}): Promise<T> {
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  const interval = opts.intervalMs ?? 50;
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() >= deadline) {
      const why = lastErr instanceof Error ? ` (last error: ${lastErr.message})` : '';
      throw new Error(`timed out after ${opts.timeoutMs ?? 10_000} ms waiting for ${opts.what ?? 'condition'}${why}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}
