#!/usr/bin/env bash
# The main job: set up, generate the sample data if missing, analyse every experiment, print results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
exec .venv/bin/python -m exp_pipeline.cli run "$@"
