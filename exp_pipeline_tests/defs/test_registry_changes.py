"""A registry change on an existing warehouse, as users make them: each run after it succeeds, the
partitions it does not rewrite stay readable, the assignment history stays, and the results equal
those of a fresh warehouse on the new registry. A change that cannot be applied stops the run
before anything is written."""

import shutil

import duckdb
import pandas as pd
import pytest
import yaml
from dagster import materialize

from exp_pipeline.defs.assets import ANALYSIS_ASSETS
from exp_pipeline.defs.partitions import experiment_partitions, run_over
from exp_pipeline_tests.conftest import Workspace, add_logins, write_tiny_workspace

pytestmark = pytest.mark.e2e

RESULT_TABLES = ("variant_metrics", "segment_metrics", "segment_heterogeneity")


def analyse(workspace, instance, experiment_ids=("exp_a", "exp_b")):
    known = set(instance.get_dynamic_partitions(experiment_partitions.name))
    instance.add_dynamic_partitions(experiment_partitions.name, [e for e in experiment_ids if e not in known])
    tags, _ = run_over(list(experiment_ids), list(experiment_ids))
    result = materialize(ANALYSIS_ASSETS, instance=instance, resources=workspace.resources(), tags=tags, raise_on_error=False)
    return result


def passes(result) -> bool:
    """The run succeeded and every check passed: a registry change must not fail one."""
    failed = [f"{e.asset_key.to_user_string()}.{e.check_name}" for e in result.get_asset_check_evaluations() if not e.passed]
    assert failed == [], failed
    return result.success


def edit_registry(workspace, change) -> None:
    registry = yaml.safe_load(workspace.registry_path.read_text())
    change(registry)
    workspace.registry_path.write_text(yaml.safe_dump(registry, sort_keys=False))


def experiment(registry, experiment_id) -> dict:
    return next(e for e in registry["experiments"] if e["id"] == experiment_id)


def fresh_copy(workspace, root) -> Workspace:
    """The same logs and (new) registry in a new folder: what a fresh warehouse computes."""
    shutil.copytree(workspace.root / "logs", root / "logs")
    shutil.copy(workspace.registry_path, root / "registry.yaml")
    return Workspace.existing(root)


def results(workspace) -> dict[str, pd.DataFrame]:
    return {table: workspace.rows(table) for table in RESULT_TABLES}


def active_assignments(workspace, columns) -> pd.DataFrame:
    rows = workspace.rows("deduped_assignments")
    rows = rows[rows.is_active][list(columns)]
    return rows.sort_values(["experiment_id", "subject_id"], ignore_index=True)


def assert_same_as_fresh(workspace, tmp_path, instance_factory) -> None:
    fresh = fresh_copy(workspace, tmp_path / "fresh")
    with instance_factory() as instance:
        assert analyse(fresh, instance).success
    changed, expected = results(workspace), results(fresh)
    for table in RESULT_TABLES:
        pd.testing.assert_frame_equal(changed[table], expected[table], check_like=True, obj=table)
    columns = [c for c in fresh.rows("deduped_assignments").columns if c not in ("valid_from", "valid_to")]
    pd.testing.assert_frame_equal(active_assignments(workspace, columns), active_assignments(fresh, columns))


@pytest.fixture()
def instance_factory(tmp_path):
    from dagster import DagsterInstance

    home = tmp_path / "fresh_home"
    home.mkdir()
    return lambda: DagsterInstance.local_temp(str(home))


@pytest.fixture()
def analysed(tmp_path, instance):
    """The tiny workspace analysed once: the existing warehouse a change is made on."""
    workspace = write_tiny_workspace(tmp_path / "existing")
    assert analyse(workspace, instance).success
    return workspace


def valid_from(workspace) -> pd.Series:
    rows = workspace.rows("deduped_assignments")
    return rows.set_index(["experiment_id", "subject_id"]).valid_from.sort_index()


def test_a_property_removed(analysed, instance, tmp_path, instance_factory):
    before = valid_from(analysed)
    edit_registry(analysed, lambda r: r["sources"]["assignments"].update(properties=[]))
    # Only exp_a is re-analysed: exp_b's partition is left as it was written.
    assert passes(analyse(analysed, instance, ["exp_a"]))
    raw = analysed.rows("raw_assignments")
    assert raw[raw.experiment_id == "exp_a"].device_type.isna().all()  # rewritten without it
    assert raw[raw.experiment_id == "exp_b"].device_type.notna().all()  # kept as written
    assert not analysed.rows("segment_metrics", "exp_a").property.isin(["device_type"]).any()
    pd.testing.assert_series_equal(valid_from(analysed), before)  # no subject's history moved
    assert passes(analyse(analysed, instance))
    assert_same_as_fresh(analysed, tmp_path, instance_factory)


def test_a_property_added(analysed, instance, tmp_path, instance_factory):
    before = valid_from(analysed)
    log = analysed.root / "logs" / "assignments.parquet"
    exposures = pd.read_parquet(log)
    exposures["country"] = ["us" if i % 2 else "de" for i in range(len(exposures))]
    exposures.to_parquet(log)
    edit_registry(analysed, lambda r: r["sources"]["assignments"].update(properties=["device_type", "country"]))
    assert passes(analyse(analysed, instance))
    deduped = analysed.rows("deduped_assignments")
    assert deduped.country.notna().all() and deduped.is_active.all()
    pd.testing.assert_series_equal(valid_from(analysed), before)  # filled in place, no correction
    assert set(analysed.rows("segment_heterogeneity").property) == {"device_type", "country"}
    assert_same_as_fresh(analysed, tmp_path, instance_factory)


def test_a_metric_added(analysed, instance, tmp_path, instance_factory):
    def add_purchases(registry):
        registry["metrics"]["purchases"] = {"event_name": "purchase", "aggregation": "count", "window_end_days": 14}
        experiment(registry, "exp_a")["metrics"].append("purchases")

    edit_registry(analysed, add_purchases)
    assert passes(analyse(analysed, instance))
    metrics = analysed.rows("variant_metrics")
    assert set(metrics[metrics.experiment_id == "exp_a"].metric) == {"revenue", "purchases"}
    assert set(metrics[metrics.experiment_id == "exp_b"].metric) == {"revenue"}
    assert_same_as_fresh(analysed, tmp_path, instance_factory)


def test_a_secondary_id_and_a_metric_keyed_by_it_added(analysed, instance, tmp_path, instance_factory):
    before = valid_from(analysed)
    add_logins(analysed, logged_in_every=3, shared=0, purchases=True)
    assert passes(analyse(analysed, instance))
    deduped = analysed.rows("deduped_assignments")
    assert deduped.is_active.all() and deduped.user_id.notna().sum() == len(deduped) // 3
    pd.testing.assert_series_equal(valid_from(analysed), before)  # filled in place, no correction
    assert len(analysed.rows("subject_id_map")) == len(deduped) // 3
    metrics = analysed.rows("variant_metrics")
    assert set(metrics[metrics.experiment_id == "exp_a"].metric) == {"revenue", "orders"}
    assert metrics[metrics.metric == "orders"].sum_y.gt(0).all()
    assert_same_as_fresh(analysed, tmp_path, instance_factory)


def test_an_experiment_and_a_variant_added(tmp_path, instance, instance_factory):
    workspace = write_tiny_workspace(tmp_path / "existing", arms={
        "exp_a": {"control": 300, "treatment": 300, "treatment_b": 300},
        "exp_b": {"control": 300, "treatment": 300},
        "exp_c": {"control": 300, "treatment": 300},
    })
    assert analyse(workspace, instance).success  # exp_c not in the registry, treatment_b not in exp_a

    def add(registry):
        experiment(registry, "exp_a")["variants"] = [
            {"id": "control", "weight": 0.34, "control": True},
            {"id": "treatment", "weight": 0.33},
            {"id": "treatment_b", "weight": 0.33},
        ]
        registry["experiments"].append({**experiment(registry, "exp_b"), "id": "exp_c", "name": "Experiment C"})

    edit_registry(workspace, add)
    assert passes(analyse(workspace, instance, ["exp_a", "exp_b", "exp_c"]))
    metrics = workspace.rows("variant_metrics")
    assert set(metrics[metrics.experiment_id == "exp_a"].variant_id) == {"control", "treatment", "treatment_b"}
    assert set(metrics.experiment_id) == {"exp_a", "exp_b", "exp_c"}
    fresh = fresh_copy(workspace, tmp_path / "fresh")
    with instance_factory() as fresh_instance:
        assert analyse(fresh, fresh_instance, ["exp_a", "exp_b", "exp_c"]).success
    for table in RESULT_TABLES:
        pd.testing.assert_frame_equal(workspace.rows(table), fresh.rows(table), check_like=True, obj=table)


def test_a_column_mapping_renamed(analysed, instance, tmp_path, instance_factory):
    before = results(analysed)
    log = analysed.root / "logs" / "assignments.parquet"
    pd.read_parquet(log).rename(columns={"variation": "arm"}).to_parquet(log)
    edit_registry(analysed, lambda r: r["sources"]["assignments"]["columns"].update(variant_id="arm"))
    assert passes(analyse(analysed, instance))
    for table in RESULT_TABLES:  # the same log under another name: the same results
        pd.testing.assert_frame_equal(analysed.rows(table), before[table], check_like=True, obj=table)
    assert_same_as_fresh(analysed, tmp_path, instance_factory)


def test_both_sources_switched_from_parquet_to_csv_and_the_old_files_removed(analysed, instance, tmp_path, instance_factory):
    before = results(analysed)
    logs = analysed.root / "logs"
    for log, at in (("assignments", "exposed_at"), ("events", "event_ts")):
        rows = pd.read_parquet(logs / f"{log}.parquet")
        rows[at] = rows[at].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows.to_csv(logs / f"{log}.csv", index=False)
        (logs / f"{log}.parquet").unlink()  # the stored event views still name this file

    def switch(registry):
        for log in ("assignments", "events"):
            registry["sources"][log]["path"] = f"logs/{log}.csv"

    edit_registry(analysed, switch)
    assert passes(analyse(analysed, instance))
    for table in RESULT_TABLES:
        pd.testing.assert_frame_equal(analysed.rows(table), before[table], check_like=True, obj=table)
    assert_same_as_fresh(analysed, tmp_path, instance_factory)


def snapshot(database) -> dict[str, list]:
    with duckdb.connect(str(database), read_only=True) as con:
        tables = [name for (name,) in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'exp' AND table_type = 'BASE TABLE'"
        ).fetchall()]
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM exp."{t}"').fetchall())) for t in tables}


def test_a_stored_column_whose_type_would_change_stops_the_run_before_anything_is_written(analysed, instance):
    with duckdb.connect(str(analysed.database)) as con:
        con.execute("ALTER TABLE exp.variant_metrics ALTER COLUMN n TYPE DOUBLE")
    before = snapshot(analysed.database)
    edit_registry(analysed, lambda r: r["sources"]["assignments"].update(properties=[]))  # a change that would write
    result = analyse(analysed, instance)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.cause.message
    assert "table exp.variant_metrics cannot take this run's rows: column 'n' is stored as float64 but this run writes int64" in message
    assert "ALTER TABLE exp.variant_metrics ALTER COLUMN n TYPE BIGINT" in message
    assert snapshot(analysed.database) == before
