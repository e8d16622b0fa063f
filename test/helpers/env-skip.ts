// A test that needs what this machine lacks (root, x86-64, a way to install QEMU) is skipped with
// its reason, never silently; under .ci/run (NBD_MIRROR_CI=1, root on Debian) it fails instead,
// since there every test must run.
import type { Context } from 'mocha';

export function skipForEnvironment(ctx: Context, why: string): never {
  if (process.env.NBD_MIRROR_CI) throw new Error(`CI runs every test, but this one cannot run here: ${why}`);
  console.log(`      skipped: ${why}`);
  ctx.skip();
}
