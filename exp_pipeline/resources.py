"""Resources and where they point by default (environment variables override every default).

EXP_PIPELINE_ENGINE picks the warehouse engine: `duckdb` (default) or `spark`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource

from exp_pipeline.registry import Registry, load_registry
from exp_pipeline.warehouse import DuckDBWarehouse, Warehouse

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = PROJECT_ROOT / "data" / "registry.yaml"
# The schema is `exp`; the file is not named after it (DuckDB 2.0 finds `exp.x` ambiguous then).
DEFAULT_DUCKDB = PROJECT_ROOT / "data" / "warehouse" / "warehouse.duckdb"
DEFAULT_SPARK_LOCATION = PROJECT_ROOT / "data" / "warehouse" / "spark" / "exp.db"
ENGINES = ("duckdb", "spark")


class RegistryResource(ConfigurableResource):
    """The experiment registry file; read fresh on every use so edits apply without a restart."""

    path: str

    def load(self) -> Registry:
        return load_registry(self.path)


def registry_path() -> str:
    return os.environ.get("EXP_PIPELINE_REGISTRY", str(DEFAULT_REGISTRY))


def duckdb_path() -> str:
    return os.environ.get("EXP_PIPELINE_DUCKDB", str(DEFAULT_DUCKDB))


def engine() -> str:
    chosen = os.environ.get("EXP_PIPELINE_ENGINE", "duckdb").strip().lower()
    if chosen not in ENGINES:
        raise ValueError(f"EXP_PIPELINE_ENGINE={chosen!r}: choose one of {', '.join(ENGINES)}")
    return chosen


def spark_config() -> dict[str, str]:
    """Local mode by default; EXP_PIPELINE_SPARK_CONF (a JSON object) adds or overrides settings,
    e.g. {"spark.master": "spark://host:7077"} or {"spark.remote": "sc://host:15002"}."""
    from exp_pipeline.spark_warehouse import LOCAL_SPARK_CONFIG

    text = os.environ.get("EXP_PIPELINE_SPARK_CONF", "{}")
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"EXP_PIPELINE_SPARK_CONF is not a JSON object: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("EXP_PIPELINE_SPARK_CONF must be a JSON object of Spark settings")
    # The catalog's own default folder, next to the pipeline's (Spark would use ./spark-warehouse).
    local = {**LOCAL_SPARK_CONFIG, "spark.sql.warehouse.dir": str(DEFAULT_SPARK_LOCATION.parent)}
    config = {**local, **{str(k): str(v) for k, v in overrides.items()}}
    if "spark.remote" in config:
        config.pop("spark.master")  # Spark Connect: the server has its own master
    return config


def spark_warehouse(**overrides) -> Warehouse:
    from dagster_pyspark import LazyPySparkResource

    from exp_pipeline.spark_warehouse import SparkWarehouse

    return SparkWarehouse(
        pyspark=LazyPySparkResource(spark_config=spark_config()),
        database=os.environ.get("EXP_PIPELINE_SPARK_DATABASE", "exp"),
        location=os.environ.get("EXP_PIPELINE_SPARK_LOCATION", str(DEFAULT_SPARK_LOCATION)) or None,
        **overrides,
    )


def default_warehouse() -> Warehouse:
    if engine() == "spark":
        return spark_warehouse()
    return DuckDBWarehouse(duckdb=DuckDBResource(database=duckdb_path()))


def default_resources() -> dict[str, ConfigurableResource]:
    # Only paths are resolved here: nothing opens the database or starts Spark at import time.
    return {"registry": RegistryResource(path=registry_path()), "warehouse": default_warehouse()}
