/**
 * The data folder (`TILL_HOME`) and what lives in it. Nothing in it is secret except the
 * control token, which only the owner can read. Till trusts the folder only when this OS user
 * alone can change it (see privateFolder.ts): a folder another user made or can write to could
 * redirect credentials (config.json) or plant links that turn Till's writes against the user.
 */
import { createHash } from 'node:crypto';
import { homedir, tmpdir } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { isRecord } from '../json';
import { ensurePrivateFolder, readPrivateFile } from '../files/privateFolder';
import type { CustomProviderConfig } from '../providers/providers';
import { checkCredentialName, type ConfiguredCredentials } from '../credentials/credentials';
import { secretSourceProblem, type SecretSource } from '../credentials/secretSource';

export interface TillPaths {
  home: string;
  ledger: string;
  audit: string;
  credentials: string;
  config: string;
  /** User price overrides (`{"models": {provider: {model: price}}}`). */
  prices: string;
  /** What the upstreams' stored conversations weigh (contexts.ts). */
  contexts: string;
  /** Unix socket (or Windows named pipe) of the control channel. */
  socket: string;
  /**
   * The private folder the socket lives in when it cannot live in the data folder (its path
   * would be too long): claimed for this user alone before the socket is bound there.
   */
  socketFolder?: string;
  /** Keychain service under which this folder's credentials are stored. */
  keychainService: string;
  /** 0600 file holding the control channel's bearer token. */
  token: string;
}

/** The per-user data folder: `TILL_HOME`, else the OS's convention. */
export function defaultHome(env: NodeJS.ProcessEnv = process.env, platform: NodeJS.Platform = process.platform): string {
  if (env.TILL_HOME) return env.TILL_HOME;
  if (platform === 'darwin') return join(homedir(), 'Library', 'Application Support', 'till');
  if (platform === 'win32') return join(env.LOCALAPPDATA ?? join(homedir(), 'AppData', 'Local'), 'till');
  return join(env.XDG_DATA_HOME || join(homedir(), '.local', 'share'), 'till');
}

/**
 * The keychain service name for a data folder. Credentials belong to a data folder (its
 * credentials.json lists them), so a non-default folder gets its own keychain namespace
 * and `till credential rm` in one folder never deletes another folder's secret.
 */
export function keychainService(home: string): string {
  return home === defaultHome({}) ? 'till' : `till ${home}`;
}

/**
 * Where a control socket goes when the data folder's path is too long for one: the user's
 * runtime folder (`XDG_RUNTIME_DIR`, private by definition), else `<tmp>/till-<uid>`, a folder
 * claimed for this user alone (never a bare file in a folder anyone can write). Read from this
 * process's environment, so that the broker and every client agree on it.
 */
function socketFolderFor(env: NodeJS.ProcessEnv): string {
  const runtime = env.XDG_RUNTIME_DIR;
  if (runtime && isAbsolute(runtime)) return join(runtime, 'till');
  // What os.tmpdir() reads on Linux and macOS, from `env` rather than this process's.
  const tmp = (env.TMPDIR || env.TMP || env.TEMP || tmpdir()).replace(/(.)\/+$/, '$1');
  return join(tmp, `till-${process.getuid?.() ?? 0}`);
}

/** The paths of a data folder. `env` says where the socket goes when it cannot live in the folder (default: this process's). */
export function tillPaths(home: string, env: NodeJS.ProcessEnv = process.env): TillPaths {
  const digest = createHash('sha256').update(home).digest('hex').slice(0, 16);
  let socket = join(home, 'control.sock');
  let socketFolder: string | undefined;
  if (process.platform === 'win32') socket = `\\\\.\\pipe\\till-${digest}`;
  // Unix socket paths are limited to about 104 bytes.
  else if (Buffer.byteLength(socket) > 100) {
    socketFolder = socketFolderFor(env);
    socket = join(socketFolder, `${digest}.sock`);
  }
  const paths: TillPaths = {
    home,
    ledger: join(home, 'ledger.jsonl'),
    audit: join(home, 'audit.jsonl'),
    credentials: join(home, 'credentials.json'),
    config: join(home, 'config.json'),
    prices: join(home, 'prices.json'),
    contexts: join(home, 'contexts.jsonl'),
    socket,
    keychainService: keychainService(home),
    token: join(home, 'control.token'),
  };
  if (socketFolder !== undefined) paths.socketFolder = socketFolder;
  return paths;
}

/**
 * The paths of a data folder Till may use: created (0700) when missing, refused with a clear
 * {@link import('../files/privateFolder').PrivateFolderError} when another user owns it or could
 * change it. Every entry point (`till`, the broker, a VS Code window) opens the folder this way.
 */
export function openHome(home: string): TillPaths {
  ensurePrivateFolder(home, 'the data folder');
  return tillPaths(home);
}

/** `config.json` in the data folder. Every field is optional. */
export interface TillConfig {
  /** Broker port. Default: 8455. */
  port?: number;
  /** Upstream base URL per provider id, e.g. `{ "openai": "http://127.0.0.1:9000/v1" }`. */
  upstreams?: Record<string, string>;
  /** User-defined providers. */
  providers?: CustomProviderConfig[];
  /** Largest request body in bytes. Default: 32 MiB. */
  maxBodyBytes?: number;
  /** A team ledger: `postgres://user:password@host/db`. Default: the data folder's own ledger. */
  ledger?: string;
  /** Address to listen on (listener.ts). Default: 127.0.0.1. Any other needs `tlsCert` and `tlsKey`. */
  listen?: string;
  /** PEM certificate chain file for a TLS listener. */
  tlsCert?: string;
  /** PEM private key file for a TLS listener (a systemd credential or a secret file, usually). */
  tlsKey?: string;
  /** Host names clients reach the broker by, besides loopback names. */
  allowedHosts?: string[];
  /** Where the admin token of the control API over the network comes from. Default: `TILL_ADMIN_TOKEN`, when set. */
  adminToken?: SecretSource;
  /** Credentials a server's service manager provides (secretSource.ts), by name. */
  credentials?: ConfiguredCredentials;
}

/** True for a URL the team ledger can open (postgres:// or postgresql://). */
export function isLedgerUrl(text: string): boolean {
  return /^postgres(ql)?:\/\/./.test(text);
}

/** Why a config field has the wrong type, or undefined. */
function configProblem(config: Record<string, unknown>): string | undefined {
  const { port, maxBodyBytes, upstreams, providers, ledger, listen, tlsCert, tlsKey, allowedHosts, adminToken, credentials } = config;
  if (listen !== undefined && typeof listen !== 'string') return '"listen" must be an IP address';
  for (const [name, file] of [
    ['tlsCert', tlsCert],
    ['tlsKey', tlsKey],
  ] as const) {
    if (file !== undefined && !(typeof file === 'string' && isAbsolute(file))) return `"${name}" must be an absolute path`;
  }
  if (allowedHosts !== undefined && !(Array.isArray(allowedHosts) && allowedHosts.every((h) => typeof h === 'string')))
    return '"allowedHosts" must be a list of host names';
  const tokenProblem = adminToken === undefined ? undefined : secretSourceProblem(adminToken);
  if (tokenProblem) return `"adminToken" ${tokenProblem}`;
  if (credentials !== undefined) {
    if (!isRecord(credentials)) return '"credentials" must map credential names to {"provider", and "env", "file" or "systemd"}';
    for (const [name, c] of Object.entries(credentials)) {
      try {
        checkCredentialName(name);
      } catch (err) {
        return `"credentials": ${(err as Error).message}`;
      }
      if (!isRecord(c) || typeof c.provider !== 'string') return `"credentials"."${name}" needs a "provider"`;
      const { provider: _, ...source } = c;
      const problem = secretSourceProblem(source);
      if (problem) return `"credentials"."${name}" ${problem}`;
    }
  }
  if (ledger !== undefined && !(typeof ledger === 'string' && isLedgerUrl(ledger))) return '"ledger" must be a postgres:// URL';
  if (port !== undefined && !(Number.isInteger(port) && (port as number) >= 0 && (port as number) <= 65535))
    return '"port" must be a whole number from 0 to 65535';
  if (maxBodyBytes !== undefined && !(Number.isSafeInteger(maxBodyBytes) && (maxBodyBytes as number) > 0))
    return '"maxBodyBytes" must be a whole number of bytes above 0';
  if (upstreams !== undefined && (!isRecord(upstreams) || Object.values(upstreams).some((u) => typeof u !== 'string'))) {
    return '"upstreams" must map provider ids to URLs';
  }
  if (providers !== undefined && !Array.isArray(providers)) return '"providers" must be a list';
  return undefined;
}

/** Reads `config.json` (a link or another user's file is refused); throws with the file's name on bad contents. */
export function readConfig(paths: TillPaths): TillConfig {
  const text = readPrivateFile(paths.config);
  if (text === undefined) return {};
  let config: unknown;
  try {
    config = JSON.parse(text);
  } catch (err) {
    throw new Error(`${paths.config} is not valid JSON (${(err as Error).message})`, { cause: err });
  }
  if (!isRecord(config)) throw new Error(`${paths.config} must hold a JSON object`);
  const problem = configProblem(config);
  if (problem) throw new Error(`${paths.config}: ${problem}`);
  return config;
}
