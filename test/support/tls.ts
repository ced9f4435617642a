/**
 * A throw-away TLS certificate for tests of a team broker: self-signed, for `till.test` and
 * 127.0.0.1, made by openssl (`.ci/run` installs it) in a private temp folder.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempHome } from './till';

export interface TestCertificate {
  certFile: string;
  keyFile: string;
  /** The certificate itself, to trust it. */
  cert: Buffer;
}

/** A certificate for `names` (DNS names) and 127.0.0.1, valid for a day. */
export function makeCertificate(names: string[] = ['till.test']): TestCertificate {
  const folder = tempHome();
  const certFile = join(folder, 'cert.pem');
  const keyFile = join(folder, 'key.pem');
  const san = [...names.map((n) => `DNS:${n}`), 'IP:127.0.0.1'].join(',');
  execFileSync(
    'openssl',
    [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-days',
      '1',
      '-subj',
      `/CN=${names[0]}`,
      '-addext',
      `subjectAltName=${san}`,
      '-keyout',
      keyFile,
      '-out',
      certFile,
    ],
    { stdio: 'ignore' },
  );
  return { certFile, keyFile, cert: readFileSync(certFile) };
}
