/**
 * A broker for tests in one of two forms behind one interface: `till serve` as users run it (a
 * child process, driven over the control channel as `till` drives it), or, where a test needs a
 * setting users cannot give (a 300 ms header timeout), a TillService in this process. Tests of
 * security, limits and defaults use the first, so a default lost in wiring cannot hide.
 */
import { appendFileSync } from 'node:fs';
import { ControlClient } from '../../src/core/runtime/control';
import type { KeySummary, TillEvent } from '../../src/core/events';
import { tillPaths } from '../../src/core/runtime/home';
import type { ServiceOptions, TillService } from '../../src/core/runtime/service';
import type { IssuedKey, IssueInput } from '../../src/core/runtime/controlApi';
import { logFile, spawnServe, startTill, type ServeProcess } from './till';

export interface Broker {
  home: string;
  /** `http://127.0.0.1:<port>`. */
  url: string;
  issue(input: IssueInput): Promise<IssuedKey>;
  /** One key's summary, as `till ls --json` shows it. */
  key(id: string): Promise<KeySummary>;
  revoke(id: string): Promise<void>;
  /** Every event since the broker started (what `till watch --json` prints). */
  events(): TillEvent[];
  /** What the broker logged (`till serve`'s output, or the in-process log). */
  log(): string;
  /** Stops the broker (SIGTERM for `till serve`); `kill` sends SIGKILL instead. */
  close(how?: 'stop' | 'kill'): Promise<void>;
}

/** `till serve` in a child process (see {@link spawnServe} for the options), driven over its control channel. */
export async function serveTill(home: string, options: Parameters<typeof spawnServe>[1] = {}): Promise<Broker & { process: ServeProcess }> {
  const serve = await spawnServe(home, options);
  // The socket's place can depend on the environment (XDG_RUNTIME_DIR, TMPDIR): the child's.
  const client = new ControlClient(tillPaths(home, { ...process.env, ...options.env }));
  const events: TillEvent[] = [];
  const abort = new AbortController();
  await new Promise<void>((resolve, reject) => {
    client.stream('/events', (e) => events.push(e as TillEvent), abort.signal, resolve).catch(reject);
  });
  return {
    home,
    url: serve.url,
    process: serve,
    issue: async (input) => (await client.request('POST', '/keys', input)) as IssuedKey,
    key: async (id) => {
      const all = (await client.request('GET', '/keys')) as KeySummary[];
      const k = all.find((s) => s.id === id);
      if (!k) throw new Error(`no key ${id}`);
      return k;
    },
    revoke: async (id) => {
      await client.request('DELETE', `/keys/${encodeURIComponent(id)}`);
    },
    events: () => events,
    log: () => serve.output(),
    close: async (how = 'stop') => {
      abort.abort();
      await serve.stop(how === 'kill' ? 'SIGKILL' : 'SIGTERM');
    },
  };
}

/** A TillService in this process, for settings `till serve` does not take. */
export async function startInProcess(options: Partial<ServiceOptions> & { home: string }): Promise<Broker & { service: TillService }> {
  const file = logFile('broker');
  let logged = '';
  const service = await startTill({
    ...options,
    log: (line) => {
      logged += line + '\n';
      appendFileSync(file, line + '\n');
      options.log?.(line);
    },
  });
  const events: TillEvent[] = [];
  const off = service.events.on((e) => events.push(e));
  return {
    home: options.home,
    url: service.url,
    service,
    issue: (input) => service.issue(input),
    key: async (id) => {
      const k = service.keys.list().find((s) => s.id === id);
      if (!k) throw new Error(`no key ${id}`);
      return k;
    },
    revoke: async (id) => {
      await service.keys.revoke(id);
    },
    events: () => events,
    log: () => logged,
    close: async () => {
      off();
      await service.close();
    },
  };
}
