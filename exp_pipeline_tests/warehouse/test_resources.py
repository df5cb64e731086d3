"""Choosing the engine and its settings from the environment (nothing starts here)."""

import pytest

from exp_pipeline.settings import spark_config
from exp_pipeline.warehouse.resources import DuckDBWarehouse, SparkWarehouse, default_warehouse


def test_duckdb_by_default_spark_when_asked(monkeypatch):
    monkeypatch.delenv("EXP_PIPELINE_ENGINE", raising=False)
    assert isinstance(default_warehouse(), DuckDBWarehouse)
    monkeypatch.setenv("EXP_PIPELINE_ENGINE", "spark")
    warehouse = default_warehouse()
    assert isinstance(warehouse, SparkWarehouse)
    assert warehouse.location.endswith("data/warehouse/spark/exp.db")
    monkeypatch.setenv("EXP_PIPELINE_ENGINE", "postgres")
    with pytest.raises(ValueError, match="EXP_PIPELINE_ENGINE='postgres': choose one of duckdb, spark"):
        default_warehouse()


def test_local_defaults_apply_only_in_local_mode(monkeypatch):
    monkeypatch.delenv("EXP_PIPELINE_SPARK_CONF", raising=False)
    local = spark_config()
    assert local["spark.master"] == "local[2]" and local["spark.sql.session.timeZone"] == "UTC"
    monkeypatch.setenv("EXP_PIPELINE_SPARK_CONF", '{"spark.master": "yarn", "spark.executor.memory": "16g"}')
    cluster = spark_config()
    assert cluster == {
        "spark.app.name": "exp_pipeline", "spark.sql.session.timeZone": "UTC",
        "spark.master": "yarn", "spark.executor.memory": "16g",
    }
    monkeypatch.setenv("EXP_PIPELINE_SPARK_CONF", "[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        spark_config()


def test_a_cluster_cannot_keep_its_tables_in_a_local_folder(monkeypatch):
    monkeypatch.setenv("EXP_PIPELINE_ENGINE", "spark")
    monkeypatch.setenv("EXP_PIPELINE_SPARK_CONF", '{"spark.master": "spark://head:7077"}')
    monkeypatch.delenv("EXP_PIPELINE_SPARK_LOCATION", raising=False)
    assert default_warehouse().location is None  # the catalog's own location
    monkeypatch.setenv("EXP_PIPELINE_SPARK_LOCATION", "/data/exp.db")
    with pytest.raises(ValueError, match="folder of this machine, but Spark runs on a cluster"):
        default_warehouse()
    monkeypatch.setenv("EXP_PIPELINE_SPARK_LOCATION", "s3a://analytics/exp.db")
    assert default_warehouse().location == "s3a://analytics/exp.db"
