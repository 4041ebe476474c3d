#!/usr/bin/env bash
# The whole test suite, on a machine that has only Rust (rustup) and, for the container tests,
# Docker. Installs what it needs first (cargo-nextest, clippy, rustfmt), then:
#   1. lints (rustfmt --check, clippy -D warnings)
#   2. every unit, simulation, property, process-level, trace and manifest test (cargo nextest)
#   3. the container tests: the real compose file, and a real single-node Docker Swarm;
#      without a Docker engine (or with STORM_SKIP_DOCKER=1) they are SKIPPED, and it says so.
# `.ci/run` runs exactly this; `just test` is the same, for those who have just.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

say() { echo "test.sh: $*" >&2; }

command -v cargo >/dev/null 2>&1 || { say "cargo not found: install Rust from https://rustup.rs"; exit 2; }
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (cargo install, once)"
  cargo install cargo-nextest --locked
fi
for component in clippy rustfmt; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    say "installing the $component component"
    rustup component add "$component"
  fi
done

say "lint"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

say "tests"
cargo nextest run --workspace --no-fail-fast

if [ "${STORM_SKIP_DOCKER:-0}" = 1 ]; then
  say "SKIPPED: container tests (STORM_SKIP_DOCKER=1)"
elif ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  say "SKIPPED: container tests: no Docker engine answers (install Docker, or set STORM_SKIP_DOCKER=1 to silence this)"
else
  say "container tests (compose, then swarm)"
  cargo nextest run --test containers --test swarm --run-ignored only --no-fail-fast --no-capture --test-threads 1
fi
say "all passed"
