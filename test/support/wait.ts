/** Waiting for something to become true in tests, by polling (no vitest import: the VS Code suites use it too). */

/**
 * Calls `check` every `everyMs` until it gives something other than `undefined` or `false`, and
 * returns that; fails after `timeoutMs` with "timed out waiting for <what>" (and the last value
 * when `describe` is given).
 */
export async function waitFor<T>(
  what: string,
  check: () => T | undefined | false | Promise<T | undefined | false>,
  options: { timeoutMs?: number; everyMs?: number; describe?: () => string } = {},
): Promise<T> {
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${options.describe ? ` (${options.describe()})` : ''}`);
    await new Promise((r) => setTimeout(r, options.everyMs ?? 50));
  }
}
