"""Per-subject metric values, capping, and the per-variant sufficient statistics behind inference."""

from __future__ import annotations

from collections.abc import Sequence

import ibis
import ibis.expr.types as ir

from exp_pipeline.registry import Metric
from exp_pipeline.transforms.fixed_point import (
    NO_TERMS,
    SumBound,
    fixed_point_sum,
    scales_table,
    with_own_scale,
)
from exp_pipeline.transforms.temporal_join import metric_windows


def subject_metric_values(
    assignments: ir.Table,
    events: ir.Table,
    metrics: Sequence[Metric],
    *,
    apply_metric_windows: bool = True,
) -> ir.Table:
    """Per (subject, metric) value; subjects without events count as zero.

    For post-assignment events each metric's own window applies. Pre-assignment events (the CUPED
    covariate) are already cut to the pre window: pass `apply_metric_windows=False`. Each subject's
    sum has its own fixed-point scale (`with_own_scale`). Capping is applied separately
    (`cap_subject_values`).
    """
    windows = metric_windows(metrics)
    matched = events.join(windows, "event_name")
    if apply_metric_windows:
        matched = matched.filter(
            matched.event_at >= matched.assigned_at + matched.start_seconds.as_interval("s"),
            matched.event_at < matched.assigned_at + matched.end_seconds.as_interval("s"),
        )
    # Only sum metrics use the values: the others skip the fixed-point conversion (null terms).
    matched = matched.mutate(
        _term=ibis.ifelse(matched.aggregation == "sum", matched.value.fill_null(0.0), ibis.null("float64"))
    )
    matched = with_own_scale(matched, matched._term, ["experiment_id", "subject_id", "metric"], "value")
    summed = matched._term
    per_subject = matched.group_by("experiment_id", "subject_id", "metric").aggregate(
        sum_value=fixed_point_sum(matched, summed, "value"),
        n_events=matched.count(),
    )

    subjects = assignments.select("experiment_id", "subject_id", "variant_id")
    grid = subjects.cross_join(windows.select("metric", "aggregation"))
    valued = grid.left_join(per_subject, ["experiment_id", "subject_id", "metric"])
    n_events = valued.n_events.fill_null(0)
    value = ibis.cases(
        (valued.aggregation == "sum", valued.sum_value.fill_null(0.0)),
        (valued.aggregation == "count", n_events.cast("float64")),
        else_=ibis.ifelse(n_events > 0, 1.0, 0.0),
    )
    return valued.select("experiment_id", "subject_id", "variant_id", "metric", value=value)


def cap_subject_values(values: ir.Table, metrics: Sequence[Metric]) -> ir.Table:
    """Winsorize per-subject values at each capped metric's percentile of its non-zero values."""
    capped = [m for m in metrics if m.cap_percentile is not None]
    if not capped:
        return values
    caps = []
    for metric in capped:
        # The percentile of the non-zero values (GrowthBook's "ignore zeros"): with few converters
        # a percentile over everyone is 0 and would cap every value to nothing.
        of_metric = values.filter((values.metric == metric.id) & (values.value != 0))
        caps.append(
            of_metric.aggregate(cap=of_metric.value.quantile(metric.cap_percentile)).mutate(
                metric=ibis.literal(metric.id)
            )
        )
    caps = ibis.union(*caps, distinct=False) if len(caps) > 1 else caps[0]
    joined = values.left_join(caps, "metric")
    value = ibis.ifelse(
        joined.cap.notnull() & (joined.value > joined.cap), joined.cap, joined.value
    )
    return joined.select("experiment_id", "subject_id", "variant_id", "metric", value=value)


def sufficient_statistics(
    post_values: ir.Table,
    pre_values: ir.Table | None,
    y_bounds: dict[str, SumBound],
    x_bounds: dict[str, SumBound] | None,
) -> ir.Table:
    """Per (experiment, variant, metric): n, sums and cross products of y and its covariate x.

    `y_bounds` and `x_bounds` bound the post and pre values per metric (`value_bounds`). This small
    table is all that leaves the engine for inference.
    """
    if pre_values is None:
        joined = post_values.mutate(x=ibis.literal(0.0))
    else:
        joined = post_values.join(
            pre_values.select("experiment_id", "subject_id", "metric", x="value"),
            ["experiment_id", "subject_id", "metric"],
            how="left",
        )
        joined = joined.mutate(x=joined.x.fill_null(0.0))
    scale_rows = []
    for metric, y_bound in y_bounds.items():
        # Each metric its own scale: a small metric is not rounded on a large one's grid. A group's
        # terms are its metric's post rows, at most y_bound.rows of them.
        rows, max_y = y_bound.rows, y_bound.max_abs
        max_x = (x_bounds or {}).get(metric, NO_TERMS).max_abs
        scale_rows.append({
            "metric": metric,
            **y_bound.scale_columns("y"),
            **SumBound(rows, max_y * max_y).scale_columns("y2"),
            **SumBound(rows, max_x).scale_columns("x"),
            **SumBound(rows, max_x * max_x).scale_columns("x2"),
            **SumBound(rows, max_x * max_y).scale_columns("xy"),
        })
    joined = joined.join(scales_table(scale_rows, ["y", "y2", "x", "x2", "xy"]), "metric")
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


