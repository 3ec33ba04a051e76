#!/usr/bin/env bash
# Process cold starts with the instance forked into its cgroup2 cgroup (clone3
# CLONE_INTO_CGROUP) against the old join (a write to cgroup.procs: a migration, which
# waits an RCU grace period unless the cgroup2 mount has `favordynmods`): the bench's
# request mode at RTT 0, init 25 ms, in interleaved rounds, each run counting the
# migrations into the bench's instance cgroups (tracefs `cgroup:cgroup_attach_task`, in a
# private tracefs instance). Root (the bench makes netns; tracefs).
#
#   scripts/bench-cgroup-join.sh                       # 3 rounds of 20 cold starts
#   BEFORE=/tmp/synwake-old ROUNDS=5 RUNS=20 scripts/bench-cgroup-join.sh
#
# Variants per round: `fork` (this build), `write` (this build, SYNWAKE_CGROUP_JOIN=write)
# and, with BEFORE=<an older synwake binary>, `before`. Needs a release build
# (cargo build --release -p synwake -p synwake-fn) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-20}
INIT=${INIT:-25}
BIN=$(pwd)/${CARGO_TARGET_DIR:-target}/release/synwake
TRACING=/sys/kernel/tracing
[ -x "$BIN" ] || { echo "bench-cgroup-join: build $BIN first" >&2; exit 1; }
[ -d "$TRACING/instances" ] || { echo "bench-cgroup-join: no tracefs at $TRACING" >&2; exit 1; }

WORK=$(mktemp -d /tmp/synwake-cgroup-join.XXXXXX)
TRACE=$TRACING/instances/synwake-clone3-bench-$$
cleanup() {
    [ -d "$TRACE" ] && { echo 0 > "$TRACE/events/cgroup/cgroup_attach_task/enable"; rmdir "$TRACE"; }
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir "$TRACE"
# The bench's instance cgroups: <daemon's cgroup>/synwake-<hash>/init-<ms>.<n>.
echo 'dst_path ~ "*synwake-*/init-*"' > "$TRACE/events/cgroup/cgroup_attach_task/filter"
echo 1 > "$TRACE/events/cgroup/cgroup_attach_task/enable"

variants="fork write"
[ -n "${BEFORE:-}" ] && variants="before $variants"
echo "| round | variant | load | p50 ms | p90 ms | cold starts | migrations |"
echo "|---|---|---|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
    for v in $variants; do
        bin=$BIN join=
        case $v in
            before) bin=$BEFORE ;;
            write) join=write ;;
        esac
        : > "$TRACE/trace"
        load=$(cut -d' ' -f1 /proc/loadavg)
        out=$WORK/$v-$round
        SYNWAKE_CGROUP_JOIN=$join "$bin" bench --modes request --rtt 0 --init "$INIT" \
            --runs "$RUNS" --out "$out" --synwake-bin "$bin" --function-bin "$BIN-fn" \
            >"$WORK/log" 2>&1 || { cat "$WORK/log" >&2; exit 1; }
        migrations=$(grep -c cgroup_attach_task "$TRACE/trace" || true)
        python3 - "$out/results.json" "$round" "$v" "$load" "$migrations" "$RUNS" <<'EOF'
import json, sys
path, round_, v, load, migrations, runs = sys.argv[1:]
r = [x for x in json.load(open(path)) if x["mode"] == "request"][0]
print(f"| {round_} | {v} | {load} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {runs} | {migrations} |")
EOF
    done
done
