/** Work on one key sent in batches (ledger/keyBatches.ts): in order, one key per batch, what waits goes next. */
import { describe, expect, it } from 'vitest';
import { KeyBatches } from '../src/core/ledger/keyBatches';

describe('key batches', () => {
  it('sends what arrives while a batch is on its way in the next one, in order, one key per batch', async () => {
    const sent: [string, number[]][] = [];
    let open: (() => void) | undefined;
    const batches = new KeyBatches<number, number>(async (key, items) => {
      sent.push([key, items]);
      if (sent.length === 1) await new Promise<void>((r) => (open = r));
      return items.map((i) => i * 10);
    }, 3);
    const first = batches.add('a', 1);
    await new Promise((r) => setTimeout(r, 10));
    // While the first is on its way: five more for a (two batches of at most 3), one for b (at once).
    const more = [2, 3, 4, 5, 6].map((i) => batches.add('a', i));
    const other = batches.add('b', 7);
    expect(await other).toBe(70);
    open!();
    expect(await first).toBe(10);
    expect(await Promise.all(more)).toEqual([20, 30, 40, 50, 60]);
    expect(sent).toEqual([
      ['a', [1]],
      ['b', [7]],
      ['a', [2, 3, 4]],
      ['a', [5, 6]],
    ]);
    await batches.idle();
  });

  it('fails every item of a batch whose sending failed, and goes on with the next', async () => {
    let calls = 0;
    const batches = new KeyBatches<number, number>(async (_, items) => {
      if (++calls === 1) throw new Error('database away');
      return items;
    });
    const a = batches.add('k', 1);
    const b = batches.add('k', 2);
    await expect(a).rejects.toThrow('database away');
    await expect(b).rejects.toThrow('database away');
    expect(await batches.add('k', 3)).toBe(3);
  });
});
