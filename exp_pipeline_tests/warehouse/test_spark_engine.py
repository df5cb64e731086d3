"""The Spark engine: the same results as DuckDB, and what only Spark needs (its catalog across
processes, nanosecond Parquet). Engine-neutral behaviour is tested on both engines elsewhere."""

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from exp_pipeline.defs.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS
from exp_pipeline.defs.partitions import experiment_partitions
from exp_pipeline.registry import Source
from exp_pipeline_tests.conftest import Workspace, spark_warehouse_at

pytestmark = pytest.mark.spark


PARITY_USERS = 20_000
EXPERIMENTS = ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]
STATISTICS = [
    "n", "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy", "mean", "std", "abs_lift", "rel_lift", "ci_low",
    "ci_high", "p_value", "p_value_holm", "cuped_theta", "cuped_rel_lift", "cuped_ci_low", "cuped_ci_high",
    "cuped_p_value", "cuped_variance_reduction", "srm_p_value", "cuped_abs_lift", "cuped_pp_abs_lift",
    "cuped_pp_rel_lift", "cuped_pp_ci_low", "cuped_pp_ci_high", "cuped_pp_p_value",
]


def analysed(workspace: Workspace, instance) -> dict:
    assert materialize(REGISTRY_ASSETS, instance=instance, resources=workspace.resources()).success
    results = {}
    for experiment_id in EXPERIMENTS:
        results[experiment_id] = materialize(
            ANALYSIS_ASSETS, partition_key=experiment_id, instance=instance,
            resources=workspace.resources(), raise_on_error=False,
        )
    return results


def test_the_sample_gives_the_same_results_on_spark_and_duckdb(tmp_path):
    (tmp_path / "logs").mkdir()
    duckdb_workspace = Workspace(tmp_path / "logs", PARITY_USERS)
    spark_workspace = Workspace.existing(duckdb_workspace.root, "spark")  # same logs, own warehouse
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, EXPERIMENTS)
        on_duckdb = analysed(duckdb_workspace, instance)
        on_spark = analysed(spark_workspace, instance)

    for experiment_id in EXPERIMENTS:
        assert on_duckdb[experiment_id].success and on_spark[experiment_id].success
        # The same checks pass and fail (only the SRM experiment fails one).
        verdicts = [
            {(e.check_name, e.passed) for e in r.get_asset_check_evaluations()}
            for r in (on_duckdb[experiment_id], on_spark[experiment_id])
        ]
        assert verdicts[0] == verdicts[1], experiment_id

        # Validity times are when each run happened; everything else is the same row for row.
        times = ["valid_from", "valid_to"]
        deduped = [w.rows("deduped_assignments", experiment_id).drop(columns=times) for w in (duckdb_workspace, spark_workspace)]
        assert len(deduped[0]) > 1000
        pd.testing.assert_frame_equal(deduped[0], deduped[1], check_exact=True, obj="deduped_assignments")

        metrics = [
            w.rows("variant_metrics", experiment_id).set_index(["variant_id", "metric"]).sort_index()
            for w in (duckdb_workspace, spark_workspace)
        ]
        assert list(metrics[0].index) == list(metrics[1].index)
        assert (metrics[0]["n"] == metrics[1]["n"]).all()
        for column in STATISTICS:
            want, got = metrics[0][column].to_numpy(float), metrics[1][column].to_numpy(float)
            assert np.array_equal(np.isnan(want), np.isnan(got)), (experiment_id, column)
            both = ~np.isnan(want)
            np.testing.assert_allclose(got[both], want[both], rtol=1e-9, atol=1e-12, err_msg=f"{experiment_id} {column}")

        # The segments come from the same aggregate on both engines.
        for table, key, columns in (
            ("segment_metrics", ["property", "value", "variant_id", "metric"], ["n", "sum_y", "sum_xy", "rel_lift", "p_value"]),
            ("segment_heterogeneity", ["property", "variant_id", "metric"], ["segments", "q", "p_value", "p_value_holm"]),
        ):
            frames = [w.rows(table, experiment_id).set_index(key).sort_index() for w in (duckdb_workspace, spark_workspace)]
            assert list(frames[0].index) == list(frames[1].index) and len(frames[0]), table
            for column in columns:
                want, got = frames[0][column].to_numpy(float), frames[1][column].to_numpy(float)
                both = ~np.isnan(want)
                assert np.array_equal(both, ~np.isnan(got)), (table, column)
                np.testing.assert_allclose(got[both], want[both], rtol=1e-9, atol=1e-12, err_msg=f"{table} {column}")


def test_a_new_process_finds_the_tables_of_the_last_one(tmp_path):
    """Local mode's catalog lives in memory: the next run (a new process) registers the tables
    again from the folder, partitions included."""
    with spark_warehouse_at(tmp_path).session() as session:
        session.replace_partition("t", "e1", pd.DataFrame({"experiment_id": ["e1", "e1"], "x": [1, 2]}))
        session.replace_partition("t", "e2", pd.DataFrame({"experiment_id": ["e2"], "x": [3]}))
        session.replace_table("dims", pd.DataFrame({"name": ["a"]}))
    script = textwrap.dedent(f"""
        from pathlib import Path
        from exp_pipeline_tests.conftest import spark_warehouse_at
        with spark_warehouse_at(Path({str(tmp_path)!r})).session() as session:
            print(sorted(session.to_pandas(session.partition("t", "e1"))["x"].tolist()),
                  session.count(session.table("t")), session.to_pandas(session.table("dims"))["name"].tolist())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[1, 2] 3 ['a']"


def test_nanosecond_parquet_is_read_at_microseconds(tmp_path):
    """pandas writes nanoseconds by default, which Spark has no type for."""
    pd.DataFrame({
        "user_id": ["a"], "ts": pd.to_datetime(["2026-10-02T10:00:00.123456789Z"]),
    }).to_parquet(tmp_path / "nanos.parquet")
    with spark_warehouse_at(tmp_path).session() as session:
        table = session.read_source(Source(path="*.parquet", format="parquet"), str(tmp_path / "*.parquet"), "events source")
        frame = session.to_pandas(table)
    assert frame["ts"].iloc[0] == pd.Timestamp("2026-10-02T10:00:00.123456Z")


def test_a_nanosecond_source_still_reads_after_a_microsecond_one(tmp_path):
    """The setting that reads nanoseconds applies when queries run: a later source must not undo it."""
    (tmp_path / "events").mkdir()
    (tmp_path / "exposures").mkdir()
    pd.DataFrame({"ts": pd.to_datetime(["2026-10-02T10:00:00Z"])}).to_parquet(tmp_path / "events" / "e.parquet")
    pd.DataFrame({"ts": pd.to_datetime(["2026-10-03T10:00:00Z"])}).to_parquet(
        tmp_path / "exposures" / "x.parquet", coerce_timestamps="us"
    )
    source = Source(path="*.parquet", format="parquet")
    with spark_warehouse_at(tmp_path).session() as session:
        events = session.read_source(source, str(tmp_path / "events" / "*.parquet"), "events source")
        exposures = session.read_source(source, str(tmp_path / "exposures" / "*.parquet"), "assignments source")
        assert session.to_pandas(events)["ts"].iloc[0] == pd.Timestamp("2026-10-02T10:00:00Z")
        assert session.to_pandas(exposures)["ts"].iloc[0] == pd.Timestamp("2026-10-03T10:00:00Z")


def test_mixed_timestamp_units_fail_naming_the_column(tmp_path):
    pd.DataFrame({"ts": pd.to_datetime(["2026-10-02T10:00:00Z"])}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"ts": pd.to_datetime(["2026-10-02T10:00:00Z"])}).to_parquet(
        tmp_path / "b.parquet", coerce_timestamps="us"
    )
    with spark_warehouse_at(tmp_path).session() as session:
        with pytest.raises(ValueError, match=r"events source: ts is stored as nanoseconds in some files"):
            session.read_source(Source(path="*.parquet", format="parquet"), str(tmp_path / "*.parquet"), "events source")
