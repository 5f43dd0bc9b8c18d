#!/usr/bin/env bash
# Idempotently install the manifest-checking tools the deploy tests use:
#   kustomize, kubeconform   (Go, via the Go module proxy)        -> $TOOLS_DIR/bin
#   check-jsonschema         (compose-spec schema vendored inside) -> $TOOLS_DIR/venv
#   kubernetes-validate      (ships Kubernetes JSON schemas, used offline by kubeconform)
#
#   deploy/local/install-tools.sh            # install what is missing
#   deploy/local/install-tools.sh --print    # print the bin dir (for PATH)
#
# TOOLS_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/sma-monitor/tools. Nothing is
# downloaded when every tool is present at its pinned version.
set -euo pipefail

KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.7.1}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.7.0}"
CHECK_JSONSCHEMA_VERSION="${CHECK_JSONSCHEMA_VERSION:-0.39.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

TOOLS_DIR="${TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sma-monitor/tools}"
BIN="$TOOLS_DIR/bin"
VENV="$TOOLS_DIR/venv"

if [ "${1:-}" = "--print" ]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$BIN"

stamp_ok() { [ -f "$BIN/.$1.version" ] && [ "$(cat "$BIN/.$1.version")" = "$2" ] && [ -x "$BIN/$1" ]; }

go_tool() {  # name module version
    local name=$1 module=$2 version=$3
    if stamp_ok "$name" "$version"; then
        echo "install-tools: $name $version already installed"
        return
    fi
    command -v go >/dev/null 2>&1 || { echo "install-tools: go not found (needed for $name)" >&2; exit 1; }
    echo "install-tools: go install $module@$version"
    GOBIN="$BIN" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "$module@$version"
    echo "$version" >"$BIN/.$name.version"
}

go_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"

py_want="check-jsonschema==$CHECK_JSONSCHEMA_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
if stamp_ok check-jsonschema "$py_want"; then
    echo "install-tools: $py_want already installed"
else
    PYTHON="${PYTHON:-python3}"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check $py_want
    ln -sf "$VENV/bin/check-jsonschema" "$BIN/check-jsonschema"
    # kubeconform reads schemas from this directory (no network): see tests/unit/test_deploy.py
    "$VENV/bin/python" - >"$BIN/.k8s-schemas" <<'PY'
import os, kubernetes_validate
print(os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema"))
PY
    echo "$py_want" >"$BIN/.check-jsonschema.version"
fi
echo "install-tools: tools in $BIN"
