"""The check rules on tables built here, without Dagster: verdicts, severities and figures as plain
values (defs/test_checks.py runs them as Dagster asset checks on materialized experiments)."""

import duckdb
import ibis
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from exp_pipeline import checks, results, schemas
from exp_pipeline.registry import parse_registry
from exp_pipeline.transforms.assignments import analysable_assignments, assignment_counts
from exp_pipeline.transforms.ingestion import RowAccounting
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession
from exp_pipeline_tests.conftest import TINY_REGISTRY

ASSIGNED = pd.Timestamp("2026-10-02T00:00:00Z")


@pytest.fixture()
def session():
    return DuckDBWarehouseSession(duckdb.connect(), "exp")


@pytest.fixture()
def registry(tmp_path):
    return parse_registry(yaml.safe_load(TINY_REGISTRY.replace("BLOCKS", "false")), tmp_path / "registry.yaml")


def write_assignments(session, arms: dict[str, int], multi_variant: int = 0, device=lambda i: "ios") -> None:
    """exp_a's deduped_assignments: `arms` subjects per variant, the first `multi_variant` excluded."""
    rows = []
    for variant, count in arms.items():
        for i in range(count):
            excluded = len(rows) < multi_variant
            rows.append({
                "experiment_id": "exp_a", "subject_id": f"{variant}_{i}", "variant_id": variant,
                "assigned_at": ASSIGNED, "device_type": device(i), "n_exposures": 2 if excluded else 1,
                "n_variants_seen": 2 if excluded else 1,
                "exclusion_reason": "multiple_variants" if excluded else None, "is_active": True,
                "valid_from": pd.Timestamp("2026-10-10T00:00:00Z"), "valid_to": pd.NaT,
            })
    replace_assignments(session, pd.DataFrame(rows))


def replace_assignments(session, frame: pd.DataFrame) -> None:
    """exp_a's deduped_assignments as `frame`, typed by the table's schema (nulls included)."""
    types = schemas.ibis_schema(schemas.deduped_assignments_schema(None, ["device_type"]))
    frame = frame[list(types)].astype(object).where(frame[list(types)].notna(), None)
    session.replace_partition("deduped_assignments", "exp_a", ibis.memtable(frame, schema=types))


@pytest.mark.parametrize(
    ("multi_variant", "passed", "severity"), [(3, True, "WARN"), (12, False, "WARN"), (60, False, "ERROR")]
)
def test_multi_variant_share_warns_then_errors(session, registry, multi_variant, passed, severity):
    write_assignments(session, {"control": 300, "treatment": 300}, multi_variant=multi_variant)
    active = session.table("deduped_assignments").filter(lambda t: t.is_active)
    excluded = session.count(active.filter(active.exclusion_reason == "multiple_variants"))
    outcome = checks.multi_variant_outcome(excluded, session.count(active), registry.experiment("exp_a"))
    assert (outcome.passed, outcome.severity) == (passed, severity)
    assert outcome.metadata["multi_variant_subjects"] == multi_variant
    assert outcome.metadata["multi_variant_share"] == pytest.approx(multi_variant / 600)


def test_a_subject_active_twice_is_named(session, registry):
    write_assignments(session, {"control": 5, "treatment": 5})
    rows = session.to_pandas(session.table("deduped_assignments"))
    twice = pd.concat([rows, rows[rows.subject_id == "control_3"].assign(variant_id="treatment")])
    replace_assignments(session, twice)
    deduped = session.table("deduped_assignments")
    both = checks.unique_active_subject_outcomes(session, deduped.filter(deduped.is_active), ["exp_a", "exp_b"])
    outcome = both["exp_a"]
    assert both["exp_b"].passed  # another experiment of the same pass is judged on its own keys
    assert not outcome.passed and outcome.severity == "ERROR"
    assert outcome.metadata["sample_duplicated_keys"] == [
        {"experiment_id": "exp_a", "subject_id": "control_3", "active_rows": 2}
    ]


@pytest.mark.parametrize("duplicate_in_b", [False, True])
def test_one_experiments_broken_keys_are_not_another_experiments_failure(session, duplicate_in_b):
    # A has a null subject (not a duplicate); B a duplicate or not; C is clean: each is judged alone.
    keys = pd.DataFrame({
        "experiment_id": ["A", "A", "B", "B", "C"],
        "subject_id": ["a1", None, "b1", "b1" if duplicate_in_b else "b2", "c1"],
    })
    table = session.temp_table("keys", ibis.memtable(keys, schema={"experiment_id": "string", "subject_id": "string"}))
    got = {k: o.passed for k, o in checks.unique_active_subject_outcomes(session, table, ["A", "B", "C"]).items()}
    assert got == {"A": False, "B": not duplicate_in_b, "C": True}


def sample_ratio(session, experiment, registry):
    """The SRM check of exp_a as the pass evaluates it, from the stored assignments."""
    analysable = analysable_assignments(session.partition("deduped_assignments", experiment.id))
    counts = session.to_pandas(assignment_counts(analysable, registry.sources.assignments.properties))
    srm, causes = results.srm_of(counts, experiment)
    return checks.sample_ratio_outcome(srm, causes, experiment, registry.sources.assignments.properties)


def test_sample_ratio_is_judged_only_from_the_minimum_count_and_names_the_cause(session, registry):
    experiment = registry.experiment("exp_a")
    write_assignments(session, {"control": 60, "treatment": 20})
    small = sample_ratio(session, experiment, registry)
    assert small.passed and small.metadata["verdict"] == "not judged"
    # Treatment lost its android subjects (every third is on android).
    device = ("ios", "android", "web")
    write_assignments(session, {"control": 400, "treatment": 400}, device=lambda i: device[i % 3])
    rows = session.to_pandas(session.table("deduped_assignments"))
    kept = rows[~((rows.variant_id == "treatment") & (rows.device_type == "android"))]
    replace_assignments(session, kept)
    flagged = sample_ratio(session, experiment, registry)
    assert not flagged.passed and flagged.severity == "WARN" and flagged.metadata["verdict"] == "SRM"
    assert flagged.metadata["likely_cause"] == "device_type = android"


def test_the_rejected_share_counts_every_row_read_and_leaves_duplicates_aside(registry):
    rows = RowAccounting(ingested=96, rejected_by_reason={"duplicate_row": 2, "missing_subject_id": 1, "unknown_variant": 1})
    outcome = checks.rejected_share(rows, registry.sources.assignments.max_rejected_share, "exp_a exposure")
    assert outcome.metadata["rows_read"] == 100 and outcome.metadata["rows_rejected"] == 2
    assert outcome.metadata["rejected_share"] == pytest.approx(0.02)
    assert not outcome.passed and outcome.severity == "ERROR"  # above the default bound of 1%
    assert outcome.metadata["rejected_by_reason"] == {"duplicate_row": 2, "missing_subject_id": 1, "unknown_variant": 1}


def test_an_empty_partition_passes_its_schema(session, registry):
    experiment = registry.experiment("exp_a")
    write_assignments(session, {"control": 1})
    replace_assignments(session, session.to_pandas(session.table("deduped_assignments")).iloc[:0])
    outcome = checks.schema_outcomes(session, "deduped_assignments", [experiment], registry)[experiment.id]
    assert outcome.passed and outcome.metadata["rows"] == 0


@pytest.mark.parametrize(
    ("now", "before", "kept", "passed", "severity"),
    [
        (0, 100, True, False, "ERROR"),  # an empty export where rows were: kept, blocks
        (40, 100, False, False, "WARN"),  # 60% fewer than the run before, bound 50%
        (60, 100, False, True, "WARN"),
        (100, None, False, True, "WARN"),  # a first run: nothing to compare
        (150, 100, False, True, "WARN"),  # growth is normal
    ],
)
def test_rows_read_against_the_run_before(now, before, kept, passed, severity):
    from exp_pipeline.checks import evaluate_rows_read

    outcome = evaluate_rows_read("the event log", now, before, 0.5, kept="100 rows of x" if kept else None)
    assert (outcome.passed, outcome.severity) == (passed, severity)


def test_metric_event_counts_equal_a_filter_per_experiment_and_time(session, registry):
    """The bucketed counts against a plain filter of the rows: exp_a's span is [Sep 17, Nov 12)
    (14 pre-period days, 14-day window after its end), exp_b's has no end; the times fall before,
    inside and after the spans."""
    # Every 7 hours, and one event exactly at each bound and time (a bound belongs to what follows).
    hours = pd.date_range("2026-09-01", "2026-12-01", freq="7h", tz="UTC").append(
        pd.DatetimeIndex(["2026-09-17", "2026-11-12", "2026-10-15T03:00"], tz="UTC")
    )
    frame = pd.DataFrame({
        "subject_id": [f"u{i % 40}" for i in range(len(hours))],
        "event_at": hours,
        "event_name": ["page_view" if i % 3 == 1 else "purchase" for i in range(len(hours))],
        "value": [float(i % 11) for i in range(len(hours))],
    })
    types = ibis.schema({"subject_id": "string", "event_at": "timestamp('UTC', 6)", "event_name": "string", "value": "float64"})
    events = ibis.memtable(frame, schema=types)
    experiments = [(e, registry.metrics_of(e)) for e in (registry.experiment("exp_a"), registry.experiment("exp_b"))]
    times = [pd.Timestamp(t).to_pydatetime() for t in ("2026-09-10T00:00Z", "2026-10-15T03:00Z", "2026-11-20T00:00Z")]
    counted = checks.metric_event_counts(session, events, experiments, times)

    frame["checksum"] = session.to_pandas(events.select(c=checks.row_checksum(events)))["c"]
    spans = {"exp_a": ("2026-09-17", "2026-11-12"), "exp_b": ("2026-09-17", "2100-01-01")}
    for experiment_id, (low, high) in spans.items():
        purchases = frame[frame.event_name == "purchase"]
        inside = purchases[(purchases.event_at >= pd.Timestamp(low, tz="UTC")) & (purchases.event_at < pd.Timestamp(high, tz="UTC"))]
        assert counted.logged(experiment_id).to_dict("records") == [{"event_name": "purchase", "rows": len(inside)}]
        for until in times:
            before = inside[inside.event_at < until]
            expected = {"purchase": [len(before), int(before.checksum.sum())]} if len(before) else {}
            assert counted.before(experiment_id, until) == expected
    assert counted.before("exp_a", pd.Timestamp("2026-10-16T00:00Z").to_pydatetime()) is None


def variant_rows(arms: dict[str, tuple]) -> pd.DataFrame:
    """variant_metrics rows of metric revenue from per-subject (y, x) arrays per variant."""
    return pd.DataFrame([
        {"variant_id": v, "metric": "revenue", "n": len(y), "sum_y": y.sum(), "sum_y2": y @ y,
         "sum_x": x.sum(), "sum_x2": x @ x, "sum_xy": x @ y}
        for v, (y, x) in arms.items()
    ])


def pre_period_arms(shift: float, seed: int = 5) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    x_c, x_t = rng.gamma(2.0, 5.0, 4000), rng.gamma(2.0, 5.0, 4000) + shift
    return {"control": (0.8 * x_c + rng.gamma(2, 3, 4000), x_c), "treatment": (0.8 * x_t + rng.gamma(2, 3, 4000), x_t)}


def test_pre_period_bias_passes_when_randomized_and_warns_on_an_imbalance(registry):
    experiment = registry.experiment("exp_a")
    balanced = checks.pre_period_bias_outcome(variant_rows(pre_period_arms(0.0)), experiment)
    assert balanced.passed and balanced.severity == checks.WARN
    assert balanced.description.startswith("no pre-period imbalance: smallest p = ")

    arms = pre_period_arms(1.0)  # treatment subjects spent more before they were assigned
    outcome = checks.pre_period_bias_outcome(variant_rows(arms), experiment)
    (_, x_t), (_, x_c) = arms["treatment"], arms["control"]
    p_value = sps.ttest_ind(x_t, x_c, equal_var=False).pvalue
    assert p_value < 1e-6
    assert not outcome.passed and outcome.severity == checks.WARN
    assert outcome.metadata["smallest_p_value"] == pytest.approx(p_value, rel=1e-9)
    [test] = outcome.metadata["tests"]
    assert test["metric"] == "revenue" and test["variant_id"] == "treatment"
    assert test["difference"] == pytest.approx(x_t.mean() - x_c.mean(), rel=1e-12)
    assert "pre-period imbalance in 1 of 1 comparisons: revenue, treatment vs control" in outcome.description
    assert "CUPED adjusts (linearly) for the pre-period difference: read cuped_rel_lift" in outcome.description


def test_the_pre_period_bias_threshold_is_the_experiments(registry, tmp_path):
    raw = yaml.safe_load(TINY_REGISTRY.replace("BLOCKS", "false"))
    rows = variant_rows(pre_period_arms(0.0))
    p_value = checks.pre_period_bias_outcome(rows, registry.experiment("exp_a")).metadata["smallest_p_value"]
    raw["experiments"][0]["pre_period_bias"] = {"p_threshold": min(0.99, p_value * 1.5)}
    strict = parse_registry(raw, tmp_path / "registry.yaml").experiment("exp_a")
    outcome = checks.pre_period_bias_outcome(rows, strict)
    assert not outcome.passed and outcome.metadata["threshold"] == min(0.99, p_value * 1.5)


def test_pre_period_bias_is_not_judged_without_a_pre_period_or_its_variance(registry):
    no_pre = registry.experiment("exp_a").model_copy(update={"cuped_pre_window_days": 0})
    outcome = checks.pre_period_bias_outcome(variant_rows(pre_period_arms(1.0)), no_pre)
    assert outcome.passed and outcome.description.startswith("not judged: the experiment has no pre-period")
    flat = {v: (y, np.zeros_like(x)) for v, (y, x) in pre_period_arms(0.0).items()}
    outcome = checks.pre_period_bias_outcome(variant_rows(flat), registry.experiment("exp_a"))
    assert outcome.passed and outcome.metadata["tests"][0]["p_value"] is None
