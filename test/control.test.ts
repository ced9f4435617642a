/**
 * The control API as `till serve` answers it: what arrives is checked, and a malformed request
 * gets a 400 that says what is wrong (not a 500 from somewhere inside), changing nothing.
 */
import * as http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient, ControlError } from '../src/core/runtime/control';
import { ControlApi } from '../src/core/runtime/controlApi';
import { tillPaths } from '../src/core/runtime/home';
import { readPrivateFile } from '../src/core/files/privateFolder';
import { serveTill, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome } from './support/till';

let broker: Broker;
let client: ControlClient;
let api: ControlApi;

beforeAll(async () => {
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', fakeCredential('control'));
  broker = await serveTill(home);
  client = new ControlClient(tillPaths(home));
  api = new ControlApi(client);
});
afterAll(() => broker?.close());

/** The status and error message of a control request. */
async function refusal(method: string, path: string, body: unknown): Promise<[number, string]> {
  try {
    await client.request(method, path, body);
  } catch (err) {
    if (err instanceof ControlError) return [err.status, err.message];
    throw err;
  }
  throw new Error(`${method} ${path} was accepted`);
}

/** A control request with a raw body (not JSON), as a broken client might send. */
function raw(method: string, path: string, body: string): Promise<{ status: number; text: string }> {
  const paths = tillPaths(broker.home);
  const token = readPrivateFile(paths.token)!.trim();
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: paths.socket, method, path, headers: { authorization: `Bearer ${token}` } }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('the control API', () => {
  it('refuses a key request that is not an object, names no target, or has a field of the wrong type, saying which', async () => {
    expect(await refusal('POST', '/keys', [1])).toEqual([400, 'a key to issue must be a JSON object']);
    expect(await refusal('POST', '/keys', {})).toEqual([400, 'a key to issue needs a "target": a provider id or a credential name']);
    expect(await refusal('POST', '/keys', { target: 'openai', uses: 'many' })).toEqual([400, 'a key to issue: "uses" must be a number']);
    expect(await refusal('POST', '/keys', { target: 'openai', models: 'gpt-5' })).toEqual([
      400,
      'a key to issue: "models" must be a list of strings',
    ]);
    const [status, message] = await refusal('POST', '/keys', { target: 'openai', max_spend: 1 });
    expect(status).toBe(400);
    expect(message).toMatch(/^a key to issue: unknown field "max_spend" \(known: target, .*maxSpend/);
    // Nothing was issued by any of them.
    expect(await api.list()).toEqual([]);
  });

  it('refuses a body that is not JSON with a 400', async () => {
    const answer = await raw('POST', '/keys', '{"target": "openai",');
    expect(answer.status).toBe(400);
    expect(JSON.parse(answer.text)).toEqual({ error: 'control request POST /keys: its body must be JSON and its path percent-encoded' });
  });

  it('checks an extension and a credential change too, and still serves well-formed requests after', async () => {
    const issued = await api.issue({ target: 'openai', uses: 2, label: 'checked' });
    expect(await refusal('POST', `/keys/${issued.id}/extend`, { uses: '3' })).toEqual([400, 'an extension: "uses" must be a number']);
    expect(await refusal('POST', '/credentials', { name: 5 })).toEqual([400, 'a credential change: "name" must be a string']);
    expect((await api.extend(issued.id, { uses: 3 })).policy.maxActivations).toBe(5);
    expect((await api.status()).keys).toBe(1);
    expect(await api.revoke(issued.id)).toBe(true);
  });
});
