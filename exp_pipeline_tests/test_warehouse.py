"""The warehouse resource: reading sources (and refusing bad ones clearly), atomic writes, locks."""

import multiprocessing
import time

import duckdb
import pandas as pd
import pytest
from dagster_duckdb import DuckDBResource

from exp_pipeline.registry import Source
from exp_pipeline.warehouse import SourceError, Warehouse, WarehouseBusy


@pytest.fixture()
def warehouse(tmp_path):
    return Warehouse(duckdb=DuckDBResource(database=str(tmp_path / "w.duckdb")))


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


def test_parquet_files_written_with_different_timestamp_kinds_read_together(warehouse, tmp_path):
    pd.DataFrame({"user_id": ["a"], "ts": pd.to_datetime(["2026-10-02T10:00:00"])}).to_parquet(tmp_path / "naive.parquet")
    pd.DataFrame({"user_id": ["b"], "ts": pd.to_datetime(["2026-10-02T12:00:00+02:00"])}).to_parquet(tmp_path / "aware.parquet")
    frame, _ = read(warehouse, tmp_path / "*.parquet", "parquet")
    assert sorted(frame["user_id"]) == ["a", "b"]


def test_a_failed_partition_write_leaves_the_previous_rows(warehouse):
    with warehouse.session() as session:
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1", "e1"], "x": [1, 2]}))
        session.replace_partition("t", "e2", pd.DataFrame({"experiment_id": ["e2"], "x": [3]}))
        with pytest.raises(duckdb.ConversionException):
            # Text into an integer column fails after the DELETE ran inside the transaction.
            session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1"], "x": ["oops"]}))
        rows = session.raw.execute("SELECT experiment_id, x FROM exp.t ORDER BY ALL").fetchall()
    assert rows == [("e1", 1), ("e1", 2), ("e2", 3)]


def test_several_tables_are_replaced_all_or_nothing(warehouse):
    with warehouse.session() as session:
        session.replace_partitions("e1", {
            "a": pd.DataFrame({"experiment_id": ["e1"], "x": [1]}),
            "b": pd.DataFrame({"experiment_id": ["e1"], "y": [1]}),
        })
        with pytest.raises(duckdb.ConversionException):
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


def test_a_locked_file_is_waited_for_then_used(tmp_path):
    path = str(tmp_path / "w.duckdb")
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(path, 3, ready))
    holder.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        warehouse = Warehouse(duckdb=DuckDBResource(database=path), lock_timeout_seconds=60)
        with warehouse.session() as session:
            assert session.raw.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - started >= 1  # it did wait for the other process
    finally:
        holder.join()


def test_a_lock_held_too_long_fails_with_a_clear_error(tmp_path):
    path = str(tmp_path / "w.duckdb")
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(path, 20, ready))
    holder.start()
    try:
        assert ready.wait(30)
        warehouse = Warehouse(duckdb=DuckDBResource(database=path), lock_timeout_seconds=0.5)
        with pytest.raises(WarehouseBusy, match="stayed locked by another process"):
            with warehouse.session():
                pass
    finally:
        holder.terminate()
        holder.join()
