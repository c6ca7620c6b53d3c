#!/usr/bin/env bash
# A real, local Kubernetes control plane for the e2e tests: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler built from their Go modules and run as plain
# processes on 127.0.0.1 (no Docker, no kubelet; hack/nodeagent.py plays the node).
#
#   hack/testcluster.sh build   build (once per machine) and cache the binaries
#   hack/testcluster.sh up      start the control plane, wait until healthy, write a kubeconfig
#   hack/testcluster.sh up --real-node   the same plus a real node (hack/realnode.sh: kubelet, containerd)
#   hack/testcluster.sh env     print `export KUBECONFIG=...` and friends (eval "$(... env)")
#   hack/testcluster.sh down    stop everything `up` started
#   hack/testcluster.sh status  show what runs
#   hack/testcluster.sh clean-build   drop the Go module/build caches (keeps the binaries)
#
# PBT_ADDONS=karpenter,kueue makes `up` also start those (hack/addons.sh); `down` stops them.
#
# Everything is cached under ${PBT_CACHE_DIR:-~/.cache/pbt-operator}/<kubernetes version>/bin;
# the state of a running cluster lives in ${PBT_CLUSTER_DIR:-<cache>/cluster}.
# See docs/testcluster.md.
set -euo pipefail

# ---- pinned versions -------------------------------------------------------------------------------
# (the Kubernetes version, PBT_K8S_VERSION, is pinned in hack/lib.sh: the real node's kubelet shares it)
ETCD_VERSION="${PBT_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${PBT_HELM_VERSION:-v3.22.0}"

LOG_TAG=testcluster
# shellcheck source=hack/lib.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
BIN_DIR="$K8S_BIN"
# The API server's address: loopback, or the real node's bridge address (hack/realnode.sh) so pods reach it.
API_ADDRESS="${PBT_APISERVER_ADDRESS:-127.0.0.1}"

# ---- build -----------------------------------------------------------------------------------------
CONTROL_PLANE=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

build_simple() { # name module version package ldflags
  local name="$1" module="$2" version="$3" pkg="$4" ldflags="$5"
  stamp_ok "$BIN_DIR" "$name" "$version" && return 0
  local dir="$BUILD_ROOT/$name-$version"
  log "building $name $version in $dir"
  new_build_module "$dir" "$module" "$version"
  go_build "$dir" "$BIN_DIR/$name" "$pkg" -ldflags "-s -w $ldflags"
  write_stamp "$BIN_DIR" "$name" "$version"
}

all_built() {
  local n
  for n in "${CONTROL_PLANE[@]}"; do stamp_ok "$BIN_DIR" "$n" "$K8S_VERSION" || return 1; done
  stamp_ok "$BIN_DIR" etcd "$ETCD_VERSION" && stamp_ok "$BIN_DIR" helm "$HELM_VERSION"
}

build_all() {
  all_built && return 0
  go_env
  local t0=$SECONDS
  build_simple etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 ""
  build_simple helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  log "building kubernetes $K8S_VERSION (${CONTROL_PLANE[*]})"
  build_k8s_binaries "${CONTROL_PLANE[@]}"
  all_built || die "build incomplete"
  log "built everything in $((SECONDS - t0))s into $BIN_DIR ($(du -sh "$BIN_DIR" | cut -f1))"
}

cmd_build() {
  if all_built; then
    log "binaries cached in $BIN_DIR"
    return 0
  fi
  with_lock control-plane build_all
}

cmd_clean_build() {
  if [[ -d "$BUILD_ROOT" ]]; then
    chmod -R u+w "$BUILD_ROOT" 2>/dev/null || true
    rm -rf "$BUILD_ROOT"
  fi
  log "removed $BUILD_ROOT (binaries in $BIN_DIR kept)"
}

# ---- run -------------------------------------------------------------------------------------------
gen_certs() {
  local d="$CLUSTER_DIR/pki"
  mkdir -p "$d"
  [[ -f "$d/sa.pub" ]] && return 0
  (
    set -e
    cd "$d"
    exec >openssl.log 2>&1
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=pbt-testcluster-ca"
    local san="IP:127.0.0.1,IP:$API_ADDRESS,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default"
    san+=",DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
      "$san" >server.ext
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >client.ext
    local name subj ext
    while read -r name subj ext; do
      openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj"
      openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" \
        -days 3650 -extfile "$ext"
    done <<'LIST'
apiserver /CN=kube-apiserver server.ext
admin /O=system:masters/CN=pbt-admin client.ext
controller-manager /CN=system:kube-controller-manager client.ext
scheduler /CN=system:kube-scheduler client.ext
LIST
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    rm -f ./*.csr
  ) || die "certificate generation failed (see $d/openssl.log)"
}

write_kubeconfig() { # file user port
  local pki="$CLUSTER_DIR/pki"
  printf '%s\n' \
    "apiVersion: v1" \
    "kind: Config" \
    "clusters:" \
    "- name: pbt-testcluster" \
    "  cluster:" \
    "    server: https://$API_ADDRESS:$3" \
    "    certificate-authority: $pki/ca.crt" \
    "users:" \
    "- name: $2" \
    "  user:" \
    "    client-certificate: $pki/$2.crt" \
    "    client-key: $pki/$2.key" \
    "contexts:" \
    "- name: pbt-testcluster" \
    "  context: {cluster: pbt-testcluster, user: $2, namespace: default}" \
    "current-context: pbt-testcluster" >"$1"
}

start_proc() { # name args... ; runs in its own session, pid in $CLUSTER_DIR/pids/name
  local name="$1"; shift
  mkdir -p "$CLUSTER_DIR/pids" "$CLUSTER_DIR/logs"
  setsid "$@" >"$CLUSTER_DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$CLUSTER_DIR/pids/$name"
}

proc_alive() { local f="$CLUSTER_DIR/pids/$1"; [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

wait_healthy() { # name url expected-body-regex [curl args...]
  local name="$1" url="$2" want="$3"; shift 3
  local deadline=$((SECONDS + ${PBT_CLUSTER_START_TIMEOUT:-90}))
  while ((SECONDS < deadline)); do
    if ! proc_alive "$name"; then
      tail -n 30 "$CLUSTER_DIR/logs/$name.log" >&2
      log "$name exited"
      return 1
    fi
    if [[ "$(curl -s --max-time 2 "$@" "$url" 2>/dev/null)" =~ $want ]]; then return 0; fi
    sleep 0.3
  done
  tail -n 30 "$CLUSTER_DIR/logs/$name.log" >&2
  log "$name did not become healthy at $url"
  return 1
}

cluster_running() {
  [[ -f "$CLUSTER_DIR/env" ]] && proc_alive etcd && proc_alive kube-apiserver \
    && proc_alive kube-controller-manager && proc_alive kube-scheduler
}

start_cluster() {
  local etcd_port etcd_peer api_port kcm_port sched_port pki="$CLUSTER_DIR/pki"
  read -r etcd_port etcd_peer api_port kcm_port sched_port <<<"$(pick_ports 5)"
  rm -rf "$CLUSTER_DIR/etcd" "$CLUSTER_DIR/pids" "$CLUSTER_DIR/logs" "$CLUSTER_DIR/env"
  mkdir -p -m 700 "$CLUSTER_DIR/etcd"
  mkdir -p "$CLUSTER_DIR/certs"
  gen_certs
  write_kubeconfig "$CLUSTER_DIR/admin.kubeconfig" admin "$api_port"
  write_kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" controller-manager "$api_port"
  write_kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" scheduler "$api_port"
  local tol="${PBT_TOLERATION_SECONDS:-10}" v="${PBT_CLUSTER_VERBOSITY:-1}"

  start_proc etcd "$BIN_DIR/etcd" --name pbt --data-dir "$CLUSTER_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "pbt=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
  wait_healthy etcd "http://127.0.0.1:$etcd_port/health" '"health": ?"true"' || return 1

  start_proc kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$API_ADDRESS" --advertise-address "$API_ADDRESS" --secure-port "$api_port" \
    --cert-dir "$CLUSTER_DIR/certs" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --default-not-ready-toleration-seconds "$tol" --default-unreachable-toleration-seconds "$tol" \
    --allow-privileged=true --profiling=false --v="$v" ${PBT_APISERVER_FLAGS:-}
  wait_healthy kube-apiserver "https://$API_ADDRESS:$api_port/readyz" '^ok$' \
    --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" || return 1

  start_proc kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$CLUSTER_DIR/certs" \
    --leader-elect=false --controllers '*' --use-service-account-credentials \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --node-monitor-period 2s --node-monitor-grace-period "${PBT_NODE_GRACE:-20s}" \
    --profiling=false --v="$v" ${PBT_KCM_FLAGS:-}
  start_proc kube-scheduler "$BIN_DIR/kube-scheduler" \
    --kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --cert-dir "$CLUSTER_DIR/certs" \
    --leader-elect=false --profiling=false --v="$v"
  wait_healthy kube-controller-manager "https://127.0.0.1:$kcm_port/healthz" '^ok$' -k || return 1
  wait_healthy kube-scheduler "https://127.0.0.1:$sched_port/healthz" '^ok$' -k || return 1

  # the default service account appears once the controller manager runs: pods need it
  local deadline=$((SECONDS + 60))
  until "$BIN_DIR/kubectl" --kubeconfig "$CLUSTER_DIR/admin.kubeconfig" -n default get serviceaccount default \
      >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "no default service account after 60s"; return 1; fi
    sleep 0.3
  done

  printf '%s\n' \
    "export KUBECONFIG=$CLUSTER_DIR/admin.kubeconfig" \
    "export PBT_TESTCLUSTER_DIR=$CLUSTER_DIR" \
    "export PBT_TESTCLUSTER_BIN=$BIN_DIR" \
    "export PBT_APISERVER=https://$API_ADDRESS:$api_port" \
    "export PBT_K8S_VERSION=$K8S_VERSION" \
    "export PATH=$BIN_DIR:\$PATH" >"$CLUSTER_DIR/env"
}

start_watchdog() {
  # Tear the cluster down when the owning process (e.g. pytest) goes away without calling `down`.
  local owner="${PBT_CLUSTER_OWNER_PID:-}"
  [[ -n "$owner" ]] || return 0
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [[ -f "$2/env" ]]; do sleep 2; done
                  if [[ -f "$2/env" ]]; then PBT_CLUSTER_DIR="$2" exec "$3" down; fi' \
    watchdog "$owner" "$CLUSTER_DIR" "$(readlink -f "$0")" >/dev/null 2>&1 </dev/null &
  echo $! >"$CLUSTER_DIR/pids/watchdog"
}

cmd_up() {
  all_built || die "binaries are not built: run $0 build first (slow the first time, see docs/testcluster.md)"
  if cluster_running; then
    log "already running in $CLUSTER_DIR"
    return 0
  fi
  local attempt t0=$SECONDS
  for attempt in 1 2 3; do
    if start_cluster && start_addons; then
      start_watchdog
      log "cluster up in $((SECONDS - t0))s at $(sed -n 's/^export PBT_APISERVER=//p' "$CLUSTER_DIR/env"), state in $CLUSTER_DIR"
      return 0
    fi
    log "start attempt $attempt failed; retrying on other ports"
    stop_all
  done
  die "could not start the cluster (logs in $CLUSTER_DIR/logs)"
}

# optional components (PBT_ADDONS=karpenter,kueue): hack/addons.sh
start_addons() { [[ -z "${PBT_ADDONS:-}" ]] || PBT_CLUSTER_DIR="$CLUSTER_DIR" bash "$(dirname "$(readlink -f "$0")")/addons.sh" up ${PBT_ADDONS//,/ }; }

stop_all() {
  local name pid pids=() deadline
  PBT_CLUSTER_DIR="$CLUSTER_DIR" bash "$(dirname "$(readlink -f "$0")")/addons.sh" down || true
  rm -f "$CLUSTER_DIR/env"
  for name in watchdog kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [[ -f "$CLUSTER_DIR/pids/$name" ]] || continue
    pid="$(cat "$CLUSTER_DIR/pids/$name")"
    rm -f "$CLUSTER_DIR/pids/$name"
    # the watchdog runs `down` itself (exec): do not kill ourselves
    [[ "$pid" == "$$" ]] && continue
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  deadline=$((SECONDS + 10))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

cmd_down() {
  # a real node (hack/realnode.sh) goes first: its kubelet and containers use the API server
  if [[ -d "$CLUSTER_DIR/node" ]]; then "$(dirname "$(readlink -f "$0")")/realnode.sh" node-down || true; fi
  stop_all
  rm -rf "$CLUSTER_DIR/etcd"
  log "stopped the cluster in $CLUSTER_DIR"
}

cmd_env() {
  [[ -f "$CLUSTER_DIR/env" ]] || die "no cluster running in $CLUSTER_DIR (run: $0 up)"
  cat "$CLUSTER_DIR/env"
}

cmd_status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler watchdog; do
    if proc_alive "$name"; then echo "$name: running (pid $(cat "$CLUSTER_DIR/pids/$name"))"
    else echo "$name: stopped"; fi
  done
  if all_built; then echo "binaries: $BIN_DIR"; else echo "binaries: not built"; fi
}

case "${1:-}" in
  build) cmd_build ;;
  up) if [[ "${2:-}" == "--real-node" ]]; then exec "$(dirname "$(readlink -f "$0")")/realnode.sh" up; fi
      cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  clean-build) cmd_clean_build ;;
  *) echo "usage: $0 build|up|down|env|status|clean-build" >&2; exit 2 ;;
esac
