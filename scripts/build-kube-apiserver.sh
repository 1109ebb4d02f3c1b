#!/usr/bin/env bash
# Builds the real kube-apiserver (and the etcd it needs) that the tests in
# tests/test_kube_real.py and tests/conformance run against. No release binaries are downloaded:
# both are compiled from the published Go modules, so Go (1.26 or newer) is all that is needed.
#
# The binaries go to a cache folder outside the checkout (printed at the end; the tests look in the
# same place), and a binary already there is not built again.
#
#   scripts/build-kube-apiserver.sh          # build what is missing
#   KUBE_VERSION=1.36.3 scripts/...          # another Kubernetes version
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.37.2}"
# Debian's etcd 3.4 runs it too, but without the watch progress requests that let the API server
# answer consistent lists from its cache, as it does on every supported (3.5+) cluster.
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/llm-key-requestor"
KUBE_DIR="$CACHE_ROOT/kube-$KUBE_VERSION"
ETCD_DIR="$CACHE_ROOT/etcd-$ETCD_VERSION"

command -v go >/dev/null || { echo "build-kube-apiserver: Go is not installed (needs Go 1.26+)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Stripped binaries (-s -w), with no paths of the building machine in them (-trimpath).
strip="-s -w"

build_kube_apiserver() {
    local out="$KUBE_DIR/kube-apiserver"
    if [[ -x "$out" ]]; then echo "kube-apiserver $KUBE_VERSION: $out (cached)"; return; fi
    # `go install k8s.io/kubernetes/cmd/kube-apiserver@v...` refuses a module with `replace`
    # directives, and k8s.io/kubernetes replaces every staging module (k8s.io/api, ...) with a
    # folder of its own repository, requiring them at v0.0.0. A module of our own that requires
    # k8s.io/kubernetes and points each of those at its published v0.<minor>.<patch> builds the
    # same source.
    local mod="$work/kube"
    mkdir -p "$mod"
    (
        cd "$mod"
        local gomod
        gomod="$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
        local staging="v0.${KUBE_VERSION#1.}"
        {
            echo "module llm-key-requestor/kube-apiserver"
            echo
            sed -n 's/^go \(.*\)$/go \1/p' "$gomod"
            echo
            echo "replace ("
            # Every k8s.io module that k8s.io/kubernetes requires at v0.0.0 is a staging module.
            awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print "\t" $1 " => " $1 " '"$staging"'" }' "$gomod"
            echo ")"
        } >go.mod
        go get "k8s.io/kubernetes/cmd/kube-apiserver@v$KUBE_VERSION"
        mkdir -p "$KUBE_DIR"
        # /version reports the release, as a released binary does (else v0.0.0-master).
        go build -trimpath -ldflags="$strip -X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION" \
            -o "$out.tmp" k8s.io/kubernetes/cmd/kube-apiserver
        mv "$out.tmp" "$out"
    )
    echo "kube-apiserver $KUBE_VERSION: $out (built)"
}

build_etcd() {
    local out="$ETCD_DIR/etcd"
    if [[ -x "$out" ]]; then echo "etcd $ETCD_VERSION: $out (cached)"; return; fi
    local mod="$work/etcd"
    mkdir -p "$mod"
    (
        cd "$mod"
        printf 'module llm-key-requestor/etcd\n\ngo 1.26.0\n' >go.mod
        go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
        mkdir -p "$ETCD_DIR"
        go build -trimpath -ldflags="$strip" -o "$out.tmp" go.etcd.io/etcd/server/v3
        mv "$out.tmp" "$out"
    )
    echo "etcd $ETCD_VERSION: $out (built)"
}

build_kube_apiserver
build_etcd
