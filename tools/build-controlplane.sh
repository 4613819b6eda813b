#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and Shipwright's build controller from Go
# modules into a version-keyed cache outside the repository, once. Skips what KUBEBUILDER_ASSETS
# or the cache already has. Versions must match K8S_VERSION / ETCD_VERSION / SHIPWRIGHT_VERSION
# in operator/workorder_operator/envtest.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${WORKORDER_CACHE:-$HOME/.cache/workorder-operator}
k8s_version=v1.34.4
etcd_version=v3.6.16
shipwright_version=v0.20.13
k8s_dir=$cache/bin/k8s-$k8s_version
etcd_dir=$cache/bin/etcd-$etcd_version
shipwright_dir=$cache/bin/shipwright-$shipwright_version

have() { [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$1" ] || [ -x "$2/$1" ]; }

command -v go >/dev/null || { echo "error: Go (>= 1.24; Shipwright's controller wants 1.26.3, which go fetches itself) is needed to build the control plane; install it or set KUBEBUILDER_ASSETS" >&2; exit 1; }
export CGO_ENABLED=0

build() { # dir module-dir minutes ldflags packages...
  local out=$1 moddir=$2 minutes=$3 ldflags=$4; shift 4
  local tmp; tmp=$(mktemp -d "$cache/build.XXXXXX")
  echo ">> building $* (one time: about $minutes minutes on 2 cores, more if Go must download modules)"
  local start=$SECONDS
  # -v prints each package as it compiles: the progress of a long build.
  (cd "$moddir" && go build -v -trimpath -o "$tmp/" -ldflags "$ldflags" "$@" 2>&1) \
    | awk '/[ :]/ {print; fflush(); next} {n++; if (n % 200 == 0) {printf "   ... %d packages compiled\n", n; fflush()}}'
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: go build failed" >&2; rm -rf "$tmp"; exit 1; }
  mkdir -p "$out" && mv "$tmp"/* "$out"/ && rmdir "$tmp"
  echo ">> built into $out in $((SECONDS - start))s"
}

mkdir -p "$cache/bin"
if ! have kube-apiserver "$k8s_dir" || ! have kube-controller-manager "$k8s_dir"; then
  vpkg=k8s.io/component-base/version
  minor=${k8s_version#v1.}; minor=${minor%%.*}
  build "$k8s_dir" "$here/controlplane" 6 \
    "-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
fi
if ! have etcd "$etcd_dir"; then
  build "$etcd_dir" "$here/etcd" 2 "-s -w" go.etcd.io/etcd/server/v3
  [ -x "$etcd_dir/etcd" ] || mv "$etcd_dir/server" "$etcd_dir/etcd"  # go names the binary after "server/v3"
fi
if ! [ -x "$shipwright_dir/shipwright-build-controller" ]; then
  # Our wrapper main around Shipwright's manager (free metrics port, no leader election).
  build "$shipwright_dir" "$here/shipwright" 3 "-s -w" workorder.dev/tools/shipwright
  [ -x "$shipwright_dir/shipwright-build-controller" ] || mv "$shipwright_dir/shipwright" "$shipwright_dir/shipwright-build-controller"
fi
