# shellcheck shell=bash
# Sourced by hack/testcluster.sh, hack/addons.sh, hack/realnode.sh and hack/prebuild.sh: one place for
# where the caches live, how a pinned Go module is built, the build locks and free ports, so that every
# Go build (control plane, kubelet, containerd, runc, crictl, helm, Karpenter, Kueue) shares one module
# cache and one build cache (common packages compile once) and two callers never build the same thing
# at the same time. The caller sets LOG_TAG before sourcing.

CACHE_ROOT="${PBT_CACHE_DIR:-$HOME/.cache/pbt-operator}"
BUILD_ROOT="$CACHE_ROOT/build"
BUILD_JOBS="${PBT_BUILD_JOBS:-2}"
# Builds are a background chore on a shared machine (niceness 10). On a machine of its own (CI: .ci/run
# sets 0) the Go builds are the critical path of `make test` and should not yield to the tests.
BUILD_NICE="${PBT_BUILD_NICE:-10}"
CLUSTER_DIR="${PBT_CLUSTER_DIR:-$CACHE_ROOT/cluster}"
K8S_VERSION="${PBT_K8S_VERSION:-v1.36.5}"
K8S_BIN="$CACHE_ROOT/$K8S_VERSION/bin"
LOCK_DIR="$CACHE_ROOT/locks"
PREBUILD_DIR="$CACHE_ROOT/prebuild" # hack/prebuild.sh: logs and outcomes of the background builds

log() { printf '[%s %s] %s\n' "${LOG_TAG:-pbt}" "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- Go builds of pinned modules -------------------------------------------------------------------
go_env() { # [toolchain]: local (default: never download a Go) or auto (fetch the Go a module's go.mod needs)
  command -v go >/dev/null || die "go is not on PATH (Go >= 1.26 is needed to build the test cluster's binaries)"
  export GOTOOLCHAIN="${1:-local}" GOFLAGS="-trimpath -mod=mod -buildvcs=false" CGO_ENABLED=0
  # one module cache and one build cache for every build; GOPATH too, so nothing lands in ~/go
  export GOMODCACHE="$BUILD_ROOT/gomod" GOCACHE="$BUILD_ROOT/gocache" GOPATH="$BUILD_ROOT/gopath"
  export GOMAXPROCS="$BUILD_JOBS"
}

stamp_ok() { [[ -x "$1/$2" && -f "$1/.$2.version" && "$(cat "$1/.$2.version")" == "$3" ]]; } # dir name version
write_stamp() { echo "$3" >"$1/.$2.version"; }                                               # dir name version

module_download() { # module version field -> a field (GoMod, Dir, ...) of `go mod download -json`
  # GoMod with the local Go even when the module needs a newer one (it is read to find that out);
  # the sources (Dir) with the toolchain go_env chose. Run outside any build module.
  local v tc="${GOTOOLCHAIN:-local}"
  [[ "$3" == GoMod ]] && tc=local
  mkdir -p "$BUILD_ROOT"
  v="$( (cd "$BUILD_ROOT" && GOTOOLCHAIN="$tc" go mod download -json "$1@$2" 2>/dev/null || true) \
        | sed -n "s/^\s*\"$3\": \"\(.*\)\",\?$/\1/p")"
  [[ -e "$v" ]] || die "could not download $1@$2 from the Go module proxy"
  echo "$v"
}

new_build_module() { # dir module version: a throw-away module that requires module@version
  local dir="$1" gomod gov
  mkdir -p "$dir"
  gomod="$(module_download "$2" "$3" GoMod)"
  # the module's own go directive: with GOTOOLCHAIN=auto a newer one fetches that Go once
  gov="$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod" | head -1)"
  printf 'module pbt-operator.local/build/%s\n\ngo %s\n\nrequire %s %s\n' "$(basename "$dir")" "${gov:-1.26.0}" "$2" "$3" \
    >"$dir/go.mod"
  : >"$dir/go.sum"
}

k8s_build_module() { # -> $BUILD_ROOT/kubernetes-<version>: k8s.io/kubernetes with its staging modules mapped
  local dir="$BUILD_ROOT/kubernetes-$K8S_VERSION" minor="${K8S_VERSION#v1.}" gomod n
  [[ -f "$dir/go.mod" ]] && grep -q "^replace" "$dir/go.mod" && return 0
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them to ./staging with replace
  # directives, which only apply inside its own repository: map them to the published modules of the
  # same release (v0.<minor>) instead.
  new_build_module "$dir" k8s.io/kubernetes "$K8S_VERSION"
  gomod="$(module_download k8s.io/kubernetes "$K8S_VERSION" GoMod)"
  {
    echo
    echo "replace ("
    for n in $(sed -n '/^replace (/,/^)/p' "$gomod" | awk '$2 == "=>" && $3 ~ /staging/ {print $1}'); do
      echo "	$n => $n v0.$minor"
    done
    echo ")"
  } >>"$dir/go.mod"
}

k8s_ldflags() { # the version stamped into Kubernetes binaries (kubectl version shows it)
  local minor="${K8S_VERSION#v1.}" kv flags="-s -w"
  for kv in "gitVersion=$K8S_VERSION" "gitMajor=1" "gitMinor=${minor%%.*}" "gitTreeState=clean"; do
    flags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  echo "$flags"
}

go_build() { # build-module-dir output package [go build flags...]: one main package, written atomically
  local dir="$1" out="$2" pkg="$3"; shift 3
  mkdir -p "$(dirname "$out")"
  log "  go build $pkg -> $out"
  (cd "$dir" && nice -n "$BUILD_NICE" go build -p "$BUILD_JOBS" "$@" -o "$out.tmp" "$pkg") || die "go build $pkg failed"
  mv "$out.tmp" "$out"
}

build_k8s_binaries() { # name... (kube-apiserver, kubelet, ...): k8s.io/kubernetes/cmd/<name> into $K8S_BIN
  local n missing=()
  for n in "$@"; do stamp_ok "$K8S_BIN" "$n" "$K8S_VERSION" || missing+=("$n"); done
  ((${#missing[@]})) || return 0
  k8s_build_module
  for n in "${missing[@]}"; do
    go_build "$BUILD_ROOT/kubernetes-$K8S_VERSION" "$K8S_BIN/$n" "k8s.io/kubernetes/cmd/$n" -ldflags "$(k8s_ldflags)"
    write_stamp "$K8S_BIN" "$n" "$K8S_VERSION"
  done
}

# ---- locks -----------------------------------------------------------------------------------------
# with_lock name command...: runs command (a function of the caller) holding $LOCK_DIR/name.lock, so that
# a second build of the same thing (e.g. a test waiting for hack/prebuild.sh's background build) waits and
# then finds the stamps current. If the background build of that name failed, its log's tail is shown.
with_lock() {
  local name="$1"; shift
  mkdir -p "$LOCK_DIR"
  (
    exec 9>"$LOCK_DIR/$name.lock"
    if ! flock -n 9; then
      log "waiting for the $name build that runs already (background log: $PREBUILD_DIR/$name.log)"
      flock 9
    fi
    if [[ -f "$PREBUILD_DIR/$name.failed" ]]; then
      log "the background $name build failed ($(cat "$PREBUILD_DIR/$name.failed")); its log ends with:"
      tail -n 25 "$PREBUILD_DIR/$name.log" >&2 || true
      log "building $name again here"
    fi
    "$@" && rm -f "$PREBUILD_DIR/$name.failed"
  )
}

# ---- ports -----------------------------------------------------------------------------------------
pick_ports() { # n -> n free loopback ports (one line)
  local py
  py="$(command -v python3 || command -v python)" || die "python3 is needed to pick free ports"
  "$py" -c '
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}
