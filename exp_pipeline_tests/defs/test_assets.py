"""End to end: materialize every experiment through Dagster on generated data, recover the truth."""

import datetime as dt
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from exp_pipeline import schemas, validation
from exp_pipeline.defs.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS
from exp_pipeline.defs.checks import CHECK_KEYS, EXPERIMENT_CHECK_KEYS, EXPERIMENT_CHECKS
from exp_pipeline.defs.partitions import experiment_partitions
from exp_pipeline.registry import load_registry
from exp_pipeline.sample_data import generate
from exp_pipeline.settings import DEFAULT_REGISTRY
from exp_pipeline_tests.conftest import ENGINES, Workspace

pytestmark = pytest.mark.e2e

EXPERIMENTS = ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]


def materialize_experiment(workspace, instance, experiment_id):
    return materialize(
        [*ANALYSIS_ASSETS, *EXPERIMENT_CHECKS],
        partition_key=experiment_id,
        instance=instance,
        resources=workspace.resources(),
    )


@pytest.fixture(scope="module", params=ENGINES)
def pipeline(request, tmp_path_factory):
    """Every experiment materialized once per engine; yields (workspace, {experiment: result}, instance)."""
    workspace = request.getfixturevalue("sample_workspace" if request.param == "duckdb" else "spark_sample_workspace")
    with DagsterInstance.local_temp(str(tmp_path_factory.mktemp("dagster_home"))) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, EXPERIMENTS)
        assert materialize(REGISTRY_ASSETS, instance=instance, resources=workspace.resources()).success
        results = {e: materialize_experiment(workspace, instance, e) for e in EXPERIMENTS}
        yield workspace, results, instance


def metadata(result, asset_name):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset_name]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_every_partition_succeeds(pipeline):
    _, results, _ = pipeline
    assert all(r.success for r in results.values())


def test_dims_come_from_the_registry(pipeline):
    workspace, _, _ = pipeline
    variants = workspace.rows("dim_variants")
    assert len(variants) == 9
    assert variants.groupby("experiment_id")["is_control"].sum().eq(1).all()
    experiments = workspace.rows("dim_experiments")
    assert sorted(experiments["experiment_id"]) == sorted(EXPERIMENTS)


def test_assignment_rules_recover_the_ground_truth(pipeline):
    workspace, results, _ = pipeline
    for experiment_id in EXPERIMENTS:
        truth = workspace.truth["experiments"][experiment_id]
        deduped = workspace.rows("deduped_assignments", experiment_id)
        counts = deduped[deduped.is_active & deduped.exclusion_reason.isna()].variant_id.value_counts()
        assert counts.to_dict() == truth["analysable_subjects"]
        meta = metadata(results[experiment_id], "deduped_assignments")
        assert meta["multi_variant_subjects"] == truth["multi_variant_subjects"]
        assert meta["exposure_rows_by_reason"]["outside_window"] == truth["rows_outside_window"]
        assert sum(meta["exposure_rows_by_reason"].values()) == truth["exposure_rows"]


def test_one_active_row_per_experiment_and_subject(pipeline):
    workspace, _, _ = pipeline
    deduped = workspace.rows("deduped_assignments")
    active = deduped[deduped.is_active]
    assert len(active) > 0
    assert not active.duplicated(["experiment_id", "subject_id"]).any()


def test_only_post_assignment_events_inside_the_window(pipeline):
    workspace, _, _ = pipeline
    days = pd.Timedelta(days=14)
    post = workspace.rows("post_assignment_events", "checkout_redesign")
    assert len(post) > 0
    assert not ((post.event_at < post.assigned_at) | (post.event_at >= post.assigned_at + days)).any()
    pre = workspace.rows("pre_assignment_events", "checkout_redesign")
    assert len(pre) > 0
    assert not ((pre.event_at >= pre.assigned_at) | (pre.event_at < pre.assigned_at - days)).any()


def metrics_of(workspace, experiment_id) -> pd.DataFrame:
    return workspace.rows("variant_metrics", experiment_id).set_index(["variant_id", "metric"])


def test_the_real_effect_is_recovered(pipeline):
    workspace, _, _ = pipeline
    truth = workspace.truth["experiments"]["checkout_redesign"]["true_relative_lift"]["treatment"]
    row = metrics_of(workspace, "checkout_redesign").loc[("treatment", "revenue")]
    assert row["ci_low"] < truth["revenue"] < row["ci_high"]
    assert row["p_value"] < 0.05 and row["p_value_holm"] < 0.05
    assert row["cuped_ci_low"] < truth["revenue"] < row["cuped_ci_high"]
    pricing = metrics_of(workspace, "pricing_three_arm")
    for variant in ("price_low", "price_high"):
        lift = workspace.truth["experiments"]["pricing_three_arm"]["true_relative_lift"][variant]["revenue"]
        r = pricing.loc[(variant, "revenue")]
        assert r["ci_low"] < lift < r["ci_high"]


def test_the_aa_experiment_is_not_significant(pipeline):
    workspace, _, _ = pipeline
    aa = metrics_of(workspace, "aa_homepage")
    treatment = aa.loc["treatment"]
    assert (treatment["p_value_holm"] >= 0.05).all()
    assert (treatment["ci_low"] < 0).all() and (treatment["ci_high"] > 0).all()


def test_cuped_narrows_the_interval(pipeline):
    workspace, _, _ = pipeline
    for experiment_id in EXPERIMENTS:
        rows = metrics_of(workspace, experiment_id)
        rows = rows[~rows["is_control"]]
        raw_width = rows["ci_high"] - rows["ci_low"]
        cuped_width = rows["cuped_ci_high"] - rows["cuped_ci_low"]
        assert (cuped_width < raw_width).all(), experiment_id
        assert (rows["cuped_variance_reduction"] > 0).all()


def test_srm_fires_only_where_injected_and_names_the_cause(pipeline):
    workspace, results, _ = pipeline
    for experiment_id in EXPERIMENTS:
        truth = workspace.truth["experiments"][experiment_id]
        meta = metadata(results[experiment_id], "variant_metrics")
        assert meta["srm_flagged"] == truth["srm_injected"], experiment_id
        if truth["srm_injected"]:
            cause = truth["srm_cause"]
            assert meta["srm_likely_cause"].startswith(f"{cause['property']} = {cause['value']}")


def test_on_the_sample_only_the_srm_experiment_fails_a_check_naming_the_device(pipeline):
    workspace, results, _ = pipeline
    for experiment_id in EXPERIMENTS:
        evaluations = results[experiment_id].get_asset_check_evaluations()
        assert len(evaluations) == len(EXPERIMENT_CHECK_KEYS)
        failed = {e.check_name: e for e in evaluations if not e.passed}
        if experiment_id == "onboarding_srm":
            assert list(failed) == ["no_sample_ratio_mismatch"]
            srm = failed["no_sample_ratio_mismatch"]
            assert srm.metadata["likely_cause"].value == "device_type = android"
            assert "Likely cause: device_type = android" in srm.description
        else:
            assert failed == {}, experiment_id


def test_every_table_the_pipeline_writes_keeps_its_contract(pipeline):
    """Each table holds exactly its schema's columns and passes its checks, partition by partition."""
    workspace, _, _ = pipeline
    registry = load_registry(workspace.registry_path)
    properties = registry.sources.assignments.properties
    with_properties = {"raw_assignments", "deduped_assignments"}
    written = set(schemas.TABLES) - {"alerts"}  # no sensor ran: there are no alerts
    with workspace.warehouse().session() as session:
        assert {name for name in schemas.TABLES if session.has_table(name)} == written
        failures = {}
        for name in sorted(written):
            table = schemas.TABLES[name]
            parts = [(e, session.partition(name, e.id)) for e in registry.experiments] if table.per_experiment else [
                (None, session.table(name))
            ]
            if table.per_experiment:  # no row outside the registry's experiments' partitions
                assert sum(session.count(rows) for _, rows in parts) == session.count(session.table(name)), name
            for experiment, rows in parts:
                args = (experiment, properties) if name in with_properties else (experiment,)
                if name == "variant_metrics":
                    args = (experiment, experiment.metrics)
                outcome = validation.validate(table.schema(*args), rows)
                if not outcome.passed:
                    failures[(name, experiment and experiment.id)] = outcome.failed_checks
    assert failures == {}


def test_variant_metrics_columns_and_sufficient_statistics(pipeline):
    workspace, _, _ = pipeline
    rows = metrics_of(workspace, "pricing_three_arm").reset_index()
    assert len(rows) == 3 * 3  # variants x metrics
    assert rows.groupby("metric")["is_control"].sum().eq(1).all()
    n_by_variant = rows.groupby("variant_id")["n"].unique()
    truth = workspace.truth["experiments"]["pricing_three_arm"]["analysable_subjects"]
    assert {v: list(n) for v, n in n_by_variant.items()} == {v: [n] for v, n in truth.items()}
    conversion = rows[rows.metric == "conversion"]
    assert ((conversion["mean"] >= 0) & (conversion["mean"] <= 1)).all()
    assert (rows["mean"] - rows["sum_y"] / rows["n"]).abs().max() < 1e-9


def test_rematerializing_a_partition_gives_identical_tables(pipeline):
    workspace, _, instance = pipeline
    tables = ["raw_assignments", "deduped_assignments", "post_assignment_events", "pre_assignment_events",
              "variant_metrics"]

    def snapshot():
        return {t: workspace.rows(t, "aa_homepage") for t in tables}

    before = snapshot()
    assert materialize_experiment(workspace, instance, "aa_homepage").success
    after = snapshot()
    for table in tables:
        pd.testing.assert_frame_equal(before[table], after[table], obj=table)


def test_no_large_table_passes_through_pandas(pipeline, monkeypatch):
    """Only small results (sufficient statistics, counts) are ever fetched into Python."""
    from exp_pipeline.warehouse.interface import WarehouseSession

    workspace, _, instance = pipeline
    fetched = []
    original = WarehouseSession.to_pandas

    def spy(self, expr):
        frame = original(self, expr)
        fetched.append(len(frame))
        return frame

    monkeypatch.setattr(WarehouseSession, "to_pandas", spy)
    assert materialize_experiment(workspace, instance, "checkout_redesign").success
    assert fetched, "the spy saw nothing: the test would pass vacuously"
    subjects = sum(workspace.truth["experiments"]["checkout_redesign"]["analysable_subjects"].values())
    assert max(fetched) <= 100 < subjects


def test_the_html_report_is_written_with_checks_and_srm(pipeline):
    workspace, results, _ = pipeline
    for experiment_id in ("checkout_redesign", "onboarding_srm"):
        [event] = [
            e for e in results[experiment_id].get_asset_materialization_events()
            if e.asset_key.path[-1] == "experiment_report"
        ]
        path = event.materialization.metadata["report_path"].value
        html_text = open(path, encoding="utf-8").read()
        assert path == str(workspace.root / "reports" / f"{experiment_id}.html")
        assert 'id="results"' in html_text and 'id="forest-plot"' in html_text and "<svg" in html_text
        assert "no_sample_ratio_mismatch" in html_text and "one_active_row_per_subject" in html_text
        if experiment_id == "onboarding_srm":
            assert "device_type = android" in html_text and 'id="srm-warning"' in html_text
        else:
            assert 'id="srm-warning"' not in html_text


def test_the_report_materialized_alone_lists_every_check_of_the_experiment_in_order(pipeline):
    """As when someone re-materializes only experiment_report from the UI: the report still shows
    the latest result of each of the experiment's checks, in the same order every time."""
    workspace, _, instance = pipeline
    result = materialize(
        [*ANALYSIS_ASSETS, *EXPERIMENT_CHECKS], selection=["experiment_report"],
        partition_key="checkout_redesign", instance=instance, resources=workspace.resources(),
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    html_text = open(event.materialization.metadata["report_path"].value, encoding="utf-8").read()
    expected = [f"{k.asset_key.to_user_string()}</td><td>{k.name}<" for k in CHECK_KEYS if k.asset_key.path[-1] != "source_audit"]
    count = len(EXPERIMENT_CHECK_KEYS)
    assert f"{count} of {count} checks passed" in html_text
    positions = [html_text.find(cell) for cell in expected]
    assert -1 not in positions and positions == sorted(positions)


def test_variant_metrics_metadata_embeds_the_forest_plot(pipeline):
    _, results, _ = pipeline
    meta = metadata(results["checkout_redesign"], "variant_metrics")
    assert meta["forest_plot"].startswith("![forest plot of relative lifts](data:image/svg+xml;base64,")
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in meta["results"].splitlines()]
    assert ["treatment", "revenue"] in rows


# -- incremental refresh -------------------------------------------------------------------------

INCREMENTAL_USERS = 4_000
RUNNING_EXPERIMENT = "aa_homepage"  # starts 2026-10-01, no end: refreshed every day


def _daily_logs_until(source: Path, target: Path, last_day: str, late_day: str | None) -> None:
    """Copy the generated daily files up to `last_day` (inclusive) into `target`; the file of
    `late_day` goes in without every fourth row: those rows arrive late, with the next day."""
    for kind in ("assignments", "events"):
        folder = target / "sample" / kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in sorted((source / kind).glob("*.parquet")):
            day = path.stem.rsplit("_", 1)[-1]
            if day > last_day:
                continue
            if kind == "events" and day == late_day:
                frame = pd.read_parquet(path)
                frame[frame.index % 4 != 0].to_parquet(folder / path.name, index=False, coerce_timestamps="us")
            else:
                shutil.copy(path, folder / path.name)


def _expose_to_another_variant(root: Path, day: str, subject_id: str) -> None:
    """A corrected log: on `day` the subject is logged in the other variant too, so it must leave
    the analysis with its events."""
    folder = root / "sample" / "assignments"
    exposures = pd.concat(pd.read_parquet(p) for p in sorted(folder.glob("*.parquet")))
    row = exposures[(exposures.experiment_key == RUNNING_EXPERIMENT) & (exposures.user_id == subject_id)].head(1)
    row = row.assign(
        variation=row.variation.map({"control": "treatment", "treatment": "control"}),
        exposed_at=pd.Timestamp(f"{day}T12:00:00Z"),
    )
    row.to_parquet(folder / f"exposures_{day}_correction.parquet", index=False, coerce_timestamps="us")


ANALYSIS_TABLES = ["deduped_assignments", "post_assignment_events", "pre_assignment_events", "variant_metrics"]


def _analysis_tables(workspace) -> dict[str, pd.DataFrame]:
    tables = {t: workspace.rows(t, RUNNING_EXPERIMENT) for t in ANALYSIS_TABLES}
    # History rows and validity times depend on when runs happened; the current state must not.
    deduped = tables["deduped_assignments"]
    deduped = deduped[deduped.is_active].drop(columns=["valid_from", "valid_to"])
    tables["deduped_assignments"] = deduped.sort_values(list(deduped.columns), ignore_index=True)
    return tables


@pytest.mark.parametrize(
    ("processed_until", "refreshed_day", "max_share_rebuilt"),
    [
        # 28 days processed, enrollment over: the daily steady state rebuilds only recent days.
        ("2026-10-28", "2026-10-29", 0.2),
        # Still enrolling: each day's new subjects are a large part of a young experiment, and
        # their whole windows (pre-period included) are new.
        ("2026-10-09", "2026-10-10", 0.75),
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_incremental_refresh_equals_full_recomputation(
    tmp_path, engine, processed_until, refreshed_day, max_share_rebuilt
):
    generated = tmp_path / "generated"
    generate(generated, n_users=INCREMENTAL_USERS)
    incremental = Workspace.existing(tmp_path / "incremental", engine)
    full = Workspace.existing(tmp_path / "full", engine)
    for workspace in (incremental, full):
        workspace.root.mkdir()
        shutil.copy(DEFAULT_REGISTRY, workspace.registry_path)
    # A quarter of the events of two days before arrive late, with the refreshed day.
    late_day = (dt.date.fromisoformat(refreshed_day) - dt.timedelta(days=2)).isoformat()
    _daily_logs_until(generated, incremental.root, processed_until, late_day=late_day)

    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, [RUNNING_EXPERIMENT])
        first = materialize_experiment(incremental, instance, RUNNING_EXPERIMENT)
        assert metadata(first, "post_assignment_events")["refresh_mode"] == "full"

        # A subject with stored events whose log is corrected on the refreshed day.
        corrected = incremental.rows("post_assignment_events", RUNNING_EXPERIMENT).subject_id.min()
        _daily_logs_until(generated, incremental.root, refreshed_day, late_day=None)
        _expose_to_another_variant(incremental.root, refreshed_day, corrected)
        refresh = materialize_experiment(incremental, instance, RUNNING_EXPERIMENT)
        _daily_logs_until(generated, full.root, refreshed_day, late_day=None)
        _expose_to_another_variant(full.root, refreshed_day, corrected)
        recomputed = materialize_experiment(full, instance, RUNNING_EXPERIMENT)

    refreshed_meta = metadata(refresh, "post_assignment_events")
    assert refreshed_meta["refresh_mode"] == "incremental"
    assert metadata(recomputed, "post_assignment_events")["refresh_mode"] == "full"
    # It rebuilt only the recent rows, not the partition.
    assert 0 < refreshed_meta["rows_inserted"] < max_share_rebuilt * refreshed_meta["dagster/row_count"]
    # The statistics reused the stored per-subject values of the subjects the refresh left alone.
    metrics_meta = metadata(refresh, "variant_metrics")
    assert metrics_meta["subject_values"] == "incremental"
    assert metadata(recomputed, "variant_metrics")["subject_values"] == "full"
    subjects = metrics_meta["analysable_subjects"]
    # Post-assignment values of subjects whose windows reach the refreshed days; pre-period values
    # only of subjects assigned on them (none once enrollment is over).
    assert 0 < metrics_meta["subjects_recomputed_post"] <= subjects
    if max_share_rebuilt < 0.5:  # the steady state: subjects assigned weeks ago are reused
        assert metrics_meta["subjects_recomputed_post"] < subjects / 2
    assert metrics_meta["subjects_recomputed_pre"] <= metrics_meta["subjects_recomputed_post"]
    got, want = _analysis_tables(incremental), _analysis_tables(full)
    # The corrected subject left the analysis, with its events.
    assert corrected not in set(got["post_assignment_events"].subject_id)
    assert corrected in set(got["deduped_assignments"].query("exclusion_reason.notnull()").subject_id)
    # Every statistic to the last bit: sums are fixed point, whatever order the rows are stored in.
    for table in ("deduped_assignments", "post_assignment_events", "pre_assignment_events", "variant_metrics"):
        pd.testing.assert_frame_equal(got[table], want[table], check_exact=True, obj=table)


def _first_exposure_moved_earlier(root: Path, subject_id: str, at: str) -> None:
    """A late exposure log: the subject was first exposed, in its own variant, earlier than known."""
    folder = root / "sample" / "assignments"
    exposures = pd.concat(pd.read_parquet(p) for p in sorted(folder.glob("*.parquet")))
    row = exposures[(exposures.experiment_key == RUNNING_EXPERIMENT) & (exposures.user_id == subject_id)].head(1)
    row.assign(exposed_at=pd.Timestamp(at)).to_parquet(
        folder / "exposures_late_log.parquet", index=False, coerce_timestamps="us"
    )


def test_statistics_stay_exact_when_assignments_change_between_the_window_events_and_them(tmp_path):
    """deduped_assignments and variant_metrics run without window_events (say, from the UI), then
    the daily run refreshes: the subject whose assignment moved must be valued on its new rows."""
    generated = tmp_path / "generated"
    generate(generated, n_users=INCREMENTAL_USERS)
    incremental, full = Workspace.existing(tmp_path / "incremental"), Workspace.existing(tmp_path / "full")
    for workspace in (incremental, full):
        workspace.root.mkdir()
        shutil.copy(DEFAULT_REGISTRY, workspace.registry_path)
    _daily_logs_until(generated, incremental.root, "2026-10-28", late_day=None)
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, [RUNNING_EXPERIMENT])
        materialize_experiment(incremental, instance, RUNNING_EXPERIMENT)
        deduped = incremental.rows("deduped_assignments", RUNNING_EXPERIMENT)
        analysable = deduped[deduped.is_active & deduped.exclusion_reason.isna()]
        # Assigned in the first week, with events: its window moves two days earlier.
        subject = analysable[analysable.assigned_at > pd.Timestamp("2026-10-03T00:00:00Z")].sort_values("assigned_at").subject_id.iloc[0]
        moved_to = "2026-10-01T00:00:01Z"
        _first_exposure_moved_earlier(incremental.root, subject, moved_to)
        partial = [a for a in ANALYSIS_ASSETS if a.op.name in ("raw_assignments", "deduped_assignments", "variant_metrics")]
        assert materialize(partial, partition_key=RUNNING_EXPERIMENT, instance=instance,
                           resources=incremental.resources()).success
        _daily_logs_until(generated, incremental.root, "2026-10-29", late_day=None)
        _first_exposure_moved_earlier(incremental.root, subject, moved_to)
        refresh = materialize_experiment(incremental, instance, RUNNING_EXPERIMENT)
        _daily_logs_until(generated, full.root, "2026-10-29", late_day=None)
        _first_exposure_moved_earlier(full.root, subject, moved_to)
        materialize_experiment(full, instance, RUNNING_EXPERIMENT)
    assert metadata(refresh, "post_assignment_events")["refresh_mode"] == "incremental"
    assert metadata(refresh, "variant_metrics")["subject_values"] == "incremental"
    got, want = _analysis_tables(incremental), _analysis_tables(full)
    assert (got["deduped_assignments"].set_index("subject_id").assigned_at[subject] == pd.Timestamp(moved_to))
    for table in ANALYSIS_TABLES:
        pd.testing.assert_frame_equal(got[table], want[table], check_exact=True, obj=table)
