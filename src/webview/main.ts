// The usage view's script: arrives with the VS Code extension issue.
