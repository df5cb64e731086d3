"""Shared fixtures: a generated sample with its registry, warehouse and Dagster instance in tmp,
small tables on each engine, and the test tiers (markers)."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import duckdb
import ibis
import pandas as pd
import pytest
from dagster import DagsterInstance
from dagster_duckdb import DuckDBResource

from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.sample_data import generate
from exp_pipeline.settings import DEFAULT_REGISTRY, spark_config
from exp_pipeline.transforms.fixed_point import SumBound, read_bounds, value_bounds
from exp_pipeline.transforms.subject_values import (
    VALUE_KEY,
    complete_statistics,
    subject_bounds,
    sufficient_statistics,
)
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession
from exp_pipeline.warehouse.resources import DuckDBWarehouse, SparkWarehouse, Warehouse

# Temporary test instances would otherwise send and log telemetry.
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

# Big enough that a 12% revenue lift is clearly detectable (same size as the README's run).
E2E_USERS = 100_000


# The slow tiers, each a marker; every test in one of them is also `slow`, so that the inner loop
# is `pytest -m "not slow"` (CI runs everything).
SLOW_TIERS = ("e2e", "spark", "browser", "benchmark")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.slow)


# Engine-dependent tests run on both; Spark in local mode, one session for the whole test run.
ENGINES = ["duckdb", pytest.param("spark", marks=pytest.mark.spark)]
TEST_SPARK_CONFIG = {
    **spark_config(),
    "spark.master": "local[2]",
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.memory": "2g",
    "spark.sql.warehouse.dir": tempfile.mkdtemp(prefix="exp_pipeline_spark_catalog_"),
}


def spark_warehouse_at(root: Path) -> Warehouse:
    """A Spark warehouse of its own (database and folder) on the test run's shared session."""
    from dagster_pyspark import LazyPySparkResource

    return SparkWarehouse(
        pyspark=LazyPySparkResource(spark_config=TEST_SPARK_CONFIG),
        database=f"exp_{uuid.uuid5(uuid.NAMESPACE_URL, str(root)).hex[:16]}",
        location=str(root / "spark" / "exp.db"),
    )


def warehouse_at(root: Path, engine: str) -> Warehouse:
    if engine == "spark":
        return spark_warehouse_at(root)
    return DuckDBWarehouse(duckdb=DuckDBResource(database=str(root / "warehouse" / "warehouse.duckdb")))


class Workspace:
    def __init__(self, root: Path, users: int, engine: str = "duckdb"):
        self.root = root
        self.engine = engine
        self.registry_path = root / "registry.yaml"
        shutil.copy(DEFAULT_REGISTRY, self.registry_path)
        self.truth = generate(root / "sample", n_users=users)
        self.database = root / "warehouse" / "warehouse.duckdb"

    @classmethod
    def existing(cls, root: Path, engine: str = "duckdb") -> "Workspace":
        """A workspace whose registry and logs are already written in `root`."""
        workspace = cls.__new__(cls)
        workspace.root = root
        workspace.engine = engine
        workspace.registry_path = root / "registry.yaml"
        workspace.truth = None
        workspace.database = root / "warehouse" / "warehouse.duckdb"
        return workspace

    def resources(self) -> dict:
        return {
            "registry": RegistryResource(path=str(self.registry_path)),
            "warehouse": warehouse_at(self.root, self.engine),
        }

    def warehouse(self) -> Warehouse:
        return self.resources()["warehouse"]

    def rows(self, table: str, experiment_id: str | None = None) -> pd.DataFrame:
        """A table (or one experiment's rows) as pandas, columns by name, rows sorted: the same
        frame from either engine."""
        with self.warehouse().session() as session:
            expr = session.table(table) if experiment_id is None else session.partition(table, experiment_id)
            frame = session.to_pandas(expr)
        frame = frame[sorted(frame.columns)]
        for column in frame.select_dtypes("datetimetz").columns:
            frame[column] = frame[column].astype("datetime64[us, UTC]")  # DuckDB's unit; Spark's is ns
        return frame.sort_values(list(frame.columns), ignore_index=True)


class EngineTables:
    """Tables built from frames and run on one engine, through the warehouse session's interface."""

    def __init__(self, session):
        self.session = session
        self.tables: dict[str, ibis.Table] = {}

    def create_table(self, name: str, obj, overwrite: bool = True) -> ibis.Table:
        if not isinstance(obj, ibis.Table):
            # A missing value is a null on every engine (Spark would keep pandas' NaN as NaN).
            obj = ibis.memtable(obj.astype(object).where(obj.notna(), None), schema=ibis.memtable(obj).schema())
        expr = obj
        self.tables[name] = self.session.temp_table(name, expr)
        return self.tables[name]

    def bounds(self, table: ibis.Table, by=VALUE_KEY) -> dict[tuple, SumBound]:
        """The fixed-point bounds of a values table per group of `by` (a small query)."""
        return read_bounds(self.session.to_pandas(value_bounds(table, by)), by)

    def statistics(self, values: ibis.Table, subjects: pd.DataFrame | None = None, metrics: dict | None = None) -> pd.DataFrame:
        """The sufficient statistics of a values table as the pass computes them; `subjects`
        (experiment_id, variant_id, n) and `metrics` ({experiment: [metric, ...]}) default to
        those the values name."""
        if subjects is None:
            named = self.to_pandas(values.select("experiment_id", "variant_id", "subject_id").distinct())
            subjects = named.groupby(["experiment_id", "variant_id"]).size().rename("n").reset_index()
        per_experiment = subjects.groupby("experiment_id")["n"].sum().astype(int).to_dict()
        if metrics is None:
            named = self.to_pandas(values.select("experiment_id", "metric").distinct())
            metrics = named.groupby("experiment_id")["metric"].apply(sorted).to_dict()
        sums = self.to_pandas(sufficient_statistics(values, subject_bounds(self.bounds(values), per_experiment)))
        return complete_statistics(sums, subjects, metrics)

    def table(self, name: str) -> ibis.Table:
        return self.tables[name]

    def to_pandas(self, expr) -> pd.DataFrame:
        return self.session.to_pandas(expr)


@pytest.fixture(params=ENGINES)
def con(request, tmp_path):
    """The transforms on each engine: DuckDB in memory, Spark in local mode."""
    if request.param == "duckdb":
        yield EngineTables(DuckDBWarehouseSession(duckdb.connect(), "exp"))
    else:
        with spark_warehouse_at(tmp_path).session() as session:
            yield EngineTables(session)


@pytest.fixture()
def duck():
    """DuckDB alone: reading files is the engine's part (see warehouse/test_warehouse.py for both engines)."""
    return ibis.duckdb.connect()


@pytest.fixture(scope="session", autouse=True)
def stop_spark_at_the_end():
    """Spark starts when a test first needs it (getOrCreate) and stops after the last test."""
    yield
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    shutil.rmtree(TEST_SPARK_CONFIG["spark.sql.warehouse.dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def sample_workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("sample"), E2E_USERS)


@pytest.fixture(scope="session")
def spark_sample_workspace(sample_workspace) -> Workspace:
    """The same logs and registry, analysed on Spark into its own warehouse (under spark/)."""
    workspace = Workspace.existing(sample_workspace.root, "spark")
    workspace.truth = sample_workspace.truth
    return workspace


@pytest.fixture()
def instance(tmp_path):
    with DagsterInstance.local_temp(str(tmp_path)) as dagster_instance:
        yield dagster_instance


TINY_REGISTRY = """
sources:
  assignments:
    path: logs/assignments.parquet
    columns: {subject_id: user_id, experiment_id: experiment_key, variant_id: variation, assigned_at: exposed_at}
    properties: [device_type]
  events:
    path: logs/events.parquet
    columns: {subject_id: user_id, event_at: event_ts, event_name: event_type, value: amount}
metrics:
  revenue: {event_name: purchase, aggregation: sum, window_end_days: 14}
experiments:
  - id: exp_a
    name: Experiment A
    start_at: 2026-10-01T00:00:00Z
    end_at: 2026-10-29T00:00:00Z
    variants:
      - {id: control, weight: 0.5, control: true}
      - {id: treatment, weight: 0.5}
    metrics: [revenue]
    srm: {blocks_metrics: BLOCKS}
  - id: exp_b
    name: Experiment B
    start_at: 2026-10-01T00:00:00Z
    variants:
      - {id: control, weight: 0.5, control: true}
      - {id: treatment, weight: 0.5}
    metrics: [revenue]
"""


def add_logins(workspace: Workspace, logged_in_every: int, shared: int, purchases: bool = False) -> None:
    """The tiny workspace's exposures gain a `login_id` (mapped as the secondary id `user_id`): every
    `logged_in_every`-th subject logs in, the rest stay anonymous (null); `shared` logins of exp_a
    are seen on a second subject later (a shared device). With `purchases`, the event log gains
    purchases keyed by login (event `order`): one before the subject's first exposure, one 2 hours
    after, one 20 days after (outside a 14-day window) per login, and orders of a login no
    subject was seen with."""
    import pandas as pd

    root = workspace.registry_path.parent
    exposures = pd.read_parquet(root / "logs/assignments.parquet")
    number = exposures.user_id.str.rsplit("_", n=1).str[-1].astype(int)
    exposures["login_id"] = ("login_" + exposures.user_id).where(number % logged_in_every == 0)
    first = exposures[(exposures.experiment_key == "exp_a") & exposures.login_id.notna()].head(shared)
    # In the other arm: the login's events would move arms if the later subject took them.
    again = first.assign(
        user_id=first.user_id + "_other", exposed_at=first.exposed_at + pd.Timedelta(hours=1),
        variation=first.variation.map({"control": "treatment", "treatment": "control"}),
    )
    pd.concat([exposures, again]).to_parquet(root / "logs/assignments.parquet")
    if purchases:
        logins = exposures[exposures.login_id.notna()]
        rows = [
            (login, at + offset, "order", value)
            for login, at, number in zip(logins.login_id, logins.exposed_at, range(len(logins)), strict=True)
            for offset, value in ((pd.Timedelta(hours=-3), 50.0), (pd.Timedelta(hours=2), float(10 + number % 7)),
                                  (pd.Timedelta(days=20), 70.0))
        ]
        rows.append(("login_nobody", logins.exposed_at.min() + pd.Timedelta(hours=1), "order", 99.0))
        events = pd.read_parquet(root / "logs/events.parquet")
        orders = pd.DataFrame(rows, columns=["user_id", "event_ts", "event_type", "amount"])
        pd.concat([events, orders.astype(events.dtypes.to_dict())]).to_parquet(root / "logs/events.parquet")
    text = workspace.registry_path.read_text().replace("    properties: [device_type]\n", (
        "    properties: [device_type]\n    secondary_ids: {user_id: login_id}\n"
    ), 1)
    if purchases:  # exp_a gains `orders`, a metric keyed by the login
        text = text.replace("metrics:\n", "metrics:\n  orders: {event_name: order, aggregation: sum, entity: user_id}\n", 1)
        text = text.replace("    metrics: [revenue]\n", "    metrics: [revenue, orders]\n", 1)
    workspace.registry_path.write_text(text)


def write_tiny_workspace(
    root: Path,
    *,
    arms: dict[str, dict[str, int]] | None = None,
    multi_variant: int = 0,
    srm_blocks: bool = False,
    engine: str = "duckdb",
) -> Workspace:
    """A small hand-made workspace: per experiment, subjects per variant (and per device), some
    multi-variant subjects in exp_a, one purchase per subject 1 hour after exposure."""
    import numpy as np
    import pandas as pd

    arms = arms or {"exp_a": {"control": 300, "treatment": 300}, "exp_b": {"control": 300, "treatment": 300}}
    rng = np.random.default_rng(5)
    exposures, events = [], []
    base = pd.Timestamp("2026-10-02T00:00:00Z")
    for experiment_id, variants in arms.items():
        for variant, count in variants.items():
            for i in range(count):
                user = f"{experiment_id}_{variant}_{i}"
                at = base + pd.Timedelta(minutes=int(rng.integers(0, 10_000)))
                device = ("ios", "android", "web")[i % 3]
                exposures.append((user, experiment_id, variant, at, device))
                events.append((user, at + pd.Timedelta(hours=1), "purchase", float(rng.gamma(2, 10))))
                events.append((user, at - pd.Timedelta(days=1), "purchase", float(rng.gamma(2, 10))))
    for i in range(multi_variant):
        user = f"exp_a_control_{i}"
        exposures.append((user, "exp_a", "treatment", base + pd.Timedelta(days=8), "ios"))
    logs = root / "logs"
    logs.mkdir(parents=True)
    pd.DataFrame(exposures, columns=["user_id", "experiment_key", "variation", "exposed_at", "device_type"]).to_parquet(
        logs / "assignments.parquet"
    )
    pd.DataFrame(events, columns=["user_id", "event_ts", "event_type", "amount"]).to_parquet(logs / "events.parquet")
    (root / "registry.yaml").write_text(TINY_REGISTRY.replace("BLOCKS", "true" if srm_blocks else "false"))
    return Workspace.existing(root, engine)
