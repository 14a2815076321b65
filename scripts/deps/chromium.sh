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

# Chromium, and the font the page asks for first (so screenshots have text on a bare machine).
if [ ! -x /usr/bin/chromium ] || [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  echo "chromium.sh: installing Debian's chromium and fonts-dejavu-core" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

# Reinstall only when the lock file changed.
mkdir -p "$dest"
if ! cmp -s "$src/package-lock.json" "$dest/package-lock.json" || [ ! -d "$dest/node_modules/playwright-core" ]; then
  echo "chromium.sh: installing playwright-core into $dest" >&2
  cp "$src/package.json" "$src/package-lock.json" "$dest/"
  (cd "$dest" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
fi
