#!/usr/bin/env bash
# The project's test command (README): installs what the tests need that is not a Rust crate
# (each scripts/deps/*.sh is idempotent and caches outside the clone), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
for dep in scripts/deps/*.sh; do
  [ -e "$dep" ] || continue
  echo "==> $dep" >&2
  bash "$dep"
done
cargo test --workspace --locked "$@"
