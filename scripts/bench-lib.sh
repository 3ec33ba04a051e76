# Shared parts of the side-by-side benchmark scripts (bench-proxy.sh, bench-tls.sh,
# bench-protocols.sh, bench-cpu-ab.sh, bench-serial-path.sh): work dir and cleanup,
# waiting for a URL, wrk's latency units, a synwake daemon in front of synwake-fn, and the
# nginx configuration and start they use. Sourced, not run; BENCH names the script
# in messages.

# WORK (a temp dir), OUT (default WORK, kept), PIDS (killed on exit; WORK removed unless
# it is OUT).
bench_workdir() {
    WORK=$(mktemp -d "/tmp/synwake-$BENCH.XXXXXX")
    mkdir -p "$WORK/nginx"
    OUT=${OUT:-$WORK}
    mkdir -p "$OUT"
    PIDS=()
    trap bench_cleanup EXIT
}
bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "$OUT" = "$WORK" ] || rm -rf "$WORK"
}

wait_http() { # url [curl args]: up to 10 s for a 2xx
    local url=$1
    shift
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "$@" "$url" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$BENCH: $url did not answer" >&2
    exit 1
}

# wrk latency figures to microseconds: "85.00us", "1.20ms", "1.01s".
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
        else if (v ~ /s$/) print n * 1000000; else print n }'
}

# synwake in front of one function `bench` (synwake-fn, kept warm for an hour) on its own
# port, probe off: writes DIR/synwake.toml and starts the daemon in the background (its pid
# is the last in PIDS).
start_bench_synwake() { # binary, dir, shared port, api port, own port, synwake-fn binary
    mkdir -p "$2"
    cat >"$2/synwake.toml" <<CONF
[gateway]
listen = "127.0.0.1:$3"
api_listen = "127.0.0.1:$4"
state_dir = "$2/state"

[probe]
mode = "off"

[[function]]
name = "bench"
port = $5
command = ["$(realpath "$6")"]
idle_timeout = "1h"
CONF
    SYNWAKE_LOG=warn "$1" up --config "$2/synwake.toml" >"$2/synwake.log" 2>&1 &
    PIDS+=($!)
}

# nginx's plain reverse proxy with upstream keepalive, inside `http {`: upstream `fn` at
# 127.0.0.1:FN_PORT and a server on 127.0.0.1:LISTEN_PORT passing everything to it.
nginx_plain_proxy() { # fn port, listen port
    cat <<CONF
    upstream fn {
        server 127.0.0.1:$1;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://fn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
CONF
}

# The head of nginx.conf for an nginx run from $WORK/nginx, up to and inside `http {`:
# the caller writes the rest (extra http settings, upstreams, servers, the closing brace).
nginx_conf_head() {
    cat <<CONF
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
CONF
}

start_nginx() { # $WORK/nginx/nginx.conf, in the foreground of a background job
    nginx -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
}
