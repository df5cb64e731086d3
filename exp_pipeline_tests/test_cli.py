"""The main command, run as a user runs it (a subprocess with its environment)."""

import os
import subprocess
import sys

import pytest

from exp_pipeline_tests.conftest import write_tiny_workspace

pytestmark = pytest.mark.e2e


def run_cli(workspace, tmp_path, *args):
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "EXP_PIPELINE_REGISTRY": str(workspace.registry_path),
        "EXP_PIPELINE_DUCKDB": str(workspace.database),
        "DAGSTER_HOME": str(home),
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "exp_pipeline.cli", "run", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_the_main_command_prints_results_and_check_failures(tmp_path):
    workspace = write_tiny_workspace(
        tmp_path, arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}}
    )
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "experiment" in out and "CUPED lift" in out
    assert out.count("revenue") == 2  # one treatment row per experiment
    assert "WARN  exp_a: deduped_assignments.no_sample_ratio_mismatch" in out
    assert "SRM (p=" in out


def test_blocked_experiments_are_not_shown_as_fresh_and_the_command_fails(tmp_path):
    workspace = write_tiny_workspace(
        tmp_path,
        arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}},
        srm_blocks=True,
    )
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 1
    assert "No fresh results for exp_a" in done.stdout
    assert "ERROR exp_a: deduped_assignments.no_sample_ratio_mismatch" in done.stdout
    lines = [line for line in done.stdout.splitlines() if "revenue" in line]
    assert len(lines) == 1 and "exp_b" in lines[0]
    assert "FAILED: exp_a" in done.stderr


def test_an_unknown_experiment_is_refused_by_name(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    done = run_cli(workspace, tmp_path, "--experiment", "nope")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: experiment 'nope' is not in the registry"


def test_an_invalid_registry_is_one_clear_message(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    workspace.registry_path.write_text(workspace.registry_path.read_text().replace("weight: 0.5}", "weight: 0.7}", 1))
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 2
    assert "experiment 'exp_a', field 'variants': variant weights must sum to 1, they sum to 1.2" in done.stderr
    assert "Traceback" not in done.stderr
