/** Where the broker may listen (listener.ts) and which Host names it then accepts (frontDoor.ts). */
import type * as http from 'node:http';
import { describe, expect, it } from 'vitest';
import { clientDenial } from '../src/core/broker/frontDoor';
import { isLoopbackAddress, listener } from '../src/core/broker/listener';

const tls = { cert: 'cert', key: 'key' };

function request(host: string, extra: Record<string, string> = {}): http.IncomingMessage {
  const headers = { host, ...extra };
  return { headers, rawHeaders: Object.entries(headers).flat(), url: '/openai/v1/models' } as unknown as http.IncomingMessage;
}

describe('the listener', () => {
  it('is 127.0.0.1 over plain HTTP by default, accepting loopback names only', () => {
    const l = listener();
    expect(l).toMatchObject({ host: '127.0.0.1', tls: undefined, allowedHosts: undefined, publicName: '127.0.0.1' });
    expect(clientDenial(request('127.0.0.1:8455'), l.allowedHosts)).toBeUndefined();
    expect(clientDenial(request('till.example.com'), l.allowedHosts)?.code).toBe('forbidden_host');
  });

  it('refuses any address off this machine without TLS, and every address without names', () => {
    expect(() => listener({ host: '0.0.0.0' })).toThrow(/only with TLS/);
    expect(() => listener({ host: '10.0.0.5' })).toThrow(/only with TLS/);
    expect(() => listener({ host: '::', tls })).toThrow(/--allow-host/);
    expect(() => listener({ host: 'till.example.com', tls })).toThrow(/IP address to bind/);
    expect(() => listener({ host: '0.0.0.0', tls, allowedHosts: ['not a name'] })).toThrow(/not a host name/);
    expect(listener({ host: '127.0.0.2' }).tls).toBeUndefined();
    expect(isLoopbackAddress('[::1]')).toBe(true);
    expect(isLoopbackAddress('10.0.0.5')).toBe(false);
  });

  it('accepts exactly its names (any port), its own address and loopback names, nothing that only starts like them', () => {
    const l = listener({ host: '0.0.0.0', tls, allowedHosts: ['Till.Example.com:8455', 'broker.internal'] });
    expect(l.publicName).toBe('till.example.com');
    for (const ok of ['till.example.com:8455', 'TILL.EXAMPLE.COM', 'broker.internal:443', 'localhost:8455'])
      expect(clientDenial(request(ok), l.allowedHosts), ok).toBeUndefined();
    for (const bad of [
      'till.example.com.evil.net',
      'evil.till.example.com',
      'till.example.com:99999',
      'till.example.com@evil',
      'till.example.com:1:2',
    ])
      expect(clientDenial(request(bad), l.allowedHosts)?.code, bad).toBe('forbidden_host');
    expect(clientDenial(request('till.example.com', { origin: 'https://till.example.com' }), l.allowedHosts)?.code).toBe('browser_origin');
    const own = listener({ host: '10.0.0.5', tls });
    expect(own.publicName).toBe('10.0.0.5');
    expect(clientDenial(request('10.0.0.5:8455'), own.allowedHosts)).toBeUndefined();
    const v6 = listener({ host: 'fd00::5', tls });
    expect(v6.publicName).toBe('[fd00::5]');
    expect(clientDenial(request('[fd00::5]:8455'), v6.allowedHosts)).toBeUndefined();
  });
});
