"""Per-subject metric values (zeros, metric windows), capping, and sufficient statistics."""

import math

import ibis
import numpy as np
import pandas as pd
import pytest

from exp_pipeline.transforms.assignments import assignment_counts, subject_segments
from exp_pipeline.transforms.subject_values import (
    SEGMENT_KEY,
    SUM_COLUMNS,
    cap_subject_values,
    complete_statistics,
    subject_bounds,
    sufficient_statistics,
)
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession
from exp_pipeline_tests.tables import assignments_table, events_table, metric, values_of, windows_table


def capped_values(con, frame: pd.DataFrame, metrics, subjects: pd.DataFrame | None = None, pre_window_days: float = 0):
    """cap_subject_values on a values frame; the analysable subjects default to those with a row."""
    if subjects is None:
        subjects = frame[["experiment_id", "subject_id", "variant_id"]].drop_duplicates()
    windows = windows_table(con, metrics, pre_window_days)
    experiments = frame["experiment_id"].unique().tolist()
    # The helper's windows are of experiment `exp`: every experiment of the frame gets them.
    windows = ibis.union(*[windows.mutate(experiment_id=ibis.literal(e)) for e in experiments], distinct=False)
    values = con.create_table("capping_values", frame, overwrite=True)
    subjects = con.create_table("capping_subjects", subjects, overwrite=True)
    return con.to_pandas(cap_subject_values(values, metrics, subjects, windows))


def test_per_subject_values_of_subjects_with_events_and_metric_windows(con):
    a = assignments_table(con, [
        ("buyer", "treatment", "2026-10-02T00:00:00Z"),
        ("idle", "control", "2026-10-02T00:00:00Z"),
    ])
    e = events_table(con, [
        ("buyer", "2026-10-02T01:00:00Z", "purchase", 10.0),
        ("buyer", "2026-10-03T01:00:00Z", "purchase", None),      # value missing: counts, sums 0
        ("buyer", "2026-10-10T00:00:00Z", "purchase", 5.0),       # day 8: outside the 7-day metric
        ("buyer", "2026-10-02T02:00:00Z", "session", None),
    ])
    metrics = [
        metric(),
        metric(id="purchases_7d", aggregation="count", window_end_days=7),
        metric(id="conversion", aggregation="conversion"),
        metric(id="sessions", event_name="session", aggregation="count"),
    ]
    values = con.to_pandas(values_of(con, a, e, metrics))
    assert set(values["period"]) == {"post"}  # no pre-period: no covariate rows
    got = values.set_index(["subject_id", "metric"])["value"].to_dict()
    assert got == {
        ("buyer", "revenue"): 15.0, ("buyer", "purchases_7d"): 2.0,
        ("buyer", "conversion"): 1.0, ("buyer", "sessions"): 1.0,
    }  # idle has no events: no rows, its values are zero (counted by complete_statistics)


def test_pre_period_values_are_the_covariate_of_every_metric_on_the_event(con):
    a = assignments_table(con, [("s", "control", "2026-10-15T00:00:00Z"), ("idle", "control", "2026-10-15T00:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-01T00:00:00Z", "purchase", 3.0),   # 14 days before: in the pre-period
        ("s", "2026-10-14T00:00:00Z", "purchase", 4.0),   # pre
        ("s", "2026-10-16T00:00:00Z", "purchase", 5.0),   # post
    ])
    metrics = [metric(), metric(id="purchases", aggregation="count", window_end_days=7)]
    values = con.to_pandas(values_of(con, a, e, metrics, pre_window_days=14))
    got = values.set_index(["subject_id", "metric", "period"])["value"].to_dict()
    assert got == {
        ("s", "revenue", "post"): 5.0, ("s", "revenue", "pre"): 7.0,
        ("s", "purchases", "post"): 1.0, ("s", "purchases", "pre"): 2.0,
    }


def test_capping_winsorizes_at_the_percentile(con):
    values = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(101)],
        "variant_id": "control", "metric": "revenue", "period": "post", "value": np.arange(101, dtype=float),
    })
    capped = capped_values(con, values, [metric(cap_percentile=0.9)])
    # The percentile is of the non-zero values (the zero of subject s0 does not pull it down).
    assert capped["value"].max() == pytest.approx(np.quantile(np.arange(1, 101), 0.9))
    uncapped = capped_values(con, values, [metric()])
    assert uncapped["value"].max() == 100


def test_capping_a_sparse_metric_keeps_its_signal(con):
    # 8 buyers among 1000 subjects: a 99th percentile over everyone would be 0 and erase them.
    values = np.zeros(1000)
    values[:8] = [1, 1, 2, 1, 3, 1, 40, 2]
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(1000)],
        "variant_id": "control", "metric": "revenue", "period": "post", "value": values,
    })
    capped = capped_values(con, frame, [metric(cap_percentile=0.99)])
    kept = np.sort(capped["value"].to_numpy())[-8:]
    assert (kept > 0).all() and kept.max() < 40  # the outlier is capped, the buyers stay


def test_caps_are_per_experiment(con):
    # Two experiments in one table: each metric's cap is its own experiment's percentile.
    frame = pd.concat([
        pd.DataFrame({"experiment_id": e, "subject_id": [f"s{i}" for i in range(101)], "variant_id": "control",
                      "metric": "revenue", "period": "post", "value": np.arange(101, dtype=float) * k})
        for e, k in (("small", 1.0), ("large", 100.0))
    ])
    capped = capped_values(con, frame, [metric(cap_percentile=0.9)])
    top = capped.groupby("experiment_id")["value"].max()
    assert top["small"] == pytest.approx(np.quantile(np.arange(1, 101), 0.9))
    assert top["large"] == pytest.approx(100 * np.quantile(np.arange(1, 101), 0.9))


def _frame(values, subject_ids=None, metric_id="revenue"):
    subject_ids = subject_ids if subject_ids is not None else [f"s{i}" for i in range(len(values))]
    return pd.DataFrame({
        "experiment_id": "exp", "subject_id": subject_ids, "variant_id": "control",
        "metric": metric_id, "period": "post", "value": np.asarray(values, dtype=float),
    })


def test_without_ignoring_zeros_the_percentile_is_of_every_subject_even_those_without_a_row(con):
    # 100 subjects with a value, 900 analysable subjects without events (no row: value zero).
    frame = _frame(np.arange(1, 101))
    everyone = pd.DataFrame({"experiment_id": "exp", "subject_id": [f"s{i}" for i in range(1000)], "variant_id": "control"})
    capped = capped_values(con, frame, [metric(cap_percentile=0.95, cap_ignore_zeros=False)], everyone)
    full = np.r_[np.arange(1, 101), np.zeros(900)]
    assert capped["value"].max() == pytest.approx(np.quantile(full, 0.95), rel=1e-12)  # 50.05, not 95.05
    assert len(capped) == 100 and (capped["value"] > 0).all()  # zeros stay zero, and rowless
    ignoring = capped_values(con, frame, [metric(cap_percentile=0.95)], everyone)
    assert ignoring["value"].max() == pytest.approx(np.quantile(np.arange(1, 101), 0.95), rel=1e-12)


def test_a_lower_cap_winsorizes_the_negative_tail(con):
    refunds = np.r_[np.arange(-100, 0), np.arange(1, 101)].astype(float)
    capped = capped_values(con, _frame(refunds), [metric(cap_percentile=0.9, cap_lower_percentile=0.05)])
    expected = np.clip(refunds, np.quantile(refunds, 0.05), np.quantile(refunds, 0.9))
    got = capped.sort_values("subject_id", key=lambda s: s.str[1:].astype(int))["value"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    lower_only = capped_values(con, _frame(refunds), [metric(cap_lower_percentile=0.05)])
    assert lower_only["value"].min() == pytest.approx(np.quantile(refunds, 0.05)) and lower_only["value"].max() == 100


def test_ignored_zeros_are_left_alone_by_a_lower_cap_and_counted_zeros_are_capped(con):
    values = np.r_[np.zeros(10), np.arange(1, 91)]
    kept = capped_values(con, _frame(values), [metric(cap_lower_percentile=0.2)])
    assert (kept["value"] == 0).sum() == 10  # ignored: zeros neither set the cap nor move
    assert kept["value"][kept["value"] > 0].min() == pytest.approx(np.quantile(np.arange(1, 91), 0.2))
    # Counted: the 0.2 percentile of all 100 subjects (10 of them without a row) is above zero,
    # so every zero, with a row or without, is raised to it.
    frame = _frame(np.arange(1, 91), [f"s{i}" for i in range(10, 100)])
    everyone = pd.DataFrame({"experiment_id": "exp", "subject_id": [f"s{i}" for i in range(100)], "variant_id": "control"})
    counted = capped_values(con, frame, [metric(cap_lower_percentile=0.2, cap_ignore_zeros=False)], everyone)
    low = np.quantile(np.r_[np.zeros(10), np.arange(1, 91)], 0.2)
    assert low > 0 and len(counted) == 100
    assert sorted(counted["value"])[:10] == pytest.approx([low] * 10)


def test_the_covariate_gets_its_own_caps_and_rowless_subjects_count_in_both_periods(con):
    post = _frame(np.arange(1, 11))
    pre = _frame(np.arange(1, 11) * 10.0).assign(period="pre")
    everyone = pd.DataFrame({"experiment_id": "exp", "subject_id": [f"s{i}" for i in range(20)], "variant_id": "control"})
    capped = capped_values(
        con, pd.concat([post, pre]), [metric(cap_percentile=0.9, cap_ignore_zeros=False)], everyone, pre_window_days=14,
    )
    top = capped.groupby("period")["value"].max()
    every = np.r_[np.arange(1, 11), np.zeros(10)]
    assert top["post"] == pytest.approx(np.quantile(every, 0.9)) and top["pre"] == pytest.approx(10 * np.quantile(every, 0.9))


def test_sufficient_statistics_match_numpy(con):
    rng = np.random.default_rng(7)
    n = 500
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(n)],
        "variant_id": rng.choice(["control", "treatment"], n), "metric": "revenue",
        "value": rng.gamma(2, 10, n), "period": "post",
    })
    pre = frame.assign(value=frame["value"] * 0.5 + rng.normal(0, 1, n), period="pre")
    pre = pre[pre.index % 10 != 0]  # subjects without pre-period values get x = 0
    values = con.create_table("values", pd.concat([frame, pre]))
    out = con.statistics(values).set_index("variant_id")
    merged = frame.merge(pre[["subject_id", "value"]].rename(columns={"value": "x"}), on="subject_id", how="left")
    merged["x"] = merged["x"].fillna(0.0)
    for variant, group in merged.groupby("variant_id"):
        row = out.loc[variant]
        y, x = group["value"], group["x"]
        assert row["n"] == len(group)
        # Correctly rounded sums (math.fsum) to the last bits: the fixed-point sums are exact but
        # for each term's rounding at 2**-120 of the largest possible total.
        for column, terms in [("sum_y", y), ("sum_y2", y * y), ("sum_x", x), ("sum_x2", x * x), ("sum_xy", x * y)]:
            assert row[column] == pytest.approx(math.fsum(terms), rel=1e-15, abs=0), column


def test_statistics_without_zero_rows_equal_those_with_every_subject(con):
    # The pass keeps only subjects with a value; zeros are counted from the subjects per variant.
    rng = np.random.default_rng(11)
    n = 400
    dense = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(n)],
        "variant_id": rng.choice(["control", "treatment"], n), "metric": "revenue", "period": "post",
        "value": np.where(rng.random(n) < 0.3, rng.gamma(2, 10, n), 0.0),
    })
    pre = dense.assign(period="pre", value=np.where(rng.random(n) < 0.4, rng.gamma(2, 5, n), 0.0))
    nobody = dense.assign(metric="refunds", value=0.0)  # a metric nobody has a value of
    every = pd.concat([dense, pre, nobody], ignore_index=True)
    some = every[every["value"] != 0]
    assert set(some["metric"]) == {"revenue"} and len(some) < len(every) / 4
    subjects = dense.groupby(["experiment_id", "variant_id"]).size().rename("n").reset_index()
    metrics = {"exp": ["refunds", "revenue"]}
    key = ["variant_id", "metric"]
    full = con.statistics(con.create_table("every", every), subjects, metrics).set_index(key).sort_index()
    sparse = con.statistics(con.create_table("some", some), subjects, metrics).set_index(key).sort_index()
    pd.testing.assert_frame_equal(sparse, full, check_exact=True)
    assert (sparse.loc[(slice(None), "refunds"), ["sum_y", "sum_x", "sum_xy"]] == 0).all().all()
    assert sparse.loc[("control", "refunds"), "n"] == (dense.variant_id == "control").sum()


def test_a_huge_value_leaves_every_other_subjects_sum_exact(con):
    rng = np.random.default_rng(7)
    subjects = [f"s{i}" for i in range(300)]
    a = assignments_table(con, [(s, "control", "2026-10-02T00:00:00Z") for s in subjects])
    amounts = {s: [float(v) for v in rng.gamma(2.0, 10.0, size=3)] for s in subjects}
    amounts["s0"] = [1e308, 1.0]  # one absurd amount (an export bug, a test row)
    amounts["s1"] = [1e-300, 3e-301]  # and tiny ones
    amounts["s3"] = [1e-30, 0.0]  # a tiny one beside a zero (a zero term has no bucket of its own)
    rows = [(s, f"2026-10-02T0{i + 1}:00:00Z", "purchase", v) for s, vs in amounts.items() for i, v in enumerate(vs)]
    values = con.to_pandas(values_of(con, a, events_table(con, rows), [metric()])).set_index("subject_id")["value"]
    for subject, terms in amounts.items():
        # Correctly rounded (math.fsum): each subject's scale is its own, whatever the others hold.
        assert values[subject] == pytest.approx(math.fsum(terms), rel=1e-15, abs=0), subject
    assert values["s2"] == math.fsum(amounts["s2"])


def test_a_subjects_sum_does_not_depend_on_other_subjects(con):
    a = assignments_table(con, [("a", "control", "2026-10-02T00:00:00Z"), ("b", "control", "2026-10-02T00:00:00Z")])
    alone = [("a", "2026-10-02T01:00:00Z", "purchase", 0.1), ("a", "2026-10-02T02:00:00Z", "purchase", 0.2)]
    with_big = [*alone, ("b", "2026-10-02T01:00:00Z", "purchase", 1e25)]

    def value_of_a(rows):
        values = con.to_pandas(values_of(con, a, events_table(con, rows), [metric()]))
        return values.set_index("subject_id")["value"]["a"]

    assert value_of_a(alone) == value_of_a(with_big)
    # Correctly rounded on DuckDB; Spark turns each scaled term into a decimal through its shortest
    # text (see test_fixed_point): within an ulp there.
    rel = 0 if isinstance(con.session, DuckDBWarehouseSession) else 4e-16
    assert value_of_a(alone) == pytest.approx(math.fsum([0.1, 0.2]), rel=rel, abs=0)


def test_segment_statistics_equal_the_statistics_of_the_segments_subjects_alone(con):
    """One aggregate gives every segment's sums; each equals the normal statistics of the values
    filtered to the segment's subjects (and the overall segment those of everyone)."""
    rng = np.random.default_rng(21)
    n = 600
    people = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(n)],
        "variant_id": rng.choice(["control", "treatment"], n),
        "device_type": rng.choice(["ios", "android", "web"], n), "country": rng.choice(["US", "DE"], n),
    })
    people.loc[:9, "device_type"] = None  # a missing property is its own segment, '(null)'
    valued = people.sample(frac=0.7, random_state=3)  # the others have no events: zeros
    post = valued.assign(metric="revenue", period="post", value=rng.gamma(2, 10, len(valued)))
    pre = valued.assign(metric="revenue", period="pre", value=rng.gamma(2, 5, len(valued)))
    values = pd.concat([post, pre])[["experiment_id", "subject_id", "variant_id", "metric", "period", "value"]]
    table = con.create_table("values", values)
    assignments = con.create_table("assignments", people)
    counts = con.to_pandas(assignment_counts(assignments, ["device_type", "country"], by=["experiment_id"]))
    bounds = subject_bounds(con.bounds(table), {"exp": n})
    segments = subject_segments(assignments, assignments, ["device_type", "country"])
    sums = con.to_pandas(sufficient_statistics(table, bounds, segments))
    full = complete_statistics(sums, counts, {"exp": ["revenue"]}, by=SEGMENT_KEY).set_index(["property", "value", "variant_id"])
    expected_segments = {("", "")} | {("device_type", v) for v in ("ios", "android", "web", "(null)")} | {
        ("country", v) for v in ("US", "DE")}
    assert {k[:2] for k in full.index} == expected_segments
    for prop, value in expected_segments:
        if prop == "":
            members = people
        else:
            members = people[people[prop].fillna("(null)") == value]
        mine = con.create_table("mine", values[values.subject_id.isin(members.subject_id)])
        alone = con.to_pandas(sufficient_statistics(mine, bounds))
        n_of = members.groupby(["experiment_id", "variant_id"]).size().rename("n").reset_index()
        alone = complete_statistics(alone, n_of, {"exp": ["revenue"]}).set_index("variant_id")
        for variant in ("control", "treatment"):
            got = full.loc[(prop, value, variant)]
            for column in ("n", *SUM_COLUMNS):
                assert got[column] == alone.loc[variant, column], (prop, value, variant, column)
