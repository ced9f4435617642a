#!/usr/bin/env bash
# Installs the agent CLIs the agent tests run for real (`npm test` runs it first): Claude Code,
# Codex CLI and Gemini CLI from npm, pinned, with their native binaries, into $TILL_CACHE/agents
# (about 770 MB; never into the project's node_modules, so `npm ci` stays small). Skipped when the
# pinned versions are already there, so a cache of $TILL_CACHE makes it instant.
set -euo pipefail

CLAUDE_CODE_VERSION=2.1.332
CODEX_VERSION=0.171.0
GEMINI_CLI_VERSION=0.61.0
CACHE="${TILL_CACHE:-$HOME/.cache/till}"
DIR="$CACHE/agents"
STAMP="@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION @openai/codex@$CODEX_VERSION @google/gemini-cli@$GEMINI_CLI_VERSION"
say() { printf '[install-agents] %s\n' "$*" >&2; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.install-agents.lock"
flock 9

if [[ -f "$DIR/.till-installed" && "$(cat "$DIR/.till-installed")" == "$STAMP" ]]; then
  say "$STAMP already in $DIR"
  exit 0
fi
start=$SECONDS
say "installing $STAMP into $DIR"
rm -rf "$DIR"
mkdir -p "$DIR"
echo '{"private":true}' > "$DIR/package.json"
# Claude Code's postinstall links its platform binary over a stub; `claude --version` checks it ran.
npm install --prefix "$DIR" --no-save --no-audit --no-fund --loglevel=error --engine-strict=false \
  "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION" "@google/gemini-cli@$GEMINI_CLI_VERSION" </dev/null >/dev/null
"$DIR/node_modules/.bin/claude" --version </dev/null >/dev/null
scratch=$(mktemp -d) && HOME="$scratch" "$DIR/node_modules/.bin/codex" --version </dev/null >/dev/null 2>&1; rm -rf "$scratch"
echo "$STAMP" > "$DIR/.till-installed"
say "done in $((SECONDS - start))s"
