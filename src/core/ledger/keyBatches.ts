/**
 * Work on one key, sent to the database in batches (group commit): while a batch for a key is on
 * its way, what arrives for the same key waits and goes in the next one, in the order it came. A
 * busy key then costs one row lock and one commit per round trip instead of one per request; a
 * quiet key's work goes at once, alone.
 *
 * One key per batch, always: a statement that locks one key's row cannot deadlock with another
 * broker's statement on other keys.
 */
export class KeyBatches<T, R> {
  private readonly waiting = new Map<string, { item: T; resolve(result: R): void; reject(err: unknown): void }[]>();
  private readonly running = new Set<Promise<void>>();

  /** `send` takes the key and its batch, in order, and answers one result per item (or throws: every item of the batch fails). */
  constructor(
    private readonly send: (key: string, items: T[]) => Promise<R[]>,
    private readonly most = 500,
  ) {}

  /** Queues `item` for `key`'s next batch; resolves with its result. */
  add(key: string, item: T): Promise<R> {
    return new Promise((resolve, reject) => {
      let queue = this.waiting.get(key);
      if (!queue) {
        queue = [];
        this.waiting.set(key, queue);
        const run = this.drain(key, queue).finally(() => this.running.delete(run));
        this.running.add(run);
      }
      queue.push({ item, resolve, reject });
    });
  }

  /** Resolves once every batch queued so far has been answered. */
  async idle(): Promise<void> {
    while (this.running.size > 0) await Promise.all([...this.running]);
  }

  private async drain(key: string, queue: { item: T; resolve(result: R): void; reject(err: unknown): void }[]): Promise<void> {
    // Started in the turn of the key's first item: the others of that turn join its batch.
    await Promise.resolve();
    while (queue.length > 0) {
      const batch = queue.splice(0, this.most);
      try {
        const results = await this.send(
          key,
          batch.map((b) => b.item),
        );
        batch.forEach((b, i) => b.resolve(results[i]!));
      } catch (err) {
        for (const b of batch) b.reject(err);
      }
    }
    this.waiting.delete(key);
  }
}
