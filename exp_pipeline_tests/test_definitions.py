"""The Definitions load (from exp_pipeline/defs/) with exactly the expected assets, checks, jobs,
schedule, sensors and resources."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from exp_pipeline.definitions import defs
from exp_pipeline.settings import PROJECT_ROOT

ASSETS = {
    "dim_experiments", "dim_variants", "source_audit", "raw_assignments", "deduped_assignments",
    "post_assignment_events", "pre_assignment_events", "variant_metrics", "experiment_report",
}
# The logs and the registry: external assets upstream of what reads them.
SOURCES = {"exposure_log", "event_log", "experiment_registry"}
CHECKS = {
    "raw_assignments.matches_schema", "raw_assignments.rejected_share_within_bound",
    "deduped_assignments.matches_schema", "deduped_assignments.one_active_row_per_subject",
    "deduped_assignments.multi_variant_share_within_bounds", "deduped_assignments.no_sample_ratio_mismatch",
    "deduped_assignments.one_subject_per_secondary_id", "deduped_assignments.conflicting_secondary_ids_within_bound",
    "post_assignment_events.matches_schema", "post_assignment_events.no_events_before_assignment",
    "post_assignment_events.metric_events_match_subjects",
    "raw_assignments.rows_read_not_dropped", "post_assignment_events.rows_read_not_dropped",
    "pre_assignment_events.matches_schema", "variant_metrics.matches_schema",
    "variant_metrics.no_pre_period_bias",
    "source_audit.rejected_share_within_bound",
}


def test_the_definitions_hold_every_asset_check_job_schedule_sensor_and_resource():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS | SOURCES
    assert {f"{k.asset_key.to_user_string()}.{k.name}" for k in graph.asset_check_keys} == CHECKS
    assert {j.name for j in defs.resolve_all_job_defs()} - {"__ASSET_JOB"} == {"analyze_experiment", "refresh_registry"}
    assert [s.name for s in defs.schedules] == ["daily_experiment_refresh"]
    assert {s.name for s in defs.sensors} == {
        "register_new_experiments", "alert_on_failed_checks", "alert_on_run_failure", "alert_on_late_results",
    }
    assert set(defs.resources) == {"registry", "warehouse"}
    assert defs.executor is dg.in_process_executor


def test_the_check_keys_the_sensor_and_report_read_are_every_check():
    from exp_pipeline.defs.checks import CHECK_KEYS

    assert {f"{k.asset_key.to_user_string()}.{k.name}" for k in CHECK_KEYS} == CHECKS
    assert len(CHECK_KEYS) == len(CHECKS)


def test_the_analysis_job_covers_every_experiment_asset_and_its_checks():
    job = defs.resolve_job_def("analyze_experiment")
    selected = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert selected == ASSETS - {"dim_experiments", "dim_variants", "source_audit"}
    checks = {f"{k.asset_key.to_user_string()}.{k.name}" for k in job.asset_layer.asset_graph.asset_check_keys}
    assert CHECKS - {"source_audit.rejected_share_within_bound"} <= checks


def test_every_asset_links_to_its_code():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        if not graph.get(key).is_executable:
            continue
        [reference] = graph.get(key).metadata["dagster/code_references"].code_references
        assert reference.file_path.endswith("exp_pipeline/defs/assets.py") and reference.line_number > 0


def run_dg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "dg"), *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"},
    )


@pytest.mark.e2e
def test_dg_check_defs_passes():
    done = run_dg("check", "defs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "All definitions loaded successfully." in done.stdout + done.stderr


@pytest.mark.e2e
def test_dg_list_defs_lists_every_asset_job_schedule_and_sensor():
    done = run_dg("list", "defs", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    listed = json.loads(done.stdout)
    assert {a["asset_key"] for a in listed["assets"]} == ASSETS | SOURCES
    assert {j["name"] for j in listed["jobs"]} == {"analyze_experiment", "refresh_registry"}
    assert [s["name"] for s in listed["schedules"]] == ["daily_experiment_refresh"]


def test_variant_metrics_is_late_in_the_ui_when_the_daily_refresh_misses_a_day():
    from exp_pipeline import alerts

    policy = defs.resolve_asset_graph().get(dg.AssetKey("variant_metrics")).freshness_policy
    assert (policy.warn_window.to_timedelta(), policy.fail_window.to_timedelta()) == (
        alerts.RESULTS_WARN_AFTER, alerts.RESULTS_LATE_AFTER)


@pytest.mark.e2e
def test_dg_launch_reruns_one_experiment_and_rewrites_its_report(tmp_path):
    """The README's re-run of one experiment: scripts/dg.sh on the registry's own instance."""
    from exp_pipeline_tests.conftest import write_tiny_workspace

    workspace = write_tiny_workspace(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("EXP_PIPELINE_DUCKDB", "DAGSTER_HOME")}
    env.update(EXP_PIPELINE_REGISTRY=str(workspace.registry_path), DAGSTER_DISABLE_TELEMETRY="1")
    first = subprocess.run([sys.executable, "-m", "exp_pipeline.cli", "run"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "reports" / "exp_a.html"
    before = report.stat().st_mtime_ns
    done = subprocess.run(
        ["bash", str(PROJECT_ROOT / "scripts" / "dg.sh"), "launch", "--assets", "variant_metrics+", "--partition", "exp_a"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert report.stat().st_mtime_ns > before
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / ".dagster_home"))) as instance:
        assert len(instance.get_runs()) == 3  # the main command's two runs and the launch
