/**
 * The data folder (`TILL_HOME`) and what lives in it. Nothing in it is secret except the
 * control token, which only the owner can read.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CustomProviderConfig } from './providers';

export interface TillPaths {
  home: string;
  ledger: string;
  audit: string;
  credentials: string;
  config: string;
  /** User price overrides (`{"models": {provider: {model: price}}}`). */
  prices: string;
  /** Unix socket (or Windows named pipe) of the control channel. */
  socket: string;
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

export function tillPaths(home: string): TillPaths {
  const digest = createHash('sha256').update(home).digest('hex').slice(0, 16);
  let socket = join(home, 'control.sock');
  if (process.platform === 'win32') socket = `\\\\.\\pipe\\till-${digest}`;
  // Unix socket paths are limited to about 104 bytes.
  else if (Buffer.byteLength(socket) > 100) socket = join(tmpdir(), `till-${process.getuid?.() ?? 0}-${digest}.sock`);
  return {
    home,
    ledger: join(home, 'ledger.jsonl'),
    audit: join(home, 'audit.jsonl'),
    credentials: join(home, 'credentials.json'),
    config: join(home, 'config.json'),
    prices: join(home, 'prices.json'),
    socket,
    keychainService: keychainService(home),
    token: join(home, 'control.token'),
  };
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
}

export function readConfig(paths: TillPaths): TillConfig {
  if (!existsSync(paths.config)) return {};
  try {
    const config = JSON.parse(readFileSync(paths.config, 'utf8')) as TillConfig;
    if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new Error('not an object');
    return config;
  } catch (err) {
    throw new Error(`${paths.config} is not valid JSON (${(err as Error).message})`);
  }
}
