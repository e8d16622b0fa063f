// One vocabulary for the errors that reach the edges. Every error class of the project extends
// NbdMirrorError and carries a code; the code alone says what the error means where it leaves the
// process: the CLI's exit code (and how its message is shown), the admin endpoint's HTTP status.
// A leaf module (like log.ts): it imports nothing of the project, so any room may use it.

/** Exit codes of the CLI: 0 success, 1 runtime failure, 2 usage or configuration error, 3 admin endpoint unreachable. */
export const EXIT = { ok: 0, fail: 1, usage: 2, unreachable: 3 } as const;

interface Meaning {
  /** The CLI's exit code. */
  exit: number;
  /** The admin endpoint's HTTP status; null: raised on the client side, never answered. */
  http: number | null;
  /** How the CLI shows the message after "nbd-mirror: " (default: as it is). */
  show?: (message: string) => string;
}

export const ERROR_CODES = {
  /** A runtime failure (and any error that has no code): a retry or a restart may help. */
  failed: { exit: EXIT.fail, http: 500 },
  /** The command line is wrong. */
  usage: { exit: EXIT.usage, http: 400 },
  /** The configuration, or a file it names (key, token, data dir), is invalid or unsafe: restarting cannot help. */
  config: { exit: EXIT.usage, http: 500, show: (m) => `config error: ${m}` },
  /** A journal for another LUN or size: restarting cannot help (the unit does not restart on 2). */
  journal: {
    exit: EXIT.usage, http: 500,
    show: (m) => `${m}; move the journal aside (its changes are then resynced from the dirty bitmap) or restore the LUN`,
  },
  /** A dirty bitmap that cannot be used. */
  bitmap: { exit: EXIT.fail, http: 500 },
  /** An undo log that cannot be used. */
  'undo-log': { exit: EXIT.fail, http: 500 },
  /** The request is malformed (bad LUN name, unknown parameter...). */
  'bad-request': { exit: EXIT.usage, http: 400 },
  /** An operator action over TCP without the right token. */
  unauthorised: { exit: EXIT.usage, http: 401 },
  /** An operator action where none is accepted. */
  forbidden: { exit: EXIT.usage, http: 403 },
  /** No such LUN, action or endpoint. */
  'not-found': { exit: EXIT.usage, http: 404 },
  'method-not-allowed': { exit: EXIT.fail, http: 405 },
  /** Not possible in the current state (the site refuses the action). */
  refused: { exit: EXIT.fail, http: 409 },
  /** The endpoint offers no operator actions. */
  unavailable: { exit: EXIT.fail, http: 501 },
  /** The admin endpoint could not be reached: nothing was done. */
  unreachable: { exit: EXIT.unreachable, http: null },
  /** The request reached the site but no usable answer came back: it may have been done. */
  'no-answer': { exit: EXIT.fail, http: null },
} as const satisfies Record<string, Meaning>;

export type ErrorCode = keyof typeof ERROR_CODES;

/**
 * The base of the project's errors. Subclasses fix their code (`override readonly code = 'x'`);
 * an error of no particular class names it in the options.
 */
export class NbdMirrorError extends Error {
  readonly code: ErrorCode;

  constructor(message: string, options?: ErrorOptions & { code?: ErrorCode }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = options?.code ?? 'failed';
  }
}

/** The code of any thrown value: 'failed' for what is not an NbdMirrorError. */
export function errorCode(err: unknown): ErrorCode {
  return err instanceof NbdMirrorError ? err.code : 'failed';
}

/** The CLI's exit code for `err`. */
export function exitCodeOf(err: unknown): number {
  return ERROR_CODES[errorCode(err)].exit;
}

/** The HTTP status the admin endpoint answers `err` with (500 for what has no status). */
export function httpStatusOf(err: unknown): number {
  return ERROR_CODES[errorCode(err)].http ?? 500;
}

/** The CLI's line for `err` (after "nbd-mirror: "). */
export function cliMessage(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const meaning: Meaning = ERROR_CODES[errorCode(err)];
  return meaning.show ? meaning.show(message) : message;
}

/** The code of an HTTP error status the admin endpoint answered (the first with it; else 'failed'). */
export function codeOfStatus(status: number): ErrorCode {
  const found = (Object.keys(ERROR_CODES) as ErrorCode[]).find((c) => ERROR_CODES[c].http === status);
  return found ?? 'failed';
}
