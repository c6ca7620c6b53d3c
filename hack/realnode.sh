#!/usr/bin/env bash
# A real node for the test cluster: containerd, runc, the CNI plugins, kube-proxy, the kubelet and a fake
# GPU device plugin, next to the control plane of hack/testcluster.sh. See docs/testcluster.md.
#
#   hack/realnode.sh build        build (once per machine, cached by version) containerd, ctr, crictl,
#                                 kubelet, kube-proxy; install runc, iptables, CNI plugins, buildah,
#                                 debootstrap from Debian
#   hack/realnode.sh images       build the stand-in base, the pause, operator and worker images
#                                 (cached by content) as OCI archives
#   hack/realnode.sh up           network + control plane (on the bridge address) + node; images imported
#   hack/realnode.sh down         remove everything `up` created (processes, mounts, devices, iptables
#                                 rules and chains, cgroups, state directories)
#   hack/realnode.sh status
#
# `hack/testcluster.sh up --real-node` is the same as `up` here.
#
# Constraints of the machines this runs on (and why the design looks the way it does):
# - cgroup v1 (hybrid): kubelet with failCgroupV1=false, the cgroupfs driver and its own cgroup root
#   /pbt-node (created in each v1 hierarchy, removed by `down`); the machine's cgroups are never remounted.
# - net.ipv4.ip_forward is 0 and global sysctls are not ours to change. Pods sit on a bridge we create
#   (pbt0, 10.88.0.1/24), and everything the tests need is local delivery to the bridge address: the API
#   server listens on it (the `kubernetes` Service is DNAT'd there by kube-proxy), the S3 server too. The
#   bridge plugin runs with isGateway=false (its gateway mode would switch ip_forward on); the bridge
#   address is set here. kube-proxy is told not to touch conntrack sysctls or route_localnet.
# - The kubelet writes six kernel tunables (vm.overcommit_memory, kernel.panic, ...) unless they already
#   hold its values, and refuses to start with protectKernelDefaults. containerd and the kubelet therefore
#   run in a private mount namespace in which those six /proc/sys files are covered by files with the
#   values it wants: it reads them, finds nothing to change and writes nothing. Every mount the node makes
#   (overlay root filesystems, secret volumes, network namespaces) lives and dies with that namespace.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
LOG_TAG=realnode
# shellcheck source=hack/lib.sh
source "$HERE/lib.sh" # caches, Go builds, locks; the Kubernetes version (the kubelet's is the API server's)

# ---- pinned versions -------------------------------------------------------------------------------
CONTAINERD_VERSION="${PBT_CONTAINERD_VERSION:-v2.4.2}"
CRICTL_VERSION="${PBT_CRICTL_VERSION:-v1.37.0}"
RUNC_VERSION="${PBT_RUNC_VERSION:-v1.5.3}"
# libseccomp-dev + pkg-config: runc is built with cgo and seccomp (RuntimeDefault profiles need it);
# buildah brings Debian's runc 1.1.5 along, which cannot start containerd 2.4's containers (see docs).
DEBIAN_PACKAGES=(containernetworking-plugins iptables buildah debootstrap libseccomp-dev pkg-config gcc)

NODE_BIN="$CACHE_ROOT/node/containerd-$CONTAINERD_VERSION/bin"
CRICTL_BIN="$CACHE_ROOT/node/crictl-$CRICTL_VERSION/bin"
RUNC_BIN="$CACHE_ROOT/node/runc-$RUNC_VERSION/bin"
IMAGE_CACHE="$CACHE_ROOT/node/images"
NODE_DIR="$CLUSTER_DIR/node"

BRIDGE="${PBT_NODE_BRIDGE:-pbt0}"
BRIDGE_IP="${PBT_NODE_BRIDGE_IP:-10.88.0.1}"
POD_CIDR="${PBT_NODE_POD_CIDR:-10.88.0.0/24}"
NODE_NAME="${PBT_NODE_NAME:-pbt-node}"
NODE_GPUS="${PBT_NODE_GPUS:-2}"
CGROUP_ROOT="/pbt-node"
CNI_BIN_DIR="${PBT_CNI_BIN_DIR:-/usr/lib/cni}"
PAUSE_IMAGE="localhost/pbt-pause:1"
DEVICE_PLUGIN_DIR=/var/lib/kubelet/device-plugins

# One real node per machine: the bridge, the cgroup root and the kubelet's iptables chains are
# machine-wide, whatever PBT_CACHE_DIR says, so the marker of the running node is too (/run: gone on reboot).
ACTIVE_FILE="${PBT_REALNODE_ACTIVE_FILE:-/run/pbt-operator-realnode.active}"

# ---- build -----------------------------------------------------------------------------------------
debian_ok() {
  local p
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
  done
}

apt_install() {
  debian_ok && return 0
  command -v apt-get >/dev/null || die "apt-get is needed to install ${DEBIAN_PACKAGES[*]}"
  local t0=$SECONDS
  log "installing Debian packages: ${DEBIAN_PACKAGES[*]}"
  # -o DPkg::Lock::Timeout: wait for another apt on the machine instead of failing
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${DEBIAN_PACKAGES[@]}" >/dev/null
  log "Debian packages installed in $((SECONDS - t0))s"
}

install_debian() { debian_ok || with_lock debian apt_install; } # the node build and the image build both need them

build_containerd() {
  local n all=1
  for n in containerd containerd-shim-runc-v2 ctr; do stamp_ok "$NODE_BIN" "$n" "$CONTAINERD_VERSION" || all=0; done
  ((all)) && return 0
  local dir="$BUILD_ROOT/containerd-$CONTAINERD_VERSION" mod=github.com/containerd/containerd/v2
  new_build_module "$dir" "$mod" "$CONTAINERD_VERSION"
  for n in containerd containerd-shim-runc-v2 ctr; do
    stamp_ok "$NODE_BIN" "$n" "$CONTAINERD_VERSION" && continue
    go_build "$dir" "$NODE_BIN/$n" "$mod/cmd/$n" -tags "no_btrfs no_devmapper no_zfs no_aufs" \
      -ldflags "-s -w -X $mod/version.Version=$CONTAINERD_VERSION"
    write_stamp "$NODE_BIN" "$n" "$CONTAINERD_VERSION"
  done
}

build_crictl() {
  stamp_ok "$CRICTL_BIN" crictl "$CRICTL_VERSION" && return 0
  local dir="$BUILD_ROOT/crictl-$CRICTL_VERSION"
  new_build_module "$dir" sigs.k8s.io/cri-tools "$CRICTL_VERSION"
  go_build "$dir" "$CRICTL_BIN/crictl" sigs.k8s.io/cri-tools/cmd/crictl -ldflags "-s -w"
  write_stamp "$CRICTL_BIN" crictl "$CRICTL_VERSION"
}

build_runc() {
  stamp_ok "$RUNC_BIN" runc "$RUNC_VERSION" && return 0
  local dir="$BUILD_ROOT/runc-$RUNC_VERSION"
  new_build_module "$dir" github.com/opencontainers/runc "$RUNC_VERSION"
  # cgo + libseccomp (Debian's libseccomp-dev): RuntimeDefault seccomp profiles need it
  CGO_ENABLED=1 go_build "$dir" "$RUNC_BIN/runc" github.com/opencontainers/runc -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}"
  write_stamp "$RUNC_BIN" runc "$RUNC_VERSION"
}

all_built() {
  local n
  debian_ok || return 1
  for n in containerd containerd-shim-runc-v2 ctr; do stamp_ok "$NODE_BIN" "$n" "$CONTAINERD_VERSION" || return 1; done
  stamp_ok "$CRICTL_BIN" crictl "$CRICTL_VERSION" || return 1
  stamp_ok "$RUNC_BIN" runc "$RUNC_VERSION" || return 1
  for n in kubelet kube-proxy; do stamp_ok "$K8S_BIN" "$n" "$K8S_VERSION" || return 1; done
}

build_node() {
  all_built && return 0
  local t0=$SECONDS
  install_debian
  go_env
  build_containerd
  build_runc
  # the kubelet and kube-proxy come from the control plane's k8s.io/kubernetes build module and caches
  build_k8s_binaries kubelet kube-proxy
  build_crictl
  all_built || die "node build incomplete"
  log "built the node in $((SECONDS - t0))s"
}

cmd_build() {
  if all_built; then log "node binaries cached ($NODE_BIN, $K8S_BIN)"; return 0; fi
  with_lock node build_node
}

# ---- images ----------------------------------------------------------------------------------------
# The base image of our Dockerfiles cannot be pulled here: a stand-in of the same Debian release with its
# python3 is built with debootstrap and tagged with the public name, so the Dockerfiles build unchanged.
BASE_IMAGE="${PBT_BASE_IMAGE:-docker.io/library/python:3.11.14-slim-bookworm}"
BASE_SUITE="bookworm"
BASE_PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
BASE_KEY="stand-in-1-$BASE_SUITE-$(echo "$BASE_PACKAGES" | md5sum | cut -c1-8)"
DEBIAN_MIRROR="${PBT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
OPERATOR_IMAGE_REPO="localhost/pbt-operator"
WORKER_IMAGE_REPO="localhost/pbt-quadratic-worker"
DIGITS_IMAGE_REPO="localhost/pbt-digits-worker"

# buildah's run root (its mount bookkeeping and locks) belongs to one `images` run: each run has its own
# private mount namespace, so a run root shared with another one (another PBT_CACHE_DIR, another
# checkout) would claim layers mounted that are not mounted here ("merged: no such file or directory").
BUILDAH_RUNROOT=""
bah() {
  [[ -n "$BUILDAH_RUNROOT" ]] || die "internal: buildah used outside \`images\`"
  nice -n "$BUILD_NICE" buildah --root "$CACHE_ROOT/node/buildah/storage" --runroot "$BUILDAH_RUNROOT" \
    --storage-driver overlay "$@"
}

image_present() { bah inspect --type image "$1" >/dev/null 2>&1; }

build_base() {
  image_present "$BASE_IMAGE" && [[ -f "$IMAGE_CACHE/.base.$BASE_KEY" ]] && return 0
  mkdir -p "$IMAGE_CACHE"
  local root="$CACHE_ROOT/node/debootstrap-$BASE_KEY" t0=$SECONDS ctr mnt
  if [[ ! -f "$root/.complete" ]]; then
    rm -rf "$root"
    log "debootstrap $BASE_SUITE ($BASE_PACKAGES) into $root (stand-in for $BASE_IMAGE)"
    nice -n "$BUILD_NICE" debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$root" "$DEBIAN_MIRROR" \
      >"$IMAGE_CACHE/debootstrap.log" 2>&1 || { tail -20 "$IMAGE_CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    # what a container image does not need: apt lists, docs, man pages
    # like the official python image: pip on PATH and no PEP 668 marker (a container is its own environment)
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/cache/apt/*.bin
    touch "$root/.complete"
  fi
  ctr="$(bah from scratch)"
  mnt="$(bah mount "$ctr")"
  tar -C "$root" --exclude ./.complete -cf - . | tar -C "$mnt" -xf -
  # The machine's CA bundle (it may hold a proxy's CA), so that pip inside builds trusts what the host trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/ca-certificates.crt"
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd python3 \
    --label "org.opencontainers.image.description=pbt-operator test stand-in for $BASE_IMAGE" "$ctr"
  bah commit -q --rm "$ctr" "$BASE_IMAGE" >/dev/null
  touch "$IMAGE_CACHE/.base.$BASE_KEY"
  log "stand-in base $BASE_IMAGE built in $((SECONDS - t0))s"
}

build_pause() { # the sandbox ("pause") image: a static binary that waits for a signal
  local tar="$IMAGE_CACHE/pause-1.tar"
  [[ -f "$tar" ]] && return 0
  local d ctr mnt
  d="$(mktemp -d)"
  printf '%s\n' '#include <signal.h>' '#include <unistd.h>' '#include <stdlib.h>' \
    'static void bye(int s) { (void)s; _exit(0); }' \
    'int main(void) { signal(SIGINT, bye); signal(SIGTERM, bye); for (;;) pause(); }' >"$d/pause.c"
  gcc -Os -static -o "$d/pause" "$d/pause.c" || die "gcc could not build the pause binary"
  ctr="$(bah from scratch)"
  mnt="$(bah mount "$ctr")"
  cp "$d/pause" "$mnt/pause"
  bah umount "$ctr" >/dev/null
  bah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  bah commit -q --rm "$ctr" "$PAUSE_IMAGE" >/dev/null
  rm -rf "$d"
  bah push -q "$PAUSE_IMAGE" "docker-archive:$tar.tmp:$PAUSE_IMAGE" && mv "$tar.tmp" "$tar"
}

src_key() { # files... -> content hash of the files (and everything under directories) given
  (cd "$REPO" && git ls-files -s -- "$@" 2>/dev/null; cd "$REPO" && git diff HEAD -- "$@" 2>/dev/null; \
   cd "$REPO" && git ls-files -o --exclude-standard -- "$@" | xargs -r cat) | sha256sum | cut -c1-12
}

build_image() { # dockerfile repo key -> prints the archive path
  local dockerfile="$1" repo="$2" key="$3" tar
  tar="$IMAGE_CACHE/$(basename "$repo")-$key.tar"
  if [[ ! -f "$tar" ]]; then
    local t0=$SECONDS
    log "building $repo:$key from $dockerfile"
    (cd "$REPO" && bah bud --pull=never --isolation chroot --network host --layers=false -q \
        -f "$dockerfile" -t "$repo:$key" . >"$IMAGE_CACHE/build-$(basename "$repo").log" 2>&1) \
      || { tail -30 "$IMAGE_CACHE/build-$(basename "$repo").log" >&2; die "building $repo from $dockerfile failed"; }
    bah push -q "$repo:$key" "docker-archive:$tar.tmp:$repo:$key" && mv "$tar.tmp" "$tar"
    find "$IMAGE_CACHE" -maxdepth 1 -name "$(basename "$repo")-*.tar" ! -name "$(basename "$tar")" -delete
    # keep only the archive: the next build of the same key is a cache hit on the file
    bah rmi -f "$repo:$key" >/dev/null 2>&1 || true
    log "built $repo:$key in $((SECONDS - t0))s ($(du -h "$tar" | cut -f1))"
  fi
  echo "$tar"
}

# The digits image's base (pytorch/pytorch:<torch>-cuda...-runtime) is stood in for by the python stand-in
# plus the same torch release from PyPI (the CUDA build: PyPI has no other); only with PBT_E2E_TORCH=1.
# The wheels (2.8 GB) are fetched once on the host with pip (which reuses the host's pip cache and
# PIP_FIND_LINKS if it holds them) into a directory cached by version, and the image build installs
# from that directory through a read-only bind mount, offline: no download per build, no wheel copies
# in a layer.
TORCH_BASE_IMAGE="docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
TORCH_VERSION="2.5.1"
TORCH_PYTHON="3.11" # bookworm's python3, the stand-in's
TORCH_WHEELS="$CACHE_ROOT/node/wheels/torch-$TORCH_VERSION-cp${TORCH_PYTHON/./}"

torch_wheels() {
  [[ -f "$TORCH_WHEELS/.complete" ]] && return 0
  local py t0=$SECONDS
  py="${PBT_PYTHON:-python3}"
  rm -rf "$TORCH_WHEELS.tmp"
  log "downloading torch $TORCH_VERSION and its dependencies (wheels for python $TORCH_PYTHON) into $TORCH_WHEELS"
  nice -n "$BUILD_NICE" "$py" -m pip download -q --only-binary=:all: --python-version "$TORCH_PYTHON" --implementation cp \
    --abi "cp${TORCH_PYTHON/./}" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$TORCH_WHEELS.tmp" "torch==$TORCH_VERSION" \
    || die "pip could not download torch $TORCH_VERSION"
  touch "$TORCH_WHEELS.tmp/.complete"
  rm -rf "$TORCH_WHEELS" && mv "$TORCH_WHEELS.tmp" "$TORCH_WHEELS"
  log "torch wheels in $((SECONDS - t0))s ($(du -sh "$TORCH_WHEELS" | cut -f1))"
}

build_torch_base() {
  image_present "$TORCH_BASE_IMAGE" && return 0
  torch_wheels
  local d t0=$SECONDS
  d="$(mktemp -d)"
  printf 'FROM %s\nRUN pip install --no-cache-dir --no-index --find-links /wheels "torch==%s"\n' \
    "$BASE_IMAGE" "$TORCH_VERSION" >"$d/Dockerfile"
  log "building the stand-in $TORCH_BASE_IMAGE (python stand-in + torch $TORCH_VERSION)"
  bah bud --pull=never --isolation chroot --network host --layers=false -q -v "$TORCH_WHEELS:/wheels:ro" \
    -f "$d/Dockerfile" -t "$TORCH_BASE_IMAGE" "$d" >"$IMAGE_CACHE/build-torch-base.log" 2>&1 \
    || { tail -30 "$IMAGE_CACHE/build-torch-base.log" >&2; die "building the torch stand-in failed"; }
  rm -rf "$d"
  log "torch stand-in built in $((SECONDS - t0))s"
}

cmd_images() {
  install_debian
  mkdir -p "$IMAGE_CACHE"
  # one image build at a time per cache (a second caller waits, then finds the cache warm)
  with_lock images build_images
}

build_images() {
  BUILDAH_RUNROOT="$(mktemp -d "${TMPDIR:-/tmp}/pbt-buildah-run.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$BUILDAH_RUNROOT'" EXIT
  build_base
  build_pause
  local src=(pyproject.toml README.md operator worker)
  local okey wkey
  okey="$(src_key Dockerfile "${src[@]}")"
  wkey="$(src_key examples/quadratic "${src[@]}")"
  build_image Dockerfile "$OPERATOR_IMAGE_REPO" "$okey" >/dev/null
  build_image examples/quadratic/Dockerfile "$WORKER_IMAGE_REPO" "$wkey" >/dev/null
  if [[ "${PBT_E2E_TORCH:-0}" == 1 ]]; then
    local dkey
    dkey="$(src_key examples/digits "${src[@]}")"
    if [[ ! -f "$IMAGE_CACHE/$(basename "$DIGITS_IMAGE_REPO")-$dkey.tar" ]]; then
      build_torch_base
      build_image examples/digits/Dockerfile "$DIGITS_IMAGE_REPO" "$dkey" >/dev/null
      # the stand-in torch base (5-6 GB) is only needed to build the archive: the cached wheels rebuild it
      bah rmi -f "$TORCH_BASE_IMAGE" >/dev/null 2>&1 || true
    fi
  fi
  printf '%s\n' "PBT_OPERATOR_IMAGE=$OPERATOR_IMAGE_REPO:$okey" "PBT_WORKER_IMAGE=$WORKER_IMAGE_REPO:$wkey" \
    >"$IMAGE_CACHE/current"
  if [[ "${PBT_E2E_TORCH:-0}" == 1 ]]; then
    echo "PBT_DIGITS_IMAGE=$DIGITS_IMAGE_REPO:$(src_key examples/digits "${src[@]}")" >>"$IMAGE_CACHE/current"
  fi
}

# ---- run -------------------------------------------------------------------------------------------
KUBELET_TUNABLES=("vm/overcommit_memory 1" "vm/panic_on_oom 0" "kernel/panic 10" "kernel/panic_on_oops 1"
                  "kernel/keys/root_maxkeys 1000000" "kernel/keys/root_maxbytes 25000000")

start_proc() { # name args... ; own session, pid in $NODE_DIR/pids/name
  local name="$1"; shift
  setsid "$@" >"$NODE_DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$NODE_DIR/pids/$name"
}

proc_alive() { local f="$NODE_DIR/pids/$1"; [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

record() { echo "$*" >>"$NODE_DIR/created"; } # what down must undo, one line each

wait_until() { # seconds description command...
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
    sleep 0.5
  done
}

net_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "network device $BRIDGE exists: another real node runs (hack/realnode.sh down, or PBT_NODE_BRIDGE)"
  ip link add "$BRIDGE" type bridge
  record "link $BRIDGE"
  ip addr add "$BRIDGE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

cgroups_up() {
  local h
  for h in /sys/fs/cgroup/*/; do
    h="${h%/}"
    [[ "$(stat -f -c %T "$h")" == cgroupfs ]] || continue # v1 hierarchies only (not the unified one)
    [[ -d "$h$CGROUP_ROOT" ]] || { mkdir "$h$CGROUP_ROOT"; record "cgroup $h$CGROUP_ROOT"; }
    if [[ -f "$h/cpuset.cpus" ]]; then
      cat "$h/cpuset.cpus" >"$h$CGROUP_ROOT/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h$CGROUP_ROOT/cpuset.mems"
    fi
  done
}

gen_node_certs() {
  local pki="$CLUSTER_DIR/pki" d="$NODE_DIR/pki" name subj
  mkdir -p "$d"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$d/client.ext"
  for name in kubelet kube-proxy; do
    subj="/O=system:nodes/CN=system:node:$NODE_NAME"
    [[ "$name" == kube-proxy ]] && subj="/CN=system:kube-proxy"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" -subj "$subj" 2>/dev/null
    openssl x509 -req -in "$d/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -out "$d/$name.crt" -days 365 -extfile "$d/client.ext" 2>/dev/null
    printf '%s\n' "apiVersion: v1" "kind: Config" "clusters:" "- name: pbt" "  cluster:" \
      "    server: $PBT_APISERVER" "    certificate-authority: $pki/ca.crt" "users:" "- name: $name" "  user:" \
      "    client-certificate: $d/$name.crt" "    client-key: $d/$name.key" "contexts:" \
      "- name: pbt" "  context: {cluster: pbt, user: $name}" "current-context: pbt" >"$NODE_DIR/$name.kubeconfig"
  done
}

write_configs() {
  local kport="$1" hport="$2" pport="$3" pmport="$4" sock="$NODE_DIR/containerd/containerd.sock"
  mkdir -p "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam" "$NODE_DIR/containerd" "$NODE_DIR/pod-logs" "$NODE_DIR/sysctl"
  cat >"$NODE_DIR/cni/net.d/10-pbt.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "pbt", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni/ipam",
            "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$BRIDGE_IP"}]],
            "routes": [{"dst": "0.0.0.0/0", "gw": "$BRIDGE_IP"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
  # containerd's root (content store and snapshots) is a cache kept between runs: imported images stay.
  cat >"$NODE_DIR/containerd.toml" <<EOF
version = 3
root = "$CACHE_ROOT/node/containerd-root"
state = "$NODE_DIR/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.blockfile",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
                    "io.containerd.nri.v1.nri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # this machine withholds CAP_SYS_RESOURCE: no oom_score_adj below containerd's own (the kubelet asks -998)
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$RUNC_BIN/runc"
        SystemdCgroup = false
        Root = "$NODE_DIR/containerd/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN_DIR"]
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $BRIDGE_IP
port: $kport
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $hport
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$sock
imageServiceEndpoint: unix://$sock
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
protectKernelDefaults: true
podLogsDir: $NODE_DIR/pod-logs
registerNode: true
maxPods: 64
podPidsLimit: 4096
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
evictionPressureTransitionPeriod: 10s
nodeStatusUpdateFrequency: 4s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 60s
resolvConf: /etc/resolv.conf
localStorageCapacityIsolation: true
shutdownGracePeriod: 0s
oomScoreAdj: 0
EOF
  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE_DIR/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:$pport
metricsBindAddress: 127.0.0.1:$pmport
nodePortAddresses: ["$BRIDGE_IP/32"]
iptables: {localhostNodePorts: false, masqueradeAll: false, syncPeriod: 10s, minSyncPeriod: 0s}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, tcpBeLiberal: false,
            udpTimeout: 0s, udpStreamTimeout: 0s}
EOF
  local t
  for t in "${KUBELET_TUNABLES[@]}"; do
    mkdir -p "$(dirname "$NODE_DIR/sysctl/${t%% *}")"
    echo "${t#* }" >"$NODE_DIR/sysctl/${t%% *}"
  done
}

start_namespace() {
  # The node's private mount namespace (see the top of this file): a holder process keeps it alive.
  # The kubelet's device-plugin directory is fixed (/var/lib/kubelet/device-plugins): in the namespace it
  # is our own directory, so plugin sockets live with the node's state.
  local binds="mount --bind '$NODE_DIR/device-plugins' $DEVICE_PLUGIN_DIR && " t
  for t in "${KUBELET_TUNABLES[@]}"; do
    binds+="mount --bind '$NODE_DIR/sysctl/${t%% *}' '/proc/sys/${t%% *}' && "
  done
  start_proc mntns unshare --mount --propagation private -- bash -c "$binds touch '$NODE_DIR/mntns.ready' && exec sleep infinity"
  wait_until 10 "the node's mount namespace" test -f "$NODE_DIR/mntns.ready" || return 1
}

in_ns() { nsenter --target "$(cat "$NODE_DIR/pids/mntns")" --mount -- "$@"; } # exec's, so pids stay right

ctr_() { "$NODE_BIN/ctr" --address "$NODE_DIR/containerd/containerd.sock" --namespace k8s.io "$@"; }
crictl_() { "$CRICTL_BIN/crictl" --runtime-endpoint "unix://$NODE_DIR/containerd/containerd.sock" --timeout 20s "$@"; }

import_images() {
  local tar
  for tar in "$IMAGE_CACHE/pause-1.tar" "$@"; do
    ctr_ images import --snapshotter overlayfs "$tar" >/dev/null \
      || die "ctr could not import $tar"
  done
  # shellcheck disable=SC2046
  prune_images "$PAUSE_IMAGE" $(sed -n 's/^PBT_[A-Z]*_IMAGE=//p' "$IMAGE_CACHE/current")
}

# containerd's root is a cache kept between runs, and every source version imports new images. Removing
# the old tags alone frees nothing: the CRI plugin adds a `sha256:<image id>` reference to every image it
# sees, which keeps the layers and unpacked snapshots alive (25 GiB after a few dozen runs, until a
# disk filled). So drop every reference, tag or id, that does not point at an image we keep, and wait
# for containerd's garbage collection before the kubelet starts.
prune_images() {
  local keep=" $* " listing digests drop
  listing="$(ctr_ images ls 2>/dev/null | awk 'NR > 1 {print $1, $3}')"
  digests=" $(awk -v keep="$keep" 'index(keep, " " $1 " ") {print $2}' <<<"$listing" | tr '\n' ' ') "
  drop="$(awk -v keep="$keep" -v digests="$digests" '($1 ~ /^localhost\/pbt-/ || $1 ~ /^sha256:/) \
    && !index(keep, " " $1 " ") && !index(digests, " " $2 " ") {print $1}' <<<"$listing")"
  [[ -z "$drop" ]] && return 0
  # shellcheck disable=SC2086
  ctr_ images rm --sync $drop >/dev/null 2>&1 || echo "warning: could not remove old images from containerd's cache" >&2
}

node_up() {
  # shellcheck disable=SC1091
  source "$CLUSTER_DIR/env"
  mkdir -p "$NODE_DIR/pids" "$NODE_DIR/logs"
  local kport hport pport pmport
  read -r kport hport pport pmport <<<"$(pick_ports 4)"
  cgroups_up
  # directories outside our own that containerd and the CNI plugins create (result cache, netns
  # mount points, shim sockets): removed by down when they did not exist before
  local d
  for d in /var/lib/cni /run/containerd /var/lib/kubelet; do [[ -e "$d" ]] || record "dir $d"; done
  mkdir -p "$DEVICE_PLUGIN_DIR" "$NODE_DIR/device-plugins"
  gen_node_certs
  write_configs "$kport" "$hport" "$pport" "$pmport"
  start_namespace || return 1
  start_proc containerd nsenter --target "$(cat "$NODE_DIR/pids/mntns")" --mount -- "$NODE_BIN/containerd" --config "$NODE_DIR/containerd.toml" --log-level warn
  wait_until 60 containerd ctr_ version || { tail -30 "$NODE_DIR/logs/containerd.log" >&2; return 1; }
  # shellcheck disable=SC2046
  import_images $(sed -n 's/^PBT_\(OPERATOR\|WORKER\|DIGITS\)_IMAGE=\(.*\):\(.*\)$/\2:\3/p' "$IMAGE_CACHE/current" \
                  | while IFS=: read -r repo key; do echo "$IMAGE_CACHE/$(basename "$repo")-$key.tar"; done)
  start_proc kubelet nsenter --target "$(cat "$NODE_DIR/pids/mntns")" --mount -- "$K8S_BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" \
    --kubeconfig "$NODE_DIR/kubelet.kubeconfig" --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet/pki" \
    --hostname-override "$NODE_NAME" --node-ip "$BRIDGE_IP" --v="${PBT_NODE_VERBOSITY:-1}"
  start_proc kube-proxy "$K8S_BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml" --v=1
  record "iptables kube-proxy"
  wait_until 60 "the kubelet's registration socket" test -S "$NODE_DIR/device-plugins/kubelet.sock" \
    || { tail -40 "$NODE_DIR/logs/kubelet.log" >&2; return 1; }
  start_proc device-plugin "${PBT_PYTHON:-python3}" "$HERE/deviceplugin.py" --devices "$NODE_GPUS" \
    --resource nvidia.com/gpu --plugin-dir "$NODE_DIR/device-plugins"
  wait_until 90 "node $NODE_NAME Ready with nvidia.com/gpu" node_ready || {
    tail -40 "$NODE_DIR/logs/kubelet.log" >&2; return 1; }
  printf '%s\n' "export PBT_NODE_NAME=$NODE_NAME" "export PBT_NODE_BRIDGE_IP=$BRIDGE_IP" \
    "export PBT_NODE_DIR=$NODE_DIR" "export PBT_NODE_GPUS=$NODE_GPUS" \
    "export CONTAINER_RUNTIME_ENDPOINT=unix://$NODE_DIR/containerd/containerd.sock" \
    "export PATH=$CRICTL_BIN:$NODE_BIN:\$PATH" >>"$CLUSTER_DIR/env"
  sed 's/^/export /' "$IMAGE_CACHE/current" >>"$CLUSTER_DIR/env"
}

node_ready() {
  local out
  out="$("$K8S_BIN/kubectl" --kubeconfig "$CLUSTER_DIR/admin.kubeconfig" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.allocatable.nvidia\.com/gpu}')"
  [[ "$out" == "True $NODE_GPUS" ]]
}

cmd_up() {
  local t0=$SECONDS
  cmd_build
  "$0" images
  mkdir -p "$CLUSTER_DIR"
  [[ -d "$NODE_DIR" ]] && die "$NODE_DIR exists: a real node runs there (hack/realnode.sh down first)"
  # One real node per machine (the bridge and the cgroup root are machine-wide): a node left behind by a
  # run that was killed with its watchdog is removed first. The check and the claim hold a machine-wide lock.
  local active="$ACTIVE_FILE" other
  exec 8</run # flock(2) on the directory: a machine-wide lock that leaves no file behind
  flock 8
  # a kubelet of a real node that no marker names (e.g. started by an older version of this script)
  other="$(pgrep -f -- "kubelet --config .*/node/kubelet.yaml" | head -1 || true)"
  if [[ -n "$other" && ! -f "$active" ]]; then
    die "a real node runs in another state directory on this machine (kubelet pid $other)"
  fi
  if [[ -f "$active" ]]; then
    local old kl wd
    old="$(cat "$active")"
    kl="$(cat "$old/node/pids/kubelet" 2>/dev/null || echo 0)"
    wd="$(cat "$old/pids/watchdog" 2>/dev/null || true)"
    if [[ -d "$old/node" ]] && kill -0 "$kl" 2>/dev/null && { [[ -z "$wd" ]] || kill -0 "$wd" 2>/dev/null; }; then
      die "a real node runs in $old (PBT_CLUSTER_DIR=$old $0 down)"
    elif [[ -d "$old/node" ]]; then
      log "removing a real node left behind in $old"
      PBT_CLUSTER_DIR="$old" "$0" down || true
    fi
    rm -f "$active"
  fi
  # leftovers of a node whose state directory is gone too (e.g. a removed temp dir): nothing can use them
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "removing a stale $BRIDGE, /pbt-node cgroups and kubelet iptables chains (no node owns them)"
    ip link del "$BRIDGE" 2>/dev/null || true
    local h; for h in /sys/fs/cgroup/*/; do cgroup_rmtree "${h%/}$CGROUP_ROOT"; done
    iptables_cleanup
  fi
  mkdir -p "$NODE_DIR/pids" "$NODE_DIR/logs"
  echo "$CLUSTER_DIR" >"$active"
  net_up
  flock -u 8; exec 8>&-
  if ! PBT_APISERVER_ADDRESS="$BRIDGE_IP" \
       PBT_APISERVER_FLAGS="--kubelet-preferred-address-types=InternalIP ${PBT_APISERVER_FLAGS:-}" \
       "$HERE/testcluster.sh" up; then
    node_down; die "the control plane did not start"
  fi
  if ! node_up; then
    log "the node did not come up (logs in $NODE_DIR/logs); tearing down"
    "$HERE/testcluster.sh" down || true
    exit 1
  fi
  log "real node $NODE_NAME up in $((SECONDS - t0))s (state in $NODE_DIR)"
}

stop_pid() { # name [seconds]
  local f="$NODE_DIR/pids/$1" pid deadline
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -TERM "$pid" 2>/dev/null; then
    deadline=$((SECONDS + ${2:-10}))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cgroup_rmtree() { # remove a v1 cgroup directory bottom-up (cgroups are removed with rmdir)
  local d="$1"
  [[ -d "$d" ]] || return 0
  find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  [[ -d "$d" ]] && log "warning: could not remove cgroup $d"
  return 0
}

node_down() {
  [[ -d "$NODE_DIR" ]] || return 0
  stop_pid device-plugin 5
  stop_pid kubelet 20
  # Every pod sandbox through CRI: containers stopped, network namespaces torn down by the CNI plugins.
  if proc_alive containerd; then
    crictl_ rmp --all --force >/dev/null 2>&1 || crictl_ rmp --all --force >/dev/null 2>&1 || true
  fi
  stop_pid containerd 20
  # shims and containers left by a crash: every process in our cgroups and mount namespace
  local h pid
  for h in /sys/fs/cgroup/*/; do
    [[ -d "${h%/}$CGROUP_ROOT" ]] || continue
    find "${h%/}$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  if [[ -f "$NODE_DIR/pids/mntns" ]]; then
    local ns
    ns="$(readlink "/proc/$(cat "$NODE_DIR/pids/mntns")/ns/mnt" 2>/dev/null || true)"
    if [[ -n "$ns" ]]; then
      for pid in /proc/[0-9]*; do
        [[ "$(readlink "$pid/ns/mnt" 2>/dev/null)" == "$ns" && "${pid#/proc/}" != "$(cat "$NODE_DIR/pids/mntns")" ]] \
          && kill -KILL "${pid#/proc/}" 2>/dev/null || true
      done
    fi
    stop_pid mntns 5 # the namespace and every mount in it go with its last process
  fi
  if [[ -f "$NODE_DIR/pids/kube-proxy" ]]; then
    stop_pid kube-proxy 10
    "$K8S_BIN/kube-proxy" --cleanup --v=0 >/dev/null 2>&1 || true
  fi
  iptables_cleanup
  local kind what
  if [[ -f "$NODE_DIR/created" ]]; then
    tac "$NODE_DIR/created" | while read -r kind what; do
      case "$kind" in
        link) ip link del "$what" 2>/dev/null || true ;;
        cgroup) cgroup_rmtree "$what" ;;
        dir) [[ -d "$what" ]] && find "$what" -depth -type d -empty -delete 2>/dev/null || true ;;
      esac
    done
  fi
  # the logs outlive the node (next to the control plane's), for whoever debugs a failed run
  # runc also mirrors the cgroups into the unified (v2) hierarchy of a hybrid machine
  for h in /sys/fs/cgroup/*/; do cgroup_rmtree "${h%/}$CGROUP_ROOT"; done
  rm -rf "$CLUSTER_DIR/logs/node" && mkdir -p "$CLUSTER_DIR/logs" && mv "$NODE_DIR/logs" "$CLUSTER_DIR/logs/node" || true
  rm -rf "$NODE_DIR"
  [[ "$(cat "$ACTIVE_FILE" 2>/dev/null)" == "$CLUSTER_DIR" ]] && rm -f "$ACTIVE_FILE"
  log "removed the real node ($NODE_NAME)"
}

iptables_cleanup() {
  # What the kubelet adds (kube-proxy --cleanup removes kube-proxy's own chains).
  local t
  for t in filter; do
    while iptables -w -t "$t" -D INPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
    while iptables -w -t "$t" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
    iptables -w -t "$t" -F KUBE-FIREWALL 2>/dev/null && iptables -w -t "$t" -X KUBE-FIREWALL 2>/dev/null || true
  done
  for t in mangle nat filter; do
    iptables -w -t "$t" -F KUBE-KUBELET-CANARY 2>/dev/null && iptables -w -t "$t" -X KUBE-KUBELET-CANARY 2>/dev/null || true
  done
  iptables -w -t mangle -X KUBE-IPTABLES-HINT 2>/dev/null || true
}

cmd_down() {
  node_down
  "$HERE/testcluster.sh" down
}

cmd_status() {
  local n
  for n in mntns containerd kubelet kube-proxy device-plugin; do
    if proc_alive "$n"; then echo "$n: running (pid $(cat "$NODE_DIR/pids/$n"))"; else echo "$n: stopped"; fi
  done
  if all_built; then echo "node binaries: $NODE_BIN $CRICTL_BIN $K8S_BIN"; else echo "node binaries: not built"; fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    build) cmd_build ;;
    images)
      # buildah mounts its storage and build containers: in a private mount namespace they all go
      # away with it, and the machine's mount table never sees them
      if [[ -z "${PBT_REALNODE_PRIVATE_MNT:-}" ]]; then
        PBT_REALNODE_PRIVATE_MNT=1 exec unshare --mount --propagation private -- "$0" images
      fi
      cmd_images ;;
    up) cmd_up ;;
    down) cmd_down ;;
    node-down) node_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 build|images|up|down|status" >&2; exit 2 ;;
  esac
fi
