#!/usr/bin/env bash
# Proxy CPU per request of two synwake builds, user and system time apart: both daemons run
# the same function (synwake-fn, release build) on their own ports, and wrk drives them in
# turn, ROUNDS times. CPU comes from /proc/<pid>/stat (all threads, 10 ms ticks). The one
# measured second in a pair tends to get more requests/s on a loaded machine: run it twice
# with the builds swapped and compare CPU per request, not requests/s.
#
#   scripts/bench-cpu-ab.sh BUILD_A BUILD_B               # 6 rounds of wrk -t2 -c64 -d3s
#   ROUNDS=4 WRK="-t1 -c1 -d3s" scripts/bench-cpu-ab.sh A B
#   BODY_BYTES=1024 scripts/bench-cpu-ab.sh A B           # POST bodies of that size
#
# Needs: wrk, curl, a release build of synwake-fn (cargo build --release -p synwake-fn).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench-cpu-ab
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
[ $# -eq 2 ] || { echo "usage: $0 BUILD_A BUILD_B" >&2; exit 2; }
ROUNDS=${ROUNDS:-6}
WRK=${WRK:--t2 -c64 -d3s}
BASE_PORT=${BASE_PORT:-18580}
FN=$(realpath "${CARGO_TARGET_DIR:-target}/release/synwake-fn")
bench_workdir
OUT="" # nothing to keep: the cleanup removes the work dir

start() { # binary, dir, shared port (api +1, own +2)
    start_bench_synwake "$1" "$2" "$3" "$(($3 + 1))" "$(($3 + 2))" "$FN"
}
start "$1" "$WORK/a" "$BASE_PORT"
start "$2" "$WORK/b" "$((BASE_PORT + 3))"
declare -A DAEMON=([a]=${PIDS[0]} [b]=${PIDS[1]}) PORT=([a]=$((BASE_PORT + 2)) [b]=$((BASE_PORT + 5)))
script=()
if [ -n "${BODY_BYTES:-}" ]; then
    printf 'wrk.method = "POST"\nwrk.body = string.rep("x", %d)\n' "$BODY_BYTES" >"$WORK/post.lua"
    script=(-s "$WORK/post.lua")
fi
for k in a b; do
    wait_http "http://127.0.0.1:${PORT[$k]}/"
    # shellcheck disable=SC2086
    wrk $WRK "${script[@]}" "http://127.0.0.1:${PORT[$k]}/" >/dev/null # warm-up
done
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; } # utime stime
echo "| round | build | requests/s | proxy user us/req | proxy sys us/req | function us/req | loadavg |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
    for k in a b; do
        p=${DAEMON[$k]}
        f=$(pgrep -P "$p" | head -1)
        read -r u0 s0 < <(ticks "$p"); read -r fu0 fs0 < <(ticks "$f")
        # shellcheck disable=SC2086
        wrk $WRK "${script[@]}" "http://127.0.0.1:${PORT[$k]}/" >"$WORK/wrk.txt"
        read -r u1 s1 < <(ticks "$p"); read -r fu1 fs1 < <(ticks "$f")
        awk -v r="$r" -v k="$k" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v f=$((fu1 - fu0 + fs1 - fs0)) \
            -v l="$(cut -d' ' -f1 /proc/loadavg)" '
            /requests in/ {n = $1; gsub("s,", "", $4); t = $4}
            END {printf "| %d | %s | %.0f | %.2f | %.2f | %.2f | %s |\n", r, k, n / t, u * 1e4 / n, s * 1e4 / n, f * 1e4 / n, l}' \
            "$WORK/wrk.txt"
    done
done
echo
echo "a = $1, b = $2; wrk $WRK${BODY_BYTES:+, POST $BODY_BYTES bytes}; $(nproc) cores"
