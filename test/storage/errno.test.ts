// The one map from system errors to NBD error values.
import { expect } from 'chai';
import {
  NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
} from '../../src/nbd/constants.js';
import { nbdErrno, nbdErrnoName } from '../../src/storage/errno.js';
import { NotFastError } from '../../src/storage/backing.js';

function sysErr(code: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`failed: ${code}`), { code });
}

describe('nbdErrno', function () {
  const table: Array<[string, number]> = [
    ['EPERM', NBD_EPERM],
    ['EACCES', NBD_EPERM],
    ['EROFS', NBD_EPERM],
    ['EIO', NBD_EIO],
    ['ENOMEM', NBD_ENOMEM],
    ['EINVAL', NBD_EINVAL],
    ['ENOSPC', NBD_ENOSPC],
    ['EDQUOT', NBD_ENOSPC],
    ['EFBIG', NBD_ENOSPC],
    ['EOVERFLOW', NBD_EOVERFLOW],
    ['ENOTSUP', NBD_ENOTSUP],
    ['EOPNOTSUPP', NBD_ENOTSUP],
    ['ESHUTDOWN', NBD_ESHUTDOWN],
  ];
  for (const [code, nbd] of table) {
    it(`${code} → ${nbd}`, function () {
      expect(nbdErrno(sysErr(code))).to.equal(nbd);
    });
  }

  it('uses the wire values the NBD spec fixes (Linux errno numbers)', function () {
    expect([NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN])
      .to.deep.equal([1, 5, 12, 22, 28, 75, 95, 108]);
  });

  it('maps ENOSPC, EDQUOT and EFBIG all to 28', function () {
    expect(['ENOSPC', 'EDQUOT', 'EFBIG'].map((c) => nbdErrno(sysErr(c)))).to.deep.equal([28, 28, 28]);
  });

  it('maps anything unknown to EIO, never to success', function () {
    for (const err of [
      sysErr('EWEIRD'), sysErr('ENOENT'), sysErr('EBADF'), sysErr(''), sysErr('ERR_INVALID_ARG_TYPE'),
      new Error('no code'), null, undefined, 'a string', 42, {},
    ]) {
      const v = nbdErrno(err);
      expect(v, String((err as { code?: unknown } | null)?.code ?? err)).to.equal(NBD_EIO);
    }
  });

  it('maps codes that are Object.prototype property names to EIO too (a lookup must not hit the prototype)', function () {
    // A function or object here would be written to the wire as errno 0, i.e. success.
    for (const code of ['toString', 'constructor', 'valueOf', 'hasOwnProperty', '__proto__']) {
      expect(nbdErrno(sysErr(code)), code).to.equal(NBD_EIO);
    }
  });

  it('maps a NotFastError (code ENOTSUP) to ENOTSUP', function () {
    expect(nbdErrno(new NotFastError('slow'))).to.equal(NBD_ENOTSUP);
  });
});

describe('nbdErrnoName', function () {
  it('names the known values and falls back to the number', function () {
    expect(nbdErrnoName(28)).to.equal('ENOSPC');
    expect(nbdErrnoName(108)).to.equal('ESHUTDOWN');
    expect(nbdErrnoName(1)).to.equal('EPERM');
    expect(nbdErrnoName(7)).to.equal('errno 7');
  });
});
