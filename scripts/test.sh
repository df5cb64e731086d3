#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (or the tests named in the arguments, e.g. the inner
# loop: -m "not slow"). pytest exits non-zero on failures and with 5 when it collected no tests;
# both fail this script, as does a lint finding.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive Debian's chromium (no browser download: the network allows none); the
# Spark engine's tests need Java 17+. Both come from Debian's packages when missing.
missing=()
command -v chromium > /dev/null || missing+=(chromium)
java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' || missing+=(openjdk-17-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "installing ${missing[*]} with apt-get (Debian packages, needs root or sudo; a few minutes once) ..." >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" > /dev/null
    echo "installed ${missing[*]}" >&2
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
