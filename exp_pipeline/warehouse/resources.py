"""The warehouse as a Dagster resource: DuckDB by default (through dagster-duckdb), or Spark
(through dagster-pyspark). The only part of the warehouse that knows Dagster: resources must
subclass its ConfigurableResource. Nothing opens the database or starts Spark until a session is
asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from dagster_pyspark import LazyPySparkResource
from pydantic import Field

from exp_pipeline import settings
from exp_pipeline.registry import is_uri
from exp_pipeline.warehouse import duckdb_engine, spark_engine
from exp_pipeline.warehouse.interface import WarehouseSession


class Warehouse(ConfigurableResource):
    """The analytics warehouse: an engine behind one session interface, opened only when used.

    DuckDBWarehouse (the default) and SparkWarehouse; `default_warehouse` picks one.
    """

    @contextmanager
    def session(self) -> Iterator[WarehouseSession]:
        raise NotImplementedError("use DuckDBWarehouse or SparkWarehouse")
        yield

    def describe(self) -> str:
        """Where the tables are, for people."""
        raise NotImplementedError


class DuckDBWarehouse(Warehouse):
    """A DuckDB file (through dagster-duckdb)."""

    duckdb: DuckDBResource
    schema_name: str = Field(default="exp", description="schema holding the pipeline's tables")
    memory_limit: str = Field(
        default="2.5GB",
        description=(
            "DuckDB's memory limit for the pipeline's queries; bigger joins spill to a temporary "
            "folder next to the database file instead of growing the process (DuckDB's own default "
            "is 80% of the machine). Set it in connection_config to override per deployment."
        ),
    )
    lock_timeout_seconds: float = Field(
        default=1800,
        description=(
            "how long to wait for another process's write lock on the DuckDB file before failing; "
            "runs under `dagster dev` queue on the warehouse_writer pool and rarely wait here"
        ),
    )

    def describe(self) -> str:
        return f"DuckDB {self.duckdb.database} (schema {self.schema_name})"

    @contextmanager
    def session(self) -> Iterator[duckdb_engine.DuckDBWarehouseSession]:
        # Connected by the engine rather than through DuckDBResource.get_connection(): its fixed
        # backoff (about 100 s) would stack on top of, and override, the configured wait.
        config = {
            "custom_user_agent": "dagster",
            "memory_limit": self.memory_limit,
            # No query relies on insertion order; without it, large inserts stream with less memory.
            "preserve_insertion_order": False,
            **self.duckdb.connection_config,
        }
        with duckdb_engine.open_session(
            self.duckdb.database, self.schema_name, config, self.lock_timeout_seconds
        ) as session:
            yield session


class SparkWarehouse(Warehouse):
    """Spark through dagster-pyspark; the session starts when an asset first needs it."""

    pyspark: LazyPySparkResource
    database: str = Field(default="exp", description="Spark catalog database holding the pipeline's tables")
    location: str | None = Field(
        default=None,
        description=(
            "folder (or URI: s3a://, abfss://, hdfs://) of the database's tables; None keeps the "
            "database where the catalog puts it (spark.sql.warehouse.dir)"
        ),
    )

    def describe(self) -> str:
        where = self.location or "the catalog's warehouse folder"
        return f"Spark database {self.database} ({where})"

    @contextmanager
    def session(self) -> Iterator[spark_engine.SparkWarehouseSession]:
        with spark_engine.open_session(self.pyspark.spark_session, self.database, self.location) as session:
            yield session


def spark_warehouse() -> SparkWarehouse:
    """The Spark warehouse of the environment; a cluster's tables must live on shared storage."""
    config = settings.spark_config()
    local = settings.is_local_spark(config)
    default_location = str(settings.spark_location()) if local else ""
    location = os.environ.get("EXP_PIPELINE_SPARK_LOCATION", default_location)
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
    """The engine EXP_PIPELINE_ENGINE names (DuckDB by default); only paths are resolved here."""
    if settings.engine() == "spark":
        return spark_warehouse()
    return DuckDBWarehouse(duckdb=DuckDBResource(database=settings.duckdb_path()))
