// `nbd-mirror config check|schema` and `nbd-mirror journal inspect`: the site's files, without a running site.
import { describeSchema, formatSchema } from '../config/describe.js';
import { loadConfig } from '../config/load.js';
import { EXIT } from '../errors.js';
import { formatJournalReport, inspectJournal } from '../persist/inspect.js';
import { DataDir } from '../site/data-dir.js';
import { HELP } from './help.js';
import { options, UsageError } from './options.js';

export async function config(args: string[]): Promise<number> {
  const opts = options(args, { json: { type: 'boolean' } }, HELP.config);
  if (!opts) return EXIT.ok;
  const [sub, file] = opts.positionals;
  if (sub === 'schema') {
    const keys = describeSchema();
    console.log(opts.values.json ? JSON.stringify(keys, null, 2) : formatSchema(keys));
    return EXIT.ok;
  }
  if (sub !== 'check' || !file) throw new UsageError(HELP.config);
  loadConfig(file);
  console.log(`${file}: ok`);
  return EXIT.ok;
}

export async function journal(args: string[]): Promise<number> {
  const opts = options(args, { config: { type: 'string', short: 'c' }, json: { type: 'boolean' } }, HELP.journal);
  if (!opts) return EXIT.ok;
  const [sub, lunName] = opts.positionals;
  if (sub !== 'inspect' || !lunName || !opts.values.config) throw new UsageError(HELP.journal);
  const cfg = loadConfig(opts.values.config as string);
  const lun = cfg.luns.find((l) => l.name === lunName);
  if (!lun) throw new UsageError(`no LUN "${lunName}" in ${opts.values.config}`);
  const report = await inspectJournal(new DataDir(cfg.dataDir).journal(lunName), lunName, lun.path);
  console.log(opts.values.json ? JSON.stringify(report, null, 2) : formatJournalReport(report));
  return report.corrupt ? EXIT.fail : EXIT.ok;
}
