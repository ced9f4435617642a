// CommonJS on purpose, as in vitest.config.ts (Vite warns about `import` syntax in a CommonJS file).
const { defineConfig } = require('vitest/config') as typeof import('vitest/config');

/** The real agent CLIs (Claude Code, Codex) through Till: `npm run test:agents`, and last in `npm test`. */
module.exports = defineConfig({
  test: {
    include: ['test/agents/**/*.test.ts'],
    globalSetup: ['test/support/globalSetup.ts'],
    testTimeout: 180_000,
    hookTimeout: 30_000,
    // Each agent is a heavy process; one file at a time keeps them from starving each other.
    fileParallelism: false,
  },
});
