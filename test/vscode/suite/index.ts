/**
 * The extension-host side of the real-VS-Code tests: VS Code loads this bundle
 * (dist/test/suite.js) as `extensionTestsPath` and calls `run()`, the same contract as
 * @vscode/test-electron. The returned promise decides the exit code the runner sees.
 *
 * Mocha is bundled in, so the extension host needs nothing from node_modules. Test files
 * import `describe`/`it` from 'mocha'; those resolve only after the `pre-require` event, so
 * each file is imported lazily below, never at the top of this module.
 */
import Mocha from 'mocha';
import { mapStack } from './sourceMaps.js';

/**
 * Every test file of the suite. Add new ones here (a bundle has no directory to scan). They are
 * named `*.vscode-test.ts`, not `*.test.ts`, so vitest (which runs every `*.test.ts` under test/)
 * leaves them alone.
 */
const testFiles: ReadonlyArray<readonly [string, () => Promise<unknown>]> =
  // The runner's --no-keychain pass: a server with no Secret Service, as a dev container is.
  process.env.TILL_TEST_SUITE === 'no-keychain'
    ? [
        ['activation.vscode-test.ts', () => import('./activation.vscode-test.js')],
        ['noKeychain.vscode-test.ts', () => import('./noKeychain.vscode-test.js')],
      ]
    : [
        ['activation.vscode-test.ts', () => import('./activation.vscode-test.js')],
        ['extension.vscode-test.ts', () => import('./extension.vscode-test.js')],
      ];

export async function run(): Promise<void> {
  const mocha = new Mocha({
    ui: 'bdd',
    reporter: 'spec',
    color: false,
    // The first activation in a fresh code-server can take seconds.
    timeout: 30_000,
    // Set by the runner from `npm run test:vscode -- --grep <pattern>`.
    ...(process.env.TILL_TEST_GREP ? { grep: process.env.TILL_TEST_GREP } : {}),
  });
  // A private context keeps describe/it off the extension host's globals.
  const context = {};
  for (const [name, load] of testFiles) {
    mocha.suite.emit(Mocha.Suite.constants.EVENT_FILE_PRE_REQUIRE, context, name, mocha);
    await load();
  }
  const failures = await new Promise<number>((resolve) => {
    const runner = mocha.run(resolve);
    // Before the reporter prints the failure at the end of the run.
    runner.on(Mocha.Runner.constants.EVENT_TEST_FAIL, (_test, err: unknown) => {
      if (err instanceof Error && err.stack) err.stack = mapStack(err.stack);
    });
  });
  if (failures > 0) {
    const err = new Error(`${failures} test${failures === 1 ? '' : 's'} failed`);
    err.stack = err.message; // the reporter above already said where
    throw err;
  }
}
