#!/usr/bin/env bash
# Where one request's time goes at one connection, synwake's own port against nginx, both
# in front of synwake-fn (release build), interleaved per round:
#   1. loopback packet timestamps (tcpdump): per request `in` (client segment -> the
#      proxy's segment to the function), `fn` (-> the function's answer), `out` (-> the
#      proxy's segment to the client) and `client` (-> the next request); the proxy adds
#      in + out;
#   2. the proxy's system calls (perf, raw_syscalls tracepoints): time between one call's
#      exit and the next one's entry (the proxy's own code), and time inside the calls.
# See docs/benchmarks.md, "Session 7 (lead)", for what these showed.
#
#   scripts/bench-serial-path.sh                  # 4 rounds, 2 s per capture
#   ROUNDS=8 NO_BUILD=1 scripts/bench-serial-path.sh
#   SYNWAKE_BIN=/path/to/synwake scripts/bench-serial-path.sh
#
# Needs root (tcpdump on lo, perf on the daemons), cargo, wrk, nginx, curl, tcpdump, perf,
# python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench-serial-path
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

ROUNDS=${ROUNDS:-4}
BASE_PORT=${BASE_PORT:-18680}
FN_PORT=$BASE_PORT
OWN_PORT=$((BASE_PORT + 3))
NGINX_PORT=$((BASE_PORT + 4))
for tool in cargo wrk nginx curl tcpdump perf python3; do
    command -v "$tool" >/dev/null || { echo "$BENCH: $tool not found" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "$BENCH: needs root (tcpdump on lo, perf -p)" >&2; exit 1; }
if [ -z "${NO_BUILD:-}" ]; then
    echo "building release binaries..." >&2
    cargo build --release -q -p synwake -p synwake-fn
fi
BIN=${CARGO_TARGET_DIR:-target}/release
SYNWAKE_BIN=${SYNWAKE_BIN:-$BIN/synwake}
ANALYSE="python3 scripts/serial-path.py"
bench_workdir

PORT=$FN_PORT SYNWAKE_FUNCTION=bench "$BIN/synwake-fn" >"$WORK/fn.log" 2>&1 &
PIDS+=($!)
start_bench_synwake "$SYNWAKE_BIN" "$WORK/synwake" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))" \
    "$OWN_PORT" "$BIN/synwake-fn"
SYNWAKE_PID=${PIDS[-1]}
# nginx_conf_head's `worker_processes auto`: one worker per CPU, as synwake has one
# serving thread per CPU.
{ nginx_conf_head; nginx_plain_proxy "$FN_PORT" "$NGINX_PORT"; echo "}"; } >"$WORK/nginx/nginx.conf"
start_nginx
NGINX_PID=${PIDS[-1]}
wait_http "http://127.0.0.1:$FN_PORT/"
wait_http "http://127.0.0.1:$OWN_PORT/"
wait_http "http://127.0.0.1:$NGINX_PORT/"

echo "machine: $(nproc) cores, $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
    for t in synwake nginx; do
        case $t in
        synwake) port=$OWN_PORT; pids=$SYNWAKE_PID ;;
        nginx) port=$NGINX_PORT; pids=$(pgrep -P "$NGINX_PID" | paste -sd,) ;;
        esac
        url="http://127.0.0.1:$port/"
        wrk -t1 -c1 -d1s "$url" >/dev/null
        echo "round $round $t (load $(cut -d' ' -f1 /proc/loadavg)):"
        tcpdump -i lo -n -q -s 80 --time-stamp-precision=nano -w "$WORK/cap" tcp 2>/dev/null &
        dump=$!
        sleep 0.5
        wrk -t1 -c1 -d2s "$url" >"$WORK/wrk-$t-hops"
        sleep 0.2
        kill "$dump"
        wait "$dump" 2>/dev/null || true
        tcpdump -r "$WORK/cap" -n -tt -q --time-stamp-precision=nano 2>/dev/null | $ANALYSE hops "$port"
        wrk -t1 -c1 -d3s "$url" >"$WORK/wrk-$t-gaps" &
        load=$!
        sleep 1
        perf record -q -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit -p "$pids" \
            -o "$WORK/sc.data" -- sleep 1 2>/dev/null
        wait "$load"
        perf script --ns -i "$WORK/sc.data" -F tid,time,event,trace 2>/dev/null | $ANALYSE gaps
        echo "  wrk: $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-$t-hops") and $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-$t-gaps") requests/s"
    done
done
