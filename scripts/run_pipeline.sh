#!/usr/bin/env bash
# The main job: set up, generate the sample data if missing, analyse every experiment, print results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Dagster instance and the warehouse default to folders beside the registry (exp_pipeline/settings.py).
exec .venv/bin/python -m exp_pipeline.cli run "$@"
