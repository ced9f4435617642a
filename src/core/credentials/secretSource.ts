/**
 * Secrets a server's service manager hands the broker, named in config.json: an environment
 * variable, a file (Docker and Kubernetes secrets under /run/secrets), or a systemd credential
 * (`LoadCredential=`, read from `$CREDENTIALS_DIRECTORY`). A team broker's real API keys and its
 * admin token come this way, so nothing on the server needs a keychain.
 *
 * Guarantees: Till only reads these (never writes, copies or caches them on disk); each read
 * goes to the source again, so a rotated file is picked up once the broker forgets its cache;
 * an error names the source, never its contents.
 */
import { readFileSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { isRecord } from '../json';
import { VaultError } from './vault';

/** Where a secret comes from. */
export type SecretSource = { env: string } | { file: string } | { systemd: string };

const LARGEST_SECRET = 16 * 1024;

/** Why `value` is not a {@link SecretSource}, or undefined. */
export function secretSourceProblem(value: unknown): string | undefined {
  if (!isRecord(value)) return 'must be {"env": NAME}, {"file": PATH} or {"systemd": NAME}';
  const keys = Object.keys(value).filter((k) => k === 'env' || k === 'file' || k === 'systemd');
  if (keys.length !== 1) return 'must name exactly one of "env", "file" or "systemd"';
  const given = value[keys[0]!];
  if (typeof given !== 'string' || given === '') return `"${keys[0]}" must be a non-empty string`;
  if (keys[0] === 'file' && !isAbsolute(given)) return '"file" must be an absolute path';
  if (keys[0] === 'systemd' && /[/\\]/.test(given)) return '"systemd" must be a credential name, not a path';
  return undefined;
}

/** How the source is named in messages: `the environment variable OPENAI_API_KEY`. */
export function describeSource(source: SecretSource): string {
  if ('env' in source) return `the environment variable ${source.env}`;
  if ('file' in source) return `the file ${source.file}`;
  return `the systemd credential ${source.systemd}`;
}

/** Reads the secret now; throws {@link VaultError} `missing` naming the source when it is not there or empty. */
export function readSecretSource(source: SecretSource, env: NodeJS.ProcessEnv = process.env): string {
  let text: string | undefined;
  if ('env' in source) text = env[source.env];
  else {
    let file: string;
    if ('file' in source) file = source.file;
    else {
      const folder = env.CREDENTIALS_DIRECTORY;
      if (!folder) {
        throw new VaultError(
          'missing',
          `${describeSource(source)} is not available: CREDENTIALS_DIRECTORY is not set (run the broker from a systemd unit with LoadCredential=${source.systemd}:…)`,
        );
      }
      file = join(folder, source.systemd);
    }
    try {
      const buffer = readFileSync(file);
      if (buffer.length > LARGEST_SECRET) throw new VaultError('missing', `${describeSource(source)} is larger than 16 KiB`);
      text = buffer.toString('utf8');
    } catch (err) {
      if (err instanceof VaultError) throw err;
      const code = (err as NodeJS.ErrnoException).code ?? 'unreadable';
      throw new VaultError('missing', `${describeSource(source)} cannot be read (${code})`);
    }
  }
  // A trailing newline is how most files (and `echo`) end; a secret never contains one.
  const secret = text?.trim();
  if (!secret) throw new VaultError('missing', `${describeSource(source)} is ${text === undefined ? 'not set' : 'empty'}`);
  return secret;
}
