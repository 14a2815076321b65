#!/usr/bin/env bash
# The project's test command (README). Two tiers, both run by default:
#
#   fast  style and types (rustfmt, clippy with warnings denied, the extension's tsc), then the
#         tests that need no model file: every crate's unit tests, the conformance suite on the
#         in-memory reference backend and the daemon's engine on it. Under a minute warm.
#   full  the integration tests (`tests/it` of each crate): real models (the default model is
#         fetched on first use), the real daemon over real sockets, Neovim, VS Code, Chromium.
#
# Usage: scripts/test.sh [fast|full|all] [extra cargo test args]
# Each scripts/deps/*.sh (idempotent, cached outside the clone) installs what the tests need
# that is not a Rust crate; the fast tier needs only the extension's node modules.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=${1:-all}
case "$tier" in
  fast | full | all) shift $(( $# > 0 ? 1 : 0 )) ;;
  *) tier=all ;;
esac
step() { echo "==> $*" >&2; }
# Every backend is built and tested, the mistral.rs one and the MPI pipeline included (features
# of the binary, off in the README's first command; scripts/deps/mpi.sh installs Open MPI). One
# feature set for every step, so each crate is built once.
features=logit-lens/mistralrs,logit-lens/mpi

deps() {
  for dep in scripts/deps/*.sh; do
    [ -e "$dep" ] || continue
    step "$dep"
    bash "$dep"
  done
}

fast() {
  step "cargo fmt --check"
  cargo fmt --all --check
  step "cargo clippy (deny warnings)"
  cargo clippy --workspace --all-targets --features "$features" --locked -- -D warnings
  step "tsc --noEmit (editors/vscode)"
  (cd editors/vscode && npm run --silent typecheck)
  step "fast tests: unit tests and the conformance suite on the reference backend"
  cargo test --workspace --features "$features" --locked --lib --bins "$@"
  cargo test --locked -p lens-conformance -p lens-server --tests "$@"
}

full() {
  step "full tests: real models, the daemon, editors and browser"
  cargo test --workspace --features "$features" --locked --test it "$@"
}

deps
case "$tier" in
  fast) fast "$@" ;;
  full) full "$@" ;;
  all) fast "$@"; full "$@" ;;
esac
