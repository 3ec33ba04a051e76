#!/usr/bin/env bash
# Warm-path cost of the synwake proxy: the same fast function (synwake-fn, release build)
# called directly, through synwake (its own port and the shared port) and through nginx as
# a plain reverse proxy with upstream keepalive. Same load generator (wrk), same machine,
# one run. Prints a markdown table; raw wrk output stays in $OUT (default: a temp dir).
#
#   scripts/bench-proxy.sh                  # 10 s per measurement
#   DURATION=30s scripts/bench-proxy.sh
#
# Needs: cargo, wrk, nginx (Debian: nginx-light), curl.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
BASE_PORT=${BASE_PORT:-18480}
FN_PORT=$BASE_PORT                  # synwake-fn, called directly and by nginx
SHARED_PORT=$((BASE_PORT + 1))      # synwake shared port: /function/bench/
API_PORT=$((BASE_PORT + 2))         # synwake management API
OWN_PORT=$((BASE_PORT + 3))         # synwake: the function's own port
NGINX_PORT=$((BASE_PORT + 4))       # nginx in front of FN_PORT

for tool in cargo wrk nginx curl; do
    command -v "$tool" >/dev/null || { echo "bench-proxy: $tool not found" >&2; exit 1; }
done

echo "building release binaries..." >&2
cargo build --release -q -p synwake -p synwake-fn
BIN=${CARGO_TARGET_DIR:-target}/release

WORK=$(mktemp -d /tmp/synwake-bench-proxy.XXXXXX)
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "$OUT" = "$WORK" ] || rm -rf "$WORK"
}
trap cleanup EXIT

wait_http() { # url: up to 10 s for a 2xx
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench-proxy: $1 did not answer" >&2
    exit 1
}

# 1. The function, called directly (and by nginx).
PORT=$FN_PORT SYNWAKE_FUNCTION=bench "$BIN/synwake-fn" >"$WORK/fn.log" 2>&1 &
PIDS+=($!)

# 2. synwake with its own instance of the same binary; kept warm for the whole run.
cat >"$WORK/synwake.toml" <<EOF
[gateway]
listen = "127.0.0.1:$SHARED_PORT"
api_listen = "127.0.0.1:$API_PORT"
state_dir = "$WORK/state"

[probe]
mode = "off"

[[function]]
name = "bench"
port = $OWN_PORT
command = ["$(realpath "$BIN/synwake-fn")"]
idle_timeout = "1h"
EOF
SYNWAKE_LOG=warn "$BIN/synwake" up --config "$WORK/synwake.toml" >"$WORK/synwake.log" 2>&1 &
PIDS+=($!)

# 3. nginx as a plain reverse proxy with upstream keepalive to the direct function.
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream fn {
        server 127.0.0.1:$FN_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
nginx -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

declare -A URL=(
    [direct]="http://127.0.0.1:$FN_PORT/"
    [synwake-own-port]="http://127.0.0.1:$OWN_PORT/"
    [synwake-shared-port]="http://127.0.0.1:$SHARED_PORT/function/bench/"
    [nginx]="http://127.0.0.1:$NGINX_PORT/"
)
TARGETS=(direct synwake-own-port synwake-shared-port nginx)
for t in "${TARGETS[@]}"; do wait_http "${URL[$t]}"; done
# The first synwake request above was the cold start; check both routes are warm now.
for t in synwake-own-port synwake-shared-port; do
    cold=$(curl -fsS -D - -o /dev/null "${URL[$t]}" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-synwake-cold-start"{print $2}')
    [ "$cold" = "false" ] || { echo "bench-proxy: $t not warm (cold-start: $cold)" >&2; exit 1; }
done

# wrk latency figures to microseconds: "85.00us", "1.20ms", "1.01s".
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
        else if (v ~ /s$/) print n * 1000000; else print n }'
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A RPS P50 P99 LOAD
LOADS=("-t1 -c1" "-t2 -c64")
for load in "${LOADS[@]}"; do
    for t in "${TARGETS[@]}"; do
        key="$t|$load"
        file="$OUT/wrk-${t}-$(echo "$load" | tr -d ' -').txt"
        LOAD[$key]=$(cut -d' ' -f1 /proc/loadavg)
        # shellcheck disable=SC2086
        wrk $load -d"$DURATION" --latency "${URL[$t]}" >"$file"
        RPS[$key]=$(awk '/^Requests\/sec:/ {print $2}' "$file")
        P50[$key]=$(to_us "$(awk '$1 == "50%" {print $2}' "$file")")
        P99[$key]=$(to_us "$(awk '$1 == "99%" {print $2}' "$file")")
        errors=$(grep -E "Non-2xx|Socket errors" "$file" || true)
        [ -z "$errors" ] || echo "bench-proxy: $t ($load): $errors" >&2
        echo "  $t ($load): ${RPS[$key]} req/s, p50 ${P50[$key]} us, p99 ${P99[$key]} us" >&2
    done
done

echo
# The last column shows how busy the machine was (1-min load average at the start).
echo "| target | wrk load | requests/s | p50 (us) | p99 (us) | loadavg |"
echo "|---|---|---:|---:|---:|---:|"
for load in "${LOADS[@]}"; do
    for t in "${TARGETS[@]}"; do
        key="$t|$load"
        echo "| $t | \`$load\` | ${RPS[$key]} | ${P50[$key]} | ${P99[$key]} | ${LOAD[$key]} |"
    done
done

low="-t1 -c1"
high="-t2 -c64"
echo
for t in synwake-own-port synwake-shared-port; do
    added=$(awk -v a="${P50[$t|$low]}" -v b="${P50[direct|$low]}" 'BEGIN {printf "%.0f", a - b}')
    share=$(awk -v a="${RPS[$t|$high]}" -v b="${RPS[nginx|$high]}" 'BEGIN {printf "%.0f", 100 * a / b}')
    p50_ok=$([ "$added" -le 100 ] && echo met || echo missed)
    rps_ok=$([ "$share" -ge 80 ] && echo met || echo missed)
    echo "- $t: adds ${added} us at p50 at low load (target <= 100 us: $p50_ok);" \
        "${share}% of nginx's requests/s at -c64 (target >= 80%: $rps_ok)"
done
nginx_added=$(awk -v a="${P50[nginx|$low]}" -v b="${P50[direct|$low]}" 'BEGIN {printf "%.0f", a - b}')
echo "- nginx: adds ${nginx_added} us at p50 at low load"
echo
echo "machine: $(nproc) cores, $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME");" \
    "load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
echo "raw wrk output: $OUT"
