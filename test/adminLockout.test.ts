/** Wrong admin tokens lock one address out for the rest of a minute; others, and the memory kept, are unaffected. */
import { describe, expect, it } from 'vitest';
import { ADMIN_FAILURES, ADMIN_LOCKOUT_MS, AdminLockout } from '../src/core/runtime/adminLockout';

describe('AdminLockout', () => {
  it('locks an address out after ten wrong tokens within a minute, until the minute since the first is over', () => {
    let now = 1_000_000;
    const lockout = new AdminLockout(() => now);
    for (let i = 1; i < ADMIN_FAILURES; i++) {
      expect(lockout.failed('10.0.0.5')).toBe(false);
      now += 1_000;
    }
    expect(lockout.retryAfter('10.0.0.5')).toBe(0);
    expect(lockout.failed('10.0.0.5')).toBe(true);
    expect(lockout.retryAfter('10.0.0.5')).toBe(51); // 9 s have passed since the first
    expect(lockout.retryAfter('10.0.0.6')).toBe(0);
    now = 1_000_000 + ADMIN_LOCKOUT_MS;
    expect(lockout.retryAfter('10.0.0.5')).toBe(0);
    expect(lockout.failed('10.0.0.5')).toBe(false); // a new window
  });

  it('forgets a minute once it is over: a wrong token every 7 s (under ten a minute) never locks anyone out', () => {
    let now = 0;
    const lockout = new AdminLockout(() => now);
    for (let i = 0; i < 3 * ADMIN_FAILURES; i++) {
      expect(lockout.failed('192.0.2.1')).toBe(false);
      now += 7_000;
    }
    expect(lockout.retryAfter('192.0.2.1')).toBe(0);
  });

  it('keeps at most 10,000 addresses, dropping the oldest', () => {
    const lockout = new AdminLockout(() => 0);
    for (let i = 0; i < ADMIN_FAILURES; i++) lockout.failed('first');
    expect(lockout.retryAfter('first')).toBeGreaterThan(0);
    for (let i = 0; i < 10_000; i++) lockout.failed(`addr-${i}`);
    expect(lockout.retryAfter('first')).toBe(0);
    expect(lockout.failed('addr-9999')).toBe(false);
  });
});
