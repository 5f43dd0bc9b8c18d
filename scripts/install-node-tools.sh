#!/usr/bin/env bash
# Idempotently install the Node.js tools the contract tests use:
#   @asyncapi/parser  (validates schemas/asyncapi.yaml)  -> $TOOLS_DIR/node/node_modules
#
#   scripts/install-node-tools.sh            # install what is missing
#   scripts/install-node-tools.sh --print    # print the node tools dir (NODE_PATH for scripts/validate-asyncapi.mjs)
#
# TOOLS_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/sma-monitor/tools (shared with
# deploy/local/install-tools.sh). Nothing is downloaded when the pinned version is present.
# npm is required: the script fails (it does not skip) when npm is missing.
set -euo pipefail

ASYNCAPI_PARSER_VERSION="${ASYNCAPI_PARSER_VERSION:-3.6.6}"
TOOLS_DIR="${TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sma-monitor/tools}"
NODE_DIR="$TOOLS_DIR/node"

if [ "${1:-}" = "--print" ]; then
    echo "$NODE_DIR"
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "install-node-tools: npm not found (install Node.js >= 18 and npm)" >&2; exit 1; }
mkdir -p "$NODE_DIR"
want="@asyncapi/parser@$ASYNCAPI_PARSER_VERSION"
stamp="$NODE_DIR/.asyncapi-parser.version"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$NODE_DIR/node_modules/@asyncapi/parser/package.json" ]; then
    echo "install-node-tools: $want already installed"
    exit 0
fi
[ -f "$NODE_DIR/package.json" ] || echo '{"name": "sma-monitor-tools", "private": true}' >"$NODE_DIR/package.json"
echo "install-node-tools: npm install $want"
npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error --save-exact "$want"
echo "$want" >"$stamp"
echo "install-node-tools: tools in $NODE_DIR/node_modules"
