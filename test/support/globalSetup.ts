import type { TestProject } from 'vitest/node';
import { startPrivateKeyring } from './keyring';

/** One private keychain for the whole run; every worker and every spawned `till` reaches it via the env. */
export default async function setup(_project: TestProject) {
  const keyring = await startPrivateKeyring();
  Object.assign(process.env, keyring.env);
  return () => keyring.stop();
}
