#!/usr/bin/env bash
# Installs the tools the project's commands need, where they are missing: just (a prebuilt
# binary from PyPI), cargo-nextest, and a Compose tool. Safe to run again.
set -euo pipefail
export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"

if ! command -v just >/dev/null 2>&1; then
  echo "install-tools: installing just (pip rust-just)"
  python3 -m pip install --quiet --user rust-just 2>/dev/null || python3 -m pip install --quiet rust-just
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-tools: installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  echo "install-tools: installing docker-compose (Debian)"
  (apt-get update -qq && apt-get install -y -qq docker-compose) || echo "install-tools: could not install docker-compose"
fi
just --version
cargo nextest --version | head -1
