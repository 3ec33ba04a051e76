#!/usr/bin/env bash
# Accept rate of the durable async queue: N async calls of 1 KiB (h2load, HTTP/1.1, C
# connections) to a function that is still starting (so the run measures accepting, not
# running), with the state dir on the disk (fsync'd) and on a tmpfs (/dev/shm: fsync is
# free there, so the difference is what durability costs). Bounded: N calls per run.
#
#   scripts/bench-async.sh                     # N=5000 C=32
#   N=20000 C=64 scripts/bench-async.sh
#   PROFILE=debug scripts/bench-async.sh       # the debug build (no release build needed)
#
# Needs: cargo, h2load (Debian: nghttp2-client), curl.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-5000}
C=${C:-32}
DISK_DIR=${DISK_DIR:-$(pwd)/target/bench-async}

for tool in cargo h2load curl; do
    command -v "$tool" >/dev/null || { echo "bench-async: $tool not found" >&2; exit 1; }
done
PROFILE=${PROFILE:-release}
echo "building $PROFILE binaries..." >&2
if [ "$PROFILE" = release ]; then
    cargo build --release -q -p synwake -p synwake-fn
else
    cargo build -q -p synwake -p synwake-fn
fi
BIN=$(pwd)/${CARGO_TARGET_DIR:-target}/$PROFILE

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/synwake-bench-async.XXXXXX)
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    rm -rf "$WORK" "$DISK_DIR" /dev/shm/synwake-bench-async.$$
}
trap cleanup EXIT
head -c 1024 /dev/urandom > "$WORK/body"

run() { # $1 = file tag, $2 = label, $3 = state dir
    local tag=$1 label=$2 state=$3 shared api
    rm -rf "$state"; mkdir -p "$state"
    shared=$(free_port); api=$(free_port)
    cat > "$WORK/synwake.toml" <<CFG
[gateway]
listen = "127.0.0.1:$shared"
api_listen = "127.0.0.1:$api"
state_dir = "$state"
drain_timeout = "1s"
[probe]
mode = "off"
[async]
max_queued = $((N + 10))
[[function]]
name = "f"
command = ["$BIN/synwake-fn"]
env = { INIT_MS = "600000" }
start_timeout = "1h"
CFG
    SYNWAKE_LOG=warn "$BIN/synwake" up --config "$WORK/synwake.toml" > "$WORK/daemon-$tag.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$api/healthz" >/dev/null && break; sleep 0.1; done
    h2load --h1 -n "$N" -c "$C" -d "$WORK/body" -H 'content-type: application/octet-stream' \
        "http://127.0.0.1:$api/async-function/f" > "$WORK/h2load-$tag.txt"
    local took rps codes syncs
    # h2load prints "finished in 383.69ms," or "1.18s,": normalised to seconds.
    took=$(awk '/^finished in/ {t=$3; sub(",", "", t); if (t ~ /ms$/) {sub("ms", "", t); t=t/1000} else if (t ~ /us$/) {sub("us", "", t); t=t/1000000} else {sub("s", "", t)}; printf "%.3f", t}' "$WORK/h2load-$tag.txt")
    rps=$(awk '/^finished in/ {printf "%d", $4}' "$WORK/h2load-$tag.txt")
    codes=$(grep '^status codes' "$WORK/h2load-$tag.txt" | sed 's/status codes: //')
    # Group commits: how many fdatasyncs the accepted calls shared.
    syncs=$(curl -sf "http://127.0.0.1:$api/metrics" | awk '$1 == "synwake_async_log_syncs_total" {print $2}')
    echo "| $label | $N | $C | $took s | $rps | $syncs | $codes |"
    # SIGTERM: synwake stops its instance; the queued calls stay in the (deleted) log.
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| state dir | calls | connections | accepted in | calls/s | fdatasyncs | status codes |"
echo "|---|---:|---:|---:|---:|---:|---|"
run disk "disk (ext4, fsync)" "$DISK_DIR"
run tmpfs "tmpfs (/dev/shm)" "/dev/shm/synwake-bench-async.$$"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
