#!/usr/bin/env bash
# The HTTPS edge side by side with nginx: the same warm function (synwake-fn, release
# build) behind synwake's TLS (its own HTTPS port and the shared HTTPS port) and behind
# nginx terminating TLS with the same certificate and key, in one run:
#
#   1. new TLS connections per second, one request each (openssl s_time -new, CLIENTS
#      parallel clients, TLS 1.3 and TLS 1.2);
#   2. requests/s over kept-alive TLS connections, wrk -t2 -c64;
#   3. p50 latency at one kept-alive connection, wrk -t1 -c1, against the function direct.
#
#   scripts/bench-tls.sh                    # 5 s per measurement
#   DURATION=10 CLIENTS=4 scripts/bench-tls.sh
#
# Prints a markdown table and the verdicts; raw output stays in $OUT (default: temp dir).
# Needs: cargo, wrk, nginx (Debian: nginx-light), openssl, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench-tls
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

DURATION=${DURATION:-5}
CLIENTS=${CLIENTS:-2}
BASE_PORT=${BASE_PORT:-18580}
FN_PORT=$BASE_PORT                 # synwake-fn, called directly and by nginx
SHARED_PORT=$((BASE_PORT + 1))     # synwake plain shared port
API_PORT=$((BASE_PORT + 2))        # synwake management API
TLS_PORT=$((BASE_PORT + 3))        # synwake shared HTTPS port: /function/bench/
OWN_TLS_PORT=$((BASE_PORT + 4))    # synwake: the function's own HTTPS port
NGINX_PORT=$((BASE_PORT + 5))      # nginx (TLS) in front of FN_PORT

for tool in cargo wrk nginx openssl curl; do
    command -v "$tool" >/dev/null || { echo "bench-tls: $tool not found" >&2; exit 1; }
done

echo "building release binaries..." >&2
cargo build --release -q -p synwake -p synwake-fn
BIN=${CARGO_TARGET_DIR:-target}/release

bench_workdir

# One certificate for both servers: ECDSA P-256 (what an ACME client issues by default).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench.test -addext "subjectAltName=DNS:bench.test" \
    -keyout "$WORK/site.key" -out "$WORK/site.pem" 2>/dev/null
chmod 600 "$WORK/site.key"

PORT=$FN_PORT SYNWAKE_FUNCTION=bench "$BIN/synwake-fn" >"$WORK/fn.log" 2>&1 &
PIDS+=($!)

cat >"$WORK/synwake.toml" <<EOF
[gateway]
listen = "127.0.0.1:$SHARED_PORT"
api_listen = "127.0.0.1:$API_PORT"
tls_listen = "127.0.0.1:$TLS_PORT"
state_dir = "$WORK/state"

[probe]
mode = "off"

[[certificate]]
cert = "$WORK/site.pem"
key = "$WORK/site.key"

[[function]]
name = "bench"
hosts = ["bench.test"]
tls_port = $OWN_TLS_PORT
command = ["$(realpath "$BIN/synwake-fn")"]
idle_timeout = "1h"
EOF
SYNWAKE_LOG=warn "$BIN/synwake" up --config "$WORK/synwake.toml" >"$WORK/synwake.log" 2>&1 &
PIDS+=($!)

{ nginx_conf_head; cat <<EOF; } >"$WORK/nginx/nginx.conf"
    upstream fn {
        server 127.0.0.1:$FN_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        ssl_certificate $WORK/site.pem;
        ssl_certificate_key $WORK/site.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        location / {
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
start_nginx

declare -A URL=(
    [direct]="http://127.0.0.1:$FN_PORT/"
    [synwake-own-tls-port]="https://127.0.0.1:$OWN_TLS_PORT/"
    [synwake-shared-tls-port]="https://127.0.0.1:$TLS_PORT/function/bench/"
    [nginx]="https://127.0.0.1:$NGINX_PORT/"
)
declare -A HOSTPORT=(
    [synwake-own-tls-port]="127.0.0.1:$OWN_TLS_PORT"
    [synwake-shared-tls-port]="127.0.0.1:$TLS_PORT"
    [nginx]="127.0.0.1:$NGINX_PORT"
)
declare -A PAGE=(
    [synwake-own-tls-port]="/"
    [synwake-shared-tls-port]="/function/bench/"
    [nginx]="/"
)
TLS_TARGETS=(synwake-own-tls-port synwake-shared-tls-port nginx)

for t in direct "${TLS_TARGETS[@]}"; do wait_http "${URL[$t]}" -k; done
# The first synwake request above was the cold start; both routes must be warm now.
for t in synwake-own-tls-port synwake-shared-tls-port; do
    cold=$(curl -kfsS -D - -o /dev/null "${URL[$t]}" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-synwake-cold-start"{print $2}')
    [ "$cold" = "false" ] || { echo "bench-tls: $t not warm (cold-start: $cold)" >&2; exit 1; }
done


LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A CPS RPS P50 LOAD

# 1. New connections: CLIENTS parallel `openssl s_time -new`, each a full handshake and
#    one HTTP/1.0 request per connection; the sum of their connections/s.
for ver in tls1_3 tls1_2; do
    for t in "${TLS_TARGETS[@]}"; do
        LOAD["$t|$ver"]=$(cut -d' ' -f1 /proc/loadavg)
        clients=()
        for i in $(seq 1 "$CLIENTS"); do
            openssl s_time -new -"$ver" -connect "${HOSTPORT[$t]}" -www "${PAGE[$t]}" \
                -time "$DURATION" >"$OUT/stime-$t-$ver-$i.txt" 2>&1 &
            clients+=($!)
        done
        wait "${clients[@]}"
        # "N connections in T real seconds, ...": the clients' rates added up.
        CPS["$t|$ver"]=$(cat "$OUT"/stime-"$t"-"$ver"-*.txt |
            awk '/connections in [0-9.]+ real seconds/ && $4 > 0 {r += $1 / $4} END {printf "%.0f", r}')
        echo "  $t new $ver connections: ${CPS["$t|$ver"]}/s" >&2
    done
done

# 2 and 3: kept-alive connections.
LOADS=("-t1 -c1" "-t2 -c64")
for load in "${LOADS[@]}"; do
    for t in direct "${TLS_TARGETS[@]}"; do
        key="$t|$load"
        file="$OUT/wrk-${t}-$(echo "$load" | tr -d ' -').txt"
        LOAD[$key]=$(cut -d' ' -f1 /proc/loadavg)
        # shellcheck disable=SC2086
        wrk $load -d"${DURATION}s" --latency "${URL[$t]}" >"$file"
        RPS[$key]=$(awk '/^Requests\/sec:/ {print $2}' "$file")
        P50[$key]=$(to_us "$(awk '$1 == "50%" {print $2}' "$file")")
        errors=$(grep -E "Non-2xx|Socket errors" "$file" || true)
        [ -z "$errors" ] || echo "bench-tls: $t ($load): $errors" >&2
        echo "  $t ($load): ${RPS[$key]} req/s, p50 ${P50[$key]} us" >&2
    done
done

echo
echo "| target | new TLS 1.3 conn/s | new TLS 1.2 conn/s | kept-alive req/s \`-t2 -c64\` | p50 at \`-t1 -c1\` (us) | loadavg |"
echo "|---|---:|---:|---:|---:|---:|"
for t in direct "${TLS_TARGETS[@]}"; do
    c13=${CPS["$t|tls1_3"]:--}
    c12=${CPS["$t|tls1_2"]:--}
    echo "| $t | $c13 | $c12 | ${RPS[$t|-t2 -c64]} | ${P50[$t|-t1 -c1]} | ${LOAD[$t|-t2 -c64]} |"
done

echo
for t in synwake-own-tls-port synwake-shared-tls-port; do
    for ver in tls1_3 tls1_2; do
        a=${CPS["$t|$ver"]}
        b=${CPS["nginx|$ver"]}
        ok=$([ "$a" -ge "$b" ] && echo met || echo missed)
        echo "- $t: $a new $ver connections/s against nginx's $b (target >= nginx: $ok)"
    done
    share=$(awk -v a="${RPS[$t|-t2 -c64]}" -v b="${RPS[nginx|-t2 -c64]}" 'BEGIN {printf "%.0f", 100 * a / b}')
    ok=$([ "$share" -ge 90 ] && echo met || echo missed)
    echo "- $t: ${share}% of nginx's kept-alive requests/s at -c64 (target >= 90%: $ok)"
    added=$(awk -v a="${P50[$t|-t1 -c1]}" -v b="${P50[direct|-t1 -c1]}" 'BEGIN {printf "%.0f", a - b}')
    nadded=$(awk -v a="${P50[nginx|-t1 -c1]}" -v b="${P50[direct|-t1 -c1]}" 'BEGIN {printf "%.0f", a - b}')
    ok=$([ "$added" -le "$nadded" ] && echo met || echo missed)
    echo "- $t: adds ${added} us at p50 at one connection, nginx ${nadded} us (target <= nginx: $ok)"
done
echo
echo "machine: $(nproc) cores, $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME");" \
    "load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
echo "raw output: $OUT"
