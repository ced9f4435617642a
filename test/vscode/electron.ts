/**
 * The same extension-host suite under @vscode/test-electron, for a desktop that has VS Code:
 *   VSCODE_PATH=/path/to/code npm run test:electron
 * (On these build machines VS Code cannot be downloaded, so CI runs the suite in code-server.)
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { runTests } from '@vscode/test-electron';
import { startPrivateKeyring } from '../support/keyring';

async function main(): Promise<number> {
  const repoRoot = path.resolve(__dirname, '..', '..');
  const vscodeExecutablePath = process.env.VSCODE_PATH;
  const keyring = process.platform === 'linux' ? await startPrivateKeyring() : undefined;
  try {
    return await runTests({
      ...(vscodeExecutablePath ? { vscodeExecutablePath } : {}),
      extensionDevelopmentPath: repoRoot,
      extensionTestsPath: path.join(repoRoot, 'dist', 'test', 'suite.js'),
      launchArgs: [
        '--disable-extensions',
        '--disable-workspace-trust',
        '--user-data-dir',
        mkdtempSync(path.join(tmpdir(), 'till-electron-')),
        mkdtempSync(path.join(tmpdir(), 'till-ws-')),
      ],
      extensionTestsEnv: {
        TILL_HOME: mkdtempSync(path.join(tmpdir(), 'till-home-')),
        ...(keyring ? { DBUS_SESSION_BUS_ADDRESS: keyring.env.DBUS_SESSION_BUS_ADDRESS } : {}),
      },
    });
  } finally {
    keyring?.stop();
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`test:electron: ${(err as Error).message}`);
    process.exit(1);
  },
);
