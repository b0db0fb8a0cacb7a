#!/usr/bin/env bash
# Each loop runs in its own subshell with its own MESSAGE_BASE_DIR, on purpose.
# shellcheck disable=SC2030,SC2031,SC1091
# Benchmark of the message-bus.sh shim, side by side with the process-spawn floor and, when its
# path is given, the original bash message-bus.sh (not part of this repository).
#
#   benches/shim.sh [N] [path/to/original/message-bus.sh]
#
# Prints one JSON line per measurement. Targets (issue 3), on the reference machine kind:
#   - a loop of N `send` calls through the sourced shim runs at >= 2/3 of the speed of the same
#     loop calling /bin/true (process spawn is the floor);
#   - `receive` of a 100-message inbox takes < 5 ms.
# Loops are interleaved and repeated; medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000}"
ORIGINAL="${2:-}"
REPS=5

SHOAL_BIN="$(scripts/build-static.sh 2>/dev/null)"
export SHOAL_BIN
base="/dev/shm/shoal-bench-shim-$$"
trap 'rm -rf "$base" "$base-orig"' EXIT

ms_now() { echo "${EPOCHREALTIME/./}"; } # microseconds, no process spawned
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

loop_true() { for ((i = 0; i < N; i++)); do /bin/true >/dev/null 2>&1; done; }
loop_direct() { for ((i = 0; i < N; i++)); do "$SHOAL_BIN" --root "$base/direct" send a b t '{"n":1}' >/dev/null 2>&1; done; }
loop_sourced() {
    (
        export MESSAGE_BASE_DIR="$base/sourced"
        source scripts/message-bus.sh
        set +e
        for ((i = 0; i < N; i++)); do send_message a b t '{"n":1}' >/dev/null 2>&1; done
    )
}
loop_executed() { for ((i = 0; i < N; i++)); do MESSAGE_BASE_DIR="$base/executed" scripts/message-bus.sh send a b t '{"n":1}' >/dev/null 2>&1; done; }
loop_original() {
    (
        export MESSAGE_BASE_DIR="$base-orig"
        # shellcheck disable=SC1090
        source "$ORIGINAL"
        set +e
        for ((i = 0; i < N; i++)); do send_message a b t '{"n":1}' >/dev/null 2>&1; done
    )
}

setup() {
    rm -rf "$base" "$base-orig"
    for d in direct sourced executed; do
        MESSAGE_BASE_DIR="$base/$d" scripts/message-bus.sh init b >/dev/null 2>&1
        # Room for every iteration: the default quota is 100,000 messages.
    done
    if [ -n "$ORIGINAL" ]; then
        MESSAGE_BASE_DIR="$base-orig" bash "$ORIGINAL" init b >/dev/null 2>&1
    fi
}

declare -A times
kinds=(true direct sourced executed)
[ -n "$ORIGINAL" ] && kinds+=(original)
for ((r = 0; r < REPS; r++)); do
    setup
    for k in "${kinds[@]}"; do
        t0=$(ms_now)
        "loop_$k"
        t1=$(ms_now)
        times[$k]+="$((t1 - t0)) "
    done
done

true_us=$(echo "${times[true]}" | tr ' ' '\n' | grep . | median)
for k in "${kinds[@]}"; do
    us=$(echo "${times[$k]}" | tr ' ' '\n' | grep . | median)
    awk -v k="$k" -v n="$N" -v us="$us" -v t="$true_us" 'BEGIN {
        printf "{\"bench\":\"send_loop\",\"kind\":\"%s\",\"calls\":%d,\"calls_per_s\":%.0f,\"us_per_call\":%.0f,\"speed_vs_true\":%.3f}\n",
            k, n, n / (us / 1e6), us / n, t / us }'
done

# receive of a 100-message inbox, through the shim, and through the original.
recv_bench() {
    local kind="$1" dir="$2" cmd="$3"
    rm -rf "$dir"
    MESSAGE_BASE_DIR="$dir" $cmd init-system >/dev/null 2>&1
    MESSAGE_BASE_DIR="$dir" $cmd init b >/dev/null 2>&1
    for ((i = 0; i < 100; i++)); do MESSAGE_BASE_DIR="$dir" $cmd send a b t "{\"i\":$i}" >/dev/null 2>&1; done
    local samples=""
    for ((r = 0; r < 21; r++)); do
        t0=$(ms_now)
        MESSAGE_BASE_DIR="$dir" $cmd receive b >/dev/null 2>&1
        t1=$(ms_now)
        samples+="$((t1 - t0)) "
    done
    local us
    us=$(echo "$samples" | tr ' ' '\n' | grep . | median)
    local got
    got=$(MESSAGE_BASE_DIR="$dir" $cmd count b 2>/dev/null)
    echo "{\"bench\":\"receive_100\",\"kind\":\"$kind\",\"messages\":$got,\"ms\":$(awk -v u="$us" 'BEGIN{printf "%.2f", u/1000}'),\"target_ms\":5}"
}
recv_bench shim "$base/recv" scripts/message-bus.sh
if [ -n "$ORIGINAL" ]; then
    recv_bench original "$base-orig-recv" "bash $ORIGINAL"
    rm -rf "$base-orig-recv"
fi
