#!/usr/bin/env bash
# A Python virtual environment at target/tools-venv with the offline schema validators that
# tests/manifests.rs runs (no network needed once installed: their schemas ship inside them):
#   check-jsonschema     (--builtin-schema vendor.compose-spec: compose and stack files)
#   kubernetes-validate  (the Kubernetes API schemas of versions 1.25 to 1.37)
# Idempotent and safe to run concurrently (a lock serializes callers). Silent unless it
# installs something; errors go to stderr with a non-zero exit. The tools are then
# target/tools-venv/bin/check-jsonschema and target/tools-venv/bin/kubernetes-validate.
set -euo pipefail

# Pinned: the versions the tests were written against (both support Python 3.9+).
PINS=(
  "check-jsonschema==0.39.0"
  "kubernetes-validate==1.37.0"
)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/tools-venv"
stamp="$venv/.installed"
want="$(printf '%s\n' "${PINS[@]}")"

die() {
  echo "tools-venv: $*" >&2
  exit 1
}

command -v python3 >/dev/null 2>&1 ||
  die "python3 is not installed (needed for the manifest validators); install Python 3.9 or newer"

# Fast path: already installed with exactly these pins.
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  exit 0
fi

mkdir -p "$root/target"
# One installer at a time: the tests run in parallel processes (nextest).
lock="$root/target/tools-venv.lock"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$lock"
  flock -w 600 9 || die "timed out waiting for $lock"
else
  # No flock: a directory as the lock; one older than 10 minutes is stale.
  waited=0
  until mkdir "$lock.d" 2>/dev/null; do
    if [[ -n "$(find "$lock.d" -maxdepth 0 -mmin +10 2>/dev/null)" ]]; then
      rmdir "$lock.d" 2>/dev/null || true
      continue
    fi
    sleep 1
    waited=$((waited + 1))
    ((waited < 600)) || die "timed out waiting for $lock.d"
  done
  trap 'rmdir "$lock.d" 2>/dev/null || true' EXIT
fi

# Another caller may have finished while this one waited.
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  exit 0
fi

echo "tools-venv: installing ${PINS[*]} into $venv"
if [[ ! -x "$venv/bin/python" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv" ||
    die "python3 -m venv failed (on Debian or Ubuntu: apt-get install python3-venv)"
fi
rm -f "$stamp"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" ||
  die "pip install ${PINS[*]} failed"
printf '%s\n' "$want" >"$stamp"
echo "tools-venv: ready: $("$venv/bin/check-jsonschema" --version), kubernetes-validate $("$venv/bin/kubernetes-validate" --version)"
