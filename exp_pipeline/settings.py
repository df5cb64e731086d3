"""Where things are by default, and the settings read from the environment.

One registry, one place: the warehouse and the Dagster instance default to folders beside the
registry file (`warehouse/warehouse.duckdb`, `.dagster_home/`), so that two registries never share
partitions, runs or alerts. Environment variables override every default: EXP_PIPELINE_REGISTRY,
EXP_PIPELINE_DUCKDB, DAGSTER_HOME, EXP_PIPELINE_ENGINE (`duckdb`, the default, or `spark`),
EXP_PIPELINE_SPARK_CONF.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = PROJECT_ROOT / "data" / "registry.yaml"
# The configuration every Dagster instance of the project starts from (copied into a new one).
INSTANCE_CONFIG_TEMPLATE = PROJECT_ROOT / "exp_pipeline" / "dagster_instance.yaml"
ENGINES = ("duckdb", "spark")

# Every session: Spark's timestamps shown and parsed in UTC, like the pipeline's.
COMMON_SPARK_CONFIG = {"spark.app.name": "exp_pipeline", "spark.sql.session.timeZone": "UTC"}
# Local mode on this machine (the default, the tests and the benchmark); a cluster sets its own.
LOCAL_SPARK_CONFIG = {
    "spark.master": "local[2]",
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.driver.memory": "4g",
    # A console for people: no progress bars, and Spark's own warnings only when they are errors.
    "spark.ui.showConsoleProgress": "false",
    "spark.log.level": "ERROR",
}


def registry_path() -> str:
    return os.environ.get("EXP_PIPELINE_REGISTRY", str(DEFAULT_REGISTRY))


def registry_folder() -> Path:
    """The folder of the registry file: its data root, and where its warehouse and instance live."""
    return Path(registry_path()).resolve().parent


def duckdb_path() -> str:
    # The schema is `exp`; the file is not named after it (DuckDB 2.0 finds `exp.x` ambiguous then).
    return os.environ.get("EXP_PIPELINE_DUCKDB", str(registry_folder() / "warehouse" / "warehouse.duckdb"))


def spark_location() -> Path:
    """Local Spark's default table folder for the registry."""
    return registry_folder() / "warehouse" / "spark" / "exp.db"


def dagster_home() -> str:
    """The Dagster instance of the registry: its runs, partitions, check results and alerts' history."""
    return os.environ.get("DAGSTER_HOME") or str(registry_folder() / ".dagster_home")


def engine() -> str:
    chosen = os.environ.get("EXP_PIPELINE_ENGINE", "duckdb").strip().lower()
    if chosen not in ENGINES:
        raise ValueError(f"EXP_PIPELINE_ENGINE={chosen!r}: choose one of {', '.join(ENGINES)}")
    return chosen


def spark_config() -> dict[str, str]:
    """Spark settings: EXP_PIPELINE_SPARK_CONF (a JSON object) over the defaults.

    Without a `spark.master` (or `spark.remote`) in it, Spark runs in local mode on this machine
    with the local defaults (two cores, 4 GB driver, the catalog's folder under the registry's warehouse/);
    with one, only the settings every engine needs (UTC) are added to the user's.
    """
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
        local = {**LOCAL_SPARK_CONFIG, "spark.sql.warehouse.dir": str(spark_location().parent)}
        return {**COMMON_SPARK_CONFIG, **local, **overrides}
    return {**COMMON_SPARK_CONFIG, **overrides}


def is_local_spark(config: dict[str, str]) -> bool:
    master = config.get("spark.master", "local")
    return "spark.remote" not in config and (master == "local" or master.startswith("local["))
