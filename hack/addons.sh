#!/usr/bin/env bash
# Optional components of the test cluster (hack/testcluster.sh): a real node autoscaler and a real
# job queue, built from their Go modules and run as plain processes on 127.0.0.1.
#
#   karpenter  Karpenter's core controller with its KWOK cloud provider (sigs.k8s.io/karpenter/kwok):
#              it creates Node objects for the NodeClaims it launches; hack/nodeagent.py --adopt-selector
#              turns them Ready after a simulated boot time and runs their pods.
#   kueue      Kueue's controller manager (sigs.k8s.io/kueue/cmd/kueue) with its webhooks served on
#              loopback with a certificate from the cluster's CA.
#
#   hack/addons.sh build [karpenter] [kueue]   build (once per machine) and cache the binaries + manifests
#   hack/addons.sh up karpenter|kueue ...       start them on the running cluster ($PBT_CLUSTER_DIR)
#   hack/addons.sh down                         stop every add-on of that cluster
#   hack/addons.sh status
#
# `hack/testcluster.sh up` starts the ones named in PBT_ADDONS (e.g. PBT_ADDONS=karpenter,kueue) and
# `down` stops them. The manifests the tests use live in examples/autoscaling/. See docs/testcluster.md.
set -euo pipefail

KARPENTER_VERSION="${PBT_KARPENTER_VERSION:-v1.15.0}"
KUEUE_VERSION="${PBT_KUEUE_VERSION:-v0.17.0}"

LOG_TAG=addons
# shellcheck source=hack/lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXAMPLES="$REPO/examples/autoscaling"

karpenter_dir() { echo "$CACHE_ROOT/karpenter-$KARPENTER_VERSION"; }
kueue_dir() { echo "$CACHE_ROOT/kueue-$KUEUE_VERSION"; }

# ---- build -----------------------------------------------------------------------------------------
# hack/lib.sh's Go environment with GOTOOLCHAIN=auto: a module that needs a newer Go than the local one
# (Karpenter v1.15 wants 1.26.9) gets that toolchain from the Go module proxy, cached in the module cache.

built() { # dir version
  [[ -f "$1/.version" && "$(cat "$1/.version")" == "$2" ]]
}

build_karpenter() {
  local out; out="$(karpenter_dir)"
  built "$out" "$KARPENTER_VERSION" && return 0
  local dir="$BUILD_ROOT/karpenter-$KARPENTER_VERSION" src t0=$SECONDS
  log "building karpenter $KARPENTER_VERSION (kwok provider) in $dir"
  new_build_module "$dir" sigs.k8s.io/karpenter "$KARPENTER_VERSION"
  mkdir -p "$out/bin" "$out/crds"
  go_build "$dir" "$out/bin/karpenter-kwok" sigs.k8s.io/karpenter/kwok \
    -ldflags "-s -w -X sigs.k8s.io/karpenter/pkg/operator.Version=$KARPENTER_VERSION"
  src="$(module_download sigs.k8s.io/karpenter "$KARPENTER_VERSION" Dir)"
  cp "$src"/kwok/charts/crds/*.yaml "$src"/kwok/apis/crds/*.yaml "$out/crds/"
  chmod -R u+w "$out/crds"
  echo "$KARPENTER_VERSION" >"$out/.version"
  log "karpenter built in $((SECONDS - t0))s ($(du -sh "$out" | cut -f1))"
}

build_kueue() {
  local out; out="$(kueue_dir)"
  built "$out" "$KUEUE_VERSION" && return 0
  local dir="$BUILD_ROOT/kueue-$KUEUE_VERSION" src t0=$SECONDS
  log "building kueue $KUEUE_VERSION in $dir"
  new_build_module "$dir" sigs.k8s.io/kueue "$KUEUE_VERSION"
  src="$(module_download sigs.k8s.io/kueue "$KUEUE_VERSION" Dir)"
  # With its internal certificate management off, Kueue reads its metrics certificate from a fixed
  # /etc path. The build module's main package is Kueue's cmd/kueue/main.go with that one path read
  # from KUEUE_METRICS_CERT_DIR instead (the module itself untouched), so nothing goes under /etc.
  grep -q '"/etc/kueue/metrics/certs"' "$src/cmd/kueue/main.go" \
    || die "kueue $KUEUE_VERSION: cmd/kueue/main.go no longer has the fixed metrics cert path; update hack/addons.sh"
  sed 's|"/etc/kueue/metrics/certs"|os.Getenv("KUEUE_METRICS_CERT_DIR")|' "$src/cmd/kueue/main.go" >"$dir/main.go"
  mkdir -p "$out/bin" "$out/crds" "$out/webhook"
  go_build "$dir" "$out/bin/kueue" . -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
  cp "$src"/config/components/crd/bases/*.yaml "$out/crds/"
  cp "$src"/config/components/webhook/manifests.yaml "$out/webhook/"
  chmod -R u+w "$out/crds" "$out/webhook"
  echo "$KUEUE_VERSION" >"$out/.version"
  log "kueue built in $((SECONDS - t0))s ($(du -sh "$out" | cut -f1))"
}

cmd_build() {
  local names=("$@") n
  ((${#names[@]})) || names=(karpenter kueue)
  for n in "${names[@]}"; do
    case "$n" in
      karpenter) built "$(karpenter_dir)" "$KARPENTER_VERSION" || { go_env auto; with_lock karpenter build_karpenter; } ;;
      kueue) built "$(kueue_dir)" "$KUEUE_VERSION" || { go_env auto; with_lock kueue build_kueue; } ;;
      *) die "unknown add-on $n (karpenter, kueue)" ;;
    esac
  done
}

# ---- run -------------------------------------------------------------------------------------------
cluster_env() {
  [[ -f "$CLUSTER_DIR/env" ]] || die "no cluster running in $CLUSTER_DIR (hack/testcluster.sh up)"
  # shellcheck disable=SC1091
  source "$CLUSTER_DIR/env"
  KUBECTL="$PBT_TESTCLUSTER_BIN/kubectl"
}

k() { "$KUBECTL" --kubeconfig "$KUBECONFIG" "$@"; }

start_proc() { # name args... (pid in $CLUSTER_DIR/pids/addon-<name>)
  local name="$1"; shift
  mkdir -p "$CLUSTER_DIR/pids" "$CLUSTER_DIR/logs"
  setsid "$@" >"$CLUSTER_DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$CLUSTER_DIR/pids/addon-$name"
}

proc_alive() { local f="$CLUSTER_DIR/pids/addon-$1"; [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

wait_url() { # name url regex [curl args]
  local name="$1" url="$2" want="$3"; shift 3
  local deadline=$((SECONDS + ${PBT_ADDON_START_TIMEOUT:-120}))
  while ((SECONDS < deadline)); do
    if ! proc_alive "$name"; then
      tail -n 30 "$CLUSTER_DIR/logs/$name.log" >&2
      die "$name exited"
    fi
    [[ "$(curl -s --max-time 2 "$@" "$url" 2>/dev/null)" =~ $want ]] && return 0
    sleep 0.5
  done
  tail -n 30 "$CLUSTER_DIR/logs/$name.log" >&2
  die "$name did not become ready at $url"
}

apply_crds() { # dir
  k apply --server-side --force-conflicts -f "$1" >/dev/null
  local f
  for f in "$1"/*.yaml; do
    k wait --for=condition=Established --timeout=60s -f "$f" >/dev/null
  done
}

up_karpenter() {
  local d; d="$(karpenter_dir)"
  built "$d" "$KARPENTER_VERSION" || die "karpenter is not built: hack/addons.sh build karpenter"
  proc_alive karpenter && { log "karpenter already runs"; return 0; }
  apply_crds "$d/crds"
  local metrics health
  read -r metrics health <<<"$(pick_ports 2)"
  # Karpenter binds its metrics and probe ports on every interface; only their numbers can be chosen.
  start_proc karpenter env KUBECONFIG="$KUBECONFIG" \
    DISABLE_LEADER_ELECTION=true METRICS_PORT="$metrics" HEALTH_PROBE_PORT="$health" \
    INSTANCE_TYPES_FILE_PATH="${PBT_KARPENTER_INSTANCE_TYPES:-$EXAMPLES/instance-types.json}" \
    BATCH_IDLE_DURATION="${PBT_KARPENTER_BATCH_IDLE:-1s}" BATCH_MAX_DURATION="${PBT_KARPENTER_BATCH_MAX:-5s}" \
    LOG_LEVEL="${PBT_KARPENTER_LOG_LEVEL:-info}" KUBE_CLIENT_QPS=50 KUBE_CLIENT_BURST=100 \
    "$d/bin/karpenter-kwok"
  wait_url karpenter "http://127.0.0.1:$health/readyz" '^ok$'
  if [[ "${PBT_KARPENTER_NODEPOOL:-}" != none ]]; then
    k apply -f "${PBT_KARPENTER_NODEPOOL:-$EXAMPLES/karpenter-nodepool.yaml}" >/dev/null
  fi
  echo "export PBT_KARPENTER_HEALTH=http://127.0.0.1:$health" >"$CLUSTER_DIR/addon-karpenter.env"
  log "karpenter $KARPENTER_VERSION up (log $CLUSTER_DIR/logs/karpenter.log)"
}

kueue_certs() { # -> $CLUSTER_DIR/kueue/certs/tls.{crt,key}: a serving certificate for 127.0.0.1
  local pki="$CLUSTER_DIR/pki" c="$CLUSTER_DIR/kueue/certs"
  mkdir -p "$c"
  [[ -f "$c/tls.crt" ]] && return 0
  (
    set -e
    cd "$c"
    exec >openssl.log 2>&1
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' >ext
    openssl req -new -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj /CN=kueue-webhook
    openssl x509 -req -in tls.csr -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -out tls.crt -days 3650 -extfile ext
    rm -f tls.csr
  ) || die "kueue certificate generation failed (see $c/openssl.log)"
}

up_kueue() {
  local d; d="$(kueue_dir)"
  built "$d" "$KUEUE_VERSION" || die "kueue is not built: hack/addons.sh build kueue"
  proc_alive kueue && { log "kueue already runs"; return 0; }
  kueue_certs
  local certs="$CLUSTER_DIR/kueue/certs" webhook health ca
  read -r webhook health <<<"$(pick_ports 2)"
  ca="$(base64 -w0 <"$CLUSTER_DIR/pki/ca.crt")"
  k create namespace kueue-system --dry-run=client -o yaml | k apply -f - >/dev/null
  apply_crds "$d/crds"
  # the multi-version CRDs convert through Kueue's /convert endpoint, as in Kueue's own install
  local crd
  for crd in localqueues clusterqueues cohorts workloads multikueueclusters; do
    k patch crd "$crd.kueue.x-k8s.io" --type merge -p "{\"spec\":{\"conversion\":{\"strategy\":\"Webhook\",\"webhook\":{\"conversionReviewVersions\":[\"v1\"],\"clientConfig\":{\"url\":\"https://127.0.0.1:$webhook/convert\",\"caBundle\":\"$ca\"}}}}}" >/dev/null
  done
  cat >"$CLUSTER_DIR/kueue/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:$health
metrics:
  bindAddress: "0"
webhook:
  host: 127.0.0.1
  port: $webhook
  certDir: $certs
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
featureGates:
  VisibilityOnDemand: false
integrations:
  frameworks:
  - batch/job
EOF
  start_proc kueue env KUBECONFIG="$KUBECONFIG" KUEUE_METRICS_CERT_DIR="$certs" \
    "$d/bin/kueue" --config "$CLUSTER_DIR/kueue/config.yaml" --zap-log-level="${PBT_KUEUE_LOG_LEVEL:-info}"
  wait_url kueue "http://127.0.0.1:$health/readyz" '^ok$'
  # Kueue's webhooks for batch/Job and its own kinds, pointed at the loopback server by URL
  k create --dry-run=client -o json -f "$d/webhook/manifests.yaml" | python3 -c '
import json, sys
base, ca = sys.argv[1], sys.argv[2]
text, dec, items, i = sys.stdin.read(), json.JSONDecoder(), [], 0
while text[i:].strip():  # kubectl prints one JSON object per document
    i += len(text[i:]) - len(text[i:].lstrip())
    doc, i = dec.raw_decode(text, i)
    items += doc["items"] if doc.get("kind") == "List" else [doc]
out = []
for cfg in items:
    hooks = []
    for h in cfg.get("webhooks") or []:
        path = h["clientConfig"]["service"]["path"]
        if "batch-v1-job" not in path and "kueue-x-k8s-io" not in path:
            continue
        h["clientConfig"] = {"url": base + path, "caBundle": ca}
        hooks.append(h)
    cfg["webhooks"] = hooks
    cfg["metadata"] = {"name": "pbt-testcluster-kueue-" + cfg["kind"].lower()}
    out.append(cfg)
json.dump({"apiVersion": "v1", "kind": "List", "items": out}, sys.stdout)
' "https://127.0.0.1:$webhook" "$ca" | k apply -f - >/dev/null
  echo "export PBT_KUEUE_HEALTH=http://127.0.0.1:$health" >"$CLUSTER_DIR/addon-kueue.env"
  log "kueue $KUEUE_VERSION up (log $CLUSTER_DIR/logs/kueue.log)"
}

cmd_up() {
  cluster_env
  local n
  for n in "$@"; do
    case "$n" in
      karpenter) cmd_build karpenter; up_karpenter ;;
      kueue) cmd_build kueue; up_kueue ;;
      "") ;;
      *) die "unknown add-on $n (karpenter, kueue)" ;;
    esac
  done
}

cmd_down() {
  local name pid f
  for name in karpenter kueue; do
    f="$CLUSTER_DIR/pids/addon-$name"
    [[ -f "$f" ]] || continue
    pid="$(cat "$f")"
    rm -f "$f" "$CLUSTER_DIR/addon-$name.env"
    if kill -TERM "$pid" 2>/dev/null; then
      local deadline=$((SECONDS + 10))
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

cmd_status() {
  local name
  for name in karpenter kueue; do
    if proc_alive "$name"; then echo "$name: running (pid $(cat "$CLUSTER_DIR/pids/addon-$name"))"
    else echo "$name: stopped"; fi
  done
  built "$(karpenter_dir)" "$KARPENTER_VERSION" && echo "karpenter binary: $(karpenter_dir)/bin" || echo "karpenter: not built"
  built "$(kueue_dir)" "$KUEUE_VERSION" && echo "kueue binary: $(kueue_dir)/bin" || echo "kueue: not built"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  build) cmd_build "$@" ;;
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 build [karpenter] [kueue] | up karpenter|kueue ... | down | status" >&2; exit 2 ;;
esac
