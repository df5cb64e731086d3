"""The warehouse resource: reading sources (and refusing bad ones clearly), atomic writes, locks."""

import multiprocessing
import time
from contextlib import contextmanager

import duckdb
import ibis
import pandas as pd
import pytest
from dagster_duckdb import DuckDBResource
from pyspark.errors import PySparkException

from exp_pipeline.registry import Source
from exp_pipeline.warehouse.duckdb_engine import WarehouseBusy
from exp_pipeline.warehouse.interface import SchemaChangeError, SourceError
from exp_pipeline.warehouse.resources import DuckDBWarehouse
from exp_pipeline_tests.conftest import ENGINES, warehouse_at

# What a failed write raises on each engine.
WRITE_FAILURES = (duckdb.Error, PySparkException)


@pytest.fixture(params=ENGINES)
def warehouse(request, tmp_path):
    return warehouse_at(tmp_path, request.param)


@pytest.fixture()
def duckdb_warehouse(tmp_path):
    return DuckDBWarehouse(duckdb=DuckDBResource(database=str(tmp_path / "w.duckdb")))


def sorted_rows(session, name) -> list[tuple]:
    frame = session.to_pandas(session.table(name))
    return sorted(frame[sorted(frame.columns)].itertuples(index=False, name=None))


def read(warehouse, path, file_format):
    with warehouse.session() as session:
        table = session.read_source(Source(path=str(path), format=file_format), str(path), "assignments source")
        return session.to_pandas(table), list(session.skipped_empty_files)


@pytest.mark.parametrize(
    ("name", "content", "file_format", "message"),
    [
        ("missing*.parquet", None, "parquet", r"no file matches .*missing\*\.parquet'; check 'path' in the registry"),
        ("junk.parquet", b"this is not parquet", "parquet", r"junk\.parquet is not a readable parquet file .*set 'format'"),
        ("zero.parquet", b"", "parquet", r"every file matching .*zero\.parquet' is empty \(0 bytes\)"),
        ("zero.csv", b"", "csv", r"every file matching .*zero\.csv' is empty \(0 bytes\)"),
    ],
)
def test_unreadable_sources_fail_naming_the_file_and_the_fix(warehouse, tmp_path, name, content, file_format, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SourceError, match=message):
        read(warehouse, tmp_path / name, file_format)


def test_a_glob_never_reads_a_symlink_that_points_outside_the_data_root(warehouse, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(root / "inside.parquet")
    pd.DataFrame({"a": [2]}).to_parquet(outside / "passwords.parquet")
    (root / "linked.parquet").symlink_to(outside / "passwords.parquet")
    with warehouse.session() as session, pytest.raises(
        SourceError, match=rf"linked\.parquet resolves to {outside}/passwords\.parquet, outside the data root"
    ):
        session.read_source(Source(path="*.parquet"), str(root / "*.parquet"), "events source", root.resolve())
    with warehouse.session() as session:  # allowed explicitly (no root to stay in)
        frame = session.to_pandas(session.read_source(Source(path="*.parquet"), str(root / "*.parquet"), "events source"))
        assert sorted(frame.a) == [1, 2]


@pytest.mark.parametrize("header", ["user_id;ts;user_id", "user_id,ts,User_ID "])
def test_a_csv_header_naming_a_column_twice_is_refused(warehouse, tmp_path, header):
    (tmp_path / "a.csv").write_text(f"{header}\nu1;2026-01-01;u2\n")
    with pytest.raises(SourceError, match=r"the header of .*a\.csv names 'user_id' more than once \(ignoring case\)"):
        read(warehouse, tmp_path / "a.csv", "csv")


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_a_log_with_its_own_filename_and_source_file_columns_is_read(warehouse, tmp_path, file_format):
    frame = pd.DataFrame({"user_id": ["a"], "filename": ["report.pdf"], "source_file": ["upstream.log"]})
    path = tmp_path / f"log.{file_format}"
    frame.to_parquet(path) if file_format == "parquet" else frame.to_csv(path, index=False)
    read_back, _ = read(warehouse, path, file_format)
    assert read_back.filename.tolist() == ["report.pdf"]
    assert read_back.source_file.tolist() == [str(path)]


def test_a_csv_that_is_not_utf8_says_so(duckdb_warehouse, tmp_path):
    (tmp_path / "latin.csv").write_bytes("user_id,city\nu1,K\u00f6ln\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin\.csv is not a readable csv file \(CSV Error on Line: 2: .*not utf-8 encoded"):
        read(duckdb_warehouse, tmp_path / "latin.csv", "csv")


def test_duckdb_refuses_a_storage_uri_naming_the_engine_that_reads_it(duckdb_warehouse):
    with pytest.raises(SourceError, match=r"'s3a://logs/x/\*\.parquet' is not a local path; DuckDB reads local files"):
        read(duckdb_warehouse, "s3a://logs/x/*.parquet", "parquet")


def test_a_catalog_table_is_a_source_and_a_missing_one_is_named(warehouse):
    with warehouse.session() as session:
        session.replace_table("exposures", pd.DataFrame({"user_id": ["a", "b"], "arm": ["control", "treatment"]}))
        qualified = f"{session.schema}.exposures"
        frame = session.to_pandas(session.read_source(Source(table=qualified), None, "assignments source"))
        assert sorted(frame.user_id) == ["a", "b"] and set(frame.source_file) == {qualified}
        with pytest.raises(SourceError, match=rf"assignments source: table '{session.schema}.nowhere' is not in the warehouse"):
            session.read_source(Source(table=f"{session.schema}.nowhere"), None, "assignments source")


def test_a_header_only_csv_is_an_empty_source(warehouse, tmp_path):
    (tmp_path / "a.csv").write_text("user_id,exp_key,arm,ts\n")
    frame, _ = read(warehouse, tmp_path / "a.csv", "csv")
    assert frame.empty and list(frame.columns) == ["user_id", "exp_key", "arm", "ts", "source_file"]


def test_a_truncated_last_line_is_kept_padded_not_lost(warehouse, tmp_path):
    (tmp_path / "a.csv").write_text("user_id,exp_key,arm,ts\nu1,e,control,2026-10-02\nu2,e,cont")
    frame, _ = read(warehouse, tmp_path / "a.csv", "csv")
    assert len(frame) == 2
    last = frame.iloc[1]
    assert last["user_id"] == "u2" and last["arm"] == "cont" and pd.isna(last["ts"])


def test_empty_files_in_a_glob_are_skipped_and_reported(warehouse, tmp_path):
    pd.DataFrame({"user_id": ["a"], "ts": ["2026-10-02"]}).to_csv(tmp_path / "day1.csv", index=False)
    (tmp_path / "day2.csv").write_bytes(b"")
    frame, skipped = read(warehouse, tmp_path / "day*.csv", "csv")
    assert len(frame) == 1 and skipped == [str(tmp_path / "day2.csv")]
    assert frame["source_file"].iloc[0].endswith("day1.csv")


def test_csv_files_with_columns_in_another_order_are_united_by_name(warehouse, tmp_path):
    (tmp_path / "day1.csv").write_text("user_id,arm,ts\na,control,2026-10-02\n")
    (tmp_path / "day2.csv").write_text("ts,user_id,arm,device\n2026-10-03,b,treatment,ios\n")
    frame, _ = read(warehouse, tmp_path / "day*.csv", "csv")
    rows = frame.sort_values("user_id")[["user_id", "arm", "ts", "device"]].astype(object)
    assert rows.where(rows.notna(), None).values.tolist() == [
        ["a", "control", "2026-10-02", None], ["b", "treatment", "2026-10-03", "ios"],
    ]


def test_parquet_files_written_with_different_timestamp_kinds_read_together(warehouse, tmp_path):
    pd.DataFrame({"user_id": ["a"], "ts": pd.to_datetime(["2026-10-02T10:00:00"])}).to_parquet(tmp_path / "naive.parquet")
    pd.DataFrame({"user_id": ["b"], "ts": pd.to_datetime(["2026-10-02T12:00:00+02:00"])}).to_parquet(tmp_path / "aware.parquet")
    frame, _ = read(warehouse, tmp_path / "*.parquet", "parquet")
    assert sorted(frame["user_id"]) == ["a", "b"]


def test_a_failed_partition_write_leaves_the_previous_rows(warehouse):
    with warehouse.session() as session:
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1", "e1"], "x": [1, 2]}))
        session.replace_partition("t", "e2", pd.DataFrame({"experiment_id": ["e2"], "x": [3]}))
        # Thousands of good rows, then one that fails while the write is under way (after
        # DuckDB's DELETE ran in the transaction; after Spark's tasks began writing files).
        text = ibis.memtable(pd.DataFrame({"experiment_id": "e1", "x": [str(i) for i in range(5000)] + ["oops"]}))
        with pytest.raises(WRITE_FAILURES):
            session.replace_partition("t", "e1", text.mutate(x=text.x.cast("int64")))
        rows = sorted_rows(session, "t")
    assert rows == [("e1", 1), ("e1", 2), ("e2", 3)]


def test_a_column_added_by_a_newer_version_is_added_and_older_partitions_read_it_as_null(warehouse):
    """A release adding a column to a stored table (variant_metrics gained cuped_abs_lift) runs on
    an existing warehouse: the column is appended, older partitions read null."""
    with warehouse.session() as session:
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1"], "x": [1]}))
        session.replace_partition("t", "e2", pd.DataFrame({"experiment_id": ["e2"], "x": [2], "y": [2.5]}))
        frame = session.to_pandas(session.table("t")).sort_values("experiment_id")
    assert sorted(frame.columns) == ["experiment_id", "x", "y"]  # Spark keeps its partition column last
    assert frame["x"].tolist() == [1, 2]
    assert frame["y"].isna().tolist() == [True, False] and frame["y"].iloc[1] == 2.5


def test_a_column_no_longer_written_stays_for_older_partitions_and_is_null_in_the_rewritten_one(warehouse):
    """A property taken out of the registry: its column stays (the partitions not rewritten keep
    their values), the partition rewritten without it reads null."""
    with warehouse.session() as session:
        for e in ("e1", "e2"):
            session.replace_partition("t", e, pd.DataFrame({"experiment_id": [e], "x": [1], "device": ["ios"]}))
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1"], "x": [3]}))
        frame = session.to_pandas(session.table("t")).sort_values("experiment_id")
    assert frame["x"].tolist() == [3, 1]
    assert frame["device"].isna().tolist() == [True, False]


def test_a_stored_column_of_another_type_stops_the_write_naming_table_column_and_fix(warehouse):
    with warehouse.session() as session:
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1"], "x": [1]}))
        session.replace_partition("t", "e2", pd.DataFrame({"experiment_id": ["e2"], "x": [2]}))
        new = pd.DataFrame({"experiment_id": ["e1"], "x": ["one"]})
        assert [(c, str(a), str(b)) for c, a, b in session.retyped_columns("t", ibis.memtable(new).schema())] == [
            ("x", "int64", "string")
        ]
        with pytest.raises(SchemaChangeError, match=r"table \w+\.t cannot take this run's rows: column 'x' is "
                           r"stored as int64 but this run writes string\. .* the run stopped before writing"):
            session.replace_partition("t", "e1", new)
        assert sorted_rows(session, "t") == [("e1", 1), ("e2", 2)]
        # A whole table replaced is created anew, whatever its types were.
        session.replace_table("w", pd.DataFrame({"x": [1]}))
        session.replace_table("w", pd.DataFrame({"x": ["one"]}))
        assert session.to_pandas(session.table("w"))["x"].tolist() == ["one"]


def test_an_empty_result_empties_only_its_partition(warehouse):
    with warehouse.session() as session:
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1"], "x": [1]}))
        session.replace_partition("t", "e2", pd.DataFrame({"experiment_id": ["e2"], "x": [2]}))
        written = session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": pd.Series([], dtype=str), "x": pd.Series([], dtype="int64")}))
        assert written == 0
        assert sorted_rows(session, "t") == [("e2", 2)]


def test_several_experiments_are_replaced_together_and_the_others_stay(warehouse):
    with warehouse.session() as session:
        for e, x in (("e1", 1), ("e2", 2), ("e3", 3)):
            session.replace_partition("t", e, pd.DataFrame({"experiment_id": [e], "x": [x]}))
        rows = ibis.memtable(pd.DataFrame({"experiment_id": ["e1", "e1", "e2", "e3"], "x": [10, 11, 20, 30]}))
        # e1 and e2 rewritten from one table (its e3 row is not theirs: left out); e3 untouched.
        written = session.replace_experiments(["e1", "e2"], {"t": rows, "u": rows.mutate(y=rows.x * 2).drop("x")})
        assert written == {"t": {"e1": 2, "e2": 1}, "u": {"e1": 2, "e2": 1}}
        assert sorted_rows(session, "t") == [("e1", 10), ("e1", 11), ("e2", 20), ("e3", 3)]
        assert sorted_rows(session, "u") == [("e1", 20), ("e1", 22), ("e2", 40)]
        # An experiment with no rows any more is emptied.
        empty = rows.filter(rows.experiment_id == "e2")
        assert session.replace_experiments(["e1", "e2"], {"t": empty})["t"] == {"e1": 0, "e2": 1}
        assert sorted_rows(session, "t") == [("e2", 20), ("e3", 3)]


def test_rows_are_appended_and_updated_by_key(warehouse):
    """The alert outbox's two operations."""
    at = pd.Timestamp("2026-10-02T10:00:00Z")
    with warehouse.session() as session:
        session.append("outbox", ibis.memtable(pd.DataFrame({
            "alert_id": ["a", "b"], "delivered": [False, False], "delivered_at": pd.Series([pd.NaT, pd.NaT], dtype="datetime64[us, UTC]"),
        })))
        session.append("outbox", ibis.memtable(pd.DataFrame({
            "alert_id": ["c"], "delivered": [False], "delivered_at": pd.Series([pd.NaT], dtype="datetime64[us, UTC]"),
        })))
        session.update_row("outbox", "alert_id", "b", {"delivered": True, "delivered_at": at})
        rows = session.to_pandas(session.table("outbox")).sort_values("alert_id")
    assert rows["delivered"].tolist() == [False, True, False]
    assert rows["delivered_at"].isna().tolist() == [True, False, True]
    assert rows["delivered_at"].iloc[1] == at


def test_several_tables_are_replaced_all_or_nothing(duckdb_warehouse):
    warehouse = duckdb_warehouse
    with warehouse.session() as session:
        session.replace_partitions("e1", {
            "a": pd.DataFrame({"experiment_id": ["e1"], "x": [1]}),
            "b": pd.DataFrame({"experiment_id": ["e1"], "y": [1]}),
        })
        # b's write fails after a's is done in the same transaction: neither stays.
        with pytest.raises(SchemaChangeError):
            session.replace_partitions("e1", {
                "a": pd.DataFrame({"experiment_id": ["e1"], "x": [2]}),
                "b": pd.DataFrame({"experiment_id": ["e1"], "y": ["not a number"]}),
            })
        assert session.raw.execute("SELECT x FROM exp.a").fetchall() == [(1,)]
        assert session.raw.execute("SELECT y FROM exp.b").fetchall() == [(1,)]


def _hold_lock(path: str, seconds: float, ready) -> None:
    connection = duckdb.connect(path)
    connection.execute("CREATE TABLE IF NOT EXISTS held (x INT)")
    ready.set()
    time.sleep(seconds)
    connection.close()


@contextmanager
def _lock_held(path: str, seconds: float):
    """Another process holding the DuckDB file's write lock for `seconds` (stopped on exit)."""
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(path, seconds, ready))
    holder.start()
    try:
        assert ready.wait(30)
        yield
    finally:
        holder.terminate()
        holder.join()


def test_a_locked_file_is_waited_for_then_used(tmp_path):
    path = str(tmp_path / "w.duckdb")
    with _lock_held(path, 3):
        started = time.monotonic()
        warehouse = DuckDBWarehouse(duckdb=DuckDBResource(database=path), lock_timeout_seconds=60)
        with warehouse.session() as session:
            assert session.raw.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - started >= 1  # it did wait for the other process


def test_a_lock_held_too_long_fails_with_a_clear_error(tmp_path):
    path = str(tmp_path / "w.duckdb")
    with _lock_held(path, 20):
        warehouse = DuckDBWarehouse(duckdb=DuckDBResource(database=path), lock_timeout_seconds=0.5)
        with pytest.raises(WarehouseBusy, match="stayed locked by another process"):
            with warehouse.session():
                pass


# -- kill -9 in the middle of writing ------------------------------------------------------------

MATERIALIZE = """
import sys
from dagster import DagsterInstance, materialize
from dagster_duckdb import DuckDBResource
from pyspark.errors import PySparkException
from exp_pipeline.defs.assets import ANALYSIS_ASSETS
from exp_pipeline.defs.partitions import experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.warehouse.resources import DuckDBWarehouse

registry, database, home, experiment, repeat = sys.argv[1:6]
resources = {
    "registry": RegistryResource(path=registry),
    "warehouse": DuckDBWarehouse(duckdb=DuckDBResource(database=database)),
}
with DagsterInstance.local_temp(home) as instance:
    instance.add_dynamic_partitions(experiment_partitions.name, [experiment])
    print("ready", flush=True)
    while True:  # with repeat=forever, rewrite every table again and again until killed
        assert materialize(ANALYSIS_ASSETS, partition_key=experiment, instance=instance, resources=resources).success
        if repeat == "once":
            break
"""

TABLES = ("raw_assignments", "rejected_rows", "deduped_assignments", "post_assignment_events",
          "pre_assignment_events", "variant_metrics")


def snapshot(warehouse) -> dict:
    with warehouse.session() as session:
        return {
            t: session.raw.execute(f"SELECT * FROM exp.{t} WHERE experiment_id = 'exp_a' ORDER BY ALL").df()
            for t in TABLES
        }


@pytest.mark.e2e
def test_killing_a_run_mid_write_leaves_every_table_intact_and_the_next_run_succeeds(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys

    from dagster import DagsterInstance, materialize

    from exp_pipeline.defs.assets import ANALYSIS_ASSETS
    from exp_pipeline.defs.partitions import experiment_partitions
    from exp_pipeline_tests.conftest import write_tiny_workspace

    # Big enough that writing takes a good part of each run.
    workspace = write_tiny_workspace(tmp_path / "ws", arms={"exp_a": {"control": 20000, "treatment": 20000}})
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, ["exp_a"])
        assert materialize(ANALYSIS_ASSETS, partition_key="exp_a", instance=instance,
                           resources=workspace.resources()).success
    before = snapshot(workspace.warehouse())
    assert all(len(frame) for t, frame in before.items() if t != "rejected_rows")

    rng = random.Random(7)
    home = tmp_path / "killed_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
    for attempt in range(5):
        process = subprocess.Popen(
            [sys.executable, "-c", MATERIALIZE, str(workspace.registry_path), str(workspace.database),
             str(home), "exp_a", "forever"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.5, 6.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        # Same input, so every committed write is identical to `before`: anything else is a torn write.
        after = snapshot(workspace.warehouse())
        for table in TABLES:
            pd.testing.assert_frame_equal(before[table], after[table], obj=f"{table} after kill {attempt}")

    (tmp_path / "rerun_home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "rerun_home")) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, ["exp_a"])
        assert materialize(ANALYSIS_ASSETS, partition_key="exp_a", instance=instance,
                           resources=workspace.resources()).success
    final = snapshot(workspace.warehouse())
    for table in TABLES:
        pd.testing.assert_frame_equal(before[table], final[table], obj=table)
    report = (tmp_path / "ws" / "reports" / "exp_a.html").read_text()
    assert report.rstrip().endswith("</html>")


@pytest.mark.e2e
def test_two_processes_writing_one_file_at_once_both_succeed(tmp_path):
    """Without Dagster's pools (two `dagster` processes, a script and the UI, ...) the second writer
    waits for DuckDB's lock instead of crashing; both results are correct."""
    import os
    import subprocess
    import sys

    from dagster import DagsterInstance, materialize

    from exp_pipeline.defs.assets import ANALYSIS_ASSETS
    from exp_pipeline_tests.conftest import write_tiny_workspace

    workspace = write_tiny_workspace(
        tmp_path / "ws",
        arms={"exp_a": {"control": 15000, "treatment": 15000}, "exp_b": {"control": 15000, "treatment": 15000}},
    )
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
    processes = []
    for experiment in ("exp_a", "exp_b", "exp_a"):  # two experiments, and one of them twice
        home = tmp_path / f"home_{len(processes)}"
        home.mkdir()
        processes.append(subprocess.Popen(
            [sys.executable, "-c", MATERIALIZE, str(workspace.registry_path), str(workspace.database),
             str(home), experiment, "once"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        ))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr.decode()[-3000:]
    concurrent = snapshot(workspace.warehouse())

    # The same result as one run after the other on a fresh warehouse.
    fresh = write_tiny_workspace(
        tmp_path / "fresh",
        arms={"exp_a": {"control": 15000, "treatment": 15000}, "exp_b": {"control": 15000, "treatment": 15000}},
    )
    with DagsterInstance.local_temp(str(tmp_path / "home_0")) as instance:
        assert materialize(ANALYSIS_ASSETS, partition_key="exp_a", instance=instance,
                           resources=fresh.resources()).success
    sequential = snapshot(fresh.warehouse())
    for table in TABLES:
        columns = [c for c in sequential[table].columns if c not in ("valid_from", "source_file")]
        pd.testing.assert_frame_equal(
            sequential[table][columns].reset_index(drop=True), concurrent[table][columns].reset_index(drop=True),
            obj=table,
        )
    with workspace.warehouse().session() as session:
        experiments = session.raw.execute("SELECT DISTINCT experiment_id FROM exp.variant_metrics ORDER BY 1").fetchall()
    assert experiments == [("exp_a",), ("exp_b",)]
