#!/usr/bin/env bash
# Test prerequisites of the VS Code extension (editors/vscode) and its tests
# (crates/logit-lens/tests/it/vscode.rs). Idempotent: every step is skipped when done.
#
# - apt: Node 20 + npm, Chromium (driven headless by playwright-core), ripgrep and the
#   build tools that code-server's native modules need.
# - npm ci in editors/vscode (the extension's pinned dev dependencies).
# - code-server 4.100.3 (VS Code 1.100.3), installed by hand from the npm registry into
#   $LOGIT_LENS_CODE_SERVER (default ~/.cache/logit-lens/test-deps/code-server): its npm
#   postinstall downloads from outside the registries, so its steps are done here instead.
#
# The Rust test finds code-server at the same path (or $LOGIT_LENS_CODE_SERVER) and
# Chromium at /usr/bin/chromium (or $LOGIT_LENS_CHROMIUM).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
start=$(date +%s)
log() { echo "[deps/vscode $(( $(date +%s) - start ))s] $*" >&2; }

CODE_SERVER_VERSION=4.100.3
dest=${LOGIT_LENS_CODE_SERVER:-$HOME/.cache/logit-lens/test-deps/code-server}

# --- apt ---------------------------------------------------------------------------------
pkgs=(nodejs npm build-essential pkg-config libkrb5-dev libxkbfile-dev libsecret-1-dev
      libx11-dev ripgrep chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# A Node from elsewhere (nvm, nodesource) is fine when it is 20+.
if command -v node >/dev/null && command -v npm >/dev/null \
  && [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ]; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- the extension's node modules --------------------------------------------------------
ext=$root/editors/vscode
lock_sum=$(sha256sum "$ext/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$ext/node_modules/.logit-lens-lock" 2>/dev/null)" != "$lock_sum" ]; then
  log "npm ci in editors/vscode"
  (cd "$ext" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" > "$ext/node_modules/.logit-lens-lock"
fi

# --- code-server -------------------------------------------------------------------------
if [ -f "$dest/.logit-lens-complete" ] && grep -qx "$CODE_SERVER_VERSION" "$dest/.logit-lens-complete"; then
  log "code-server $CODE_SERVER_VERSION present in $dest"
  exit 0
fi
log "installing code-server $CODE_SERVER_VERSION into $dest"
rm -rf "$dest" "$dest.tmp"
mkdir -p "$dest.tmp"
export npm_config_nodedir=/usr npm_config_yes=true npm_config_loglevel=error \
       npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false
(cd "$dest.tmp" && npm pack "code-server@$CODE_SERVER_VERSION" >/dev/null \
   && tar -xzf "code-server-$CODE_SERVER_VERSION.tgz" && rm "code-server-$CODE_SERVER_VERSION.tgz")
pkg=$dest.tmp/package
(cd "$pkg" && npm install --omit=dev --ignore-scripts >/dev/null && npm rebuild argon2 --build-from-source >/dev/null)
log "code-server: lib/vscode modules"
(cd "$pkg/lib/vscode" && npm install --omit=dev --ignore-scripts >/dev/null \
   && npm rebuild @parcel/watcher @vscode/deviceid @vscode/spdlog kerberos native-watchdog node-pty >/dev/null)
mkdir -p "$pkg/lib/vscode/node_modules/@vscode/ripgrep/bin"
ln -sf /usr/bin/rg "$pkg/lib/vscode/node_modules/@vscode/ripgrep/bin/rg"
ln -sfn node_modules "$pkg/lib/vscode/node_modules.asar"
ln -sf code-linux.sh "$pkg/lib/vscode/bin/remote-cli/code-server"
ln -sf browser-linux.sh "$pkg/lib/vscode/bin/helpers/browser.sh"
log "code-server: built-in extensions"
(cd "$pkg/lib/vscode/extensions" && npm install --omit=dev --ignore-scripts >/dev/null && node postinstall.mjs >/dev/null)
mv "$pkg" "$dest"
rm -rf "$dest.tmp"
echo "$CODE_SERVER_VERSION" > "$dest/.logit-lens-complete"
log "code-server ready: $dest/out/node/entry.js"
