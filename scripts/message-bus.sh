#!/bin/sh
# message-bus.sh: drop-in replacement for the bash message bus (message-bus.sh v1.0/v1.1),
# backed by shoal. Same commands, functions, arguments, stdout and exit statuses; messages are
# files in $MESSAGE_BASE_DIR/<id>/inbox/*.json in the same format. See docs/migrating.md.
#
# Executed:  scripts/message-bus.sh {init|send|receive|clear|count|cleanup|init-system|cleanup-system} [args]
# Sourced:   . scripts/message-bus.sh   (defines init_message_bus, send_message, receive_messages,
#            clear_inbox, message_count, cleanup_message_bus, init_message_bus_system,
#            cleanup_message_bus_system, log_info, log_error)
#
# The shoal binary is found through $SHOAL_BIN, then PATH, then this repository's release build.
# POSIX sh on purpose: executed, it starts under dash, which is faster than bash.

MESSAGE_BASE_DIR="${MESSAGE_BASE_DIR:-/dev/shm/cfn-mvp/messages}"
# shellcheck disable=SC2034 # read by scripts that source the bus, as with the original
MESSAGE_VERSION="1.0"

# Where this file is: BASH_SOURCE when sourced from bash, else $0.
# shellcheck disable=SC3028 # bash-only on purpose: unset under dash, where it falls back to $0
_mb_self="${BASH_SOURCE:-$0}"

log_info() {
    echo "[$(date '+%H:%M:%S')] [MESSAGE-BUS] $*" >&2
}

log_error() {
    echo "[$(date '+%H:%M:%S')] [MESSAGE-BUS] ERROR: $*" >&2
}

_mb_find_shoal() {
    if [ -n "${SHOAL_BIN:-}" ]; then
        _mb_shoal="$SHOAL_BIN"
    elif _mb_shoal="$(command -v shoal 2>/dev/null)" && [ -n "$_mb_shoal" ]; then
        :
    else
        # This repository's builds: the static one (scripts/build-static.sh) starts faster.
        _mb_repo="$(dirname -- "$_mb_self")/.."
        _mb_shoal="$_mb_repo/target/release/shoal"
        for _mb_static in "$_mb_repo"/target/*/release/shoal; do
            if [ -x "$_mb_static" ]; then
                _mb_shoal="$_mb_static"
                break
            fi
        done
    fi
    if [ ! -x "$_mb_shoal" ]; then
        log_error "shoal binary not found (set SHOAL_BIN, put shoal on PATH, or run: cargo build --release)"
        return 1
    fi
}

# Run shoal on the base directory: compat layout for a new base, bash-style logs.
_mb_shoal() {
    [ -n "${_mb_shoal:-}" ] || _mb_find_shoal || return 1
    SHOAL_BASH_LOGS=1 SHOAL_LAYOUT=compat "$_mb_shoal" --root "$MESSAGE_BASE_DIR" "$@"
}

init_message_bus() {
    _mb_shoal init -- "${1-}"
}

send_message() {
    _mb_shoal send -- "${1-}" "${2-}" "${3-}" "${4-}"
}

receive_messages() {
    _mb_shoal receive -- "${1-}"
}

clear_inbox() {
    _mb_shoal clear -- "${1-}"
}

message_count() {
    _mb_shoal count -- "${1-}" "${2:-inbox}"
}

cleanup_message_bus() {
    _mb_shoal cleanup -- "${1-}"
}

init_message_bus_system() {
    _mb_shoal init-system
}

cleanup_message_bus_system() {
    _mb_shoal cleanup-system
}

_mb_usage() {
    echo "Usage: $0 {init|send|receive|clear|count|cleanup|init-system|cleanup-system} [args]"
    echo ""
    echo "Commands:"
    echo "  init <agent-id>                     - Initialize message bus for agent"
    echo "  send <from> <to> <type> <payload>   - Send message between agents"
    echo "  receive <agent-id>                  - Receive messages (JSON array)"
    echo "  clear <agent-id>                    - Clear inbox after processing"
    echo "  count <agent-id> [inbox|outbox]     - Get message count"
    echo "  cleanup <agent-id>                  - Cleanup agent's message bus"
    echo "  init-system                         - Initialize message bus system"
    echo "  cleanup-system                      - Cleanup entire message bus"
}

if [ "$_mb_self" = "$0" ]; then
    # Executed. Each command replaces this shell with shoal (exec): one process, no fork.
    set -eu
    _mb_cmd="${1:-}"
    [ $# -gt 0 ] && shift
    case "$_mb_cmd" in
        init | send | receive | clear | count | cleanup | init-system | cleanup-system)
            _mb_find_shoal || exit 1
            export SHOAL_BASH_LOGS=1 SHOAL_LAYOUT=compat
            case "$_mb_cmd" in
                init) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" init -- "${1-}" ;;
                send) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" send -- "${1-}" "${2-}" "${3-}" "${4-}" ;;
                receive) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" receive -- "${1-}" ;;
                clear) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" clear -- "${1-}" ;;
                count) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" count -- "${1-}" "${2:-inbox}" ;;
                cleanup) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" cleanup -- "${1-}" ;;
                init-system) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" init-system ;;
                cleanup-system) exec "$_mb_shoal" --root "$MESSAGE_BASE_DIR" cleanup-system ;;
            esac
            ;;
        *)
            _mb_usage
            exit 1
            ;;
    esac
elif [ -n "${BASH_VERSION:-}" ]; then
    # Sourced from bash: the original set these options in the caller's shell; scripts written
    # against it run with them, so they are kept (see docs/migrating.md).
    # shellcheck disable=SC3040 # only reached under bash
    set -euo pipefail
fi
