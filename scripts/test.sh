#!/usr/bin/env bash
# Set up and run the whole test suite. pytest exits non-zero on failures and with 5 when it
# collected no tests; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive Debian's chromium (no browser download: the network allows none).
if ! command -v chromium > /dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
fi
exec .venv/bin/python -m pytest "$@"
