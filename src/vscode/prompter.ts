/**
 * The questions the extension asks a person, behind one interface: VS Code's quick picks and
 * input boxes in use, a scripted answerer in the extension-host tests (which drive the same
 * flows through it).
 */
import * as vscode from 'vscode';

export interface PickItem<T> {
  label: string;
  description?: string;
  detail?: string;
  value: T;
}

export interface Prompter {
  pick<T>(title: string, items: PickItem<T>[], placeHolder?: string): Promise<T | undefined>;
  input(
    title: string,
    options?: { value?: string; prompt?: string; password?: boolean; placeHolder?: string; validate?: (v: string) => string | undefined },
  ): Promise<string | undefined>;
  /** A message with buttons; resolves to the button chosen. */
  message(kind: 'info' | 'warning' | 'error', text: string, buttons: string[], modal?: boolean): Promise<string | undefined>;
}

/** The real thing: VS Code's own UI. */
export const vscodePrompter: Prompter = {
  async pick(title, items, placeHolder) {
    const picked = await vscode.window.showQuickPick(
      items.map((i) => ({ label: i.label, description: i.description, detail: i.detail, value: i.value })),
      { title, placeHolder, ignoreFocusOut: true },
    );
    return picked?.value;
  },
  input(title, options = {}) {
    if (options.password) return secretInput(title, options);
    return Promise.resolve(
      vscode.window.showInputBox({
        title,
        value: options.value,
        prompt: options.prompt,
        password: options.password,
        placeHolder: options.placeHolder,
        ignoreFocusOut: true,
        validateInput: options.validate,
      }),
    );
  },
  message(kind, text, buttons, modal = false) {
    const show =
      kind === 'info'
        ? vscode.window.showInformationMessage
        : kind === 'warning'
          ? vscode.window.showWarningMessage
          : vscode.window.showErrorMessage;
    return Promise.resolve(show(text, { modal }, ...buttons));
  },
};

/**
 * A masked input box that is emptied and disposed once answered, so the secret does not stay
 * in the page's input element after use (showInputBox keeps its widget and value around).
 */
function secretInput(title: string, options: Parameters<Prompter['input']>[1] = {}): Promise<string | undefined> {
  const box = vscode.window.createInputBox();
  Object.assign(box, { title, prompt: options.prompt, placeholder: options.placeHolder, password: true, ignoreFocusOut: true });
  return new Promise((resolve) => {
    let answer: string | undefined;
    box.onDidChangeValue((v) => (box.validationMessage = options.validate?.(v)));
    box.onDidAccept(() => {
      if (options.validate?.(box.value)) return;
      answer = box.value;
      box.hide();
    });
    box.onDidHide(() => {
      box.value = '';
      box.dispose();
      resolve(answer);
    });
    box.show();
  });
}
