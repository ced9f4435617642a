/**
 * What every agent test sets up (a data folder with the credential, a scripted upstream, `till
 * serve`) and what it checks afterwards (no credential anywhere the agent could see, usage equal
 * to what the upstream reported, no address tried but the broker's).
 */
import { randomBytes } from 'node:crypto';
import { expect } from 'vitest';
import type { KeySummary } from '../../../src/core/events';
import { CREDENTIAL_MARKER, addCredential, fakeCredential, runTill, spawnServe, tempHome, type ServeProcess } from '../../support/till';
import type { Upstream, UpstreamOptions } from '../../support/upstreams';
import { waitFor } from '../../support/wait';
import { denials, isLoopback, listKeys, noteReader, workspace, type AgentResult, type AgentRun } from './agentRun';

export interface AgentBroker {
  /** Till's data folder. */
  home: string;
  /** The agent's workspace, with note.txt. */
  dir: string;
  /** What note.txt says. */
  marker: string;
  credential: string;
  up: Upstream;
  serve: ServeProcess;
  close(): Promise<void>;
}

/**
 * A provider's credential in a fresh data folder (`home`, default a temp one), its upstream
 * answering as the note-reading model, and `till serve` pointed at it.
 */
export async function startAgentBroker(options: {
  provider: string;
  start: (options: UpstreamOptions) => Promise<Upstream>;
  /** The upstream URL `till serve` gets, from the upstream's origin (OpenAI's has /v1). */
  upstreamUrl?: (origin: string) => string;
  upstream?: Partial<UpstreamOptions>;
  home?: string;
}): Promise<AgentBroker> {
  const marker = `NOTE-${randomBytes(6).toString('hex')}`;
  const home = options.home ?? tempHome();
  const dir = workspace(marker);
  const credential = fakeCredential(options.provider);
  const up = await options.start({ credential, reply: noteReader(dir, marker), ...options.upstream });
  await addCredential(home, options.provider, options.provider, credential);
  const url = options.upstreamUrl?.(up.url) ?? up.url;
  const serve = await spawnServe(home, { env: { [`TILL_UPSTREAM_${options.provider.toUpperCase()}`]: url } });
  return {
    home,
    dir,
    marker,
    credential,
    up,
    serve,
    close: async () => {
      await serve.stop();
      await up.close();
    },
  };
}

/** Neither the agent's environment nor any file under its HOME (or written for it) holds a credential. */
export function expectNoCredential(r: AgentResult): void {
  expect(Object.values(r.env).join('\n')).not.toContain(CREDENTIAL_MARKER);
  expect(r.files.length).toBeGreaterThan(0);
  for (const f of r.files) expect(f.text.includes(CREDENTIAL_MARKER), f.path).toBe(false);
}

/** The key (ended by `till exec`) counted one activation per model call and exactly the tokens the upstream reported. */
export function expectUsage(key: KeySummary | undefined, calls: number, up: Upstream): void {
  expect(key?.state).toBe('revoked'); // till exec revokes its keys when the command exits
  expect(key?.used.activations).toBe(calls);
  expect(key?.tokens.input).toBe(up.reported.inputTokens);
  expect(key?.tokens.output).toBe(up.reported.outputTokens);
}

/** The key labelled `label` on `home` refused nothing, spent something and at most `maxUsd`, and holds nothing now. */
export async function expectServedWithin(home: string, label: string, maxUsd: number): Promise<void> {
  expect(denials(home, label)).toEqual([]);
  const key = (await listKeys(home)).find((k) => k.label === label);
  expect(key?.spend.usd).toBeGreaterThan(0);
  expect(key?.spend.usd).toBeLessThanOrEqual(maxUsd);
  expect(key?.spend.reservedUsd).toBe(0);
}

/** Every address the agent (and what it ran) tried was the broker's, on loopback; none was the upstream's. */
export function expectOnlyBroker(r: AgentResult, broker: AgentBroker): void {
  expect(r.destinations.length).toBeGreaterThan(0);
  for (const d of r.destinations) expect(isLoopback(d.address), JSON.stringify(d)).toBe(true);
  const ports = r.destinations.map((d) => d.port);
  expect(ports).toContain(Number(new URL(broker.serve.url).port));
  expect(ports).not.toContain(Number(new URL(broker.up.url).port));
}

/**
 * Once `streaming()` says the agent's answer is under way, revokes its key (found by `label`)
 * with `till revoke`, and returns how the agent ended, how long after the revocation, and how
 * many requests the key had in flight when it was revoked.
 */
export async function revokeWhileStreaming(
  broker: AgentBroker,
  run: AgentRun,
  label: string,
  streaming: () => boolean,
): Promise<{ r: AgentResult; afterMs: number; inFlight: number }> {
  await waitFor('the answer to stream', streaming, { timeoutMs: 60_000 });
  const key = (await listKeys(broker.home)).find((k) => k.label === label && k.state === 'active');
  expect(key, `an active key labelled "${label}"`).toBeDefined();
  const revokedAt = Date.now();
  expect((await runTill(['revoke', key!.id], { home: broker.home })).code).toBe(0);
  const r = await run.done;
  return { r, afterMs: Date.now() - revokedAt, inFlight: key!.inFlight };
}
