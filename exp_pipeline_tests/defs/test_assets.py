"""End to end: materialize every experiment through Dagster on generated data, recover the truth."""


import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize
from scipy import stats as sps

from exp_pipeline import schemas, validation
from exp_pipeline.defs.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS
from exp_pipeline.defs.checks import CHECK_KEYS, EXPERIMENT_CHECK_KEYS
from exp_pipeline.defs.partitions import experiment_partitions, run_over
from exp_pipeline.registry import load_registry
from exp_pipeline_tests.conftest import ENGINES, add_logins, write_tiny_workspace

pytestmark = pytest.mark.e2e

EXPERIMENTS = ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]


def materialize_experiment(workspace, instance, experiment_id):
    """A one-partition run, as the UI's Materialize of one experiment."""
    return materialize(
        ANALYSIS_ASSETS, partition_key=experiment_id, instance=instance, resources=workspace.resources(),
    )


@pytest.fixture(scope="module", params=ENGINES)
def pipeline(request, tmp_path_factory):
    """Every experiment materialized in ONE run per engine (as the daily schedule and the main
    command run them); yields (workspace, the run's result, instance)."""
    workspace = request.getfixturevalue("sample_workspace" if request.param == "duckdb" else "spark_sample_workspace")
    with DagsterInstance.local_temp(str(tmp_path_factory.mktemp("dagster_home"))) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, EXPERIMENTS)
        assert materialize(REGISTRY_ASSETS, instance=instance, resources=workspace.resources()).success
        tags, _ = run_over(EXPERIMENTS, EXPERIMENTS)
        result = materialize(ANALYSIS_ASSETS, instance=instance, resources=workspace.resources(), tags=tags)
        yield workspace, result, instance


def metadata(result, asset_name, experiment_id):
    [event] = [
        e for e in result.get_asset_materialization_events()
        if e.asset_key.path[-1] == asset_name and e.materialization.partition == experiment_id
    ]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def evaluations_of(result, experiment_id):
    return [e for e in result.get_asset_check_evaluations() if e.partition == experiment_id]


def test_one_run_analyses_every_experiment_in_one_step(pipeline):
    _, result, _ = pipeline
    assert result.success
    steps = {e.step_key for e in result.all_events if e.is_step_success}
    assert steps == {"experiment_analysis"}
    for experiment_id in EXPERIMENTS:
        assert {"raw_assignments", "deduped_assignments", "post_assignment_events", "pre_assignment_events",
                "variant_metrics", "experiment_report"} == {
            e.asset_key.path[-1] for e in result.get_asset_materialization_events()
            if e.materialization.partition == experiment_id
        }
        meta = metadata(result, "variant_metrics", experiment_id)
        assert meta["experiments_in_pass"] == len(EXPERIMENTS)
        assert meta["pass_stage_seconds"]["temporal join"] > 0


def test_each_experiments_check_evaluations_are_recorded_against_its_partition(pipeline):
    _, result, instance = pipeline
    storage = instance.event_log_storage
    for key in EXPERIMENT_CHECK_KEYS:
        records = storage.get_asset_check_execution_history(key, limit=100)
        mine = [r for r in records if r.run_id == result.run_id]
        assert sorted(r.partition for r in mine) == sorted(EXPERIMENTS), key
        assert {r.status.value for r in mine} <= {"SUCCEEDED", "FAILED"}, key  # none left PLANNED


def test_dims_come_from_the_registry(pipeline):
    workspace, _, _ = pipeline
    variants = workspace.rows("dim_variants")
    assert len(variants) == 9
    assert variants.groupby("experiment_id")["is_control"].sum().eq(1).all()
    experiments = workspace.rows("dim_experiments")
    assert sorted(experiments["experiment_id"]) == sorted(EXPERIMENTS)


def test_assignment_rules_recover_the_ground_truth(pipeline):
    workspace, result, _ = pipeline
    for experiment_id in EXPERIMENTS:
        truth = workspace.truth["experiments"][experiment_id]
        deduped = workspace.rows("deduped_assignments", experiment_id)
        counts = deduped[deduped.is_active & deduped.exclusion_reason.isna()].variant_id.value_counts()
        assert counts.to_dict() == truth["analysable_subjects"]
        meta = metadata(result, "deduped_assignments", experiment_id)
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


def test_the_effect_only_on_ios_is_found_by_segment_and_the_aa_test_differs_nowhere(pipeline):
    workspace, _, _ = pipeline
    truth = workspace.truth["experiments"]["checkout_redesign"]["true_revenue_lift_by_device"]["treatment"]
    segments = workspace.rows("segment_metrics", "checkout_redesign")
    revenue = segments[(segments.metric == "revenue") & (segments.property == "device_type") & ~segments.is_control]
    for row in revenue.itertuples():
        assert row.ci_low < truth[row.value] < row.ci_high, row.value
    assert revenue.set_index("value").loc["ios", "ci_low"] > 0
    heterogeneity = workspace.rows("segment_heterogeneity").set_index(["experiment_id", "property", "variant_id", "metric"]).sort_index()
    assert heterogeneity.loc[("checkout_redesign", "device_type", "treatment", "revenue"), "differs"]
    assert not heterogeneity.loc[("checkout_redesign", "country", "treatment", "revenue"), "differs"]
    assert not heterogeneity.loc["aa_homepage", "differs"].any()


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


def test_cuped_pp_is_at_least_as_narrow_as_cuped_on_every_comparison(pipeline):
    workspace, _, _ = pipeline
    rows = workspace.rows("variant_metrics")
    treatments = rows[~rows.is_control]
    assert (treatments["cuped_pp_covariates"] == "pre_period, device_type, country").all()
    # Not a theorem (CUPED++'s slope is within arms, CUPED's theta over the pooled sample), so a
    # tolerance: on the sample CUPED++ is narrower everywhere by a little (its properties explain
    # little of the metrics), and never wider than chance could make it.
    width = treatments["cuped_pp_ci_high"] - treatments["cuped_pp_ci_low"]
    assert (width <= 1.001 * (treatments["cuped_ci_high"] - treatments["cuped_ci_low"])).all()
    assert (width < treatments["ci_high"] - treatments["ci_low"]).all()


def test_srm_fires_only_where_injected_and_names_the_cause(pipeline):
    workspace, result, _ = pipeline
    for experiment_id in EXPERIMENTS:
        truth = workspace.truth["experiments"][experiment_id]
        meta = metadata(result, "variant_metrics", experiment_id)
        assert meta["srm_flagged"] == truth["srm_injected"], experiment_id
        if truth["srm_injected"]:
            cause = truth["srm_cause"]
            assert meta["srm_likely_cause"].startswith(f"{cause['property']} = {cause['value']}")


def test_on_the_sample_only_the_srm_experiment_fails_a_check_naming_the_device(pipeline):
    workspace, result, _ = pipeline
    for experiment_id in EXPERIMENTS:
        evaluations = evaluations_of(result, experiment_id)
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


def test_a_one_partition_run_gives_the_tables_of_the_multi_experiment_run(pipeline):
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
    workspace, result, _ = pipeline
    for experiment_id in ("checkout_redesign", "onboarding_srm"):
        [event] = [
            e for e in result.get_asset_materialization_events()
            if e.asset_key.path[-1] == "experiment_report" and e.materialization.partition == experiment_id
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
        # The same report in the UI: markdown in the materialization's metadata.
        report = event.materialization.metadata["report"].value
        assert report.startswith(f"# {load_registry(workspace.registry_path).experiment(experiment_id).name} ({experiment_id})")
        assert "## Results" in report and "![forest plot of relative lifts](data:image/svg+xml" in report
        assert "deduped_assignments.no_sample_ratio_mismatch" in report
        assert ("Do not trust the lifts below" in report) == (experiment_id == "onboarding_srm")


def test_the_report_materialized_alone_lists_every_check_of_the_experiment_in_order(pipeline):
    """As when someone re-materializes only experiment_report from the UI: the report still shows
    the latest result of each of the experiment's checks, in the same order every time."""
    workspace, _, instance = pipeline
    result = materialize(
        ANALYSIS_ASSETS, selection=["experiment_report"],
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
    _, result, _ = pipeline
    meta = metadata(result, "variant_metrics", "checkout_redesign")
    assert meta["forest_plot"].startswith("![forest plot of relative lifts](data:image/svg+xml;base64,")
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in meta["results"].splitlines()]
    assert ["treatment", "revenue"] in rows


def test_the_logs_and_the_registry_are_observed_with_their_paths_and_row_counts(tmp_path, instance):
    from dagster import AssetKey, AssetRecordsFilter

    from exp_pipeline_tests.conftest import write_tiny_workspace

    workspace = write_tiny_workspace(tmp_path)
    assert materialize(REGISTRY_ASSETS, instance=instance, resources=workspace.resources()).success

    def observed(asset: str) -> dict:
        [record] = instance.fetch_observations(AssetRecordsFilter(asset_key=AssetKey(asset)), limit=1).records
        return {k: v.value for k, v in record.asset_observation.metadata.items()}

    exposures = pd.read_parquet(tmp_path / "logs" / "assignments.parquet")
    events = pd.read_parquet(tmp_path / "logs" / "events.parquet")
    assert observed("exposure_log") == {
        "path": str(tmp_path / "logs" / "assignments.parquet"), "dagster/row_count": len(exposures), "files": 1}
    assert observed("event_log")["dagster/row_count"] == len(events)
    assert observed("experiment_registry") == {"path": str(workspace.registry_path), "experiments": 2, "metrics": 1}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_metric_keyed_by_a_secondary_id_counts_for_the_first_subject_seen_with_it(tmp_path, instance, engine):
    workspace = write_tiny_workspace(tmp_path, engine=engine)
    add_logins(workspace, logged_in_every=3, shared=10, purchases=True)
    instance.add_dynamic_partitions(experiment_partitions.name, ["exp_a"])
    assert materialize_experiment(workspace, instance, "exp_a").success
    # By hand from the logs: each subject's first exposure, each login's owner (the first subject
    # seen with it, then the smaller id), the owner's orders in [assigned_at, assigned_at + 14 days).
    logs = workspace.registry_path.parent / "logs"
    exposures = pd.read_parquet(logs / "assignments.parquet").query("experiment_key == 'exp_a'")
    first = exposures.sort_values(["exposed_at", "user_id"]).groupby("user_id").first()
    owners = exposures.dropna(subset=["login_id"]).sort_values(["exposed_at", "user_id"]).groupby("login_id").user_id.first()
    orders = pd.read_parquet(logs / "events.parquet").query("event_type == 'order'")
    orders = orders.assign(subject=orders.user_id.map(owners)).dropna(subset=["subject"])
    orders = orders.join(first.exposed_at, on="subject")
    counted = orders[(orders.event_ts >= orders.exposed_at) & (orders.event_ts < orders.exposed_at + pd.Timedelta(days=14))]
    value = counted.groupby("subject").amount.sum().reindex(first.index, fill_value=0.0)
    assert len(counted) == len(owners) and (value > 0).sum() == len(owners)  # one order per login, none late
    rows = metrics_of(workspace, "exp_a")
    for variant in ("control", "treatment"):
        mine = value[first.variation == variant]
        row = rows.loc[(variant, "orders")]
        assert row["n"] == len(mine)  # subjects without a login count, as zero
        assert row["sum_y"] == pytest.approx(mine.sum(), rel=1e-12)
        assert row["mean"] == pytest.approx(mine.mean(), rel=1e-12)
    welch = sps.ttest_ind(value[first.variation == "treatment"], value[first.variation == "control"], equal_var=False)
    treatment = rows.loc[("treatment", "orders")]
    assert treatment["abs_lift_ci_low"] == pytest.approx(welch.confidence_interval().low, rel=1e-9)
    assert treatment["df"] == pytest.approx(welch.df, rel=1e-9)
    # The pre-period (CUPED's covariate) counts each login's order 3 hours before its owner's exposure.
    assert treatment["sum_x"] == pytest.approx(50.0 * np.sum(owners.map(first.variation) == "treatment"), rel=1e-12)
