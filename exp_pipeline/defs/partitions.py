"""One dynamic partition per experiment, and the pool every step that opens the warehouse joins."""

import dagster as dg

experiment_partitions = dg.DynamicPartitionsDefinition(name="experiment")

# Every asset and check writing the DuckDB file shares one pool so that writers queue instead of
# colliding on DuckDB's single-writer lock (limited to 1 in exp_pipeline/dagster_instance.yaml).
WRITER_POOL = "warehouse_writer"

# A run over several experiments covers a range of partitions (in the order they were added);
# experiments of the range that were not asked for are named out in the analysis' config.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
ANALYSIS_STEP = "experiment_analysis"


def run_over(partitions_in_order: list[str], experiment_ids: list[str]) -> tuple[dict[str, str], dict]:
    """Tags and run config of ONE run analysing `experiment_ids` (each a known partition)."""
    wanted = set(experiment_ids)
    covered = [k for k in partitions_in_order if k in wanted]
    first, last = partitions_in_order.index(covered[0]), partitions_in_order.index(covered[-1])
    tags = {RANGE_START_TAG: covered[0], RANGE_END_TAG: covered[-1]}
    if len(covered) == last - first + 1:
        return tags, {}
    return tags, {"ops": {ANALYSIS_STEP: {"config": {"experiment_ids": covered}}}}
