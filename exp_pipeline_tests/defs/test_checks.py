"""Each check passes on clean data and fails, with the right severity and numbers, on broken data."""

import ibis
import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetCheckSeverity, AssetKey, materialize

from exp_pipeline import checks, validation
from exp_pipeline.defs.assets import ANALYSIS_ASSETS
from exp_pipeline.defs.checks import EXPERIMENT_CHECK_KEYS, check_result
from exp_pipeline.defs.partitions import experiment_partitions, run_over
from exp_pipeline.registry import load_registry
from exp_pipeline.transforms import temporal_join
from exp_pipeline_tests.conftest import ENGINES, add_logins, write_tiny_workspace


def run(workspace, instance, experiment_id="exp_a"):
    known = set(instance.get_dynamic_partitions(experiment_partitions.name))
    if experiment_id not in known:
        instance.add_dynamic_partitions(experiment_partitions.name, [experiment_id])
    return materialize(
        ANALYSIS_ASSETS,
        partition_key=experiment_id,
        instance=instance,
        resources=workspace.resources(),
        raise_on_error=False,
    )


def stored(session, table: str) -> pd.DataFrame:
    return session.to_pandas(session.partition(table, "exp_a"))


def rewrite(session, table: str, rows: pd.DataFrame) -> None:
    """Replace exp_a's rows of `table` with `rows` (broken on purpose), keeping the table's types."""
    schema = session.table(table).schema()
    session.replace_partition(table, "exp_a", ibis.memtable(rows[list(schema)], schema=schema))


def evaluations(result) -> dict:
    return {
        f"{e.asset_key.path[-1]}.{e.check_name}": e for e in result.get_asset_check_evaluations()
    }


def materialized(result, experiment_id: str = "exp_a") -> set[str]:
    """The assets the run wrote for one experiment."""
    return {
        m.asset_key.path[-1] for m in result.get_asset_materialization_events()
        if m.materialization.partition == experiment_id
    }


@pytest.mark.parametrize("engine", ENGINES)
def test_every_check_passes_on_clean_data(tmp_path, instance, engine, monkeypatch):
    check_by_check = []
    monkeypatch.setattr(validation, "_pandera_outcome", lambda *args: check_by_check.append(args))
    workspace = write_tiny_workspace(tmp_path, engine=engine)
    result = run(workspace, instance)
    assert result.success
    # Every schema of the pipeline is decided in one query when it passes.
    assert check_by_check == []
    found = evaluations(result)
    assert sorted(found) == sorted(k.asset_key.to_user_string() + "." + k.name for k in EXPERIMENT_CHECK_KEYS)
    failed = [name for name, e in found.items() if not e.passed]
    assert failed == []
    srm = found["deduped_assignments.no_sample_ratio_mismatch"]
    assert srm.metadata["verdict"].value == "ok"
    assert srm.metadata["observed"].value == {"control": 300, "treatment": 300}


@pytest.fixture(params=ENGINES)
def clean(request, tmp_path, instance):
    workspace = write_tiny_workspace(tmp_path, engine=request.param)
    assert run(workspace, instance).success
    registry = load_registry(workspace.registry_path)
    return workspace, registry, registry.experiment("exp_a")


def test_a_duplicated_subject_fails_uniqueness_with_its_key(clean):
    workspace, registry, experiment = clean
    with workspace.warehouse().session() as session:
        rows = stored(session, "deduped_assignments")
        copy = rows[rows.subject_id == "exp_a_control_7"].assign(variant_id="treatment")
        rewrite(session, "deduped_assignments", pd.concat([rows, copy]))
        deduped = session.partition("deduped_assignments", experiment.id)
        result = check_result(checks.unique_active_subject_outcomes(session, deduped.filter(deduped.is_active), [experiment.id])[experiment.id])
        schema = check_result(checks.schema_outcomes(session, "deduped_assignments", [experiment], registry)[experiment.id])
    assert not result.passed and result.severity == AssetCheckSeverity.ERROR
    assert result.metadata["duplicated_subjects"].value == 1
    assert result.metadata["sample_duplicated_keys"].value == [
        {"experiment_id": "exp_a", "subject_id": "exp_a_control_7", "active_rows": 2}
    ]
    assert schema.passed  # the schema itself is fine: only the key is duplicated


def test_a_join_that_lets_pre_assignment_events_in_fails_leakage_and_schema(tmp_path, instance, monkeypatch):
    # The checks judge the run's own join: split it wrongly (every segment "post") and they say so.
    cut = temporal_join.window_segments

    def every_segment_post(windows):
        spans, segments, coverage = cut(windows)
        return temporal_join.WindowSegments(spans, segments.assign(period="post"), coverage)

    monkeypatch.setattr(temporal_join, "window_segments", every_segment_post)
    workspace = write_tiny_workspace(tmp_path)
    result = run(workspace, instance)
    found = evaluations(result)
    leakage = found["post_assignment_events.no_events_before_assignment"]
    assert not leakage.passed and leakage.severity == AssetCheckSeverity.ERROR
    assert leakage.metadata["leaked_events"].value == 600  # the pre-period purchase of each of its 600 subjects
    assert leakage.metadata["sample"].value[0]["subject_id"].startswith("exp_a_")
    schema = found["post_assignment_events.matches_schema"]
    assert not schema.passed and "event_at_not_before_assigned_at" in schema.description
    # Blocking: this experiment's results are not written; the run itself is green.
    assert result.success and "variant_metrics" not in materialized(result)


def test_schema_check_names_the_column_and_check(clean):
    workspace, registry, experiment = clean
    with workspace.warehouse().session() as session:
        rows = stored(session, "deduped_assignments")
        rows.loc[rows.subject_id == "exp_a_control_1", "variant_id"] = "purple"
        rewrite(session, "deduped_assignments", rows)
        result = check_result(checks.schema_outcomes(session, "deduped_assignments", [experiment], registry)[experiment.id])
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
    assert "variant_metrics" in materialized(result)


def test_srm_is_not_judged_below_the_minimum_count(tmp_path, instance):
    workspace = write_tiny_workspace(tmp_path, arms={"exp_a": {"control": 60, "treatment": 20}})
    srm = evaluations(run(workspace, instance))["deduped_assignments.no_sample_ratio_mismatch"]
    assert srm.passed and srm.metadata["verdict"].value == "not judged"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_blocking_failure_stops_variant_metrics_of_that_experiment_only(tmp_path, instance, engine):
    workspace = write_tiny_workspace(
        tmp_path,
        arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}},
        srm_blocks=True,
        engine=engine,
    )
    blocked = run(workspace, instance, "exp_a")
    srm = evaluations(blocked)["deduped_assignments.no_sample_ratio_mismatch"]
    assert not srm.passed and srm.severity == AssetCheckSeverity.ERROR
    assert "deduped_assignments" in materialized(blocked) and "variant_metrics" not in materialized(blocked)
    # Gated in the pass, experiment by experiment: the run itself goes on (and is green).
    assert blocked.success

    other = run(workspace, instance, "exp_b")
    assert other.success
    assert set(workspace.rows("variant_metrics").experiment_id) == {"exp_b"}


def run_both(workspace, instance):
    """exp_a and exp_b in one run, one pass."""
    instance.add_dynamic_partitions(experiment_partitions.name, ["exp_a", "exp_b"])
    tags, _ = run_over(["exp_a", "exp_b"], ["exp_a", "exp_b"])
    return materialize(ANALYSIS_ASSETS, instance=instance, resources=workspace.resources(), tags=tags)


@pytest.mark.parametrize("engine", ENGINES)
def test_in_one_run_a_blocking_failure_keeps_that_experiments_results_and_writes_the_others(tmp_path, instance, engine):
    workspace = write_tiny_workspace(tmp_path, srm_blocks=True, engine=engine)
    assert run_both(workspace, instance).success
    before = workspace.rows("variant_metrics")
    # exp_a loses two thirds of its treatment exposures: an SRM, which blocks its metrics.
    path = tmp_path / "logs" / "assignments.parquet"
    log = pd.read_parquet(path)
    lost = (log.experiment_key == "exp_a") & (log.variation == "treatment") & (log.index % 3 != 0)
    log[~lost].to_parquet(path)
    result = run_both(workspace, instance)
    assert result.success  # gated per experiment, not by failing the run
    srm = {e.partition: e for e in result.get_asset_check_evaluations() if e.check_name == "no_sample_ratio_mismatch"}
    assert not srm["exp_a"].passed and srm["exp_a"].severity == AssetCheckSeverity.ERROR and srm["exp_b"].passed
    assert "variant_metrics" not in materialized(result, "exp_a") and "deduped_assignments" in materialized(result, "exp_a")
    assert "variant_metrics" in materialized(result, "exp_b")
    after = workspace.rows("variant_metrics")
    # exp_a's previous results are intact (the n of its treatment did not drop); exp_b's rewritten.
    pd.testing.assert_frame_equal(
        after[after.experiment_id == "exp_a"].reset_index(drop=True),
        before[before.experiment_id == "exp_a"].reset_index(drop=True),
    )
    assert set(after.experiment_id) == {"exp_a", "exp_b"}
    # The failed evaluation is on record against exp_a's partition, where the alert sensor reads it.
    key = AssetCheckKey(AssetKey("deduped_assignments"), "no_sample_ratio_mismatch")
    [failed] = [
        r for r in instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
        if r.run_id == result.run_id and r.status.value == "FAILED"
    ]
    assert failed.partition == "exp_a"


def csv_workspace(tmp_path, lines: list[str], engine: str = "duckdb"):
    """The tiny workspace with its exposure log replaced by a CSV file of the given data lines."""
    workspace = write_tiny_workspace(tmp_path, engine=engine)
    registry = workspace.registry_path.read_text().replace("logs/assignments.parquet", "logs/exposures*.csv")
    workspace.registry_path.write_text(registry)
    good = pd.read_parquet(tmp_path / "logs" / "assignments.parquet")
    good["exposed_at"] = good["exposed_at"].dt.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    good.to_csv(tmp_path / "logs" / "exposures_1.csv", index=False)
    header = ",".join(good.columns)
    (tmp_path / "logs" / "exposures_2.csv").write_text("\n".join([header, *lines]))
    (tmp_path / "logs" / "exposures_3.csv").write_bytes(b"")  # a writer that crashed
    return workspace


BAD_LINES = [
    ",exp_a,control,2026-10-03T00:00:00Z,ios",                 # no subject id
    "bad1,exp_a,,2026-10-03T00:00:00Z,ios",                    # no variant
    "bad2,exp_a,control,,ios",                                 # no timestamp
    "bad3,exp_a,control,last tuesday,ios",                     # unparsable timestamp
    "bad4,exp_a,purple,2026-10-03T00:00:00Z,ios",              # unknown variant
    "bad5,exp_a,control,2026-10-03T00:00:00Z,ios",             # fine ...
    "bad5,exp_a,control,2026-10-03T00:00:00Z,ios",             # ... and its exact duplicate
    "bad6,exp_a,control,2026-10-03 02:00:00,web",              # naive timestamp: UTC, fine
    "bad7,exp_a,treatment,2026-10-03T04:00:00+02:00,web",      # aware timestamp: converted, fine
    "o'brien; DROP TABLE exp.raw_assignments; --,exp_a,control,2026-10-03T00:00:00Z,ios",  # just data
    "bad8,exp_a,contr",                                        # truncated last line: no timestamp
]


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_rows_are_rejected_with_reasons_and_every_row_is_accounted_for(tmp_path, instance, engine):
    workspace = csv_workspace(tmp_path, BAD_LINES, engine)
    registry = workspace.registry_path.read_text()
    workspace.registry_path.write_text(
        registry.replace("properties: [device_type]", "properties: [device_type]\n    max_rejected_share: 0.005")
    )
    result = run(workspace, instance)
    meta = {
        k: v.value for e in result.get_asset_materialization_events()
        if e.asset_key.path[-1] == "raw_assignments" for k, v in e.materialization.metadata.items()
    }
    assert meta["rows_read"] == 600 + len(BAD_LINES)
    assert meta["rows_ingested"] + meta["rows_rejected"] == meta["rows_read"]
    assert meta["rejected_by_reason"] == {
        "missing_subject_id": 1, "missing_variant_id": 1, "missing_timestamp": 2,
        "unparsable_timestamp": 1, "unknown_variant": 1, "duplicate_row": 1,
    }
    assert meta["empty_files_skipped"] == [str(tmp_path / "logs" / "exposures_3.csv")]
    rejected = workspace.rows("rejected_rows", "exp_a")
    raw = workspace.rows("raw_assignments", "exp_a")
    times = dict(zip(raw.subject_id, raw.assigned_at, strict=True))
    assert len(rejected) == 7 and rejected.source_file.str.endswith("exposures_2.csv").all()
    assert any("assigned_at=last tuesday" in r for r in rejected.record)
    assert times["bad6"] == times["bad7"] == pd.Timestamp("2026-10-03T02:00:00Z")
    [quoted] = [s for s in raw.subject_id if s.startswith("o'brien")]
    assert quoted == "o'brien; DROP TABLE exp.raw_assignments; --"  # stored as a value, never run
    # 7 of 611 rows (6 not counting the duplicate) is above the configured 0.5%: an ERROR that
    # blocks this experiment's results.
    check = evaluations(result)["raw_assignments.rejected_share_within_bound"]
    assert not check.passed and check.severity == AssetCheckSeverity.ERROR
    assert check.metadata["rows_rejected"].value == 6
    assert "variant_metrics" not in materialized(result) and "deduped_assignments" not in materialized(result)


def test_a_few_bad_rows_under_the_bound_pass(tmp_path, instance):
    workspace = csv_workspace(tmp_path, BAD_LINES[:2])
    result = run(workspace, instance)
    assert result.success
    assert evaluations(result)["raw_assignments.rejected_share_within_bound"].passed


@pytest.mark.parametrize("engine", ENGINES)
def test_an_experiment_with_an_empty_arm_still_reports_every_variant(tmp_path, instance, engine):
    workspace = write_tiny_workspace(tmp_path, arms={"exp_a": {"control": 300, "treatment": 0}}, engine=engine)
    result = run(workspace, instance)
    srm = evaluations(result)["deduped_assignments.no_sample_ratio_mismatch"]
    assert not srm.passed and srm.metadata["observed"].value == {"control": 300, "treatment": 0}
    rows = workspace.rows("variant_metrics", "exp_a").sort_values("variant_id")
    assert list(zip(rows.variant_id, rows.n, strict=True)) == [("control", 300), ("treatment", 0)]
    assert pd.isna(rows.rel_lift.iloc[1])  # no lift without subjects, and no crash


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda root: (root / "logs" / "assignments.parquet").unlink(),
         "sources.assignments.path: no non-empty file matches 'logs/assignments.parquet'"),
        (lambda root: (root / "logs" / "assignments.parquet").write_bytes(b"garbage"),
         "is not a readable parquet file"),
        (lambda root: (root / "registry.yaml").write_text(
            (root / "registry.yaml").read_text().replace("variant_id: variation", "variant_id: arm")),
         "sources.assignments.columns.variant_id: column 'arm' is not in"),
        (lambda root: pd.read_parquet(root / "logs" / "assignments.parquet").drop(columns=["device_type"])
         .to_parquet(root / "logs" / "assignments.parquet"),
         "sources.assignments.properties: column 'device_type' is not in"),
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_sources_that_cannot_be_read_fail_the_step_with_a_clear_message(tmp_path, instance, mutate, message, engine):
    workspace = write_tiny_workspace(tmp_path, engine=engine)
    mutate(tmp_path)
    result = run(workspace, instance)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "experiment_analysis"
    assert message in failure.event_specific_data.error.cause.message


@pytest.mark.parametrize("engine", ENGINES)
def test_secondary_ids_map_to_the_first_subject_and_shared_ones_warn(tmp_path, instance, engine):
    workspace = write_tiny_workspace(tmp_path, engine=engine)
    add_logins(workspace, logged_in_every=2, shared=20)  # 20 of exp_a's 300 logins seen twice: 6.7%
    result = run(workspace, instance)
    assert result.success
    found = evaluations(result)
    assert found["deduped_assignments.one_subject_per_secondary_id"].passed
    conflicts = found["deduped_assignments.conflicting_secondary_ids_within_bound"]
    assert not conflicts.passed and conflicts.severity == AssetCheckSeverity.WARN
    assert conflicts.metadata["user_id_values"].value == 300
    assert conflicts.metadata["user_id_conflicting"].value == 20
    assert "20 of 300 values (6.67%)" in conflicts.description
    # The map, from the log by pandas: the first subject seen with each login (then the smaller id).
    log = pd.read_parquet(workspace.registry_path.parent / "logs/assignments.parquet")
    log = log[(log.experiment_key == "exp_a") & log.login_id.notna()].sort_values(["exposed_at", "user_id"])
    expected = log.groupby("login_id").agg(subject_id=("user_id", "first"), n_subjects=("user_id", "nunique"))
    with workspace.warehouse().session() as session:
        stored_map = stored(session, "subject_id_map").set_index("secondary_id").sort_index()
        deduped = stored(session, "deduped_assignments").set_index("subject_id")
    assert (stored_map.id_name == "user_id").all()
    assert stored_map.subject_id.to_dict() == expected.subject_id.to_dict()
    assert stored_map.n_subjects.to_dict() == expected.n_subjects.to_dict()
    # deduped_assignments keeps each subject's first logged login; anonymous subjects have none.
    assert deduped.loc["exp_a_control_2", "user_id"] == "login_exp_a_control_2"
    assert pd.isna(deduped.loc["exp_a_control_1", "user_id"])
    assert deduped.loc["exp_a_control_0_other", "user_id"] == "login_exp_a_control_0"


def test_few_shared_secondary_ids_pass(tmp_path, instance):
    workspace = write_tiny_workspace(tmp_path)
    add_logins(workspace, logged_in_every=2, shared=3)
    conflicts = evaluations(run(workspace, instance))["deduped_assignments.conflicting_secondary_ids_within_bound"]
    assert conflicts.passed and conflicts.metadata["user_id_conflicting"].value == 3
