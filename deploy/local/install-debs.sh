#!/usr/bin/env bash
# Idempotently install Debian packages: only the ones not already installed.
#
#   deploy/local/install-debs.sh PKG [PKG...]
#
# Exits 0 without touching apt when every package is already installed. Runs
# `apt-get update` at most once per invocation, and only when something is missing.
# Needs root (or sudo) for the install step. Non-interactive.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 PKG [PKG...]" >&2
    exit 2
fi

missing=()
for pkg in "$@"; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        echo "install-debs: $pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-debs: need root to install: ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-debs: installing ${missing[*]}"
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
