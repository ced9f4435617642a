import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/support/globalSetup.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Tests spawn brokers and keyring daemons; two cores do not gain from more workers.
    maxWorkers: 2,
  },
});
