"""The one Definitions object: everything in exp_pipeline/defs/, found by Dagster's loader."""

from pathlib import Path

import dagster as dg

defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    # Steps of one run share the DuckDB file one at a time anyway (pool warehouse_writer), so a
    # subprocess per step would only add seconds of start-up to every step.
    dg.Definitions(executor=dg.in_process_executor),
)
