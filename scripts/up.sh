#!/usr/bin/env bash
# Builds synwake and runs it on the example config (or $SYNWAKE_CONFIG).
#
#   ./scripts/up.sh                   # gateway on :8080, API on 127.0.0.1:8081
#   ./scripts/up.sh --help            # extra arguments go to `synwake up`
#   SYNWAKE_CONFIG=my.toml ./scripts/up.sh
#
# Installs missing packages first when run as root (see scripts/deps.sh); without root
# synwake still runs, with the eBPF probe off.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# rustup's default location, for shells (sudo, CI) that did not source ~/.cargo/env.
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

scripts/deps.sh
cargo build --release -p synwake
exec "${CARGO_TARGET_DIR:-target}/release/synwake" up \
    --config "${SYNWAKE_CONFIG:-examples/synwake.toml}" "$@"
