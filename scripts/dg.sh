#!/usr/bin/env bash
# dg, Dagster's CLI, on the registry's own Dagster instance (DAGSTER_HOME, by default .dagster_home/
# beside the registry file; see exp_pipeline/settings.py). For `dg dev`, the alert links point at
# the address the UI really listens on (--host, --port).
#   bash scripts/dg.sh dev --port 3000
#   bash scripts/dg.sh launch --assets "variant_metrics+" --partition checkout_redesign
#   bash scripts/dg.sh check defs
set -euo pipefail
# A registry path relative to where the command was typed, made absolute before the cd below.
if [ -n "${EXP_PIPELINE_REGISTRY:-}" ]; then
    EXP_PIPELINE_REGISTRY="$(realpath -m "$EXP_PIPELINE_REGISTRY")"
    export EXP_PIPELINE_REGISTRY
fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DAGSTER_HOME="$(.venv/bin/python -c 'from exp_pipeline.defs.instance import ready_home; print(ready_home())')"
export DAGSTER_HOME
if [ "${1:-}" = dev ] && [ -z "${EXP_PIPELINE_UI_URL:-}" ]; then
    host=127.0.0.1 port=3000
    args=("$@")
    for ((i = 1; i < ${#args[@]}; i++)); do
        case "${args[i]}" in
            -h|--host) host="${args[i+1]:-$host}" ;;
            -p|--port) port="${args[i+1]:-$port}" ;;
            --host=*) host="${args[i]#--host=}" ;;
            --port=*) port="${args[i]#--port=}" ;;
            -h?*) host="${args[i]#-h}" ;;
            -p?*) port="${args[i]#-p}" ;;
        esac
    done
    # Listening on every interface: links name this machine (set EXP_PIPELINE_UI_URL for a proxy).
    if [ "$host" = 0.0.0.0 ]; then host="$(hostname)"; fi
    export EXP_PIPELINE_UI_URL="http://$host:$port"
fi
exec .venv/bin/dg "$@"
