#!/usr/bin/env bash
# Compiles the local control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager,
# kubectl, kwok) and helm (the chart's tests install it) from the Go module proxy into a cache
# outside the repository.
#
# Usage: hack/build-control-plane.sh            builds what is missing, prints the bin directory
# Environment (all optional):
#   KUBETASK_CACHE_DIR   cache root; default ${XDG_CACHE_HOME:-~/.cache}/kubetask
#   KUBERNETES_VERSION   k8s.io/kubernetes tag; default v1.37.2 (newest release that Go 1.26 builds)
#   ETCD_VERSION         go.etcd.io/etcd/server/v3 tag; default v3.6.17 (kubeadm's pairing)
#   KWOK_VERSION         sigs.k8s.io/kwok tag; default v0.8.0
#   HELM_VERSION         helm.sh/helm/v4 tag; default v4.3.2 (kept beside the others, rebuilt
#                        when it changes: bin/helm.version records the one built)
# Everything is built once per version triple; later runs find the binaries and return at once.
set -euo pipefail

KUBERNETES_VERSION=${KUBERNETES_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.6.17}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v4.3.2}
CACHE_ROOT=${KUBETASK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetask}
DEST="$CACHE_ROOT/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
BIN="$DEST/bin"
K8S_BINARIES=(kube-apiserver kube-scheduler kube-controller-manager kubectl)

say() { printf '[build-control-plane] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

command -v go >/dev/null 2>&1 || die "Go is not installed or not on PATH; install Go >= 1.26 first."

all_present() {
  local b
  for b in etcd kwok "${K8S_BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  [ -s "$BIN/kwok-stages.yaml" ] && helm_present
}
helm_present() { [ -x "$BIN/helm" ] && [ "$(cat "$BIN/helm.version" 2>/dev/null)" = "$HELM_VERSION" ]; }
if all_present; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN" "$DEST/src"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
build_flags=(-trimpath)
started=$(date +%s)

# --- etcd: its go.mod replaces its sibling modules, so it is built through a wrapper module. ---
if [ ! -x "$BIN/etcd" ]; then
  say "Building etcd $ETCD_VERSION ..."
  src="$DEST/src/etcd"
  rm -rf "$src" && mkdir -p "$src"
  cat >"$src/main.go" <<'GO'
// Wrapper so that the etcd server builds with the published sibling modules.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (
    cd "$src"
    go mod init kubetask.local/etcd >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 \
      || die "cannot fetch go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go mod tidy >/dev/null 2>&1 || die "go mod tidy failed for etcd"
    go build "${build_flags[@]}" -ldflags "-s -w" -o "$BIN/etcd.tmp" . || die "building etcd failed"
  )
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  say "etcd built ($(( $(date +%s) - started ))s so far)."
fi

# --- kwok: no replace directives, installs directly. ---
if [ ! -x "$BIN/kwok" ]; then
  say "Building kwok $KWOK_VERSION ..."
  GOBIN="$DEST/src/kwok-bin" go install "${build_flags[@]}" -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" || die "building kwok failed"
  mv "$DEST/src/kwok-bin/kwok" "$BIN/kwok"
  say "kwok built ($(( $(date +%s) - started ))s so far)."
fi

# --- helm: no replace directives either. ---
if ! helm_present; then
  say "Building helm $HELM_VERSION ..."
  GOBIN="$DEST/src/helm-bin" go install "${build_flags[@]}" \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" || die "building helm failed"
  mv "$DEST/src/helm-bin/helm" "$BIN/helm"
  echo "$HELM_VERSION" >"$BIN/helm.version"
  say "helm built ($(( $(date +%s) - started ))s so far)."
fi

# --- KWOK's stages: the kwok binary embeds none, so the "fast" set shipped in its module (nodes
# become Ready and keep heartbeating; pods become Ready, complete and are deleted) is collected
# into one config file. ---
if [ ! -s "$BIN/kwok-stages.yaml" ]; then
  kwok_dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -d "$kwok_dir/kustomize/stage" ] || die "cannot find KWOK's stages in the module cache"
  for stage in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$kwok_dir/kustomize/stage/$stage"
  done >"$BIN/kwok-stages.yaml.tmp"
  mv "$BIN/kwok-stages.yaml.tmp" "$BIN/kwok-stages.yaml"
  say "KWOK stages written to $BIN/kwok-stages.yaml."
fi

# --- Kubernetes: a wrapper module that requires k8s.io/kubernetes and replaces every staging
# module with its published v0.X.Y, a list read from the served go.mod rather than typed here. ---
missing=()
for b in "${K8S_BINARIES[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
if [ "${#missing[@]}" -gt 0 ]; then
  say "Building Kubernetes $KUBERNETES_VERSION: ${missing[*]} (the slowest part) ..."
  src="$DEST/src/kubernetes"
  rm -rf "$src" && mkdir -p "$src"
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
    | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION"
  staging_version="v0.${KUBERNETES_VERSION#v1.}"
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  {
    echo "module kubetask.local/kubernetes"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" \
      | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } >"$src/go.mod"
  say "Replacing $(grep -c '^replace' "$src/go.mod") staging modules with $staging_version."
  {
    echo "//go:build tools"
    echo
    echo "// Package tools pins the Kubernetes commands this module builds."
    echo "package tools"
    echo
    echo "import ("
    for b in "${K8S_BINARIES[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$b\""; done
    echo ")"
  } >"$src/tools.go"
  ver=k8s.io/component-base/version
  ldflags="-s -w -X $ver.gitVersion=$KUBERNETES_VERSION -X $ver.gitMajor=1 -X $ver.gitMinor=$minor"
  ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  ldflags="$ldflags -X $ver.gitTreeState=clean"
  (
    cd "$src"
    go mod tidy >"$src/tidy.log" 2>&1 || { tail -20 "$src/tidy.log" >&2; die "go mod tidy failed"; }
    pkgs=()
    for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    mkdir -p "$src/out"
    go build "${build_flags[@]}" -ldflags "$ldflags" -o "$src/out/" "${pkgs[@]}" \
      || die "building Kubernetes failed"
  )
  for b in "${missing[@]}"; do mv "$src/out/$b" "$BIN/$b"; done
  say "Kubernetes built ($(( $(date +%s) - started ))s so far)."
fi

all_present || die "some binaries are still missing in $BIN"
say "All control-plane binaries are in $BIN."
echo "$BIN"
