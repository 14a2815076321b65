#!/usr/bin/env bash
# Test prerequisite of lens-plot's browser test (crates/lens-plot/tests/it/browser.rs):
# Debian's Chromium at /usr/bin/chromium and playwright-core (no browser download) from npm,
# pinned by crates/lens-plot/tests/browser/package-lock.json, installed into
# ~/.cache/logit-lens/test-deps/browser (override with LOGIT_LENS_BROWSER_DEPS; the test reads
# the same variable). Idempotent: does nothing when both are already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="$root/crates/lens-plot/tests/browser"
dest="${LOGIT_LENS_BROWSER_DEPS:-$HOME/.cache/logit-lens/test-deps/browser}"

if [ ! -x /usr/bin/chromium ]; then
  echo "chromium.sh: installing Debian's chromium" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# Reinstall only when the lock file changed.
mkdir -p "$dest"
if ! cmp -s "$src/package-lock.json" "$dest/package-lock.json" || [ ! -d "$dest/node_modules/playwright-core" ]; then
  echo "chromium.sh: installing playwright-core into $dest" >&2
  cp "$src/package.json" "$src/package-lock.json" "$dest/"
  (cd "$dest" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
fi
