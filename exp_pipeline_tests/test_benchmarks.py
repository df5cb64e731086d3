"""The benchmark harness at a tiny size: every implementation runs and agrees with the pipeline.

Times are not asserted (benchmarks/README.md: figures come from the script, not from tests); this
keeps reference.sql, the pandas implementation, the Spark engine and the incremental comparison in
step with the pipeline's rules.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_and_every_implementation_matches_the_pipeline(tmp_path):
    out = tmp_path / "report.md"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run_benchmark.py", "--users", "3000", "--runs", "1", "--spark",
         "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = out.read_text()
    assert "MISMATCH" not in report and "FAILED" not in report
    for name in ("pipeline_spark", "one_pass", "one_pass_keep_duplicates", "table_design", "pandas"):
        assert f"- {name} = pipeline: all 35 (experiment, variant, metric) rows" in report, name
    assert "bit-identical in every run" in report and "## Daily refresh" in report
    assert "## Pipeline: one run, one pass, 5 experiments" in report and "| temporal join |" in report


def test_more_experiments_share_the_same_traffic_and_still_match(tmp_path):
    out = tmp_path / "report.md"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run_benchmark.py", "--users", "3000", "--runs", "1", "--experiments", "12",
         "--skip", "one_pass_keep_duplicates", "--skip", "table_design", "--skip", "pandas", "--skip", "incremental",
         "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = out.read_text()
    assert "MISMATCH" not in report and "FAILED" not in report
    assert "## Pipeline: one run, one pass, 12 experiments" in report
    # Twelve copies of the five's shapes: 12 x 7 (experiment, variant, metric) rows, as the five have 35.
    assert "- one_pass = pipeline: all 84 (experiment, variant, metric) rows" in report
