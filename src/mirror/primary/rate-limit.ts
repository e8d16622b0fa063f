// A token bucket for background work (initial sync, resync, verify): at most `bytesPerSec` on
// average, in bursts of up to one second's worth, so host I/O keeps its share of the disks and link.
export class RateLimiter {
  private tokens: number;
  private last = Date.now();

  constructor(readonly bytesPerSec: number) {
    this.tokens = bytesPerSec;
  }

  /** Wait until `bytes` may be spent. */
  async take(bytes: number): Promise<void> {
    for (;;) {
      const now = Date.now();
      this.tokens = Math.min(this.bytesPerSec, this.tokens + ((now - this.last) / 1000) * this.bytesPerSec);
      this.last = now;
      if (this.tokens >= Math.min(bytes, this.bytesPerSec)) {
        this.tokens -= bytes;
        return;
      }
      const waitMs = Math.ceil(((Math.min(bytes, this.bytesPerSec) - this.tokens) / this.bytesPerSec) * 1000);
      await new Promise((r) => setTimeout(r, Math.max(1, waitMs)));
    }
  }
}
