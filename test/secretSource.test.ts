/** Secrets a service manager hands the broker (secretSource.ts): read, never written, errors without contents. */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readSecretSource, secretSourceProblem } from '../src/core/credentials/secretSource';
import { configuredVault } from '../src/core/credentials/credentials';

// Outside the test root, whose files are scanned for real credentials.
const folder = mkdtempSync(join(tmpdir(), 'till-secret-source-'));
afterAll(() => rmSync(folder, { recursive: true, force: true }));

describe('secret sources', () => {
  it('reads an environment variable, a file and a systemd credential, without their trailing newline', () => {
    writeFileSync(join(folder, 'openai'), 'sk-from-systemd\n');
    writeFileSync(join(folder, 'docker-secret'), 'sk-from-file\r\n');
    const env = { TEAM_KEY: 'sk-from-env', CREDENTIALS_DIRECTORY: folder };
    expect(readSecretSource({ env: 'TEAM_KEY' }, env)).toBe('sk-from-env');
    expect(readSecretSource({ file: join(folder, 'docker-secret') }, env)).toBe('sk-from-file');
    expect(readSecretSource({ systemd: 'openai' }, env)).toBe('sk-from-systemd');
  });

  it('names the source, never a secret, when it is missing, empty or too large', () => {
    writeFileSync(join(folder, 'empty'), '\n');
    writeFileSync(join(folder, 'huge'), 'x'.repeat(17 * 1024));
    expect(() => readSecretSource({ env: 'NOPE' }, {})).toThrow('the environment variable NOPE is not set');
    expect(() => readSecretSource({ file: join(folder, 'absent') }, {})).toThrow(/cannot be read \(ENOENT\)/);
    expect(() => readSecretSource({ file: join(folder, 'empty') }, {})).toThrow(/is empty/);
    expect(() => readSecretSource({ file: join(folder, 'huge') }, {})).toThrow(/larger than 16 KiB/);
    expect(() => readSecretSource({ systemd: 'openai' }, {})).toThrow(/CREDENTIALS_DIRECTORY is not set.*LoadCredential=openai/);
  });

  it('checks what config.json names', () => {
    expect(secretSourceProblem({ env: 'X' })).toBeUndefined();
    expect(secretSourceProblem({ file: 'relative/path' })).toMatch(/absolute/);
    expect(secretSourceProblem({ systemd: '../etc/passwd' })).toMatch(/not a path/);
    expect(secretSourceProblem({ env: 'X', file: '/x' })).toMatch(/exactly one/);
    expect(secretSourceProblem('OPENAI_API_KEY')).toMatch(/must be/);
  });

  it('serves configured credentials read-only', async () => {
    const vault = configuredVault({ openai: { provider: 'openai', env: 'TEAM_KEY' } }, { TEAM_KEY: 'sk-team' });
    await expect(vault.get('openai')).resolves.toBe('sk-team');
    await expect(vault.set('openai', 'sk-other')).rejects.toThrow(/comes from the environment variable TEAM_KEY.*change it there/);
    await expect(vault.get('github')).rejects.toThrow(/not in config.json/);
  });
});
