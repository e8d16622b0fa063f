// The error vocabulary (src/errors.ts): every error class of the project has a code, and the code
// alone decides the CLI's exit code, how its message is shown, and the admin endpoint's HTTP status.
import { expect } from 'chai';
import { ActionError } from '../src/admin/actions.js';
import { AdminAnswerError, AdminUnreachableError } from '../src/admin/client.js';
import { UsageError } from '../src/cli/options.js';
import { ConfigError } from '../src/config/load.js';
import {
  cliMessage, codeOfStatus, ERROR_CODES, errorCode, exitCodeOf, httpStatusOf, NbdMirrorError, type ErrorCode,
} from '../src/errors.js';
import { BitmapError } from '../src/persist/bitmap.js';
import { JournalError } from '../src/persist/journal.js';
import { UndoLogError } from '../src/persist/undo-log.js';
import { SecurityError } from '../src/security/files.js';

const JOURNAL_HINT = '; move the journal aside (its changes are then resynced from the dirty bitmap) or restore the LUN';

// Each class with what it means at the edges: the exit code, the CLI line (after "nbd-mirror: "), the HTTP status.
const CLASSES: { err: Error; code: ErrorCode; exit: number; line: string; http: number }[] = [
  { err: new ConfigError('a.json: listen.port: must be a port'), code: 'config', exit: 2, line: 'config error: a.json: listen.port: must be a port', http: 500 },
  { err: new SecurityError('key.psk is readable by others'), code: 'config', exit: 2, line: 'config error: key.psk is readable by others', http: 500 },
  { err: new JournalError('journal of lun1, not lun0'), code: 'journal', exit: 2, line: `journal of lun1, not lun0${JOURNAL_HINT}`, http: 500 },
  { err: new BitmapError('bitmap crc'), code: 'bitmap', exit: 1, line: 'bitmap crc', http: 500 },
  { err: new UndoLogError('undo log torn'), code: 'undo-log', exit: 1, line: 'undo log torn', http: 500 },
  { err: new UsageError('serve needs --config FILE'), code: 'usage', exit: 2, line: 'serve needs --config FILE', http: 400 },
  { err: new AdminUnreachableError('connect ECONNREFUSED'), code: 'unreachable', exit: 3, line: 'connect ECONNREFUSED', http: 500 },
  { err: new AdminAnswerError('no answer within 60 s'), code: 'no-answer', exit: 1, line: 'no answer within 60 s', http: 500 },
  { err: new ActionError('LUN lun0 is already primary here'), code: 'refused', exit: 1, line: 'LUN lun0 is already primary here', http: 409 },
  { err: new ActionError('no LUN "x"', 404), code: 'not-found', exit: 2, line: 'no LUN "x"', http: 404 },
  { err: new ActionError('not mirrored', 400), code: 'bad-request', exit: 2, line: 'not mirrored', http: 400 },
  { err: new Error('EIO'), code: 'failed', exit: 1, line: 'EIO', http: 500 },
];

describe('errors: one vocabulary for the edges', () => {
  for (const c of CLASSES) {
    it(`${c.err.constructor.name} (${c.code}): exit ${c.exit}, HTTP ${c.http}`, () => {
      expect(errorCode(c.err)).to.equal(c.code);
      expect(exitCodeOf(c.err)).to.equal(c.exit);
      expect(cliMessage(c.err)).to.equal(c.line);
      expect(httpStatusOf(c.err)).to.equal(c.http);
      if (c.code !== 'failed') expect(c.err).to.be.instanceOf(NbdMirrorError);
      expect(c.err.message).to.equal(c.line.replace(/^config error: /, '').replace(JOURNAL_HINT, ''));
    });
  }

  it('ActionError keeps its status (409 by default)', () => {
    expect(new ActionError('busy').status).to.equal(409);
    expect(new ActionError('nope', 404).status).to.equal(404);
  });

  it('an error of no class names its code; a cause is kept', () => {
    const cause = new Error('inner');
    const err = new NbdMirrorError('outer', { code: 'forbidden', cause });
    expect([err.code, httpStatusOf(err), exitCodeOf(err), err.cause]).to.deep.equal(['forbidden', 403, 2, cause]);
    expect(new NbdMirrorError('plain').code).to.equal('failed');
  });

  it('values that are not errors: failed, exit 1, HTTP 500, shown as text', () => {
    expect([exitCodeOf('boom'), httpStatusOf(undefined), cliMessage(42)]).to.deep.equal([1, 500, '42']);
  });

  it('an HTTP answer maps to the exit code the CLI has always given it', () => {
    // 400/404 (bad or unknown LUN) and 401/403 (not authorised): 2; anything else not 200: 1.
    const exits = [400, 401, 403, 404, 405, 409, 500, 501, 502, 0, 418].map((s) => ERROR_CODES[codeOfStatus(s)].exit);
    expect(exits).to.deep.equal([2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]);
  });

  it('every code that has an HTTP status is an error status', () => {
    for (const [code, m] of Object.entries(ERROR_CODES)) {
      if (m.http !== null) expect(m.http, code).to.be.within(400, 599);
    }
  });
});
