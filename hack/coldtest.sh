#!/usr/bin/env bash
# Time `make test` (through .ci/run, as CI runs it) from a cold start: a fresh clone, and every cache
# the project fills (HOME, hence ~/.cache/pbt-operator; the Go module, build and path caches; pip's
# cache) replaced by empty directories, so every download and build happens again. Nothing the
# machine already has is removed: Debian packages, Go and python3 stay installed (apt is a no-op then).
#
# Usage: hack/coldtest.sh [WORKDIR] [GIT-SOURCE] [REF]
#   WORKDIR     scratch directory, emptied first (default /tmp/pbt-cold); needs about 20 GB free
#   GIT-SOURCE  repository to clone (default: this checkout)
#   REF         branch or commit (default: HEAD of GIT-SOURCE)
#
# Writes into WORKDIR: run.log (every line of .ci/run, time-stamped), monitor.log (load, disk, once a
# minute), times.txt (start, end, exit status, wall and CPU seconds), disk.txt (what each cache
# holds at the end) and prebuild/ (the background builds' logs and per-step times). The cold state
# stays in WORKDIR for inspection; remove it when done (it is about 20 GB).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/pbt-cold}
SRC=${2:-$here}
REF=${3:-}
case "$W" in /|/root|/home|"$HOME") echo "coldtest: refusing to empty $W" >&2; exit 2 ;; esac

rm -rf "$W"
mkdir -p "$W"/home "$W"/gomod "$W"/gocache "$W"/gopath "$W"/pip
[ -f "$HOME/.gitconfig" ] && cp "$HOME/.gitconfig" "$W/home/"
git clone -q "$SRC" "$W/repo"
cd "$W/repo" || exit 2
[ -n "$REF" ] && git checkout -q "$REF"
git log --oneline -1 > "$W/commit.txt"

export HOME=$W/home GOMODCACHE=$W/gomod GOCACHE=$W/gocache GOPATH=$W/gopath PIP_CACHE_DIR=$W/pip
unset PBT_CACHE_DIR XDG_CACHE_HOME PBT_CLUSTER_DIR PBT_NODE_CLUSTER_DIR
export PYTEST_ARGS="${PYTEST_ARGS:--v -p no:cacheprovider --durations=40}"

( while sleep 60; do
    echo "$(date -u +%T) $(uptime | sed 's/.*load/load/') | disk free $(df -h "$W" | awk 'NR==2{print $4}')"
  done ) > "$W/monitor.log" 2>&1 &
monitor=$!
trap 'kill $monitor 2>/dev/null' EXIT

echo "start $(date -u +%T)" > "$W/times.txt"
t0=$(date +%s)
# .ci/run's own output, each line stamped with the UTC time it appeared.
CI=true bash .ci/run 2>&1 | python3 -u -c '
import sys, time
for line in sys.stdin:
    print(time.strftime("%H:%M:%S", time.gmtime()), line, end="", flush=True)' > "$W/run.log"
rc=${PIPESTATUS[0]}
# CPU of every process .ci/run waited for (tests, builds, clusters it stopped), from the shell's
# accounting of its children: the user and system times of `times`' second line.
cpu=$(times | sed -n 2p)
echo "end $(date -u +%T) rc=$rc wall=$(( $(date +%s) - t0 ))s children_cpu(user sys)=$cpu" >> "$W/times.txt"

mkdir -p "$W/prebuild"
cp -r "$HOME/.cache/pbt-operator/prebuild/." "$W/prebuild/" 2>/dev/null
du -sh "$HOME"/.cache/pbt-operator/* "$W/gomod" "$W/gocache" "$W/pip" "$W/repo/.venv" > "$W/disk.txt" 2>&1
cat "$W/times.txt"
exit "$rc"
