import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startPrivateKeyring } from './keyring';
import { filesContaining } from './files';

const CREDENTIAL_MARKER = 'REALCRED';

/**
 * One private keychain and one scratch root for the whole run. At the end, every file the
 * suite wrote (ledgers, audit logs, broker and CLI output) is scanned for any fake real
 * credential: finding one fails the run.
 */
export default async function setup() {
  const keyring = await startPrivateKeyring();
  const root = mkdtempSync(join(tmpdir(), 'till-test-'));
  Object.assign(process.env, keyring.env, { TILL_TEST_ROOT: root });
  return () => {
    keyring.stop();
    const leaks = filesContaining(root, CREDENTIAL_MARKER);
    if (leaks.length > 0) throw new Error(`a real credential was written to: ${leaks.join(', ')}`);
    if (!process.env.TILL_KEEP_TEST_ROOT) rmSync(root, { recursive: true, force: true });
  };
}
