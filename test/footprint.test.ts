/**
 * What `till serve` costs a machine when it is not doing much: its memory under load and its
 * wakeups when idle, checked on `till serve` as users start it (plain `node dist/till.js`).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { spawnServe, tempHome } from './support/till';

const SURVIVORS = join(__dirname, 'fixtures', 'footprint', 'survivors.cjs');
const MIB = 1024 * 1024;

/** Waits for the preloaded survivors.cjs to report `what` (`new_space_max`, …): its number of bytes, or NaN for `none`. */
async function reported(output: () => string, what = 'new_space_max', withinMs = 15_000): Promise<number> {
  for (let waited = 0; waited < withinMs; waited += 50) {
    const m = new RegExp(`${what} (\\d+|none)`).exec(output());
    if (m) return Number(m[1]);
    await sleep(50);
  }
  throw new Error(`no ${what} reported: ${output()}`);
}

describe.runIf(process.platform === 'linux')("till serve's footprint", () => {
  it("keeps V8's young generation at 16 MiB where a plain node process grows it past that", async () => {
    const env = { NODE_OPTIONS: `--require ${SURVIVORS}` };
    const serve = await spawnServe(tempHome(), { env });
    try {
      expect(await reported(serve.output)).toBeLessThanOrEqual(16 * MIB);
    } finally {
      await serve.stop();
    }
    // The same allocations in a process that is not Till's: V8 grows its new space past the cap
    // (to 32 MiB on Node 20, 128 MiB on Node 24).
    const plain = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 3000)'], { env: { ...process.env, ...env } });
    let text = '';
    plain.stderr.on('data', (c) => (text += c));
    try {
      expect(await reported(() => text)).toBeGreaterThan(16 * MIB);
    } finally {
      plain.kill();
    }
  }, 30_000);

  it('grows its young generation back to 16 MiB once busy again, after V8 shrank it while idle', async () => {
    const serve = await spawnServe(tempHome(), { env: { NODE_OPTIONS: `--require ${SURVIVORS}`, SURVIVORS_AGAIN: '1' } });
    try {
      expect(await reported(serve.output)).toBe(16 * MIB);
      // Node 20's V8 shrinks an idle process's new space after some seconds (its memory
      // reducer); Node 24's kept it for the fixture's 30 s: then there is nothing to grow back.
      const shrunk = await reported(serve.output, 'new_space_shrunk', 40_000);
      if (Number.isNaN(shrunk)) return console.info(`V8 ${process.versions.v8} did not shrink the idle new space within 30 s`);
      expect(shrunk).toBeLessThan(16 * MIB);
      expect(await reported(serve.output, 'new_space_again')).toBe(16 * MIB);
    } finally {
      await serve.stop();
    }
  }, 60_000);

  it('sleeps when idle: a few wakeups a second, not a timer every 50 ms', async () => {
    const serve = await spawnServe(tempHome());
    try {
      const switches = () => Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync(`/proc/${serve.child.pid}/status`, 'utf8'))![1]);
      await sleep(1_000);
      const before = switches();
      await sleep(3_000);
      const wakeups = switches() - before;
      console.info(`idle till serve: ${wakeups} wakeups of its main thread in 3 s`);
      expect(wakeups).toBeLessThanOrEqual(12);
    } finally {
      await serve.stop();
    }
  }, 30_000);
});
