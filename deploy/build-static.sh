#!/usr/bin/env bash
# Builds statically linked stormd and stormctl on the host, into target/static, for
# deploy/Dockerfile.prebuilt (the FROM-scratch image for engines that cannot pull a Rust image):
#   bash deploy/build-static.sh
#   STORM_DOCKERFILE=deploy/Dockerfile.prebuilt docker compose up --scale peer=5
#
# The static build uses its own target dir (target/static) so that it never waits on, or
# invalidates, the ordinary build in target/. Safe to run again: cargo reuses what is up to date.
set -euo pipefail

die() { echo "build-static: $*" >&2; exit 1; }

[ $# -eq 0 ] || die "usage: $0   (no arguments)"
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install Rust: https://rustup.rs)"

triple=x86_64-unknown-linux-gnu
[ "$(uname -m)" = x86_64 ] || die "the image is built for $triple; this machine is $(uname -m)"
rustup target list --installed 2>/dev/null | grep -qx "$triple" \
  || echo "build-static: warning: rustup does not list $triple as installed; trying anyway" >&2

export CARGO_TARGET_DIR=target/static
# crt-static on the gnu target gives a static-pie binary; getrandom must use the syscall
# because a scratch image has no /dev/urandom. Stripped: the image needs no symbols.
export RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"'
export CARGO_PROFILE_RELEASE_STRIP=symbols
export CARGO_PROFILE_RELEASE_DEBUG=false
echo "build-static: cargo build --release --target $triple (static, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --locked --target "$triple" --bin stormd --bin stormctl \
  || die "static cargo build failed"

out="$CARGO_TARGET_DIR/$triple/release"
for bin in stormd stormctl; do
  [ -x "$out/$bin" ] || die "missing $out/$bin after the build"
  if command -v file >/dev/null 2>&1 && file -L "$out/$bin" | grep -q 'dynamically linked'; then
    # static-pie binaries are reported as "dynamically linked" by older `file`: check for an
    # interpreter instead, which a truly dynamic binary has and a static-pie one does not.
    if command -v readelf >/dev/null 2>&1 && readelf -l "$out/$bin" | grep -q 'Requesting program interpreter'; then
      die "$out/$bin is dynamically linked; it would not run in a scratch image"
    fi
  fi
done

echo "build-static: $out/stormd and $out/stormctl are ready"
