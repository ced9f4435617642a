/**
 * Upstream TLS is verified: the credential is never sent to a server whose certificate does
 * not check out, and a CA the user trusts through NODE_EXTRA_CA_CERTS is honoured.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addCredential, fakeCredential, runTill, spawnServe, startTill, tempHome } from './support/till';

let server: Server;
let url: string;
let certFile: string;
const hits: string[] = [];

beforeAll(async () => {
  const dir = tempHome();
  certFile = join(dir, 'cert.pem');
  const keyFile = join(dir, 'key.pem');
  execFileSync(
    'openssl',
    [
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      keyFile,
      '-out',
      certFile,
      '-days',
      '1',
      '-subj',
      '/CN=127.0.0.1',
      '-addext',
      'subjectAltName=IP:127.0.0.1',
    ],
    { stdio: 'ignore' },
  );
  server = createServer({ key: readFileSync(keyFile), cert: readFileSync(certFile) }, (req, res) => {
    hits.push(req.url ?? '');
    res.setHeader('content-type', 'application/json');
    res.end('{"object":"list","data":[]}');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(() => new Promise<void>((r) => server.close(() => r())));

describe('upstream TLS', () => {
  // Attack: a man in the middle (or a misconfigured override) presenting a certificate nobody
  // trusts must not receive the credential.
  it('refuses an upstream with an untrusted certificate: 502, no request sent, no activation spent', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', fakeCredential('tls'));
    const till = await startTill({ home, env: { TILL_UPSTREAM_OPENAI: `${url}/v1` } });
    try {
      const issued = await till.issue({ target: 'openai', uses: 1 });
      const res = await fetch(`${issued.baseUrl}/chat/completions`, {
        method: 'POST',
        body: '{"model":"gpt-4o"}',
        headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
      });
      expect(res.status).toBe(502);
      const body = (await res.json()) as { error: { message: string } };
      expect(body.error.message).toMatch(/cannot reach OpenAI .*(SELF_SIGNED|CERT)/);
      expect(hits).toHaveLength(0);
      expect(till.keys.list()[0]!.remaining.activations).toBe(1);
    } finally {
      await till.close();
    }
  });

  it('trusts a CA given in NODE_EXTRA_CA_CERTS', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', fakeCredential('tls'));
    const serve = await spawnServe(home, { env: { TILL_UPSTREAM_OPENAI: `${url}/v1`, NODE_EXTRA_CA_CERTS: certFile } });
    try {
      const issued = JSON.parse((await runTill(['issue', 'openai', '--json'], { home })).stdout) as { key: string; baseUrl: string };
      const res = await fetch(`${issued.baseUrl}/models`, { headers: { authorization: `Bearer ${issued.key}` } });
      expect(res.status).toBe(200);
      expect(hits).toEqual(['/v1/models']);
    } finally {
      await serve.stop();
    }
  });
});
