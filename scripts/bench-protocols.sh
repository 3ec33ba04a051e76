#!/usr/bin/env bash
# HTTP/2 and WebSocket through synwake against nginx, same machine, one run (issue 11):
#
# - HTTP/2 (h2load -c64 -m10): h2c with prior knowledge on synwake's own and shared ports,
#   h2 over TLS (ALPN) on synwake's tls_listen, and nginx with `http2` on a plain and a TLS
#   listener. Both proxy to the same fast function (synwake-fn) over HTTP/1.1 keep-alive.
# - WebSocket: round trip of a small text message (sequential, one connection) to the same
#   Python echo function (tests/fixtures/ws_echo.py) directly, through synwake's own and
#   shared ports and through nginx; p50/p99.
# - An h2c function (`protocol = "h2c"`: synwake speaks HTTP/2 to it): nghttpd serving a
#   3-byte file over h2c with prior knowledge; h2load against it directly and through
#   synwake's shared port (nginx proxies HTTP/2 upstream only for gRPC: no nginx row).
#   H2_ONLY="target ..." runs only those HTTP/2 targets.
# - WebSocket over HTTP/2 (RFC 8441): round trips of the same message from the python3-h2
#   client (tests/fixtures/ws_h2_client.py) to the python3-h2 h2c echo function
#   (ws_h2_server.py) directly and through synwake's shared port.
#
#   scripts/bench-protocols.sh                 # 10 s per h2load run, 5000 WebSocket round trips
#   DURATION=5s WS_ROUNDS=2000 scripts/bench-protocols.sh
#   WS_ROUNDS=0 H2_ONLY="h2c-function-direct synwake-shared-port-to-h2c-function" \
#       scripts/bench-protocols.sh             # only the h2c function rows
#
# Needs: cargo, h2load (nghttp2-client), nghttpd (nghttp2-server), nginx (with http_v2 and
# ssl), openssl, curl, /usr/bin/python3 with websockets.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench-protocols
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

DURATION=${DURATION:-10s}
WS_ROUNDS=${WS_ROUNDS:-5000}
BASE_PORT=${BASE_PORT:-18680}
FN_PORT=$BASE_PORT                  # synwake-fn, called by nginx
SHARED_PORT=$((BASE_PORT + 1))      # synwake shared port
API_PORT=$((BASE_PORT + 2))         # synwake management API
OWN_PORT=$((BASE_PORT + 3))         # synwake: the bench function's own port
TLS_PORT=$((BASE_PORT + 4))         # synwake tls_listen
NGINX_H2C_PORT=$((BASE_PORT + 5))   # nginx, http2 without TLS (prior knowledge)
NGINX_TLS_PORT=$((BASE_PORT + 6))   # nginx, http2 over TLS
WS_FN_PORT=$((BASE_PORT + 7))       # the WebSocket echo, called directly and by nginx
WS_OWN_PORT=$((BASE_PORT + 8))      # synwake: the WebSocket function's own port
NGINX_WS_PORT=$((BASE_PORT + 9))    # nginx in front of WS_FN_PORT
H2C_FN_PORT=$((BASE_PORT + 10))     # the h2c function (nghttpd), called directly
WS_H2C_FN_PORT=$((BASE_PORT + 11))  # the RFC 8441 WebSocket echo (h2c), called directly
PY=/usr/bin/python3

for tool in cargo h2load nghttpd nginx openssl curl "$PY"; do
    command -v "$tool" >/dev/null || { echo "bench-protocols: $tool not found" >&2; exit 1; }
done
"$PY" -c "import websockets" || { echo "bench-protocols: $PY lacks websockets" >&2; exit 1; }

echo "building release binaries..." >&2
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p synwake -p synwake-fn
BIN=${CARGO_TARGET_DIR:-target}/release
SYNWAKE_BIN=${SYNWAKE_BIN:-$BIN/synwake}
WS_ECHO=$(realpath crates/synwake/tests/fixtures/ws_echo.py)
WS_H2_ECHO=$(realpath crates/synwake/tests/fixtures/ws_h2_server.py)
WS_H2_CLIENT=$(realpath crates/synwake/tests/fixtures/ws_h2_client.py)

bench_workdir


# A self-signed P-256 certificate for 127.0.0.1, shared by synwake and nginx.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 600 "$WORK/key.pem"

# 1. The functions, called directly (and by nginx).
PORT=$FN_PORT SYNWAKE_FUNCTION=bench "$BIN/synwake-fn" >"$WORK/fn.log" 2>&1 &
PIDS+=($!)
PORT=$WS_FN_PORT "$PY" "$WS_ECHO" >"$WORK/ws-fn.log" 2>&1 &
PIDS+=($!)
PORT=$WS_H2C_FN_PORT "$PY" "$WS_H2_ECHO" >"$WORK/ws-h2-fn.log" 2>&1 &
PIDS+=($!)

# The h2c function: nghttpd (nghttp2's C server) serving a small file over h2c on $PORT,
# from a directory the function's unprivileged user can read.
H2C=$WORK/h2cfn
mkdir -p "$H2C"
chmod 755 "$WORK" "$H2C"
echo ok >"$H2C/index.html"
chmod 644 "$H2C/index.html"
H2C_FN="exec nghttpd --no-tls -d $H2C \$PORT"
PORT=$H2C_FN_PORT sh -c "exec nghttpd --no-tls -d $H2C $H2C_FN_PORT" >"$WORK/h2cfn.log" 2>&1 &
PIDS+=($!)

# 2. synwake with its own instances of the same functions, kept warm for the whole run.
cat >"$WORK/synwake.toml" <<EOF
[gateway]
listen = "127.0.0.1:$SHARED_PORT"
api_listen = "127.0.0.1:$API_PORT"
tls_listen = "127.0.0.1:$TLS_PORT"
state_dir = "$WORK/state"

[probe]
mode = "off"

[[certificate]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
default = true

[[function]]
name = "bench"
port = $OWN_PORT
command = ["$(realpath "$BIN/synwake-fn")"]
idle_timeout = "1h"

[[function]]
name = "ws"
port = $WS_OWN_PORT
command = ["$PY", "$WS_ECHO"]
idle_timeout = "1h"

[[function]]
name = "h2cfn"
protocol = "h2c"
command = ["sh", "-c", "$H2C_FN"]
idle_timeout = "1h"

[[function]]
name = "wsh2"
protocol = "h2c"
command = ["$PY", "$WS_H2_ECHO"]
idle_timeout = "1h"
EOF
SYNWAKE_LOG=warn "$SYNWAKE_BIN" up --config "$WORK/synwake.toml" >"$WORK/synwake.log" 2>&1 &
PIDS+=($!)

# 3. nginx: http2 on a plain and a TLS listener, upstream keep-alive; a WebSocket proxy.
{ nginx_conf_head; cat <<EOF; } >"$WORK/nginx/nginx.conf"
    # No GOAWAY after 1000 requests per connection (nginx's default; synwake has no cap).
    keepalive_requests 1000000;
    upstream fn {
        server 127.0.0.1:$FN_PORT;
        # h2load keeps 640 streams in flight: room to keep as many upstream connections.
        keepalive 1024;
    }
    server {
        listen 127.0.0.1:$NGINX_H2C_PORT http2;
        location / {
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        location / {
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$NGINX_WS_PORT;
        location / {
            proxy_pass http://127.0.0.1:$WS_FN_PORT;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
        }
    }
}
EOF
start_nginx

declare -A H2URL=(
    [synwake-own-port-h2c]="http://127.0.0.1:$OWN_PORT/"
    [synwake-shared-port-h2c]="http://127.0.0.1:$SHARED_PORT/function/bench/"
    [synwake-tls-h2]="https://127.0.0.1:$TLS_PORT/function/bench/"
    [nginx-h2c]="http://127.0.0.1:$NGINX_H2C_PORT/"
    [nginx-tls-h2]="https://127.0.0.1:$NGINX_TLS_PORT/"
    [h2c-function-direct]="http://127.0.0.1:$H2C_FN_PORT/"
    [synwake-shared-port-to-h2c-function]="http://127.0.0.1:$SHARED_PORT/function/h2cfn/"
)
H2TARGETS=(synwake-own-port-h2c synwake-shared-port-h2c nginx-h2c synwake-tls-h2 nginx-tls-h2
    h2c-function-direct synwake-shared-port-to-h2c-function)
[ -z "${H2_ONLY:-}" ] || read -r -a H2TARGETS <<<"$H2_ONLY"
for t in "${H2TARGETS[@]}"; do
    case $t in
        *-h2c | *h2c-function*) wait_http "${H2URL[$t]}" --http2-prior-knowledge ;; # h2c ports speak only h2
        *) wait_http "${H2URL[$t]}" -k --http2 ;;
    esac
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
secs=${DURATION%s}
declare -A RPS LOAD
for t in "${H2TARGETS[@]}"; do
    LOAD[$t]=$(cut -d' ' -f1 /proc/loadavg)
    h2load -c64 -m10 -t2 -D "$secs" "${H2URL[$t]}" >"$OUT/h2load-$t.txt" 2>&1
    RPS[$t]=$(awk '/^finished in/ {print $4}' "$OUT/h2load-$t.txt")
    proto=$(awk '/^Application protocol:/ {print $3}' "$OUT/h2load-$t.txt")
    bad=$(awk '/^requests:/ {print $10}' "$OUT/h2load-$t.txt") # failed (errored ones included)
    [ "$proto" = "h2" ] || [ "$proto" = "h2c" ] || { echo "bench-protocols: $t spoke ${proto:-?}" >&2; exit 1; }
    [ "${bad:-1}" = "0" ] || echo "bench-protocols: $t: $bad failed requests" >&2
    echo "  $t: ${RPS[$t]} req/s ($proto)" >&2
done

# WebSocket round trips: one connection, WS_ROUNDS sequential 16-byte messages, after 200
# for warm-up; prints "p50 p99" in microseconds.
WS_RTT='
import asyncio, sys, time, websockets
async def main():
    async with websockets.connect(sys.argv[1], open_timeout=30, compression=None) as ws:
        msg = "x" * 16
        for _ in range(200):
            await ws.send(msg); await ws.recv()
        rtt = []
        for _ in range(int(sys.argv[2])):
            t0 = time.perf_counter_ns()
            await ws.send(msg)
            await ws.recv()
            rtt.append((time.perf_counter_ns() - t0) / 1000)
        rtt.sort()
        print(f"{rtt[len(rtt) // 2]:.0f} {rtt[len(rtt) * 99 // 100]:.0f}")
asyncio.run(main())
'
declare -A WSURL=(
    [direct]="ws://127.0.0.1:$WS_FN_PORT/"
    [synwake-own-port]="ws://127.0.0.1:$WS_OWN_PORT/"
    [synwake-shared-port]="ws://127.0.0.1:$SHARED_PORT/function/ws/"
    [nginx]="ws://127.0.0.1:$NGINX_WS_PORT/"
)
WSTARGETS=(direct synwake-own-port synwake-shared-port nginx)
[ "$WS_ROUNDS" != 0 ] || WSTARGETS=()
declare -A WSP50 WSP99 WSLOAD
for t in "${WSTARGETS[@]}"; do
    WSLOAD[$t]=$(cut -d' ' -f1 /proc/loadavg)
    read -r p50 p99 < <("$PY" -c "$WS_RTT" "${WSURL[$t]}" "$WS_ROUNDS")
    WSP50[$t]=$p50
    WSP99[$t]=$p99
    echo "  ws $t: p50 $p50 us, p99 $p99 us" >&2
done
# RFC 8441 (python3-h2 client and h2c function): WebSocket over HTTP/2 end to end.
declare -A WSH2=([h2-direct]="$WS_H2C_FN_PORT /" [h2-synwake-to-h2c-function]="$SHARED_PORT /function/wsh2/")
WSH2TARGETS=(h2-direct h2-synwake-to-h2c-function)
[ "$WS_ROUNDS" != 0 ] || WSH2TARGETS=()
for t in "${WSH2TARGETS[@]}"; do
    read -r port path <<<"${WSH2[$t]}"
    WSLOAD[$t]=$(cut -d' ' -f1 /proc/loadavg)
    read -r _ p50 p99 < <(WS_RTT_ROUNDS=$WS_ROUNDS "$PY" "$WS_H2_CLIENT" 127.0.0.1 "$port" "$path" 0 hi | grep '^rtt ')
    WSP50[$t]=$p50
    WSP99[$t]=$p99
    echo "  ws $t: p50 $p50 us, p99 $p99 us" >&2
done

echo
echo "| HTTP/2 target (h2load \`-c64 -m10 -t2 -D $secs\`) | requests/s | loadavg |"
echo "|---|---:|---:|"
for t in "${H2TARGETS[@]}"; do echo "| $t | ${RPS[$t]} | ${LOAD[$t]} |"; done
echo
for pair in "synwake-own-port-h2c nginx-h2c" "synwake-shared-port-h2c nginx-h2c" "synwake-tls-h2 nginx-tls-h2" \
    "synwake-shared-port-to-h2c-function h2c-function-direct"; do
    read -r a b <<<"$pair"
    [ -n "${RPS[$a]:-}" ] && [ -n "${RPS[$b]:-}" ] || continue
    echo "- $a: $(awk -v a="${RPS[$a]}" -v b="${RPS[$b]}" 'BEGIN {printf "%.0f", 100 * a / b}')% of $b's requests/s"
done
echo
echo "| WebSocket target ($WS_ROUNDS round trips, 16 B) | p50 (us) | p99 (us) | added p50 (us) | loadavg |"
echo "|---|---:|---:|---:|---:|"
for t in "${WSTARGETS[@]}" "${WSH2TARGETS[@]}"; do
    base=direct
    [[ $t != h2-* ]] || base=h2-direct
    added=$(awk -v a="${WSP50[$t]}" -v b="${WSP50[$base]}" 'BEGIN {printf "%.0f", a - b}')
    echo "| $t | ${WSP50[$t]} | ${WSP99[$t]} | $added | ${WSLOAD[$t]} |"
done
echo
echo "machine: $(nproc) cores, $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME");" \
    "load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
echo "raw output: $OUT"
