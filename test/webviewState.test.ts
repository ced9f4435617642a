/**
 * The Usage view's state (src/webview/state.ts), driven by the host's messages as the page
 * receives them: what the page would draw after each, without a browser.
 */
import { describe, expect, it } from 'vitest';
import type { KeySummary, RequestInfo, RequestRecord } from '../src/core/events';
import type { HostMessage } from '../src/webview/messages';
import { MINUTE, newModel, receive, running, sortedKeys, SPAN, stats, type PageModel } from '../src/webview/state';

const NOW = new Date(2026, 11, 7, 15, 30, 0).getTime();

function key(id: string, over: Partial<KeySummary> = {}): KeySummary {
  return {
    id,
    label: `key ${id}`,
    provider: 'openai',
    credential: 'openai',
    createdAt: NOW - 60 * MINUTE,
    state: 'active',
    policy: {},
    used: {},
    reserved: {},
    remaining: {},
    inFlight: 0,
    tokens: { input: 0, output: 0, cached: 0, reasoning: 0 },
    estimatedSpend: 0,
    spend: { usd: 0, pricedUsd: 0, estimatedUsd: 0, reservedUsd: 0, unpricedRequests: 0 },
    ...over,
  };
}

const info = (requestId: string, keyId: string): RequestInfo => ({
  requestId,
  keyId,
  label: `key ${keyId}`,
  provider: 'openai',
  method: 'POST',
  path: '/v1/chat/completions',
  model: 'gpt-5',
  billable: true,
});

function finished(requestId: string, keyId: string, at: number, spend?: number): RequestRecord {
  return {
    type: 'request.finished',
    at,
    request: info(requestId, keyId),
    status: 200,
    latencyMs: 12,
    usage: { tokens: { input: 10, output: 5, cached: 0, reasoning: 0 }, ...(spend === undefined ? {} : { spend }), estimated: false },
  };
}

function denied(requestId: string, keyId: string, at: number): RequestRecord {
  return { type: 'request.denied', at, request: info(requestId, keyId), status: 429, reason: 'till key exhausted', code: 'exhausted' };
}

/** A stream's running usage, as the host relays it. */
function progress(requestId: string, keyId: string, spend?: number, held?: { spend: number }): HostMessage {
  return {
    type: 'event',
    event: {
      type: 'request.progress',
      at: NOW,
      request: info(requestId, keyId),
      usage: { tokens: { input: 100, output: 50, cached: 0, reasoning: 0 }, ...(spend === undefined ? {} : { spend }), estimated: true },
      held,
    },
  };
}

function state(over: Partial<Extract<HostMessage, { type: 'state' }>> = {}): HostMessage {
  return {
    type: 'state',
    keys: [],
    recent: [],
    truncated: false,
    brokerUrl: 'http://127.0.0.1:8455',
    role: 'host',
    hasCredential: true,
    placement: 'The broker runs in this window, on this machine. Real keys: in the OS keychain.',
    ...over,
  };
}

function loaded(over: Partial<Extract<HostMessage, { type: 'state' }>> = {}): PageModel {
  const model = newModel();
  receive(model, state(over), NOW);
  return model;
}

describe('the Usage view state', () => {
  it('draws nothing before the first state, and everything from it', () => {
    const model = newModel();
    expect(model.loaded).toBe(false);
    expect(receive(model, state({ keys: [key('a')], recent: [finished('r1', 'a', NOW - 1000)] }), NOW)).toEqual({ repaint: 'all' });
    expect(model.loaded).toBe(true);
    expect([...model.keys.keys()]).toEqual(['a']);
    expect(model.records.map((r) => r.request.requestId)).toEqual(['r1']);
    expect(model.role).toBe('host');
    expect(model.placement).toMatch(/^The broker runs in this window, on this machine\. Real keys: in the OS keychain\.$/);
  });

  it('fills what a key from an older broker lacks, so its card draws without tokens or dollars', () => {
    const old = { ...key('a') } as Partial<KeySummary>;
    delete old.tokens;
    delete old.spend;
    delete old.used;
    const model = loaded({ keys: [old as KeySummary] });
    const k = model.keys.get('a')!;
    expect(k.tokens).toEqual({ input: 0, output: 0, cached: 0, reasoning: 0 });
    expect(k.spend.unpricedRequests).toBe(0);
    expect(k.used).toEqual({});
  });

  it('counts each ended request once, whether it came in a state or as an event', () => {
    const r = finished('r1', 'a', NOW - 1000);
    const model = loaded({ keys: [key('a')], recent: [r] });
    receive(model, { type: 'event', event: r }, NOW);
    receive(model, { type: 'event', event: denied('r2', 'a', NOW - 500) }, NOW);
    expect(model.records.map((x) => x.request.requestId)).toEqual(['r1', 'r2']);
    const st = stats(model, NOW);
    expect(st.servedToday).toBe(1);
    expect(st.deniedToday).toBe(1);
  });

  it('keeps open streams apart: progress repaints only their lines, their end repaints all', () => {
    const model = loaded({ keys: [key('a', { inFlight: 1 }), key('b', { inFlight: 1 })] });
    expect(receive(model, progress('s1', 'a', 1000, { spend: 20_000 }), NOW)).toEqual({ repaint: 'live' });
    receive(model, progress('s2', 'b', 3000, { spend: 20_000 }), NOW);
    expect(running(model)).toMatchObject({ count: 2, spend: 4000, priced: true, tokens: 300, held: { spend: 40_000 } });
    expect(running(model, 'a')).toMatchObject({ count: 1, spend: 1000 });
    expect(receive(model, { type: 'event', event: finished('s1', 'a', NOW, 1200) }, NOW)).toEqual({ repaint: 'all' });
    expect(running(model).count).toBe(1);
  });

  it('forgets a stream whose end was missed once its key has nothing in flight, but not one that just started', () => {
    const model = loaded({ keys: [key('a', { inFlight: 1 })] });
    receive(model, progress('s1', 'a'), NOW);
    // A key list read before the stream started says nothing is in flight: the fresh stream stays.
    receive(model, { type: 'keys', keys: [key('a', { inFlight: 0 })] }, NOW + 1000);
    expect(model.streams.size).toBe(1);
    // Later, still nothing in flight: the stream's end was missed.
    receive(model, { type: 'keys', keys: [key('a', { inFlight: 0 })] }, NOW + 5000);
    expect(model.streams.size).toBe(0);
  });

  it('drops every open stream when the broker goes away', () => {
    const model = loaded({ keys: [key('a', { inFlight: 1 })] });
    receive(model, progress('s1', 'a'), NOW);
    receive(model, { type: 'role', role: 'down', brokerUrl: undefined }, NOW);
    expect(model.streams.size).toBe(0);
    expect(model.role).toBe('down');
  });

  it('announces key events in words a screen reader can say', () => {
    const model = loaded({ keys: [key('a')] });
    const revoked = key('a', { state: 'revoked', revokedAt: NOW });
    model.revoking.add('a');
    expect(receive(model, { type: 'event', event: { type: 'key.revoked', at: NOW, key: revoked } }, NOW)).toEqual({
      repaint: 'all',
      announce: 'Till key key a revoked.',
    });
    expect(model.revoking.has('a')).toBe(false);
    expect(
      receive(
        model,
        { type: 'event', event: { type: 'limit.near', at: NOW, key: key('b'), meter: 'spend', used: 80, limit: 100, percent: 80 } },
        NOW,
      ).announce,
    ).toBe('Till key key b has used 80% of its spend limit.');
    expect(
      receive(model, { type: 'event', event: { type: 'key.exhausted', at: NOW, key: key('c'), meter: 'activations' } }, NOW).announce,
    ).toBe('Till key key c used up its call limit.');
  });

  it('sorts live keys first, newest first, and shows a key past its expiry as expired before the broker says so', () => {
    const model = loaded({
      keys: [
        key('old', { createdAt: NOW - 3 * MINUTE }),
        key('new', { createdAt: NOW - MINUTE }),
        key('gone', { state: 'revoked', createdAt: NOW }),
        key('late', { createdAt: NOW, policy: { expiresAt: NOW - 1 } }),
      ],
    });
    expect(sortedKeys(model, NOW).map((k) => `${k.key.id}:${k.state}`)).toEqual([
      'new:active',
      'old:active',
      'late:expired',
      'gone:revoked',
    ]);
  });

  it("sums today's calls, spend and tokens, and the last half hour by minute, per key", () => {
    const midnight = new Date(NOW).setHours(0, 0, 0, 0);
    const recent = [
      finished('yesterday', 'a', midnight - 1000, 5_000_000),
      finished('r1', 'a', NOW - 40 * MINUTE, 1000),
      finished('r2', 'a', NOW - 2 * MINUTE, 2000),
      finished('r3', 'b', NOW - 2 * MINUTE),
      denied('d1', 'a', NOW),
    ];
    const model = loaded({ keys: [key('a'), key('b')], recent });
    const st = stats(model, NOW);
    expect(st.servedToday).toBe(3);
    expect(st.deniedToday).toBe(1);
    expect(st.spendToday).toBe(3000);
    // r3's model had no price: its dollars are unknown, not zero.
    expect(st.unpricedToday).toBe(1);
    expect(st.tokensToday).toEqual({ input: 30, output: 15, cached: 0, reasoning: 0 });
    expect(st.total.served.reduce((a, b) => a + b, 0)).toBe(2);
    expect(st.total.served[SPAN - 3]).toBe(2);
    expect(st.total.denied[SPAN - 1]).toBe(1);
    expect(st.byKey.get('a')!.served[SPAN - 3]).toBe(1);
    expect(st.byKey.get('b')!.served[SPAN - 3]).toBe(1);
    expect(st.todayPartial).toBe(false);
  });

  it("says today's counts are partial when older requests were dropped and the oldest kept is from today", () => {
    const model = loaded({ truncated: true, recent: [finished('r1', 'a', NOW - MINUTE)] });
    expect(stats(model, NOW).todayPartial).toBe(true);
  });

  it('does not count a request that never reached the upstream as a call', () => {
    const r: RequestRecord = { ...finished('r1', 'a', NOW - MINUTE), uncounted: true } as RequestRecord;
    const model = loaded({ recent: [r] });
    expect(stats(model, NOW).servedToday).toBe(0);
    expect(model.records).toHaveLength(1);
  });
});
