/**
 * The control API in one place, as `webview/messages.ts` is for the webview: each call the broker
 * answers over the control channel (control.ts), what it is sent and what it answers; the typed
 * client the `till` command and other VS Code windows call it with; and the checks the broker
 * makes of what arrives, so that a malformed request gets a 400 saying what is wrong instead of
 * failing somewhere inside.
 */
import type { KeySummary, RequestRecord, TillEvent } from '../events';
import type { Extension } from '../keys/keys';
import type { Policy, PolicyInput } from '../policy/policy';
import { ControlError, type ControlChannel } from './control';

/** What issuing a key is asked with: a policy, and who it is for. */
export interface IssueInput extends PolicyInput {
  /** A provider id (when it has exactly one credential) or a credential name. */
  target: string;
  label?: string;
  /** Who asks (`vscode:<session>`, `cli`, …). */
  owner?: string;
  /** Revoke the key when the process holding its lease (`GET /leases/<ids>`) goes away. */
  lease?: boolean;
}

/** What issuing a key returns: the only time the full key is given out. */
export interface IssuedKey {
  id: string;
  key: string;
  provider: string;
  credential: string;
  label: string;
  baseUrl: string;
  env: Record<string, string>;
  policy: Policy;
}

/** What `GET /status` answers. */
export interface BrokerStatus {
  url: string;
  pid: number;
  home: string;
  /** Active keys. */
  keys: number;
}

/** The control calls, typed, over a {@link ControlChannel}. */
export class ControlApi {
  constructor(readonly client: ControlChannel) {}

  status(): Promise<BrokerStatus> {
    return this.call('GET', '/status');
  }

  issue(input: IssueInput): Promise<IssuedKey> {
    return this.call('POST', '/keys', input);
  }

  list(): Promise<KeySummary[]> {
    return this.call('GET', '/keys');
  }

  /** The last ended requests, oldest first. */
  recent(): Promise<RequestRecord[]> {
    return this.call('GET', '/requests');
  }

  /** Raises a key's limits. */
  extend(id: string, by: Extension): Promise<KeySummary> {
    return this.call('POST', `/keys/${encodeURIComponent(id)}/extend`, by);
  }

  /** Revokes one key; whether it was live. */
  async revoke(id: string): Promise<boolean> {
    return (await this.call<{ revoked: number }>('DELETE', `/keys/${encodeURIComponent(id)}`)).revoked > 0;
  }

  /** Revokes every key; how many were live. */
  async revokeAll(): Promise<number> {
    return (await this.call<{ revoked: number }>('DELETE', '/keys')).revoked;
  }

  /** The credentials the broker can use: names and providers, never secrets. */
  credentials(): Promise<{ name: string; provider: string }[]> {
    return this.call('GET', '/credentials');
  }

  /** Tells the broker a credential changed, so it drops what it cached. */
  async credentialChanged(name: string): Promise<void> {
    await this.call('POST', '/credentials', { name });
  }

  /** Calls `onEvent` for each event until `signal` aborts or the broker goes away. */
  events(onEvent: (e: TillEvent) => void, signal?: AbortSignal): Promise<void> {
    return this.client.stream('/events', (e) => onEvent(e as TillEvent), signal);
  }

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    return (await this.client.request(method, path, body)) as T;
  }
}

// ---------------------------------------------------------------------------------------------
// What the broker checks of what it is sent

type Field = 'string' | 'number' | 'boolean' | 'strings' | 'duration';

const ISSUE_FIELDS: Record<keyof IssueInput, Field> = {
  target: 'string',
  label: 'string',
  owner: 'string',
  lease: 'boolean',
  uses: 'number',
  maxTokens: 'number',
  maxSpend: 'number',
  ttl: 'duration',
  rpm: 'number',
  concurrency: 'number',
  methods: 'strings',
  paths: 'strings',
  models: 'strings',
};

const EXTENSION_FIELDS: Record<keyof Extension, Field> = { uses: 'number', maxTokens: 'number', maxSpend: 'number' };

const fits = (value: unknown, field: Field): boolean => {
  switch (field) {
    case 'strings':
      return Array.isArray(value) && value.every((v) => typeof v === 'string');
    case 'duration':
      return typeof value === 'string' || (typeof value === 'number' && Number.isFinite(value));
    case 'number':
      return typeof value === 'number' && Number.isFinite(value);
    default:
      return typeof value === field;
  }
};

const described: Record<Field, string> = {
  string: 'a string',
  number: 'a number',
  boolean: 'true or false',
  strings: 'a list of strings',
  duration: 'a duration such as "30m", or milliseconds',
};

/** `body` as an object of the given fields (each optional, of its type), or a 400 naming what is wrong. */
function readObject<T>(body: unknown, fields: Record<string, Field>, what: string): T {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ControlError(400, `${what} must be a JSON object`);
  for (const [name, value] of Object.entries(body)) {
    const field = fields[name];
    if (!field) throw new ControlError(400, `${what}: unknown field "${name}" (known: ${Object.keys(fields).join(', ')})`);
    if (value !== undefined && !fits(value, field)) throw new ControlError(400, `${what}: "${name}" must be ${described[field]}`);
  }
  return body as T;
}

/** The body of `POST /keys`, checked. */
export function readIssueInput(body: unknown): IssueInput {
  const input = readObject<IssueInput>(body, ISSUE_FIELDS, 'a key to issue');
  if (typeof input.target !== 'string' || input.target === '')
    throw new ControlError(400, 'a key to issue needs a "target": a provider id or a credential name');
  return input;
}

/** The body of `POST /keys/<id>/extend`, checked. */
export function readExtension(body: unknown): Extension {
  return readObject<Extension>(body, EXTENSION_FIELDS, 'an extension');
}

/** The credential named by the body of `POST /credentials`, checked; undefined (no body, no name): every credential. */
export function readCredentialName(body: unknown): string | undefined {
  if (body === undefined) return undefined;
  return readObject<{ name?: string }>(body, { name: 'string' }, 'a credential change').name;
}
