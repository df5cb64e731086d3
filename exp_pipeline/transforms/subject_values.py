"""Per-subject metric values, capping, and the per-variant sufficient statistics behind inference."""

from __future__ import annotations

from collections.abc import Sequence

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import Metric
from exp_pipeline.transforms.fixed_point import (
    FIXED_POINT,
    NO_TERMS,
    SumBound,
    exact_sums,
    fixed_point_sum,
    scales_table,
)


def metric_bucket_sums(segments: ir.Table, coverage: ir.Table) -> ir.Table:
    """Per (unit, metric, period, value bucket): the events and their exact fixed-point sum, from
    the run's aggregated join. `segments`: `segment_sums`; `coverage` (`window_segments`): the
    segments of each metric's post window and of its pre-period. Materialize it:
    `subject_metric_values` reads it more than once."""
    covered = segments.join(coverage, ["span", "segment"])
    return covered.group_by("unit", "metric", "period", "sum_value_bucket").aggregate(
        n_events=covered.n_events.sum(), sum_value_fixed=covered.sum_value_fixed.sum().cast(FIXED_POINT)
    )


def subject_metric_values(subjects: ir.Table, bucket_sums: ir.Table, windows: ir.Table) -> ir.Table:
    """Per (experiment, subject, metric, period) value, for every experiment in `windows` at once;
    subjects without events count as zero.

    `subjects`: the analysable subjects with their `unit` (`numbered_subjects`); `bucket_sums`:
    `metric_bucket_sums`; `windows`: the `metric_windows_frame` table. Period `post`: the metric's
    own window after assignment; `pre` (only where the experiment has a pre-period): the CUPED
    covariate, every event of the metric's name in the pre-period. Each subject's sum is exact in
    fixed point (`exact_sums` over its buckets). Capping is applied separately
    (`cap_subject_values`).
    """
    key = ["unit", "metric", "period"]
    # metric_bucket_sums is one row per subject, metric, period and bucket already.
    per_subject = exact_sums(bucket_sums, key, "sum_value", ["n_events"])

    periods = ibis.memtable(pd.DataFrame({"period": ["post", "pre"]}))
    grid = subjects.select("unit", "experiment_id", "subject_id", "variant_id").join(
        windows.select("experiment_id", "metric", "aggregation", "pre_seconds"), "experiment_id"
    ).cross_join(periods)
    grid = grid.filter((grid.period == "post") | (grid.pre_seconds > 0))
    valued = grid.left_join(per_subject, key)
    n_events = valued.n_events.fill_null(0)
    value = ibis.cases(
        (valued.aggregation == "sum", valued.sum_value.fill_null(0.0)),
        (valued.aggregation == "count", n_events.cast("float64")),
        else_=ibis.ifelse(n_events > 0, 1.0, 0.0),
    )
    return valued.select("experiment_id", "subject_id", "variant_id", "metric", "period", value=value)


def cap_subject_values(values: ir.Table, metrics: Sequence[Metric]) -> ir.Table:
    """Winsorize per-subject values at each capped metric's percentile of its non-zero values,
    per experiment (and per period: the covariate has its own cap)."""
    by_percentile: dict[float, list[str]] = {}
    for metric in metrics:
        if metric.cap_percentile is not None:
            by_percentile.setdefault(metric.cap_percentile, []).append(metric.id)
    if not by_percentile:
        return values
    key = ["experiment_id", "metric", "period"]
    caps = []
    for percentile, ids in sorted(by_percentile.items()):
        # The percentile of the non-zero values (GrowthBook's "ignore zeros"): with few converters
        # a percentile over everyone is 0 and would cap every value to nothing.
        of_metrics = values.filter(values.metric.isin(ids) & (values.value != 0))
        caps.append(of_metrics.group_by(*key).aggregate(cap=of_metrics.value.quantile(percentile)))
    caps = ibis.union(*caps, distinct=False) if len(caps) > 1 else caps[0]
    joined = values.left_join(caps, key)
    value = ibis.ifelse(joined.cap.notnull() & (joined.value > joined.cap), joined.cap, joined.value)
    return joined.select("experiment_id", "subject_id", "variant_id", "metric", "period", value=value)


VALUE_KEY = ("experiment_id", "metric", "period")


def sufficient_statistics(values: ir.Table, bounds: dict[tuple, SumBound]) -> ir.Table:
    """Per (experiment, variant, metric): n, sums and cross products of y (the post value) and its
    covariate x (the pre value, 0 without a pre-period).

    `bounds` bound the values per (experiment, metric, period) (`value_bounds(values, VALUE_KEY)`).
    This small table is all that leaves the engine for inference.
    """
    key = ["experiment_id", "subject_id", "metric"]
    post = values.filter(values.period == "post")
    pre = values.filter(values.period == "pre")
    joined = post.join(pre.select(*key, x="value"), key, how="left")
    joined = joined.mutate(x=joined.x.fill_null(0.0))
    scale_rows = []
    for (experiment_id, metric, period), y_bound in bounds.items():
        if period != "post":
            continue
        # Each experiment's metric its own scale: a small metric is not rounded on a large one's
        # grid, and an experiment's sums do not depend on which others share its run. A group's
        # terms are its metric's post rows, at most y_bound.rows of them.
        rows, max_y = y_bound.rows, y_bound.max_abs
        max_x = bounds.get((experiment_id, metric, "pre"), NO_TERMS).max_abs
        scale_rows.append({
            "experiment_id": experiment_id,
            "metric": metric,
            **y_bound.scale_columns("y"),
            **SumBound(rows, max_y * max_y).scale_columns("y2"),
            **SumBound(rows, max_x).scale_columns("x"),
            **SumBound(rows, max_x * max_x).scale_columns("x2"),
            **SumBound(rows, max_x * max_y).scale_columns("xy"),
        })
    joined = joined.join(scales_table(scale_rows, ["y", "y2", "x", "x2", "xy"]), ["experiment_id", "metric"])
    y = joined.value.cast("float64")
    x = joined.x.cast("float64")
    return joined.group_by("experiment_id", "variant_id", "metric").aggregate(
        n=joined.count(),
        sum_y=fixed_point_sum(joined, y, "y"),
        sum_y2=fixed_point_sum(joined, y * y, "y2"),
        sum_x=fixed_point_sum(joined, x, "x"),
        sum_x2=fixed_point_sum(joined, x * x, "x2"),
        sum_xy=fixed_point_sum(joined, x * y, "xy"),
    )
