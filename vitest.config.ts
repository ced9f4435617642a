// CommonJS on purpose: this package is not "type": "module", so Node (and Vite's coming native
// config loader) read a .ts file here as CommonJS, and Vite warns about `import` syntax in it.
const { defineConfig } = require('vitest/config') as typeof import('vitest/config');

module.exports = defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // The real agent CLIs are slow and large: they run on their own (vitest.agents.config.ts).
    exclude: ['test/agents/**', 'node_modules/**'],
    globalSetup: ['test/support/globalSetup.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Tests spawn brokers and keyring daemons; two cores do not gain from more workers.
    maxWorkers: 2,
  },
});
