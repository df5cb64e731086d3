"""The warehouse: the engine interface (`interface`), its DuckDB and Spark implementations
(`duckdb_engine`, `spark_engine`), and the Dagster resource that opens one (`resources`).
"""
