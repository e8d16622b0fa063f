// SIGHUP: what changed between two configurations, as dotted keys.

/** Dotted paths of the keys whose values differ between two configuration objects. */
export function changedKeys(a: unknown, b: unknown, prefix: string): string[] {
  const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  if (!isObj(a) || !isObj(b)) return JSON.stringify(a) === JSON.stringify(b) ? [] : [prefix.replace(/\.$/, '')];
  const out: string[] = [];
  for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const [x, y] = [a[k], b[k]];
    if (isObj(x) && isObj(y)) out.push(...changedKeys(x, y, `${prefix}${k}.`));
    else if (JSON.stringify(x) !== JSON.stringify(y)) out.push(`${prefix}${k}`);
  }
  return out;
}
