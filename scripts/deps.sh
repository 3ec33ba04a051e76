#!/usr/bin/env bash
# Makes sure this machine has what synwake's build, tests and benchmarks need.
#
#   scripts/deps.sh            as root: install missing Debian packages, mount bpffs and tracefs;
#                              otherwise: report what is missing and how to fix it
#   scripts/deps.sh --check    change nothing; exit 1 if anything is missing
#
# Idempotent and quiet when everything is in place. Never runs `apt-get update` unless a
# package is actually missing. SYNWAKE_SKIP_DEPS=1 skips it (used by up.sh / test.sh).
set -euo pipefail

# Why each package is here:
#   clang llvm libbpf-dev bpftool linux-libc-dev   compile and inspect the eBPF probe
#   runc busybox-static                            oci runtime and its test images
#   iptables iproute2                              netns/veth fixtures, NFQUEUE delay line
#   nginx-light wrk                                reverse-proxy baseline and load generator
#   python3 curl                                   example functions, quickstart
#   build-essential pkg-config                     the linker cargo needs, native build deps
#   openssl                                        test certificates, s_client in the TLS tests
#   nghttp2-client                                 h2load: HTTP/2 and TLS load generator
#   nghttp2-server                                 nghttpd: fast h2c function in bench-protocols
#   python3-grpcio python3-websockets python3-h2   gRPC, WebSocket and HTTP/2 test clients
#   docker-registry skopeo buildah podman umoci    real registry and image tools for oci tests
#   python3-prometheus-client                      real OpenMetrics/text parsers for GET /metrics
#   tcpdump linux-perf                             bench-serial-path: loopback timestamps, syscall tracepoints
PACKAGES=(
    clang llvm libbpf-dev bpftool linux-libc-dev
    runc busybox-static
    iptables iproute2
    nginx-light wrk
    python3 curl
    build-essential pkg-config
    openssl nghttp2-client nghttp2-server
    python3-grpcio python3-websockets python3-h2
    docker-registry skopeo buildah podman umoci
    python3-prometheus-client
    tcpdump linux-perf
)

check_only=false
case "${1:-}" in
    --check) check_only=true ;;
    "") ;;
    -h | --help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "deps.sh: unknown argument '$1' (try --help)" >&2
        exit 2
        ;;
esac

if [[ "${SYNWAKE_SKIP_DEPS:-}" == 1 ]]; then
    echo "deps.sh: SYNWAKE_SKIP_DEPS=1, not checking dependencies"
    exit 0
fi

say() { echo "deps.sh: $*"; }
is_root() { [[ "$(id -u)" -eq 0 ]]; }

problems=0

# --- Debian packages -------------------------------------------------------------------
install_packages() {
    local missing=("$@")
    export DEBIAN_FRONTEND=noninteractive
    # Keep packages such as nginx from starting their daemon during installation: the
    # benchmark starts its own nginx with its own config. Only when no policy exists yet.
    local policy=/usr/sbin/policy-rc.d added_policy=false
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=true
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also when interrupted mid-install
    fi
    local rc=0
    say "installing: ${missing[*]}"
    apt-get update -qq || rc=$?
    if [[ $rc -eq 0 ]]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
    fi
    if $added_policy; then
        rm -f "$policy"
        trap - EXIT
    fi
    return $rc
}

if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${PACKAGES[@]}"; do
        # Same test as `dpkg -s`: the package is there only when fully installed.
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        if [[ "$status" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        :
    elif ! $check_only && is_root; then
        if ! install_packages "${missing[@]}"; then
            say "ERROR: apt-get could not install: ${missing[*]}"
            exit 1
        fi
    else
        say "missing Debian packages: ${missing[*]}"
        if is_root; then
            say "  install them with: apt-get install -y ${missing[*]}"
        else
            say "  install them with: sudo apt-get install -y ${missing[*]}"
            say "  (or run this script as root, which installs them)"
        fi
        problems=$((problems + 1))
    fi
else
    say "no dpkg here (not Debian?): install the equivalents of: ${PACKAGES[*]}"
    problems=$((problems + 1))
fi

# --- bpffs and tracefs -----------------------------------------------------------------
# Mounts filesystem type $1 at $2 (named $3 in messages) unless it is there already.
ensure_mount() {
    local type=$1 dir=$2 name=$3
    [[ -d $dir ]] && ! grep -qs " $dir $type " /proc/mounts || return 0
    if ! $check_only && is_root; then
        if mount -t "$type" "$type" "$dir"; then
            say "mounted $name at $dir"
        else
            say "WARNING: could not mount $name at $dir"
            problems=$((problems + 1))
        fi
    else
        say "$name is not mounted; as root: mount -t $type $type $dir"
        problems=$((problems + 1))
    fi
}
# The probe pins nothing by default, but bpftool and some tests expect bpffs; the kernel
# here does not mount it at boot.
ensure_mount bpf /sys/fs/bpf bpffs
# Tests that count cgroup migrations (crates/synwake-test-support/src/cgroup_trace.rs) use
# a private tracefs instance; a fresh machine here boots without tracefs mounted (an
# older kernel's tracefs under debugfs does as well).
if [[ ! -d /sys/kernel/debug/tracing/instances ]]; then
    ensure_mount tracefs /sys/kernel/tracing tracefs
fi

# --- Rust toolchain --------------------------------------------------------------------
# rustup installs into ~/.cargo/bin, which a non-login shell (CI, sudo) may not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    say "cargo is in $HOME/.cargo/bin but not on PATH; add it: export PATH=\"\$HOME/.cargo/bin:\$PATH\""
    problems=$((problems + 1))
elif ! command -v cargo >/dev/null 2>&1; then
    say "ERROR: no Rust toolchain (cargo not found). Install it with rustup:"
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
    say "  then: source \"\$HOME/.cargo/env\""
    # Nothing can be built without it, check-only or not.
    exit 1
fi

if [[ $problems -gt 0 ]]; then
    if $check_only; then
        exit 1
    fi
    if ! is_root; then
        say "continuing without root (the eBPF probe, network namespaces and runc need root)"
    fi
fi
exit 0
