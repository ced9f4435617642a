import { defineConfig } from 'vitest/config';

/** The real agent CLIs (Claude Code, Codex) through Till: `npm run test:agents`, and last in `npm test`. */
export default defineConfig({
  test: {
    include: ['test/agents/**/*.test.ts'],
    globalSetup: ['test/support/globalSetup.ts'],
    testTimeout: 180_000,
    hookTimeout: 30_000,
    // Each agent is a heavy process; one file at a time keeps them from starving each other.
    fileParallelism: false,
  },
});
