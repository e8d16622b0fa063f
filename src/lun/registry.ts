// The site's LUNs by name, in configuration order (the first one is NBD's default export "").
import type { Lun } from './lun.js';

export class LunRegistry {
  private readonly byName = new Map<string, Lun>();

  add(lun: Lun): void {
    if (this.byName.has(lun.name)) throw new Error(`duplicate LUN name ${lun.name}`);
    this.byName.set(lun.name, lun);
  }

  remove(name: string): Lun | undefined {
    const lun = this.byName.get(name);
    this.byName.delete(name);
    return lun;
  }

  /** Export lookup for NBD: the empty name means the default (first) export. */
  find(name: string): Lun | undefined {
    if (name === '') return this.byName.values().next().value;
    return this.byName.get(name);
  }

  /** Exact lookup (no default): what the mirror pairs by. */
  get(name: string): Lun | undefined {
    return this.byName.get(name);
  }

  all(): Lun[] {
    return [...this.byName.values()];
  }
}
