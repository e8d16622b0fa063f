// A secondary LUN's applied point (<lun>.applied, 64 bytes, 0600): the primary run it follows and
// the sequence number up to which it has applied every request of that run. A restarted
// secondary tells the primary this point in its answer, so the primary resumes after it, and it
// never applies a request at or below it again: re-applying an old journal record over a newer
// write would take the copy back in time.
//
// The rule that makes this enough: before a request whose `dep` is above the recorded point is
// applied, the point is recorded at (at least) that dep. So any request above the point that was
// applied has no newer overlapping request applied after it, and applying it again is harmless.
//
// Recording is one small positional write into the page cache (a killed process loses nothing);
// `durable` is the point as of the last backing flush, the only one trusted after a reboot.
import { crc32c } from '@node-rs/crc32';
import fs from 'node:fs';
import { readU64, writeU64 } from '../net/u64.js';
import { closeFd, fdatasync, openFile } from './file-io.js';

export const APPLIED_MAGIC = Buffer.from('NBDMAPLD', 'latin1');
const SIZE = 64;
// magic 8 | version u16 | pad u16 | instance 8 | prefix u64 | durable u64 | bootId 16 | pad 8 | crc u32 at 60
const NO_INSTANCE = Buffer.alloc(8);

/** This boot's id (`override`: a test seam that stands for a reboot, 32 hex digits). */
function readBootId(override?: string): Buffer {
  if (override && /^[0-9a-f]{32}$/i.test(override)) return Buffer.from(override, 'hex');
  try {
    return Buffer.from(fs.readFileSync('/proc/sys/kernel/random/boot_id', 'latin1').trim().replace(/-/g, ''), 'hex').subarray(0, 16);
  } catch {
    return Buffer.alloc(16);
  }
}

export class AppliedPoint {
  /** The primary run (its instance id) the point belongs to, or null: none recorded. */
  instance: Buffer | null = null;
  prefix = 0;
  /**
   * Restored after a reboot from a point that had applied more than it had flushed: the requests
   * above `prefix` were answered but may be lost. The primary must be told (it resends them).
   */
  lostAbove = false;
  private durable = 0;
  private readonly buf = Buffer.alloc(SIZE);
  private readonly bootId = readBootId(process.env.NBD_MIRROR_TEST_BOOT_ID);
  private closed = false;

  private constructor(private readonly fd: number, readonly file: string) {}

  /**
   * Open (creating it empty). A damaged file is reported and treated as no point (the primary's
   * offer then decides, as for a new secondary); after a reboot only the durable point counts.
   */
  static async open(file: string, onDamaged: (reason: string) => void = () => undefined): Promise<AppliedPoint> {
    const fd = await openFile(file, fs.constants.O_RDWR | fs.constants.O_CREAT);
    const p = new AppliedPoint(fd, file);
    const got = Buffer.alloc(SIZE);
    const n = fs.readSync(fd, got, 0, SIZE, 0);
    if (n === 0) return p;
    if (n < SIZE || !got.subarray(0, 8).equals(APPLIED_MAGIC) || got.readUInt32BE(60) !== crc32c(got.subarray(0, 60)) >>> 0) {
      onDamaged(n < SIZE ? `${n} bytes` : 'bad magic or CRC');
      return p;
    }
    const instance = got.subarray(12, 20);
    if (instance.equals(NO_INSTANCE)) return p;
    const prefix = readU64(got, 20);
    const durable = readU64(got, 28);
    const sameBoot = got.subarray(36, 52).equals(p.bootId);
    p.instance = Buffer.from(instance);
    p.prefix = sameBoot ? prefix : durable;
    p.durable = durable;
    p.lostAbove = !sameBoot && prefix > durable;
    return p;
  }

  /** Record `prefix` of run `instance` (synchronous: it must precede what depends on it). */
  record(instance: Buffer, prefix: number): void {
    if (this.closed) return;
    if (this.instance === null || !this.instance.equals(instance)) {
      this.instance = Buffer.from(instance);
      this.durable = 0;
    }
    this.prefix = prefix;
    this.write();
  }

  /** The backing was flushed with everything up to `prefix` applied: that much survives a reboot too. */
  async flushed(instance: Buffer, prefix: number): Promise<void> {
    if (this.closed || !this.instance || !this.instance.equals(instance) || prefix <= this.durable) return;
    this.durable = prefix;
    this.write();
    await fdatasync(this.fd);
  }

  /** Forget the point (the copy was overwritten by other means, e.g. a rollback or a discard). */
  clear(): void {
    this.instance = null;
    this.prefix = 0;
    this.durable = 0;
    if (!this.closed) this.write();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await closeFd(this.fd);
  }

  private write(): void {
    const b = this.buf;
    b.fill(0);
    APPLIED_MAGIC.copy(b, 0);
    b.writeUInt16BE(1, 8);
    (this.instance ?? NO_INSTANCE).copy(b, 12);
    writeU64(b, 20, this.prefix);
    writeU64(b, 28, Math.min(this.durable, this.prefix));
    this.bootId.copy(b, 36);
    b.writeUInt32BE(crc32c(b.subarray(0, 60)) >>> 0, 60);
    fs.writeSync(this.fd, b, 0, SIZE, 0);
  }
}
