#!/usr/bin/env bash
# Set up and run the whole test suite. pytest exits non-zero on failures and with 5 when it
# collected no tests; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
