#!/usr/bin/env bash
# How much memory one echoed message touches: instructions, and distinct cache lines and pages
# of code and data, per message handled by `shoal echo` (valgrind lackey traces every access).
#
# Why: in a 1000-agent round every agent process wakes once, and whatever it touches is cold
# (a thousand other processes ran since). Its cost is then mostly cache and TLB misses, so the
# number of distinct data lines per message predicts the agents' CPU far better than the
# instruction count, and, unlike timings on this machine, it is exact and repeatable.
#
#   scripts/echo-footprint.sh [--layout scripts/hot-text.ld] [--hybrid] [path/to/shoal]
#                                                  (default: target/release/shoal)
#
# --hybrid: the echo agent is a member of a team whose hub runs, and the messages are the
# requests of coordination rounds (`shoal gather`), fanned out by the hub; replies go back
# through it. Without it, plain requests straight to the agent.
#
# With --layout it also writes the linker script that places the functions one message runs
# side by side at the start of the executable's code (see build.rs); regenerate it when the
# hot path changes (functions renamed or added).
#
# Needs valgrind and python3, and the default non-PIE build: lines are sorted into stack,
# binary and heap by the addresses valgrind gives them there. Takes ~30 s. Prints one line per
# message (the last eight) and a breakdown of the data lines of one message by the function
# that first touched them.
set -euo pipefail
cd "$(dirname "$0")/.."
layout=""
if [ "${1:-}" = "--layout" ]; then
    layout="$(readlink -f "$2")"
    shift 2
fi
hybrid=""
if [ "${1:-}" = "--hybrid" ]; then
    hybrid=1
    shift
fi
bin="${1:-target/release/shoal}"
bin="$(readlink -f "$bin")"
work="$(mktemp -d /dev/shm/shoal-footprint.XXXXXX)"
trap 'rm -rf "$work"' EXIT
export SHOAL_ROOT="$work/root"
n=30
if [ -n "$hybrid" ]; then
    # Enough rounds for the receiver state to hold as many broadcast ids as it keeps.
    n=90
    # One team of two with its hub; the coordinator outside it.
    "$bin" topology plan --agents 2 --team-size 2 >/dev/null
    "$bin" init me >/dev/null
    ag=agent-0000
    "$bin" hub team-000 &
    others=$!
    "$bin" echo agent-0001 &
    others="$others $!"
    trap 'kill $others 2>/dev/null; rm -rf "$work"' EXIT
else
    "$bin" init me >/dev/null
    ag=ag
    "$bin" init "$ag" >/dev/null
fi
valgrind --tool=lackey --trace-mem=yes --log-file="$work/trace" "$bin" echo "$ag" --count "$n" &
echo_pid=$!
sleep 3
for _ in $(seq 1 "$n"); do
    if [ -n "$hybrid" ]; then
        "$bin" gather me ping '{"task":"ping"}' --timeout 30s >/dev/null
    else
        "$bin" request me "$ag" ping '{"task":"ping"}' --timeout 30s >/dev/null
    fi
done
wait "$echo_pid"
# A message's window starts where the receive starts.
entry="$(nm "$bin" | awk '/ t _ZN5shoal5store5jsonl4recv7receive17h/ && !f {print $1; f = 1}')"
[ -n "$entry" ] || { echo "no receive symbol in $bin (stripped?)" >&2; exit 1; }
python3 - "$bin" "$entry" "$work/trace" "$layout" <<'EOF'
import bisect, collections, fnmatch, re, subprocess, sys
binary, entry, trace, layout = sys.argv[1], int(sys.argv[2], 16), sys.argv[3], sys.argv[4]
def nm(*flags):
    out = subprocess.run(["nm", "-n", "-S", "--defined-only", *flags, binary],
                         capture_output=True, text=True).stdout.splitlines()
    return [l.split(" ", 3) for l in out]
# (address, size, mangled name, readable name) of every function; both listings in one order.
syms = [(int(m[0], 16), int(m[1], 16), m[3], d[3][:100])
        for m, d in zip(nm(), nm("-C")) if len(m) == 4 and m[2] in "tTwW"]
starts = [s[0] for s in syms]
def index(a):
    i = bisect.bisect_right(starts, a) - 1
    return i if i >= 0 and a < 0x2000000 else None
def function(a):
    i = index(a)
    return syms[i][3] if i is not None else "(shared libraries)"
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
            cur = {"n": 0, "code": set(), "data": {}, "order": {}}
        last = addr
        if cur is not None:
            cur["n"] += 1
            line_ = addr >> 6
            if line_ not in cur["code"]:
                cur["code"].add(line_)
                i = index(addr)
                if i is not None:
                    cur["order"].setdefault(i, len(cur["order"]))
    elif cur is not None:
        cur["data"].setdefault(addr >> 6, last)
windows = windows[5:]  # warm-up
if not windows:
    sys.exit("no messages traced")
print("per message: instructions, code lines, code pages, data lines, data pages")
for w in windows[-8:]:  # the last: the receiver state has grown to its steady size
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
if not layout:
    sys.exit(0)
# The functions of the binary that run in most messages, in the order they first run.
runs = collections.Counter(i for w in windows for i in w["order"])
hot = [i for i, k in runs.items() if 2 * k >= len(windows)]
hot.sort(key=lambda i: sorted(w["order"][i] for w in windows if i in w["order"])[runs[i] // 2])
# Patterns without the hashes that change from build to build: legacy names end in
# 17h<16 hex>E, v0 names carry the crate's hash as Cs<base62>_. A pattern that would also
# pull in other copies of a generic function (much more code than the hot copy) is left out.
def pattern(name):
    if name.startswith("_ZN"):
        return re.sub(r"17h[0-9a-f]{16}E$", "17h*", name)
    return re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", name)
size_of = collections.defaultdict(int)
pats = {i: pattern(syms[i][2]) for i in hot}
wanted = set(pats.values())
for s in syms:
    p = pattern(s[2])
    if p in wanted and fnmatch.fnmatchcase(s[2], p):
        size_of[p] += s[1]
lines, kept, seen = [], 0, set()
for i in hot:
    p = pats[i]
    if p in seen or size_of[p] > 2 * syms[i][1] + 1024:
        continue
    seen.add(p)
    kept += size_of[p]
    lines.append(f"    *(.text.{p})")
with open(layout, "w") as f:
    f.write("/* The functions one echoed message runs, in the order it runs them, side by side at\n"
            "   the start of the code: written by scripts/echo-footprint.sh --layout, used by\n"
            "   build.rs. */\n")
    f.write("SECTIONS\n{\n  .text.shoal_hot : {\n" + "\n".join(lines) + "\n  }\n}\nINSERT BEFORE .text;\n")
print(f"\n{layout}: {len(lines)} of {len(hot)} hot functions, {kept} bytes")
EOF
