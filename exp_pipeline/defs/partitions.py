"""One dynamic partition per experiment, and the pool every step that opens the warehouse joins."""

import dagster as dg

experiment_partitions = dg.DynamicPartitionsDefinition(name="experiment")

# Every asset and check writing the DuckDB file shares one pool so that writers queue instead of
# colliding on DuckDB's single-writer lock (limited to 1 in .dagster_home/dagster.yaml).
WRITER_POOL = "warehouse_writer"
