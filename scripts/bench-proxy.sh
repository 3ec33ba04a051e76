#!/usr/bin/env bash
# Warm-path cost of the synwake proxy: the same fast function (synwake-fn, release build)
# called directly, through synwake (its own port and the shared port) and through nginx as
# a plain reverse proxy with upstream keepalive. Same load generator (wrk), same machine,
# one run, INTERLEAVED: every round measures every target once, in an order rotated per
# round, so load from other jobs on a shared machine hits all targets alike. Prints a
# markdown table of medians over the rounds and the per-round ratios against nginx, with
# the load average next to every figure; raw wrk output stays in $OUT (default: a temp dir).
#
#   scripts/bench-proxy.sh                        # 3 rounds of 5 s per target and load
#   ROUNDS=5 DURATION=10s scripts/bench-proxy.sh
#   SYNWAKE_BIN_BEFORE=/path/to/old/synwake scripts/bench-proxy.sh
#       # also a second daemon from another build (before/after), interleaved the same way
#   BODY_BYTES=1024 scripts/bench-proxy.sh        # POST rows: size of the request body
#   LOADS="GET -t2 -c64" scripts/bench-proxy.sh   # method and wrk load, ';' between several
#       # (default: "GET -t1 -c1;GET -t2 -c64;POST -t2 -c64")
#   NGINX_FORWARDED=1 scripts/bench-proxy.sh
#       # also nginx-forwarded: nginx sending the function the four forwarded fields synwake
#       # sends (X-Forwarded-For/-Proto/-Host, Forwarded) and the client's Host, as an edge
#       # proxy is usually set up; ratios against it are printed too
#   ACCOUNT=1 scripts/bench-proxy.sh
#       # also where the machine's CPU went during each measurement: CPU us per request of
#       # wrk, the proxy and the function behind it, the rest of the machine, idle %, context
#       # switches and CPU halts per request, and the upstream connections the function accepted
#
# Needs: cargo, wrk, nginx (Debian: nginx-light), curl.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench-proxy
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
BODY_BYTES=${BODY_BYTES:-1024}
BASE_PORT=${BASE_PORT:-18480}
FN_PORT=$BASE_PORT                  # synwake-fn, called directly and by nginx
SHARED_PORT=$((BASE_PORT + 1))      # synwake shared port: /function/bench/
API_PORT=$((BASE_PORT + 2))         # synwake management API
OWN_PORT=$((BASE_PORT + 3))         # synwake: the function's own port
NGINX_PORT=$((BASE_PORT + 4))       # nginx in front of FN_PORT
B_SHARED_PORT=$((BASE_PORT + 5))    # the "before" daemon, same layout
B_API_PORT=$((BASE_PORT + 6))
B_OWN_PORT=$((BASE_PORT + 7))
NGINX_FWD_PORT=$((BASE_PORT + 8))   # NGINX_FORWARDED=1: nginx sending the forwarded fields

for tool in cargo wrk nginx curl; do
    command -v "$tool" >/dev/null || { echo "bench-proxy: $tool not found" >&2; exit 1; }
done

IFS=';' read -r -a LOADS <<<"${LOADS:-GET -t1 -c1;GET -t2 -c64;POST -t2 -c64}"
for load in "${LOADS[@]}"; do
    case "$load" in
    "GET "* | "POST "*) ;;
    *) echo "bench-proxy: LOADS entry \"$load\" must start with GET or POST, then wrk's options (as in \"GET -t1 -c1\")" >&2
       exit 2 ;;
    esac
done

if [ -z "${NO_BUILD:-}" ]; then
    echo "building release binaries..." >&2
    cargo build --release -q -p synwake -p synwake-fn
fi
BIN=${CARGO_TARGET_DIR:-target}/release
SYNWAKE_BIN=${SYNWAKE_BIN:-$BIN/synwake}
SYNWAKE_BIN_BEFORE=${SYNWAKE_BIN_BEFORE:-}

bench_workdir


# 1. The function, called directly (and by nginx).
PORT=$FN_PORT SYNWAKE_FUNCTION=bench "$BIN/synwake-fn" >"$WORK/fn.log" 2>&1 &
PIDS+=($!)
FN_PID=$!

# 2. synwake with its own instance of the same binary; kept warm for the whole run.
start_synwake() { # binary, dir, shared port, api port, own port
    start_bench_synwake "$1" "$2" "$3" "$4" "$5" "$BIN/synwake-fn"
    DAEMON[$2]=${PIDS[-1]}
}
declare -A DAEMON
start_synwake "$SYNWAKE_BIN" "$WORK/synwake" "$SHARED_PORT" "$API_PORT" "$OWN_PORT"

# 3. nginx as a plain reverse proxy with upstream keepalive to the direct function.
{ nginx_conf_head; nginx_plain_proxy "$FN_PORT" "$NGINX_PORT"; cat <<EOF; } >"$WORK/nginx/nginx.conf"
    server {
        listen 127.0.0.1:$NGINX_FWD_PORT;
        location / {
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header Forwarded "for=\$remote_addr;proto=\$scheme;host=\\"\$http_host\\"";
        }
    }
}
EOF
start_nginx
NGINX_PID=${PIDS[-1]}

declare -A URL=(
    [direct]="http://127.0.0.1:$FN_PORT/"
    [synwake-own-port]="http://127.0.0.1:$OWN_PORT/"
    [synwake-shared-port]="http://127.0.0.1:$SHARED_PORT/function/bench/"
    [nginx]="http://127.0.0.1:$NGINX_PORT/"
)
TARGETS=(direct synwake-own-port synwake-shared-port nginx)
NGINX_TARGETS=(nginx)
if [ -n "${NGINX_FORWARDED:-}" ]; then
    URL[nginx-forwarded]="http://127.0.0.1:$NGINX_FWD_PORT/"
    TARGETS+=(nginx-forwarded)
    NGINX_TARGETS+=(nginx-forwarded)
fi
SYNWAKE_TARGETS=(synwake-own-port synwake-shared-port)
if [ -n "$SYNWAKE_BIN_BEFORE" ]; then
    start_synwake "$SYNWAKE_BIN_BEFORE" "$WORK/before" "$B_SHARED_PORT" "$B_API_PORT" "$B_OWN_PORT"
    URL[before-own-port]="http://127.0.0.1:$B_OWN_PORT/"
    URL[before-shared-port]="http://127.0.0.1:$B_SHARED_PORT/function/bench/"
    TARGETS+=(before-own-port before-shared-port)
    SYNWAKE_TARGETS+=(before-own-port before-shared-port)
fi
for t in "${TARGETS[@]}"; do wait_http "${URL[$t]}"; done
# The first synwake request above was the cold start; check every route is warm now.
for t in "${SYNWAKE_TARGETS[@]}"; do
    cold=$(curl -fsS -D - -o /dev/null "${URL[$t]}" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-synwake-cold-start"{print $2}')
    [ "$cold" = "false" ] || { echo "bench-proxy: $t not warm (cold-start: $cold)" >&2; exit 1; }
done

# ACCOUNT=1: which processes play which part behind each target, and their counters.
descendants() { # pid: its descendants named $2
    local c
    for c in $(pgrep -P "$1"); do
        [ "$(cat "/proc/$c/comm" 2>/dev/null)" = "$2" ] && echo "$c"
        descendants "$c" "$2"
    done
}
declare -A PROXY_PIDS FN_PIDS FN_CONN_URL ASKED_DIRECT
for t in "${TARGETS[@]}"; do
    case $t in
        direct) PROXY_PIDS[$t]=""; FN_PIDS[$t]=$FN_PID ;;
        nginx|nginx-forwarded) PROXY_PIDS[$t]="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"; FN_PIDS[$t]=$FN_PID ;;
        synwake-*) PROXY_PIDS[$t]=${DAEMON[$WORK/synwake]}; FN_PIDS[$t]=$(descendants "${DAEMON[$WORK/synwake]}" synwake-fn | tr '\n' ' ') ;;
        before-*) PROXY_PIDS[$t]=${DAEMON[$WORK/before]}; FN_PIDS[$t]=$(descendants "${DAEMON[$WORK/before]}" synwake-fn | tr '\n' ' ') ;;
    esac
    # The function's own count of accepted connections, asked through the same route.
    # Asked directly, the question is a connection of its own; through synwake it may ride
    # a pooled one.
    FN_CONN_URL[$t]="http://127.0.0.1:$FN_PORT/connections"; ASKED_DIRECT[$t]=1
    case $t in synwake-*|before-*) FN_CONN_URL[$t]="${URL[$t]}connections"; ASKED_DIRECT[$t]=0 ;; esac
done
ticks() { # pids: utime + stime, clock ticks, all threads
    local p sum=0 v
    for p in "$@"; do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
cpu_halts() { # entries into a cpuidle state that is not polling, all CPUs (0 without cpuidle)
    local d sum=0 name
    for d in /sys/devices/system/cpu/cpu[0-9]*/cpuidle/state[0-9]*; do
        [ -r "$d/usage" ] || continue
        name=$(cat "$d/name" 2>/dev/null || true)
        [ "$name" = POLL ] && continue
        sum=$((sum + $(cat "$d/usage")))
    done
    echo "$sum"
}
machine() { # busy ticks, idle ticks (idle + iowait), context switches, irq + softirq
    # ticks, steal ticks, TCP segments sent, CPU halts
    { cat /proc/stat; grep '^Tcp:' /proc/net/snmp | tail -1; echo "halts $(cpu_halts)"; } | awk '
        $1 == "cpu" {b = $2 + $3 + $4 + $7 + $8; i = $5 + $6; q = $7 + $8; st = $9}
        $1 == "ctxt" {c = $2} $1 == "Tcp:" {o = $12} $1 == "halts" {h = $2}
        END {print b, i, c, q, st, o, h}'
}
fn_accepted() { curl -fsS "$1" 2>/dev/null | tr -dc '0-9'; }
ctxt() { # pids: voluntary + involuntary context switches of all their threads
    local p
    for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done |
        awk '/ctxt_switches/ {n += $2} END {print n + 0}'
}
ACCT_ROWS=()

# POST with a body: the function echoes it back.
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = string.rep("x", $BODY_BYTES)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {
    if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2];
    else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A RPS P50 P99 LOAD     # space-separated values, one per round
n=${#TARGETS[@]}
for round in $(seq 1 "$ROUNDS"); do
    for load in "${LOADS[@]}"; do
        method=${load%% *}
        args=${load#* }
        script=()
        [ "$method" = POST ] && script=(-s "$WORK/post.lua")
        for i in $(seq 0 $((n - 1))); do
            t=${TARGETS[$(((i + round - 1) % n))]}   # rotated: no target always goes first
            key="$t|$load"
            file="$OUT/wrk-${t}-${method}$(echo "$args" | tr -d ' -')-r$round.txt"
            l=$(cut -d' ' -f1 /proc/loadavg)
            if [ -n "${ACCOUNT:-}" ]; then
                # shellcheck disable=SC2086
                { a0=$(fn_accepted "${FN_CONN_URL[$t]}"); read -r mb0 mi0 mc0 mq0 ms0 mo0 mh0 < <(machine)
                  p0=$(ticks ${PROXY_PIDS[$t]}); f0=$(ticks ${FN_PIDS[$t]})
                  pc0=$(ctxt ${PROXY_PIDS[$t]}); fc0=$(ctxt ${FN_PIDS[$t]}); }
            fi
            timed=()
            [ -n "${ACCOUNT:-}" ] && timed=(/usr/bin/time -f "%U %S %w %c" -o "$file.time")
            # shellcheck disable=SC2086
            "${timed[@]}" wrk $args -d"$DURATION" --latency "${script[@]}" "${URL[$t]}" >"$file"
            r=$(awk '/^Requests\/sec:/ {print $2}' "$file")
            if [ -n "${ACCOUNT:-}" ]; then
                # shellcheck disable=SC2086
                { read -r mb1 mi1 mc1 mq1 ms1 mo1 mh1 < <(machine); p1=$(ticks ${PROXY_PIDS[$t]}); f1=$(ticks ${FN_PIDS[$t]})
                  pc1=$(ctxt ${PROXY_PIDS[$t]}); fc1=$(ctxt ${FN_PIDS[$t]})
                  a1=$(fn_accepted "${FN_CONN_URL[$t]}"); }
                reqs=$(awk '/requests in/ {print $1}' "$file")
                read -r wu ws wv wc <"$file.time"
                row=$(awk -v n="$reqs" -v wu="$wu" -v ws="$ws" -v p="$((p1 - p0))" -v f="$((f1 - f0))" \
                    -v mb="$((mb1 - mb0))" -v mi="$((mi1 - mi0))" -v mc="$((mc1 - mc0))" \
                    -v mq="$((mq1 - mq0))" -v ms="$((ms1 - ms0))" -v mo="$((mo1 - mo0))" \
                    -v mh="$((mh1 - mh0))" \
                    -v acc="$((a1 - a0 - ${ASKED_DIRECT[$t]}))" -v wcs="$((wv + wc))" \
                    -v pcs="$((pc1 - pc0))" -v fcs="$((fc1 - fc0))" 'BEGIN {
                    tick = 1e6 / 100 / n; w = (wu + ws) * 1e6 / n
                    printf "%.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f%% | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f | %d",
                        w, p * tick, f * tick, mb * tick - w - p * tick - f * tick,
                        mq * tick, mb * tick, ms * tick, 100 * mi / (mb + mi + ms), mc / n, wcs / n,
                        pcs / n, fcs / n, mh / n, mo / n, acc }')
                ACCT_ROWS+=("| $t | \`$load\` | $round | $r | $row | $l |")
                echo "    us/request wrk | proxy | fn | rest | irq | machine | steal | idle | ctxt/req: machine | wrk | proxy | fn | CPU halts/req | TCP segments/req | fn conns accepted: $row" >&2
            fi
            p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$file")")
            p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$file")")
            RPS[$key]+="$r "; P50[$key]+="$p50 "; P99[$key]+="$p99 "; LOAD[$key]+="$l "
            errors=$(grep -E "Non-2xx|Socket errors" "$file" || true)
            [ -z "$errors" ] || echo "bench-proxy: $t ($load): $errors" >&2
            echo "  round $round $t ($load): $r req/s, p50 $p50 us, p99 $p99 us, load $l" >&2
        done
    done
done

echo
echo "Medians over $ROUNDS interleaved rounds of $DURATION; loadavg = 1-min load average at the"
echo "start of each round's measurement (it counts the benchmark's own threads too)."
echo
echo "| target | load | requests/s | p50 (us) | p99 (us) | requests/s per round | loadavg per round |"
echo "|---|---|---:|---:|---:|---|---|"
for load in "${LOADS[@]}"; do
    for t in "${TARGETS[@]}"; do
        key="$t|$load"
        echo "| $t | \`$load\` | $(median <<<"${RPS[$key]}") | $(median <<<"${P50[$key]}") |" \
            "$(median <<<"${P99[$key]}") | ${RPS[$key]% } | ${LOAD[$key]% } |"
    done
done

echo
first() { awk -v i="$2" '{print $i}' <<<"$1"; }
per_round() { # series a, series b, awk expression of a and b, printf format: one value per round
    local out="" r
    for r in $(seq 1 "$ROUNDS"); do
        out+="$(awk -v a="$(first "$1" "$r")" -v b="$(first "$2" "$r")" "BEGIN {printf \"$4\", $3}") "
    done
    echo "${out% }"
}
for load in "${LOADS[@]}"; do
    [[ "$load" == *c1 ]] && continue
    for ng in "${NGINX_TARGETS[@]}"; do
        for t in "${SYNWAKE_TARGETS[@]}"; do
            ratios=$(per_round "${RPS[$t|$load]}" "${RPS[$ng|$load]}" "a / b" "%.2f")
            echo "- $t \`$load\`: requests/s / $ng's, per round: $ratios" \
                "(median $(median <<<"$ratios"); target >= 1.0)"
        done
    done
done
low="GET -t1 -c1"
if [ -n "${P50[nginx|$low]:-}" ]; then
    for t in "${SYNWAKE_TARGETS[@]}" "${NGINX_TARGETS[@]}"; do
        added=$(per_round "${P50[$t|$low]}" "${P50[direct|$low]}" "a - b" "%.0f")
        echo "- $t: p50 added over direct at one connection, per round: $added us" \
            "(median $(median <<<"$added"))"
    done
fi
if [ -n "${ACCOUNT:-}" ]; then
    echo
    echo "Where the machine's CPU went (ACCOUNT=1): CPU time per request in us (utime + stime,"
    echo "10 ms ticks) of wrk, the proxy (synwake daemon / nginx master + workers), the function"
    echo "behind it, the rest of the machine (other jobs, kernel threads), irq + softirq time (part"
    echo "of it is charged to the processes too), the whole machine (without steal) and the time"
    echo "the hypervisor stole; machine idle %; context switches per request (machine, wrk, the proxy, the"
    echo "function); entries of the CPUs into an idle state that halts them (cpuidle, not POLL;"
    echo "0 without cpuidle) per request: on a VM each costs an exit, and waking it again costs"
    echo "whoever wakes a task there; TCP segments sent per request (all of the machine's); connections the"
    echo "function accepted during the measurement. Context switches of threads that exited during"
    echo "the measurement are lost: nginx closes an upstream connection after 1000 requests (its"
    echo "keepalive_requests), so the function's column behind nginx is too low (perf stat -e"
    echo "context-switches -p, which counts exited threads, showed about 1.0 per request for both)."
    echo
    echo "| target | load | round | requests/s | wrk | proxy | fn | rest | irq | machine | steal | idle | ctxt/req | wrk ctxt/req | proxy ctxt/req | fn ctxt/req | CPU halts/req | TCP segs/req | fn conns accepted | loadavg |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${ACCT_ROWS[@]}"
fi
echo
echo "machine: $(nproc) cores, $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME");" \
    "load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
echo "raw wrk output: $OUT"
