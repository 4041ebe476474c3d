#!/usr/bin/env bash
# Builds the FROM-scratch stormdht image: statically linked stormd and stormctl, then
# `docker build`. Usage: deploy/build-image.sh [TAG]   (default: $STORM_IMAGE or stormdht:latest)
#
# The static build uses its own target dir (target/static) so that it never waits on, or
# invalidates, the ordinary build in target/. Safe to run again: cargo and docker both reuse
# what is up to date.
set -euo pipefail

die() { echo "build-image: $*" >&2; exit 1; }

tag="${1:-${STORM_IMAGE:-stormdht:latest}}"
[ $# -le 1 ] || die "usage: $0 [TAG]"
cd "$(dirname "$0")/.."

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install Rust: https://rustup.rs)"
command -v docker >/dev/null 2>&1 || die "docker not found on PATH"
docker info >/dev/null 2>&1 || die "no Docker engine answers (is the daemon running? can this user reach its socket?)"

bash deploy/build-static.sh || die "static build failed"

echo "build-image: docker build -f deploy/Dockerfile.prebuilt -t $tag ."
# Without the buildx plugin a recent docker CLI refuses BuildKit builds: use the classic
# builder then (a FROM-scratch Dockerfile needs nothing else).
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
docker build -f deploy/Dockerfile.prebuilt -t "$tag" . || die "docker build failed"
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "build-image: built $tag ($(( size / 1024 )) KiB)"
