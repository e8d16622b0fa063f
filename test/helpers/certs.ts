// Throw-away X.509 material for TLS tests, made with the openssl CLI: a CA and leaf
// certificates it signs (usable as server and client certificates, SAN IP 127.0.0.1).
import fs from 'node:fs/promises';
import path from 'node:path';
import { exec } from './exec.js';

export interface CertFiles { certFile: string; keyFile: string }

export class TestCa {
  private serial = 1;
  private constructor(readonly dir: string, readonly name: string, readonly caFile: string, private readonly caKey: string) {}

  /** A new self-signed CA under `dir`. */
  static async create(dir: string, name: string): Promise<TestCa> {
    const caFile = path.join(dir, `${name}-ca.pem`);
    const caKey = path.join(dir, `${name}-ca-key.pem`);
    await exec('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
      '-subj', `/CN=${name} test CA`, '-keyout', caKey, '-out', caFile], { timeoutMs: 30_000 });
    await fs.chmod(caKey, 0o600);
    return new TestCa(dir, name, caFile, caKey);
  }

  /** A leaf certificate and its key (0600), signed by this CA. */
  async issue(cn: string, prefix = `${this.name}-${cn}`): Promise<CertFiles> {
    const keyFile = path.join(this.dir, `${prefix}-key.pem`);
    const csr = path.join(this.dir, `${prefix}.csr`);
    const certFile = path.join(this.dir, `${prefix}-cert.pem`);
    const ext = path.join(this.dir, `${prefix}.ext`);
    await exec('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', `/CN=${cn}`,
      '-keyout', keyFile, '-out', csr], { timeoutMs: 30_000 });
    await fs.chmod(keyFile, 0o600);
    await fs.writeFile(ext, 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
    await exec('openssl', ['x509', '-req', '-in', csr, '-CA', this.caFile, '-CAkey', this.caKey, '-set_serial', String(this.serial++),
      '-days', '2', '-extfile', ext, '-out', certFile], { timeoutMs: 30_000 });
    return { certFile, keyFile };
  }
}
