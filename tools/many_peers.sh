#!/usr/bin/env bash
# Many real peer processes on loopback: N peers at V tokens each register (past 1,024 the
# manager refuses them, naming the limit), then setup, distribute a file, verify every record,
# SIGKILL one peer, wait until every row has its two copies again, verify again; then SIGKILL
# the manager, restart it, and wait for the peers to bring the ring back.
#   bash tools/many_peers.sh [N=1030] [V=16] [FILE=../shared/data/details-1996.csv]
# Needs `cargo build --release`. Every process it starts is ended by its id on exit.
set -euo pipefail
N=${1:-1030}
V=${2:-16}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FILE=${3:-$ROOT/../shared/data/details-1996.csv}
BIN=$ROOT/target/release
PORT=${STORM_MANY_PORT:-5791}
WORK=$(mktemp -d /tmp/stormdht-many.XXXXXX)
CTL=("$BIN/stormctl" --manager "127.0.0.1:$PORT" --json)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
secs() { python3 -c "import time,sys; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
# Waits up to $1 s until $live peers are up, the ring settled and every row held twice; prints
# True or False. The last status is left in $WORK/status.json.
replicated() {
    local ok=False
    for _ in $(seq 1 "$1"); do
        "${CTL[@]}" status > "$WORK/status.json" 2>/dev/null || true
        ok=$(field "$WORK/status.json" "sum(p['state'] == 'up' for p in d['peers']) == $live and d['settled'] and d['under_replicated_ranges'] == 0 and sum(p['records'] or 0 for p in d['peers']) == 2 * $rows" 2>/dev/null || echo False)
        [ "$ok" = True ] && break
        sleep 1
    done
    echo "$ok"
}

ulimit -n 65536 2>/dev/null || true
STORM_ROLE=manager STORM_LISTEN=127.0.0.1:$PORT STORM_VNODES=$V STORM_TELEMETRY__LOG=warn \
    "$BIN/stormd" > "$WORK/manager.log" 2>&1 &
PIDS+=($!)
sleep 0.5
for i in $(seq 1 "$N"); do
    STORM_ROLE=peer STORM_NAME=p$i STORM_LISTEN=127.0.0.1:0 STORM_MANAGER=127.0.0.1:$PORT \
        STORM_TELEMETRY__LOG=warn "$BIN/stormd" > "$WORK/peer-$i.log" 2>&1 &
    PIDS+=($!)
    echo $! > "$WORK/peer-$i.pid"
done
for _ in $(seq 1 120); do
    "${CTL[@]}" status > "$WORK/status.json" 2>/dev/null || true
    registered=$(field "$WORK/status.json" 'len(d["peers"])' 2>/dev/null || echo 0)
    refused=$({ grep -l "cluster is full" "$WORK"/peer-*.log 2>/dev/null || true; } | wc -l)
    [ $((registered + refused)) -ge "$N" ] && break
    sleep 1
done
echo "registered: $registered, refused: $refused"
{ grep -h "cluster is full" "$WORK"/peer-*.log 2>/dev/null || true; } | head -1 | sed 's/.*reason=/refusal: /'
t=$(date +%s.%N); "${CTL[@]}" setup > "$WORK/setup.json" || { echo "setup failed: $(cat "$WORK/setup.json")"; tail -5 "$WORK/manager.log"; exit 1; }; echo "setup: $(secs "$t") s"
t=$(date +%s.%N); "${CTL[@]}" distribute --file "$FILE" > "$WORK/dist.json"
echo "distribute: $(secs "$t") s, stored $(field "$WORK/dist.json" 'd["stored"]') of $(field "$WORK/dist.json" 'd["read"]')"
"${CTL[@]}" verify --file "$FILE" > "$WORK/verify.json"
echo "verify: found $(field "$WORK/verify.json" 'd["found"]') of $(field "$WORK/verify.json" 'd["keys"]') keys in $(field "$WORK/verify.json" 'round(d["elapsed_ms"])') ms"
rows=$(field "$WORK/dist.json" 'd["stored"]')
victim=$(field "$WORK/setup.json" 'd["peers"][len(d["peers"]) // 2]["name"]')
kill -9 "$(cat "$WORK/peer-${victim#p}.pid")"
t=$(date +%s.%N)
live=$((registered - 1))
ok=$(replicated 120)
echo "SIGKILL of $victim: $live peers up, every row twice again: $ok after $(secs "$t") s"
"${CTL[@]}" verify --file "$FILE" > "$WORK/verify.json"
echo "verify: found $(field "$WORK/verify.json" 'd["found"]') of $(field "$WORK/verify.json" 'd["keys"]') keys"
echo "manager: $(field "$WORK/status.json" 'd["manager"].get("fragmented", 0)') messages sent in fragments, $(field "$WORK/status.json" 'd["manager"]["retransmits"]') retransmissions"
[ "$ok" = True ] && [ "$(field "$WORK/verify.json" 'd["found"] == d["keys"]')" = True ]

# The manager killed and restarted on its address: the peers rejoin, each with its view.
kill -9 "${PIDS[0]}"
sleep 1
STORM_ROLE=manager STORM_LISTEN=127.0.0.1:$PORT STORM_VNODES=$V STORM_TELEMETRY__LOG=warn \
    "$BIN/stormd" > "$WORK/manager-2.log" 2>&1 &
PIDS+=($!)
t=$(date +%s.%N)
ok=$(replicated 180)
echo "manager restarted: $live peers up, every row twice: $ok after $(secs "$t") s ($(field "$WORK/status.json" 'sum(p["state"] == "dead" for p in d["peers"])' 2>/dev/null || echo '?') declared dead)"
"${CTL[@]}" verify --file "$FILE" > "$WORK/verify.json"
echo "verify: found $(field "$WORK/verify.json" 'd["found"]') of $(field "$WORK/verify.json" 'd["keys"]') keys"
[ "$ok" = True ] && [ "$(field "$WORK/verify.json" 'd["found"] == d["keys"]')" = True ]
