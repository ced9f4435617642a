/**
 * The extension loads in a real VS Code extension host and activates cheaply. Runs inside
 * code-server (see test/vscode/README.md), so this is the remote (server-side) extension
 * host on Node 24, as the VSIX will run for users of code-server and remote workspaces.
 */
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { describe, it } from 'mocha';
import * as vscode from 'vscode';
import { EXTENSION_ID } from '../../../src/vscode/constants';

describe('activation', () => {
  it('runs in the extension host the runner expects', () => {
    console.log(
      `[till-test] uiKind=${vscode.UIKind[vscode.env.uiKind]} remoteName=${vscode.env.remoteName ?? '(none)'}` +
        ` appHost=${vscode.env.appHost} vscode=${vscode.version} node=${process.versions.node}`,
    );
    // Node 24 in code-server; desktop VS Code's Electron brings its own (20 or newer).
    const major = Number(process.versions.node.split('.')[0]);
    assert.ok(major >= 20, `extension host Node is ${process.versions.node}, expected >= 20`);
  });

  it(`finds ${EXTENSION_ID} loaded from this checkout`, () => {
    const ext = vscode.extensions.getExtension(EXTENSION_ID);
    assert.ok(ext, `${EXTENSION_ID} is not among ${vscode.extensions.all.length} extensions`);
    // dist/test/suite.js lives two levels under the repository root: the extension under
    // test must be this checkout (extensionDevelopmentPath), not some installed copy.
    assert.equal(ext.extensionUri.fsPath, path.resolve(__dirname, '..', '..'));
  });

  it('activates', async () => {
    const ext = vscode.extensions.getExtension(EXTENSION_ID);
    assert.ok(ext);
    const started = Date.now();
    await ext.activate();
    assert.equal(ext.isActive, true);
    console.log(`[till-test] activated in ${Date.now() - started} ms, extensionKind=${vscode.ExtensionKind[ext.extensionKind]}`);
  });
});
