#!/usr/bin/env bash
# Builds everything and runs synwake's whole test suite.
#
#   ./scripts/test.sh                          # all tests, two test threads
#   ./scripts/test.sh lifecycle                # cargo arguments: a test-name filter,
#   ./scripts/test.sh -p synwake-ebpf          #   a package, --release, ...
#   ./scripts/test.sh -- --nocapture           # after `--`: arguments for the test binaries
#
# Tests that build network namespaces, load BPF programs or run runc need root (CI runs
# this as root). Missing packages are installed first when run as root (scripts/deps.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

cargo_args=()
test_args=()
after_dashes=false
for arg in "$@"; do
    if ! $after_dashes && [[ "$arg" == "--" ]]; then
        after_dashes=true
    elif $after_dashes; then
        test_args+=("$arg")
    else
        cargo_args+=("$arg")
    fi
done

# A package chosen on the command line narrows the run; otherwise test the workspace.
scope=(--workspace)
for arg in "${cargo_args[@]}"; do
    case "$arg" in
        -p | -p* | --package | --package=*) scope=() ;;
    esac
done

# Two threads: the privileged tests start real processes, containers and namespaces, and
# these machines have two cores. An explicit --test-threads wins.
threads=(--test-threads=2)
for arg in "${test_args[@]}"; do
    case "$arg" in
        --test-threads | --test-threads=*) threads=() ;;
    esac
done

scripts/deps.sh

if [[ "$(id -u)" -ne 0 ]]; then
    echo "test.sh: not root: tests needing network namespaces, BPF or runc cannot do their real work"
fi

cargo build --workspace --all-targets
# Every test binary runs even after one fails, so a failed run shows all its failures.
cargo test --no-fail-fast "${scope[@]}" "${cargo_args[@]}" -- "${threads[@]}" "${test_args[@]}"
