/**
 * Three `till serve` brokers on one team ledger (a throw-away PostgreSQL server), as a team runs
 * them: `TILL_LEDGER=postgres://…`, each with its own data folder and its own copy of the real
 * credential. Limits hold across them; a revocation on one ends streams on another.
 */
import * as http from 'node:http';
import { readFileSync } from 'node:fs';
import OpenAI from 'openai';
import WebSocket from 'ws';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serveTill, type Broker } from './support/served';
import { startPostgres, type TestPostgres } from './support/postgres';
import { addCredential, fakeCredential, runTill, tempHome } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';
import { openResponsesSocket } from './support/responsesSocket';
import { waitFor } from './support/wait';

let db: TestPostgres;
let credential: string;
let openai: Upstream;
let brokers: (Broker & { process: { output(): string } })[] = [];

beforeAll(async () => {
  db = await startPostgres();
  credential = fakeCredential('openai');
  openai = await startOpenAIUpstream({ credential, streamChunks: 100, streamDelayMs: 50 });
  brokers = await brokersOn(openai, 3);
}, 60_000);
afterAll(async () => {
  // A broker that does not exit within 15 s of SIGTERM (a connection left open keeps it alive)
  // is killed, and the suite fails naming it.
  const hung: string[] = [];
  await Promise.all(
    brokers.map(async (b) => {
      const stopped = await Promise.race([b.close().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 15_000))]);
      if (stopped) return;
      hung.push(`${b.url}: ${b.process.output().slice(-500)}`);
      await b.close('kill');
    }),
  );
  await openai?.close();
  db?.destroy();
  if (hung.length > 0) throw new Error(`till serve did not stop on SIGTERM:\n${hung.join('\n')}`);
}, 60_000);

/** `count` brokers as a team runs them: each its own data folder and copy of the credential, on the team ledger. */
function brokersOn(up: Upstream, count: number): Promise<(Broker & { process: { output(): string } })[]> {
  return Promise.all(
    Array.from({ length: count }, async () => {
      const home = tempHome();
      await addCredential(home, 'openai', 'openai', credential);
      return serveTill(home, { env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1`, TILL_LEDGER: db.url } });
    }),
  );
}

/**
 * One streamed chat through `broker` with the official SDK, read to its end: its text, or how it
 * failed (`429 <message>`, or the message of a stream ended by the broker).
 */
async function stream(
  broker: Broker,
  key: string,
  request: { model: string; max_tokens?: number; content: string },
): Promise<{ text?: string; failed?: string }> {
  const client = new OpenAI({ apiKey: key, baseURL: `${broker.url}/openai/v1`, maxRetries: 0 });
  try {
    const answer = await client.chat.completions.create({
      model: request.model,
      stream: true,
      max_tokens: request.max_tokens,
      messages: [{ role: 'user', content: request.content }],
    });
    let text = '';
    for await (const chunk of answer) text += chunk.choices[0]?.delta.content ?? '';
    return { text };
  } catch (err) {
    return { failed: `${(err as { status?: number }).status ?? ''} ${(err as Error).message}`.trim() };
  }
}

/** Waits until every broker knows the key (a notification from the database tells them). */
async function everywhere(id: string): Promise<void> {
  for (const b of brokers) await waitFor(`broker to know key ${id}`, async () => (await b.key(id).catch(() => undefined)) !== undefined);
}

/** A small chat request through `broker` (on a connection of its own unless `agent` is given); its status and body. */
function chat(broker: Broker, key: string, agent: http.Agent | false = false): Promise<{ status: number; body: string }> {
  const u = new URL(broker.url);
  const body = JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: u.hostname,
        port: u.port,
        method: 'POST',
        path: '/openai/v1/chat/completions',
        agent,
        headers: { 'content-type': 'application/json', authorization: `Bearer ${key}`, 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

describe('a team ledger on PostgreSQL, through till serve', () => {
  it('lets exactly 100 of 900 parallel requests through three brokers use a key with 100 activations', async () => {
    const k = await brokers[0]!.issue({ target: 'openai', uses: 100 });
    await everywhere(k.id);
    const before = openai.received.length;
    const agents = brokers.map(() => new http.Agent({ keepAlive: true, maxSockets: 50 }));
    try {
      const answers = await Promise.all(brokers.flatMap((b, i) => Array.from({ length: 300 }, () => chat(b, k.key, agents[i]))));
      const ok = answers.filter((a) => a.status === 200);
      expect(ok).toHaveLength(100);
      expect(openai.received.length - before).toBe(100);
      const refused = answers.filter((a) => a.status !== 200);
      expect(new Set(refused.map((a) => a.status))).toEqual(new Set([429]));
      expect(refused[0]!.body).toMatch(/100/);
    } finally {
      for (const a of agents) a.destroy();
    }
    // Every broker sees the key spent: 100 used, nothing held.
    for (const b of brokers) {
      await waitFor('the key to settle everywhere', async () => (await b.key(k.id)).used.activations === 100);
      expect((await b.key(k.id)).state).toBe('exhausted');
    }
    expect(db.psql(`select used_activations, held_activations from till_keys where id = '${k.id}'`)).toBe('100|0');
  });

  it('serves a key issued through broker 1 at once through broker 3, without waiting for the notification', async () => {
    const k = await brokers[0]!.issue({ target: 'openai', uses: 2 });
    const answer = await chat(brokers[2]!, k.key);
    expect(answer.status, answer.body).toBe(200);
  });

  it('serves whole 30 parallel streams through three brokers that fit a $1 key (text bytes past max_tokens included)', async () => {
    // 1,500 tokens of 4 to 5 bytes each: more bytes than the 3,000-token cap, which is as far as a hold goes.
    const up = await startOpenAIUpstream({ credential, streamChunks: 1500, streamDelayMs: 2 });
    const homes = await brokersOn(up, 3);
    try {
      const k = await homes[0]!.issue({ target: 'openai', maxSpend: 1 });
      const outcomes = await Promise.all(
        Array.from({ length: 30 }, async (_, i) => {
          const { text, failed } = await stream(homes[i % 3]!, k.key, { model: 'gpt-4o', max_tokens: 3000, content: 'tell me everything' });
          return failed ?? (text!.length > 3000 ? 'whole' : `short: ${text!.length}`);
        }),
      );
      expect(
        outcomes.filter((o) => o !== 'whole'),
        outcomes.join('\n'),
      ).toEqual([]);
      const billed = Math.ceil(up.billed.inputTokens * 2.5 + up.billed.outputTokens * 10);
      await waitFor(
        'the key to count every stream',
        async () => Number(db.psql(`select used_spend from till_keys where id = '${k.id}'`)) === billed,
      );
    } finally {
      await Promise.all(homes.map((b) => b.close()));
      await up.close();
    }
  });

  it('never lets 600 parallel streams through three brokers bill more than $1 on a $1 key', async () => {
    // Each stream would produce 1,500 tokens ($0.015 at gpt-4o's $10 per million): their holds
    // start at a slice and grow as they go, each growth checked in the database.
    const up = await startOpenAIUpstream({ credential, streamChunks: 1500, streamDelayMs: 2, afterDisconnectTokens: 50 });
    const homes = await brokersOn(up, 3);
    try {
      const k = await homes[0]!.issue({ target: 'openai', maxSpend: 1 });
      for (const b of homes)
        await waitFor('the broker to know the key', async () => (await b.key(k.id).catch(() => undefined)) !== undefined);
      const outcomes = await Promise.all(
        homes.flatMap((b) =>
          Array.from({ length: 200 }, async () => {
            const { failed } = await stream(b, k.key, { model: 'gpt-4o', max_tokens: 3000, content: 'tell me everything' });
            return failed === undefined ? 'served' : failed.split(' ')[0]!;
          }),
        ),
      );
      // Every broker's streams ended and settled: nothing in flight anywhere, nothing held in the database.
      await waitFor('every stream to settle', async () => {
        if (up.inFlight() > 0) return false;
        for (const b of homes) if ((await b.key(k.id)).inFlight > 0) return false;
        return (
          db.psql(`select held_spend, (select count(*) from till_holds where key_id = '${k.id}') from till_keys where id = '${k.id}'`) ===
          '0|0'
        );
      });
      // gpt-4o: $2.50 input, $10 output per million tokens, in micro-dollars.
      const billed = Math.ceil(up.billed.inputTokens * 2.5 + up.billed.outputTokens * 10);
      const counted = Number(db.psql(`select used_spend from till_keys where id = '${k.id}'`));
      expect(billed).toBeLessThanOrEqual(1_000_000);
      expect(counted).toBeLessThanOrEqual(1_000_000);
      expect(Math.abs(counted - billed), `counted ${counted}, billed ${billed}`).toBeLessThanOrEqual(Math.max(10, billed * 0.03));
      expect(billed).toBeGreaterThan(0);
      const served = outcomes.filter((o) => o === 'served').length;
      const refused = outcomes.filter((o) => o === '429').length;
      console.log(
        `team ledger, 600 streams on $1: ${served} served whole, ${refused} refused, ${600 - served - refused} cut; billed $${(billed / 1e6).toFixed(4)}, counted $${(counted / 1e6).toFixed(4)}`,
      );
    } finally {
      await Promise.all(homes.map((b) => b.close()));
      await up.close();
    }
  });

  it('keeps WebSocket turns in order while their holds go to the database, and refuses the one past the limit', async () => {
    const up = await startOpenAIUpstream({ credential, websocket: true });
    const b = (await brokersOn(up, 1))[0]!;
    try {
      const k = await b.issue({ target: 'openai', uses: 2 });
      const ws = new WebSocket(`${b.url.replace(/^http/, 'ws')}/openai/v1/responses`, { headers: { authorization: `Bearer ${k.key}` } });
      const received: { type?: string; error?: { message?: string } }[] = [];
      ws.on('message', (data: Buffer) => received.push(JSON.parse(data.toString()) as (typeof received)[number]));
      await new Promise((r, j) => {
        ws.once('open', r);
        ws.once('error', j);
      });
      // Three turns sent at once: each waits for the one before it, as a local ledger keeps them.
      for (const input of ['first', 'second', 'third']) ws.send(JSON.stringify({ type: 'response.create', model: 'gpt-4o-mini', input }));
      await waitFor('the third turn to be refused', async () => received.some((m) => m.type === 'error'));
      await waitFor('two turns upstream', async () => up.socketMessages.length >= 2);
      // The first two reached the upstream, in the order sent; the third was refused by the limit.
      const sent = up.socketMessages.filter((m) => m.type === 'response.create').map((m) => m.input);
      expect(sent).toEqual(['first', 'second']);
      expect(received.find((m) => m.type === 'error')?.error?.message).toMatch(/of 2 activations/);
      ws.close();
      await waitFor(
        'both turns to settle',
        async () => db.psql(`select used_activations, held_activations from till_keys where id = '${k.id}'`) === '2|0',
      );
    } finally {
      await b.close();
      await up.close();
    }
  });

  it('keeps a concurrency limit across brokers: 12 parallel streams through three on a key allowing 2, exactly 2 run', async () => {
    const k = await brokers[0]!.issue({ target: 'openai', concurrency: 2 });
    await everywhere(k.id);
    const before = openai.received.length;
    const outcomes = await Promise.all(
      Array.from(
        { length: 12 },
        async (_, i) => (await stream(brokers[i % 3]!, k.key, { model: 'gpt-4o-mini', content: 'go' })).failed ?? 'served',
      ),
    );
    expect(outcomes.filter((o) => o === 'served')).toHaveLength(2);
    expect(openai.received.length - before).toBe(2);
    const refused = outcomes.filter((o) => o !== 'served');
    expect(
      refused.every((o) => o.startsWith('429') && /allows 2 requests at once/.test(o)),
      refused.join('\n'),
    ).toBe(true);
    // Once they ended, the slots are free again, on any broker; a free route takes one too.
    await waitFor('the slots to be free', async () => db.psql(`select count(*) from till_holds where key_id = '${k.id}'`) === '0');
    expect((await chat(brokers[1]!, k.key)).status).toBe(200);
  });

  it('keeps a rate limit across brokers: 9 requests through three on a key allowing 5 a minute, exactly 5 pass', async () => {
    const k = await brokers[0]!.issue({ target: 'openai', rpm: 5 });
    await everywhere(k.id);
    const answers = await Promise.all(Array.from({ length: 9 }, (_, i) => chat(brokers[i % 3]!, k.key)));
    expect(answers.filter((a) => a.status === 200)).toHaveLength(5);
    const refused = answers.filter((a) => a.status !== 200);
    expect(new Set(refused.map((a) => a.status))).toEqual(new Set([429]));
    expect(refused[0]!.body).toMatch(/limited to 5 requests per minute; retry in \d+ s/);
  });

  it('serves an extension made through broker 1 on broker 3 within a second', async () => {
    const k = await brokers[0]!.issue({ target: 'openai', uses: 1 });
    await everywhere(k.id);
    expect((await chat(brokers[2]!, k.key)).status).toBe(200);
    expect((await chat(brokers[2]!, k.key)).status).toBe(429);
    const extended = await runTill(['extend', k.id, '--uses', '1'], { home: brokers[0]!.home });
    expect(extended.code, extended.stderr).toBe(0);
    const at = Date.now();
    await waitFor('broker 3 to see the new limit', async () => (await brokers[2]!.key(k.id)).policy.maxActivations === 2);
    expect(Date.now() - at).toBeLessThan(1_000);
    expect((await chat(brokers[2]!, k.key)).status).toBe(200);
  });

  it('closes a WebSocket on another broker within a second of a revocation through broker 1', async () => {
    const up = await startOpenAIUpstream({ credential, websocket: true });
    const b = (await brokersOn(up, 1))[0]!;
    try {
      const k = await brokers[0]!.issue({ target: 'openai' });
      await waitFor('the broker to know the key', async () => (await b.key(k.id).catch(() => undefined)) !== undefined);
      const socket = await openResponsesSocket(`${b.url.replace(/^http/, 'ws')}/openai/v1/responses`, k.key);
      const closed = new Promise<number>((resolve) => socket.ws.once('close', () => resolve(Date.now())));
      await socket.turn('hi');
      const revokedAt = Date.now();
      await brokers[0]!.revoke(k.id);
      expect((await closed) - revokedAt).toBeLessThan(1_000);
    } finally {
      await b.close();
      await up.close();
    }
  });

  it('ends a stream on broker 3 within a second of a revocation through broker 1', async () => {
    const k = await brokers[0]!.issue({ target: 'openai' });
    await everywhere(k.id);
    const client = new OpenAI({ apiKey: k.key, baseURL: `${brokers[2]!.url}/openai/v1`, maxRetries: 0 });
    const stream = await client.chat.completions.create({
      model: 'gpt-4o-mini',
      stream: true,
      messages: [{ role: 'user', content: 'go' }],
    });
    let chunks = 0;
    let revokedAt = 0;
    try {
      for await (const _ of stream) {
        if (++chunks === 3) {
          revokedAt = Date.now();
          await brokers[0]!.revoke(k.id);
        }
      }
    } catch {
      // The broker ends the stream with an error event: the SDK throws.
    }
    const endedAt = Date.now();
    expect(revokedAt).toBeGreaterThan(0);
    // 100 chunks 50 ms apart would take 5 s: it ended well before.
    expect(chunks).toBeLessThan(30);
    expect(endedAt - revokedAt).toBeLessThan(1_000);
    expect((await brokers[2]!.key(k.id)).state).toBe('revoked');
  });

  it("reclaims a broker's holds within their expiry when it is killed with streams open, and the key never overruns", async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', credential);
    const doomed = await serveTill(home, {
      env: { TILL_UPSTREAM_OPENAI: `${openai.url}/v1`, TILL_LEDGER: db.url, TILL_LEDGER_HOLD_TTL_MS: '1000' },
    });
    const k = await brokers[0]!.issue({ target: 'openai', uses: 5 });
    await waitFor('the new broker to know the key', async () => (await doomed.key(k.id).catch(() => undefined)) !== undefined);
    const client = new OpenAI({ apiKey: k.key, baseURL: `${doomed.url}/openai/v1`, maxRetries: 0 });
    const streams = await Promise.all(
      [1, 2, 3].map(() =>
        client.chat.completions.create({ model: 'gpt-4o-mini', stream: true, messages: [{ role: 'user', content: 'go' }] }),
      ),
    );
    const reading = streams.map(async (s) => {
      try {
        for await (const _ of s) void _;
        return 'ended';
      } catch (err) {
        return (err as Error).name;
      }
    });
    expect(db.psql(`select held_activations from till_keys where id = '${k.id}'`)).toBe('3');
    const killedAt = Date.now();
    await doomed.close('kill');
    // Its clients see the connection go (no clean end of the stream).
    for (const r of await Promise.all(reading)) expect(r).not.toBe('ended');
    // Reclaimed by the brokers still running, counted as spent: they may have reached the upstream.
    await waitFor('the holds to be reclaimed', async () => db.psql(`select held_activations from till_keys where id = '${k.id}'`) === '0');
    expect(Date.now() - killedAt).toBeLessThan(3_000);
    expect(db.psql(`select used_activations from till_keys where id = '${k.id}'`)).toBe('3');
    // What is left is still usable, and no more.
    const answers = await Promise.all([1, 2, 3, 4].map((i) => chat(brokers[i % 3]!, k.key)));
    expect(answers.filter((a) => a.status === 200)).toHaveLength(2);
  });

  it('answers 503 in the provider error shape while the database is down, loses none of the streams it had admitted, and serves again when it is back', async () => {
    const k = await brokers[0]!.issue({ target: 'openai', uses: 10 });
    await everywhere(k.id);
    expect((await chat(brokers[1]!, k.key)).status).toBe(200);
    // Three streams (5 s each) admitted before the database goes away; they end while it is away.
    const client = new OpenAI({ apiKey: k.key, baseURL: `${brokers[1]!.url}/openai/v1`, maxRetries: 0 });
    const streams = await Promise.all(
      [1, 2, 3].map(() =>
        client.chat.completions.create({ model: 'gpt-4o-mini', stream: true, messages: [{ role: 'user', content: 'go' }] }),
      ),
    );
    const reading = streams.map(async (stream) => {
      let text = '';
      for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
      return text.length;
    });
    const before = openai.received.length;
    db.stop();
    try {
      const down = await chat(brokers[1]!, k.key);
      expect(down.status).toBe(503);
      expect(JSON.parse(down.body)).toMatchObject({
        error: { message: expect.stringMatching(/team ledger \(PostgreSQL\) is unavailable/) },
      });
      expect(openai.received.length).toBe(before);
      // A free route holds nothing, so it still passes.
      const models = await new Promise<number>((resolve, reject) => {
        const u = new URL(brokers[1]!.url);
        http
          .get(
            { host: u.hostname, port: u.port, path: '/openai/v1/models', agent: false, headers: { authorization: `Bearer ${k.key}` } },
            (res) => {
              res.resume();
              resolve(res.statusCode ?? 0);
            },
          )
          .on('error', reject);
      });
      expect(models).toBe(200);
      for (const length of await Promise.all(reading)) expect(length).toBeGreaterThan(0);
    } finally {
      db.start();
    }
    // No broker was restarted; the streams' settlements, acknowledged to their clients while the
    // database was away, are written once it is back.
    await waitFor('the brokers to serve again', async () => (await chat(brokers[1]!, k.key)).status === 200);
    await waitFor('the key to count all five', async () => (await brokers[0]!.key(k.id)).used.activations === 5);
    expect(db.psql(`select used_activations, held_activations from till_keys where id = '${k.id}'`)).toBe('5|0');
  });

  it('keeps the real credential out of the database and the logs', () => {
    const dump = db.psql(`select coalesce(string_agg(record::text || policy::text, ''), '') from till_keys`);
    expect(dump.length).toBeGreaterThan(0);
    expect(dump).not.toContain(credential);
    for (const b of brokers) {
      expect(b.process.output()).not.toContain(credential);
      // The database's password is not printed either: the broker names the database without it.
      expect(b.process.output()).toContain('team ledger: postgres://till@127.0.0.1');
      expect(b.process.output()).not.toContain(new URL(db.url).password);
    }
    expect(readFileSync(`${brokers[0]!.home}/ledger.jsonl`, { encoding: 'utf8', flag: 'a+' })).toBe('');
  });
});
