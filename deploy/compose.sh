#!/usr/bin/env bash
# The compose cluster, with `docker compose` or the older `docker-compose`, whichever is here.
#   deploy/compose.sh up [N]   build the image on the host if it is missing (deploy/build-image.sh,
#                              no pull needed), then start the manager and N peers (default 5);
#                              Jaeger too (profile `jaeger`), but only if its image is present
#                              locally (nothing waits on it, and nothing is pulled for it)
#   deploy/compose.sh down     stop and remove the containers, networks and volumes
#   deploy/compose.sh logs     follow the logs
# Environment: STORM_IMAGE, STORM_PORT, STORM_DATA_DIR, STORM_DATA_FILE (see docker-compose.yml),
# and COMPOSE_PROJECT_NAME as compose reads it.
set -euo pipefail

die() { echo "compose.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 up [N] | down | logs"; }

cd "$(dirname "$0")/.."
command -v docker >/dev/null 2>&1 || die "docker not found on PATH"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  die "neither \`docker compose\` nor \`docker-compose\` is installed"
fi
compose+=(-f docker-compose.yml)

image="${STORM_IMAGE:-stormdht:latest}"
export STORM_IMAGE="$image"

# The jaeger service's image, as the compose file pins it.
jaeger_image() {
  sed -n 's/^ *image: *\(jaegertracing\/jaeger:[^ ]*\).*/\1/p' docker-compose.yml | head -n 1
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
case "$cmd" in
  up)
    n="${1:-5}"
    [ $# -le 1 ] || usage
    [[ "$n" =~ ^[0-9]+$ ]] || die "N must be a number of peers, not '$n'"
    docker info >/dev/null 2>&1 || die "no Docker engine answers (is the daemon running?)"
    if ! docker image inspect "$image" >/dev/null 2>&1; then
      echo "compose.sh: image $image not found; building it"
      bash deploy/build-image.sh "$image"
    fi
    services=(manager peer)
    jaeger="$(jaeger_image)"
    if [ -n "$jaeger" ] && docker image inspect "$jaeger" >/dev/null 2>&1; then
      compose+=(--profile jaeger)
      services+=(jaeger)
    else
      echo "compose.sh: ${jaeger:-the Jaeger image} is not present locally; starting without Jaeger (daemons log a warning and run untraced)"
    fi
    "${compose[@]}" up -d --scale "peer=$n" "${services[@]}"
    echo "compose.sh: up with $n peer(s); manager on udp 127.0.0.1:${STORM_PORT:-5000} (try: just ctl status)"
    ;;
  down)
    [ $# -eq 0 ] || usage
    "${compose[@]}" down -v --remove-orphans
    ;;
  logs)
    [ $# -eq 0 ] || usage
    "${compose[@]}" logs -f --tail=200
    ;;
  *) usage ;;
esac
