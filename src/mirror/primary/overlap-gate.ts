// Serializes overlapping writes of a mirrored LUN: a write waits while an earlier one that
// overlaps it is in flight (or still waiting). Non-overlapping writes run in parallel. So the
// order in which the primary applied two overlapping writes is the order of their sequence
// numbers, which the secondary then follows.

export interface GateToken { start: number; end: number }
interface Waiter extends GateToken { resolve: (t: GateToken) => void }

export class OverlapGate {
  private readonly active = new Set<GateToken>();
  private waiters: Waiter[] = [];

  /** The token once no earlier overlapping write is active or waiting (synchronously if free). */
  enter(start: number, len: number): GateToken | Promise<GateToken> {
    const t = { start, end: start + len };
    if (!overlapsAny(t, this.active) && !overlapsAny(t, this.waiters)) {
      this.active.add(t);
      return t;
    }
    return new Promise((resolve) => this.waiters.push({ ...t, resolve }));
  }

  leave(t: GateToken): void {
    this.active.delete(t);
    if (this.waiters.length === 0) return;
    const still: Waiter[] = [];
    for (const w of this.waiters) {
      // A waiter overlapping an earlier one that still waits keeps its place behind it.
      if (overlapsAny(w, this.active) || overlapsAny(w, still)) {
        still.push(w);
      } else {
        this.active.add(w);
        w.resolve(w);
      }
    }
    this.waiters = still;
  }

  get size(): number {
    return this.active.size + this.waiters.length;
  }
}

function overlapsAny(r: GateToken, set: Iterable<GateToken>): boolean {
  for (const a of set) if (a.start < r.end && r.start < a.end) return true;
  return false;
}
