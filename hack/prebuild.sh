#!/usr/bin/env bash
# Start the e2e tiers' builds in the background, so that they overlap with what does not need them
# (the venv, lint, the unit and integration tests) and with each other where they do not compete for
# CPU. `make test` and `make e2e` call `start` first; the tests need no change: each fixture runs the
# same build command, which takes the same lock (hack/lib.sh with_lock), waits for the background build
# and then finds its binaries cached. A background build that failed is shown (its log's tail) by the
# build that waits for it, which then tries once more itself, so the failure surfaces in the tier
# that needs it.
#
#   hack/prebuild.sh start    start two background chains (returns at once; a no-op when all is cached)
#       go:     control plane -> Karpenter -> Kueue -> the node's Go binaries (one Go build at a time:
#               they share the module and build caches and each uses both cores)
#       images: Debian packages -> debootstrap stand-in base -> pause, operator and worker images
#               (mostly downloads and file writes; the real node only, as root)
#   hack/prebuild.sh wait     wait for both chains; fails if a step failed
#   hack/prebuild.sh status   what ran, how long, what failed
#
# Logs: ${PBT_CACHE_DIR:-~/.cache/pbt-operator}/prebuild/<step>.log, outcome in <step>.{ok,failed}.
# PBT_E2E=0 or PBT_PREBUILD=0: nothing is started.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=prebuild
# shellcheck source=hack/lib.sh
source "$HERE/lib.sh"

off() { [[ "${1:-}" =~ ^(0|false|no|off)$ ]]; }

step() { # name command...: one step of a chain, its output in $PREBUILD_DIR/name.log
  local name="$1" t0=$SECONDS rc=0; shift
  mkdir -p "$PREBUILD_DIR"
  rm -f "$PREBUILD_DIR/$name.ok" "$PREBUILD_DIR/$name.failed"
  echo "$(date -u +%FT%TZ) start" >"$PREBUILD_DIR/$name.time"
  # bash's `time`: the step's CPU (its children's, as they are waited for) next to its wall time
  local TIMEFORMAT="$name: wall %R s, cpu user %U s sys %S s"
  { time "$@" >"$PREBUILD_DIR/$name.log" 2>&1 </dev/null || rc=$?; } 2>>"$PREBUILD_DIR/$name.time"
  if ((rc == 0)); then
    echo "$((SECONDS - t0))s" >"$PREBUILD_DIR/$name.ok"
  else
    echo "rc $rc after $((SECONDS - t0))s at $(date -u +%H:%M:%S)" >"$PREBUILD_DIR/$name.failed"
  fi
  echo "$(date -u +%FT%TZ) end rc=$rc $((SECONDS - t0))s" >>"$PREBUILD_DIR/$name.time"
}

chain_go() {
  step control-plane bash "$HERE/testcluster.sh" build
  # step names are the build locks' names (hack/lib.sh with_lock), so a waiting build finds their logs
  step karpenter bash "$HERE/addons.sh" build karpenter
  step kueue bash "$HERE/addons.sh" build kueue
  if [[ "$(id -u)" == 0 ]]; then step node bash "$HERE/realnode.sh" build; fi
}

chain_images() {
  step images bash "$HERE/realnode.sh" images
}

# containerd's root under the cache should hold the current images only (about 2 GiB; realnode.sh
# prunes older ones at every `up`). Before that pruning existed it grew by an image set per source
# version, until the disk filled while pip installed torch. It is a cache of what `up` imports again from
# the image tarballs, so when it is oversized and no containerd runs on the machine, it is dropped here,
# before the venv needs the space.
trim_node_cache() {
  local root="$CACHE_ROOT/node/containerd-root" limit_gib="${PBT_CONTAINERD_CACHE_GIB:-8}" kib
  [[ -d "$root" ]] || return 0
  pgrep -x containerd >/dev/null && return 0
  kib="$(du -sk "$root" 2>/dev/null | cut -f1)"
  if ((${kib:-0} > limit_gib * 1024 * 1024)); then
    log "containerd's image cache holds $((kib / 1024 / 1024)) GiB (more than $limit_gib GiB): removing $root"
    rm -rf "$root"
  fi
}

cmd_start() {
  if off "${PBT_E2E:-}" || off "${PBT_PREBUILD:-}"; then return 0; fi
  mkdir -p "$PREBUILD_DIR"
  trim_node_cache
  # a full disk fails far from its cause (pip, a Go link, containerd): say how much there is up front
  log "free disk: $(df -Ph "$CACHE_ROOT" | awk 'NR == 2 {print $4 " under " $6}') (the cache), $(df -Ph . | awk 'NR == 2 {print $4 " under " $6}') (this checkout); a cold \`make test\` needs about 25 GiB"
  local running=0 _ pid
  if [[ -f "$PREBUILD_DIR/pids" ]]; then
    while read -r _ pid; do kill -0 "$pid" 2>/dev/null && running=1; done <"$PREBUILD_DIR/pids"
  fi
  if ((running)); then log "background builds already run (status: $0 status)"; return 0; fi
  : >"$PREBUILD_DIR/pids"
  # each chain in its own session, so that it outlives make's shell and is not hit by its signals
  setsid bash "$0" chain go </dev/null >"$PREBUILD_DIR/chain-go.log" 2>&1 &
  echo "go $!" >>"$PREBUILD_DIR/pids"
  if [[ "$(id -u)" == 0 ]]; then
    setsid bash "$0" chain images </dev/null >"$PREBUILD_DIR/chain-images.log" 2>&1 &
    echo "images $!" >>"$PREBUILD_DIR/pids"
  fi
  log "background builds started (logs in $PREBUILD_DIR; the tests wait for what they need)"
}

cmd_wait() {
  local _ pid failed=0 f
  [[ -f "$PREBUILD_DIR/pids" ]] || return 0
  while read -r _ pid; do
    while kill -0 "$pid" 2>/dev/null; do sleep 2; done
  done <"$PREBUILD_DIR/pids"
  for f in "$PREBUILD_DIR"/*.failed; do
    [[ -f "$f" ]] || continue
    failed=1
    log "$(basename "$f" .failed) failed ($(cat "$f")); log: ${f%.failed}.log"
  done
  return "$failed"
}

cmd_status() {
  local f n
  for f in "$PREBUILD_DIR"/*.time; do
    [[ -f "$f" ]] || continue
    n="$(basename "$f" .time)"
    if [[ -f "$PREBUILD_DIR/$n.ok" ]]; then echo "$n: ok in $(cat "$PREBUILD_DIR/$n.ok")"
    elif [[ -f "$PREBUILD_DIR/$n.failed" ]]; then echo "$n: FAILED ($(cat "$PREBUILD_DIR/$n.failed")), log $PREBUILD_DIR/$n.log"
    else echo "$n: running since $(head -1 "$f" | cut -d' ' -f1)"; fi
  done
}

case "${1:-}" in
  start) cmd_start ;;
  wait) cmd_wait ;;
  status) cmd_status ;;
  chain) "chain_$2" ;;
  *) echo "usage: $0 start|wait|status" >&2; exit 2 ;;
esac
