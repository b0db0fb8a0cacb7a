#!/usr/bin/env bash
# How much memory one echoed message touches: instructions, and distinct cache lines and pages
# of code and data, per message handled by `shoal echo` (valgrind lackey traces every access).
#
# Why: in a 1000-agent round every agent process wakes once, and whatever it touches is cold
# (a thousand other processes ran since). Its cost is then mostly cache and TLB misses, so the
# number of distinct data lines per message predicts the agents' CPU far better than the
# instruction count, and, unlike timings on this machine, it is exact and repeatable.
#
#   scripts/echo-footprint.sh [path/to/shoal]     (default: target/release/shoal)
#
# Needs valgrind and python3, and the default non-PIE build: lines are sorted into stack,
# binary and heap by the addresses valgrind gives them there. Takes ~30 s. Prints one line per message (after warm-up) and a
# breakdown of the data lines of one message by the function that first touched them.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/shoal}"
bin="$(readlink -f "$bin")"
work="$(mktemp -d /dev/shm/shoal-footprint.XXXXXX)"
trap 'rm -rf "$work"' EXIT
export SHOAL_ROOT="$work/root"
"$bin" init me >/dev/null
"$bin" init ag >/dev/null
n=30
valgrind --tool=lackey --trace-mem=yes --log-file="$work/trace" "$bin" echo ag --count "$n" &
echo_pid=$!
sleep 3
for _ in $(seq 1 "$n"); do
    "$bin" request me ag ping '{"task":"ping"}' --timeout 30s >/dev/null
done
wait "$echo_pid"
# A message's window starts where the receive starts.
entry="$(nm "$bin" | awk '/ t _ZN5shoal5store5jsonl4recv7receive17h/ && !f {print $1; f = 1}')"
[ -n "$entry" ] || { echo "no receive symbol in $bin (stripped?)" >&2; exit 1; }
python3 - "$bin" "$entry" "$work/trace" <<'EOF'
import bisect, collections, subprocess, sys
binary, entry, trace = sys.argv[1], int(sys.argv[2], 16), sys.argv[3]
syms = []
for l in subprocess.run(["nm", "-C", "--defined-only", binary], capture_output=True, text=True).stdout.splitlines():
    p = l.split(" ", 2)
    if len(p) == 3 and p[1] in "tTwW":
        syms.append((int(p[0], 16), p[2]))
syms.sort()
starts = [a for a, _ in syms]
def function(a):
    i = bisect.bisect_right(starts, a) - 1
    return syms[i][1][:100] if i >= 0 and a < 0x2000000 else "(shared libraries)"
windows, cur, last = [], None, 0
for line in open(trace):
    p = line.split()
    if len(p) < 2 or line.startswith("=="):
        continue
    kind, addr = p[0], int(p[1].split(",")[0], 16)
    if kind == "I":
        if addr == entry:
            if cur is not None:
                windows.append(cur)
            cur = {"n": 0, "code": set(), "data": {}}
        last = addr
        if cur is not None:
            cur["n"] += 1
            cur["code"].add(addr >> 6)
    elif cur is not None:
        cur["data"].setdefault(addr >> 6, last)
windows = windows[5:]  # warm-up
if not windows:
    sys.exit("no messages traced")
print("per message: instructions, code lines, code pages, data lines, data pages")
for w in windows[:8]:
    print(w["n"], len(w["code"]), len({l >> 6 for l in w["code"]}),
          len(w["data"]), len({l >> 6 for l in w["data"]}))
w = windows[len(windows) // 2]
by = collections.Counter()
for line, ip in w["data"].items():
    a = line << 6
    region = "stack" if 0x1f00000000 <= a < 0x2100000000 else ("binary" if a < 0x2000000 else "heap/mmap")
    by[(function(ip), region)] += 1
print("\ndata lines of one message, by the function that touched them first:")
for (f, region), k in by.most_common(25):
    print(f"{k:4} {region:9} {f}")
EOF
