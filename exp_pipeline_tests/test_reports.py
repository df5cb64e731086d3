"""The console and markdown renderings: numbers as people read them, the stored SRM verdict."""

import math

import pandas as pd
import pytest

from exp_pipeline import reports, stats
from exp_pipeline.results import variant_metric_rows
from exp_pipeline_tests.tables import experiment, metric


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None, "x"])
def test_what_is_not_a_finite_number_reads_n_a(value):
    assert reports.percent(value) == "n/a"
    assert reports.p_value_text(value) == "n/a"
    assert reports.interval(value, 0.1) == "n/a" and reports.interval(-0.1, value) == "n/a"


def test_numbers_as_the_results_table_prints_them():
    assert reports.percent(0.1386) == "+13.86%" and reports.percent(-0.0233) == "-2.33%"
    assert reports.interval(-0.0215, 0.0299) == "[-2.15%, +2.99%]"
    assert reports.p_value_text(0.75) == "0.750" and reports.p_value_text(1.3e-9) == "1.3e-09"


def _rows(control: int, treatment: int) -> pd.DataFrame:
    exp = experiment()
    srm = stats.srm_test({"control": control, "treatment": treatment}, exp.weights, min_total=100)
    sufficient = pd.DataFrame([
        {"variant_id": v, "metric": "revenue", "n": n, "sum_y": float(n), "sum_y2": 2.0 * n,
         "sum_x": 0.0, "sum_x2": 0.0, "sum_xy": 0.0}
        for v, n in (("control", control), ("treatment", treatment))
    ])
    return reports.results_rows(variant_metric_rows(sufficient, exp, [metric()], srm))


def test_the_srm_column_shows_the_one_stored_verdict():
    assert _rows(500, 500)["SRM"].tolist() == ["ok (p=1.000)"]
    assert _rows(700, 300)["SRM"].iloc[0].startswith("SRM (p=")
    # 60 subjects, fewer than srm.min_subjects: not judged, though the test has a p-value.
    assert _rows(40, 20)["SRM"].tolist() == ["not judged"]


def test_a_row_written_before_the_verdict_was_stored_reads_n_a():
    assert reports.srm_text(None, 0.5) == "n/a" and reports.srm_text(math.nan, 0.5) == "n/a"


def test_the_console_table_reads_in_120_columns_with_the_verdict_heading_each_experiment():
    exp = experiment()
    srm = stats.srm_test({"control": 24875, "treatment": 25038}, exp.weights, min_total=100)
    sufficient = pd.DataFrame([
        {"variant_id": v, "metric": m, "n": n, "sum_y": 17.76 * n, "sum_y2": 900.0 * n,
         "sum_x": 5.0 * n, "sum_x2": 400.0 * n, "sum_xy": 300.0 * n}
        for v, n in (("control", 24875), ("treatment", 25038)) for m in ("revenue", "a_long_metric_name")
    ])
    frame = variant_metric_rows(sufficient, exp, [metric(), metric(id="a_long_metric_name")], srm)
    text = reports.results_text(frame)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.splitlines()[0] == f"{exp.id} · sample ratio ok (p={reports.p_value_text(srm.p_value)})"


def test_the_report_as_markdown_says_the_verdict_the_results_and_every_check():
    srm = {"verdict": "SRM", "p_value": 1e-9, "observed": {"control": 700, "treatment": 300},
           "expected": {"control": 500.0, "treatment": 500.0}, "likely_cause": "device_type = android"}
    checks = [
        {"asset": "raw_assignments", "check": "matches_schema", "passed": True, "severity": "ERROR", "description": None},
        {"asset": "deduped_assignments", "check": "no_sample_ratio_mismatch", "passed": False, "severity": "WARN",
         "description": "sample ratio mismatch"},
    ]
    text = reports.report_markdown("Test", "exp_t", srm, "| results |", "![plot](data:x)", None, checks)
    lines = text.splitlines()
    assert lines[0] == "# Test (exp_t)"
    assert lines[2].startswith("**Sample ratio:** SRM (p=1e-09); observed {'control': 700, 'treatment': 300}")
    assert "Likely cause: device_type = android." in text and "## By segment" not in text
    assert "| deduped_assignments.no_sample_ratio_mismatch | FAILED (WARN) | sample ratio mismatch |" in text
    assert "| raw_assignments.matches_schema" in text and "| passed " in text
    ok = reports.report_markdown("Test", "exp_t", {**srm, "verdict": "ok"}, "r", "p", "| by segment |", [])
    assert "Do not trust" not in ok and "## By segment\n\n| by segment |" in ok and "no checks evaluated" in ok
