"""Pure table -> table functions (Ibis expressions), one module per pipeline stage.

Nothing here executes a query or pulls rows into Python; assets decide when to run and where to
write. No engine-specific SQL: only Ibis, so the same code runs on DuckDB and on Spark.

- `ingestion`: source rows onto canonical names and types, classified ingested or rejected (and
  `RowAccounting`, which reads the small per-reason counts back)
- `assignments`: dedupe (first exposure wins), assignment history, subject counts
- `temporal_join`: each subject's events inside its metric and pre-assignment windows
- `fixed_point`: order-independent exact sums
- `subject_values`: per-subject metric values, capping, sufficient statistics
"""
