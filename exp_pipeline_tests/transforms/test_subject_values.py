"""Per-subject metric values (zeros, metric windows), capping, and sufficient statistics."""

import math

import numpy as np
import pandas as pd
import pytest

from exp_pipeline.registry import Metric
from exp_pipeline.transforms.fixed_point import SumBound
from exp_pipeline.transforms.subject_values import (
    cap_subject_values,
    subject_metric_values,
    subject_value_scales,
    sufficient_statistics,
)
from exp_pipeline_tests.tables import assignments_table, events_table, metric, post_rows


def test_per_subject_values_with_zeros_and_metric_windows(con):
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
    post = post_rows(a, e, metrics)
    values = con.to_pandas(subject_metric_values(a, post, metrics, con.bounds(post, "event_name")))
    got = values.set_index(["subject_id", "metric"])["value"].to_dict()
    assert got == {
        ("buyer", "revenue"): 15.0, ("buyer", "purchases_7d"): 2.0,
        ("buyer", "conversion"): 1.0, ("buyer", "sessions"): 1.0,
        ("idle", "revenue"): 0.0, ("idle", "purchases_7d"): 0.0,
        ("idle", "conversion"): 0.0, ("idle", "sessions"): 0.0,
    }


def test_capping_winsorizes_at_the_percentile(con):
    values = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(101)],
        "variant_id": "control", "metric": "revenue", "value": np.arange(101, dtype=float),
    })
    t = con.create_table("values", values)
    capped = con.to_pandas(cap_subject_values(t, [metric(cap_percentile=0.9)]))
    # The percentile is of the non-zero values (the zero of subject s0 does not pull it down).
    assert capped["value"].max() == pytest.approx(np.quantile(np.arange(1, 101), 0.9))
    uncapped = con.to_pandas(cap_subject_values(t, [metric()]))
    assert uncapped["value"].max() == 100


def test_capping_a_sparse_metric_keeps_its_signal(con):
    # 8 buyers among 1000 subjects: a 99th percentile over everyone would be 0 and erase them.
    values = np.zeros(1000)
    values[:8] = [1, 1, 2, 1, 3, 1, 40, 2]
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(1000)],
        "variant_id": "control", "metric": "revenue", "value": values,
    })
    capped = con.to_pandas(cap_subject_values(con.create_table("v", frame), [metric(cap_percentile=0.99)]))
    kept = np.sort(capped["value"].to_numpy())[-8:]
    assert (kept > 0).all() and kept.max() < 40  # the outlier is capped, the buyers stay


def test_sufficient_statistics_match_numpy(con):
    rng = np.random.default_rng(7)
    n = 500
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(n)],
        "variant_id": rng.choice(["control", "treatment"], n), "metric": "revenue",
        "value": rng.gamma(2, 10, n),
    })
    pre = frame.assign(value=frame["value"] * 0.5 + rng.normal(0, 1, n))
    pre = pre[pre.index % 10 != 0]  # subjects without pre-period events get x = 0
    post_t = con.create_table("post", frame)
    pre_t = con.create_table("pre", pre)
    out = con.to_pandas(
        sufficient_statistics(post_t, pre_t, con.bounds(post_t), con.bounds(pre_t))
    ).set_index("variant_id")
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


def test_a_subjects_sum_has_the_same_scale_however_many_rows_the_partition_holds():
    metric = Metric(id="revenue", event_name="purchase", aggregation="sum")
    few = subject_value_scales({"purchase": SumBound(10, 30.0)}, [metric])
    many = subject_value_scales({"purchase": SumBound(10**9, 31.9)}, [metric])
    larger = subject_value_scales({"purchase": SumBound(10, 32.5)}, [metric])
    assert few == many != larger
