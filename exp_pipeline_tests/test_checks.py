"""Each check passes on clean data and fails, with the right severity and numbers, on broken data."""

import pytest
from dagster import AssetCheckSeverity, DagsterInstance, materialize

from exp_pipeline import checks
from exp_pipeline.assets import ANALYSIS_ASSETS, experiment_partitions
from exp_pipeline.checks import EXPERIMENT_CHECKS
from exp_pipeline.registry import load_registry

from .conftest import write_tiny_workspace


def run(workspace, instance, experiment_id="exp_a"):
    known = set(instance.get_dynamic_partitions(experiment_partitions.name))
    if experiment_id not in known:
        instance.add_dynamic_partitions(experiment_partitions.name, [experiment_id])
    return materialize(
        [*ANALYSIS_ASSETS, *EXPERIMENT_CHECKS],
        partition_key=experiment_id,
        instance=instance,
        resources=workspace.resources(),
        raise_on_error=False,
    )


def evaluations(result) -> dict:
    return {
        f"{e.asset_key.path[-1]}.{e.check_name}": e for e in result.get_asset_check_evaluations()
    }


def test_every_check_passes_on_clean_data(tmp_path, instance):
    workspace = write_tiny_workspace(tmp_path)
    result = run(workspace, instance)
    assert result.success
    found = evaluations(result)
    assert len(found) == len(EXPERIMENT_CHECKS)
    failed = [name for name, e in found.items() if not e.passed]
    assert failed == []
    srm = found["deduped_assignments.no_sample_ratio_mismatch"]
    assert srm.metadata["verdict"].value == "ok"
    assert srm.metadata["observed"].value == {"control": 300, "treatment": 300}


@pytest.fixture()
def clean(tmp_path, instance):
    workspace = write_tiny_workspace(tmp_path)
    assert run(workspace, instance).success
    registry = load_registry(workspace.registry_path)
    return workspace, registry, registry.experiment("exp_a")


def test_a_duplicated_subject_fails_uniqueness_with_its_key(clean):
    workspace, registry, experiment = clean
    with workspace.warehouse().session() as session:
        session.raw.execute(
            "INSERT INTO exp.deduped_assignments SELECT * REPLACE ('treatment' AS variant_id) "
            "FROM exp.deduped_assignments WHERE subject_id = 'exp_a_control_7'"
        )
        result = checks.evaluate_unique_active_subject(session, experiment)
        schema = checks.evaluate_schema(session, "deduped_assignments", experiment, registry)
    assert not result.passed and result.severity == AssetCheckSeverity.ERROR
    assert result.metadata["duplicated_subjects"].value == 1
    assert result.metadata["sample_duplicated_keys"].value == [
        {"experiment_id": "exp_a", "subject_id": "exp_a_control_7", "active_rows": 2}
    ]
    assert schema.passed  # the schema itself is fine: only the key is duplicated


def test_an_event_before_assignment_fails_leakage_and_schema(clean):
    workspace, registry, experiment = clean
    with workspace.warehouse().session() as session:
        session.raw.execute(
            "UPDATE exp.post_assignment_events SET event_at = assigned_at - INTERVAL 1 HOUR "
            "WHERE subject_id = 'exp_a_treatment_3'"
        )
        leakage = checks.evaluate_no_pre_assignment_events(session, experiment)
        schema = checks.evaluate_schema(session, "post_assignment_events", experiment, registry)
    assert not leakage.passed and leakage.severity == AssetCheckSeverity.ERROR
    assert leakage.metadata["leaked_events"].value == 1
    assert leakage.metadata["sample"].value[0]["subject_id"] == "exp_a_treatment_3"
    assert not schema.passed
    assert "event_at_not_before_assigned_at" in schema.description


def test_schema_check_names_the_column_and_check(clean):
    workspace, registry, experiment = clean
    with workspace.warehouse().session() as session:
        session.raw.execute(
            "UPDATE exp.deduped_assignments SET variant_id = 'purple' WHERE subject_id = 'exp_a_control_1'"
        )
        result = checks.evaluate_schema(session, "deduped_assignments", experiment, registry)
    assert not result.passed
    assert "variant_id: isin(['control', 'treatment'])" in result.description


@pytest.mark.parametrize(
    ("multi_variant", "passed", "severity"),
    [(3, True, AssetCheckSeverity.WARN), (12, False, AssetCheckSeverity.WARN), (60, False, AssetCheckSeverity.ERROR)],
)
def test_multi_variant_share_warns_then_errors(tmp_path, instance, multi_variant, passed, severity):
    # 600 subjects: 3 -> 0.5% (ok), 12 -> 2% (above warn 1%), 60 -> 10% (above error 5%).
    workspace = write_tiny_workspace(tmp_path, multi_variant=multi_variant)
    result = evaluations(run(workspace, instance))["deduped_assignments.multi_variant_share_within_bounds"]
    assert result.passed is passed and result.severity == severity
    assert result.metadata["multi_variant_subjects"].value == multi_variant
    assert result.metadata["multi_variant_share"].value == pytest.approx(multi_variant / 600)


def test_injected_srm_fails_and_names_the_device(tmp_path, instance):
    # Treatment lost most of its android exposures (every third subject is on android).
    workspace = write_tiny_workspace(tmp_path)
    import pandas as pd

    path = tmp_path / "logs" / "assignments.parquet"
    log = pd.read_parquet(path)
    lost = (log.variation == "treatment") & (log.device_type == "android") & (log.experiment_key == "exp_a")
    log[~lost | (log.index % 5 == 0)].to_parquet(path)
    result = run(workspace, instance)
    srm = evaluations(result)["deduped_assignments.no_sample_ratio_mismatch"]
    assert not srm.passed and srm.severity == AssetCheckSeverity.WARN
    assert srm.metadata["verdict"].value == "SRM"
    assert srm.metadata["likely_cause"].value == "device_type = android"
    assert "Likely cause: device_type = android" in srm.description
    # The failure is written to the run log, where a person reading the run sees it.
    logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("no_sample_ratio_mismatch failed for exp_a" in m for m in logged)
    # WARN does not block: the results are still computed, and the run is green.
    assert result.success
    assert any(m.asset_key.path[-1] == "variant_metrics" for m in result.get_asset_materialization_events())


def test_srm_is_not_judged_below_the_minimum_count(tmp_path, instance):
    workspace = write_tiny_workspace(tmp_path, arms={"exp_a": {"control": 60, "treatment": 20}})
    srm = evaluations(run(workspace, instance))["deduped_assignments.no_sample_ratio_mismatch"]
    assert srm.passed and srm.metadata["verdict"].value == "not judged"


def test_a_blocking_failure_stops_variant_metrics_of_that_experiment_only(tmp_path, instance):
    workspace = write_tiny_workspace(
        tmp_path,
        arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}},
        srm_blocks=True,
    )
    blocked = run(workspace, instance, "exp_a")
    srm = evaluations(blocked)["deduped_assignments.no_sample_ratio_mismatch"]
    assert not srm.passed and srm.severity == AssetCheckSeverity.ERROR
    materialized = {m.asset_key.path[-1] for m in blocked.get_asset_materialization_events()}
    assert "deduped_assignments" in materialized and "variant_metrics" not in materialized
    assert not blocked.success

    other = run(workspace, instance, "exp_b")
    assert other.success
    with workspace.warehouse().session() as session:
        experiments = session.raw.execute("SELECT DISTINCT experiment_id FROM exp.variant_metrics").fetchall()
    assert experiments == [("exp_b",)]
