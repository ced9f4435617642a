/**
 * Credentials kept in two stores (src/core/credentials/credentials.ts): the OS keychain, and the
 * editor's secret storage (VS Code's, which only the extension can reach). Each credential is read
 * from the store it was added to; nothing copies it to the other; a process without a credential's
 * store says which store keeps it and what to do.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CredentialStore } from '../src/core/credentials/credentials';
import { VaultError, type Vault } from '../src/core/credentials/vault';
import { tillPaths } from '../src/core/runtime/home';
import { expectOneLineError, runTill, spawnServe, tempHome } from './support/till';

/** A store in memory, standing in for VS Code's secret storage (the extension-host tests use the real one). */
class MemoryVault implements Vault {
  readonly secrets = new Map<string, string>();
  get(name: string): Promise<string> {
    const s = this.secrets.get(name);
    return s === undefined ? Promise.reject(new VaultError('missing', `no ${name}`)) : Promise.resolve(s);
  }
  set(name: string, secret: string): Promise<void> {
    this.secrets.set(name, secret);
    return Promise.resolve();
  }
  delete(name: string): Promise<boolean> {
    return Promise.resolve(this.secrets.delete(name));
  }
}

function stores() {
  const keychain = new MemoryVault();
  const editor = new MemoryVault();
  const store = new CredentialStore(join(tempHome(), 'credentials.json'), { keychain, editor });
  return { keychain, editor, store };
}

describe('two secret stores', () => {
  it('keeps a credential in the store it was added to, and reads it from there', async () => {
    const { keychain, editor, store } = stores();
    await store.add('openai', 'sk-in-editor-0001', 'openai', 'editor');
    await store.add('anthropic', 'sk-ant-in-keychain-01');
    expect(store.all().map((c) => [c.name, c.store ?? 'keychain'])).toEqual([
      ['openai', 'editor'],
      ['anthropic', 'keychain'],
    ]);
    expect([...editor.secrets.keys()]).toEqual(['openai']);
    expect([...keychain.secrets.keys()]).toEqual(['anthropic']);
    expect(await store.vault.get('openai')).toBe('sk-in-editor-0001');
    expect(await store.vault.get('anthropic')).toBe('sk-ant-in-keychain-01');
    await store.remove('openai');
    expect(editor.secrets.size).toBe(0);
    expect(keychain.secrets.size).toBe(1);
  });

  it('moves nothing by itself: added again elsewhere, the old store no longer keeps it', async () => {
    const { keychain, editor, store } = stores();
    await store.add('openai', 'sk-first-000000001');
    await store.add('openai', 'sk-second-00000002', 'openai', 'editor');
    expect(keychain.secrets.size).toBe(0);
    expect(editor.secrets.get('openai')).toBe('sk-second-00000002');
    expect(store.storeOf('openai')).toBe('editor');
  });

  it('moves a credential only when asked, and then from one store to the other', async () => {
    const { keychain, editor, store } = stores();
    await store.add('openai', 'sk-to-be-moved-0001');
    await store.move('openai', 'editor');
    expect(keychain.secrets.size).toBe(0);
    expect(editor.secrets.get('openai')).toBe('sk-to-be-moved-0001');
    expect(store.storeOf('openai')).toBe('editor');
    await store.move('openai', 'keychain');
    expect(editor.secrets.size).toBe(0);
    expect(await store.vault.get('openai')).toBe('sk-to-be-moved-0001');
    await expect(store.move('nope', 'editor')).rejects.toThrow(/no credential named "nope"/);
  });

  it('a process without the editor store says where the credential is, and stores nothing', async () => {
    const keychain = new MemoryVault();
    const file = join(tempHome(), 'credentials.json');
    writeFileSync(file, JSON.stringify({ credentials: [{ name: 'openai', provider: 'openai', addedAt: 1, store: 'editor' }] }));
    const store = new CredentialStore(file, { keychain });
    await expect(store.vault.get('openai')).rejects.toThrow(/kept in VS Code's secret storage.*let a VS Code window run the broker/);
    await expect(store.add('openai', 'sk-some-secret-0001', 'openai', 'editor')).rejects.toThrow(/cannot be reached/);
    expect(keychain.secrets.size).toBe(0);
  });

  it('till serve refuses a key for a credential VS Code keeps, saying so', async () => {
    const home = tempHome();
    const paths = tillPaths(home);
    writeFileSync(
      paths.credentials,
      JSON.stringify({ credentials: [{ name: 'openai', provider: 'openai', addedAt: 1, store: 'editor' }] }),
      { mode: 0o600 },
    );
    const serve = await spawnServe(home);
    try {
      const r = await runTill(['issue', 'openai'], { home });
      expectOneLineError(r, undefined, /kept in VS Code's secret storage/);
      expect(r.stdout).toBe('');
    } finally {
      await serve.stop();
    }
  });
});
