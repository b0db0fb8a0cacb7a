#!/usr/bin/env bash
# Build a statically linked shoal for the host: it starts as fast as /bin/true, which matters
# when a shell script runs one shoal per message (the message-bus.sh shim, shell loops).
# Prints the binary's path. The shim finds it there (or set SHOAL_BIN, or copy it onto PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
host="$(rustc -vV | sed -n 's/^host: //p')"
# With an explicit --target, RUSTFLAGS apply to the binary only, not to proc-macros.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --release --locked --target "$host" --bin shoal >&2
echo "$PWD/target/$host/release/shoal"
