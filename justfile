# stormdht tasks. `just --list` shows them all.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Image tag used by the compose recipes.
image_tag := env_var_or_default("STORM_IMAGE", "stormdht:latest")

# The main job: a manager and 5 peers on loopback, setup → distribute → queries → leave → teardown.
demo:
    cargo run --release -- demo

# The whole test suite: lint, unit, process-level integration and container tests (README's
# test command, tools/test.sh, which installs what it needs).
test:
    bash tools/test.sh

# Container tests (need a Docker engine; STORM_SKIP_DOCKER=1 skips them, loudly).
test-containers:
    if [ "${STORM_SKIP_DOCKER:-0}" = 1 ]; then echo "SKIPPED: container tests (STORM_SKIP_DOCKER=1)"; else cargo nextest run --test containers --test swarm --run-ignored only --no-fail-fast --no-capture --test-threads 1; fi

# Benchmarks: one JSON line of figures each (no pass/fail).
bench:
    cargo bench --bench cluster

# Lints as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings

# Build the FROM-scratch image around statically linked stormd and stormctl.
image:
    bash deploy/build-image.sh {{image_tag}}

# Start the manager and N peers with compose (builds the image if needed).
up N="5":
    bash deploy/compose.sh up {{N}}

# Run stormctl against the compose cluster's published port.
ctl *ARGS:
    cargo run --quiet --release --bin stormctl -- --manager 127.0.0.1:${STORM_PORT:-5000} {{ARGS}}

# Stop and remove the compose cluster.
down:
    bash deploy/compose.sh down

# Follow the compose cluster's logs.
logs:
    bash deploy/compose.sh logs
