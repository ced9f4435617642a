/**
 * The VS Code entry point. The extension UI arrives with its own issue; for now activation
 * only registers nothing and stays cheap, as activation must.
 */
import type * as vscode from 'vscode';

export function activate(_context: vscode.ExtensionContext): void {
  // Registration only: the broker starts when first needed.
}

export function deactivate(): void {
  // nothing to dispose yet
}
