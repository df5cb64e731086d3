"""Resources and where they point by default (environment variables override every default).

EXP_PIPELINE_ENGINE picks the warehouse engine: `duckdb` (default) or `spark`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource

from exp_pipeline.registry import Registry, is_uri, load_registry
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
    """Spark settings: EXP_PIPELINE_SPARK_CONF (a JSON object) over the defaults.

    Without a `spark.master` (or `spark.remote`) in it, Spark runs in local mode on this machine
    with the local defaults (two cores, 4 GB driver, the catalog's folder under data/warehouse);
    with one, only the settings every engine needs (UTC) are added to the user's.
    """
    from exp_pipeline.spark_warehouse import COMMON_SPARK_CONFIG, LOCAL_SPARK_CONFIG

    text = os.environ.get("EXP_PIPELINE_SPARK_CONF", "{}")
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"EXP_PIPELINE_SPARK_CONF is not a JSON object: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("EXP_PIPELINE_SPARK_CONF must be a JSON object of Spark settings")
    overrides = {str(k): str(v) for k, v in overrides.items()}
    if is_local_spark(overrides):
        # The catalog's own default folder next to the pipeline's (Spark would use ./spark-warehouse).
        local = {**LOCAL_SPARK_CONFIG, "spark.sql.warehouse.dir": str(DEFAULT_SPARK_LOCATION.parent)}
        return {**COMMON_SPARK_CONFIG, **local, **overrides}
    return {**COMMON_SPARK_CONFIG, **overrides}


def is_local_spark(config: dict[str, str]) -> bool:
    master = config.get("spark.master", "local")
    return "spark.remote" not in config and (master == "local" or master.startswith("local["))


def spark_warehouse() -> Warehouse:
    """The Spark warehouse of the environment; a cluster's tables must live on shared storage."""
    from dagster_pyspark import LazyPySparkResource

    from exp_pipeline.spark_warehouse import SparkWarehouse

    config = spark_config()
    local = is_local_spark(config)
    location = os.environ.get("EXP_PIPELINE_SPARK_LOCATION", str(DEFAULT_SPARK_LOCATION) if local else "")
    if location and not local and not is_uri(location):
        raise ValueError(
            f"EXP_PIPELINE_SPARK_LOCATION={location!r} is a folder of this machine, but Spark runs on "
            f"a cluster ({config.get('spark.master') or config.get('spark.remote')}) whose executors "
            "cannot write there: use shared storage (s3a://, abfss://, hdfs://, ...) or leave it "
            "empty for the catalog's own location"
        )
    return SparkWarehouse(
        pyspark=LazyPySparkResource(spark_config=config),
        database=os.environ.get("EXP_PIPELINE_SPARK_DATABASE", "exp"),
        location=location or None,
    )


def default_warehouse() -> Warehouse:
    if engine() == "spark":
        return spark_warehouse()
    return DuckDBWarehouse(duckdb=DuckDBResource(database=duckdb_path()))


def default_resources() -> dict[str, ConfigurableResource]:
    # Only paths are resolved here: nothing opens the database or starts Spark at import time.
    return {"registry": RegistryResource(path=registry_path()), "warehouse": default_warehouse()}
