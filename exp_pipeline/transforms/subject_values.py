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
    """Per (experiment, subject, metric, period) value of the subjects with events of the metric in
    the period, for every experiment in `windows` at once. A subject without a row has the value
    zero: zeros add nothing to a sum, so only the counts need every subject (`complete_statistics`);
    capping adds the zeros it changes (`cap_subject_values`, `cap_ignore_zeros: false`).

    `subjects`: the analysable subjects with their `unit` (`numbered_subjects`); `bucket_sums`:
    `metric_bucket_sums`; `windows`: the `metric_windows_frame` table. Period `post`: the metric's
    own window after assignment; `pre` (only where the experiment has a pre-period): the CUPED
    covariate, every event of the metric's name in the pre-period. Each subject's sum is exact in
    fixed point (`exact_sums` over its buckets). Capping is applied separately
    (`cap_subject_values`).
    """
    # metric_bucket_sums is one row per subject, metric, period and bucket already.
    per_subject = exact_sums(bucket_sums, ["unit", "metric", "period"], "sum_value", ["n_events"])
    valued = per_subject.join(subjects.select("unit", "experiment_id", "subject_id", "variant_id"), "unit").join(
        windows.select("experiment_id", "metric", "aggregation", "pre_seconds"), ["experiment_id", "metric"]
    )
    valued = valued.filter((valued.period == "post") | (valued.pre_seconds > 0))
    value = ibis.cases(
        (valued.aggregation == "sum", valued.sum_value.fill_null(0.0)),
        (valued.aggregation == "count", valued.n_events.cast("float64")),
        else_=ibis.ifelse(valued.n_events > 0, 1.0, 0.0),
    )
    return valued.select("experiment_id", "subject_id", "variant_id", "metric", "period", value=value)


def _periods(windows: ir.Table) -> ir.Table:
    """(experiment, metric, period) of every value a subject can have: post, and pre where the
    experiment has a pre-period (as `subject_metric_values` computes them)."""
    post = windows.select("experiment_id", "metric", period=ibis.literal("post"))
    pre = windows.filter(windows.pre_seconds > 0).select("experiment_id", "metric", period=ibis.literal("pre"))
    return ibis.union(post, pre, distinct=False)


def _zero_values(values: ir.Table, subjects: ir.Table, windows: ir.Table) -> ir.Table:
    """The zero values of the subjects without a row, for the (experiment, metric)s of `windows`."""
    grid = subjects.select("experiment_id", "subject_id", "variant_id").join(_periods(windows), "experiment_id")
    missing = grid.anti_join(values, ["experiment_id", "subject_id", "metric", "period"])
    return missing.select("experiment_id", "subject_id", "variant_id", "metric", "period", value=ibis.literal(0.0))


def cap_subject_values(values: ir.Table, metrics: Sequence[Metric], subjects: ir.Table, windows: ir.Table) -> ir.Table:
    """Winsorize per-subject values at each capped metric's percentiles, per experiment and period
    (the covariate has its own caps).

    `cap_ignore_zeros` (the default): the percentiles are of the non-zero values and zeros stay
    zero (GrowthBook's "ignore zeros", Statsig's default): with few converters a percentile over
    everyone is 0 and would cap every value to nothing. Otherwise they are of every analysable
    subject (`subjects`, `numbered_subjects`), the subjects without a row counted as zeros, and
    those zeros are capped like any value. `windows`: the `metric_windows_frame` table.
    """
    rules: dict[tuple, list[str]] = {}
    for metric in metrics:
        if metric.capped:
            rule = (metric.cap_percentile, metric.cap_lower_percentile, metric.cap_ignore_zeros)
            rules.setdefault(rule, []).append(metric.id)
    if not rules:
        return values
    key = ["experiment_id", "metric", "period"]
    zeros_of = sorted({m for (_, _, ignore), ids in rules.items() if not ignore for m in ids})
    zeros = _zero_values(values, subjects, windows.filter(windows.metric.isin(zeros_of))) if zeros_of else None
    caps = []
    for (high, low, ignore_zeros), ids in sorted(rules.items(), key=str):
        mine = values.filter(values.metric.isin(ids))
        if ignore_zeros:
            population = mine.filter(mine.value != 0)
        else:
            population = ibis.union(mine, zeros.filter(zeros.metric.isin(ids)), distinct=False)
        caps.append(population.group_by(*key).aggregate(
            cap_high=population.value.quantile(high) if high is not None else ibis.null("float64"),
            cap_low=population.value.quantile(low) if low is not None else ibis.null("float64"),
            ignore_zeros=ibis.literal(ignore_zeros),
        ))
    caps = ibis.union(*caps, distinct=False) if len(caps) > 1 else caps[0]
    rows = values if zeros is None else ibis.union(values, zeros, distinct=False)
    joined = rows.left_join(caps, key)
    value = joined.value
    capping = joined.ignore_zeros.notnull() & ~(joined.ignore_zeros & (value == 0))
    value = ibis.ifelse(capping & joined.cap_high.notnull() & (value > joined.cap_high), joined.cap_high, value)
    value = ibis.ifelse(capping & joined.cap_low.notnull() & (value < joined.cap_low), joined.cap_low, value)
    capped = joined.select("experiment_id", "subject_id", "variant_id", "metric", "period", value=value)
    # A zero row that stayed zero adds nothing: only the subjects with a value are kept, as before.
    return capped if zeros is None else capped.filter(capped.value != 0)


VALUE_KEY = ("experiment_id", "metric", "period")


SUM_COLUMNS = ("sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy")


def subject_bounds(bounds: dict[tuple, SumBound], subjects: dict[str, int]) -> dict[tuple, SumBound]:
    """`value_bounds` of the values with a row, counted over every subject of the experiment
    (`subjects`: analysable subjects per experiment): a sum's terms include the zeros."""
    return {key: SumBound(subjects.get(key[0], bound.rows), bound.max_abs) for key, bound in bounds.items()}


SEGMENT_KEY = ("property", "value")


def sufficient_statistics(values: ir.Table, bounds: dict[tuple, SumBound], segments: ir.Table | None = None) -> ir.Table:
    """Per (experiment, variant, metric) with values: the sums and cross products of y (the post
    value) and its covariate x (the pre value, 0 without one); a subject without a row adds zero.
    `complete_statistics` adds n and the groups without any value.

    With `segments` (`assignments.subject_segments`: each subject's (property, value) pairs, the
    overall ('', '') among them), per (experiment, variant, metric, property, value) instead:
    every segment's sums and the overall ones from the same aggregate.

    `bounds` bound the values per (experiment, metric, period) (`value_bounds(values, VALUE_KEY)`,
    counted over every subject: `subject_bounds`). This small table is all that leaves the engine
    for inference.
    """
    # y and x of a subject side by side: one row per period at most, so each sum has one term.
    joined = values.group_by("experiment_id", "subject_id", "variant_id", "metric").aggregate(
        y=ibis.ifelse(values.period == "post", values.value, 0.0).sum(),
        x=ibis.ifelse(values.period == "pre", values.value, 0.0).sum(),
    )
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
    for (experiment_id, metric, period), x_bound in bounds.items():
        if period == "pre" and (experiment_id, metric, "post") not in bounds:
            # Covariate values and not one post value: y is zero throughout.
            max_x = x_bound.max_abs
            scale_rows.append({
                "experiment_id": experiment_id, "metric": metric,
                **NO_TERMS.scale_columns("y"), **NO_TERMS.scale_columns("y2"),
                **x_bound.scale_columns("x"), **SumBound(x_bound.rows, max_x * max_x).scale_columns("x2"),
                **NO_TERMS.scale_columns("xy"),
            })
    keys = ["experiment_id", "variant_id", "metric"]
    if segments is not None:
        # A segment's terms are some of the experiment's: its metric's scale fits them too.
        joined = joined.join(segments.select("experiment_id", "subject_id", *SEGMENT_KEY), ["experiment_id", "subject_id"])
        keys += SEGMENT_KEY
    joined = joined.join(scales_table(scale_rows, ["y", "y2", "x", "x2", "xy"]), ["experiment_id", "metric"])
    y = joined.y.cast("float64")
    x = joined.x.cast("float64")
    return joined.group_by(*keys).aggregate(
        sum_y=fixed_point_sum(joined, y, "y"),
        sum_y2=fixed_point_sum(joined, y * y, "y2"),
        sum_x=fixed_point_sum(joined, x, "x"),
        sum_x2=fixed_point_sum(joined, x * x, "x2"),
        sum_xy=fixed_point_sum(joined, x * y, "xy"),
    )


def complete_statistics(
    sums: pd.DataFrame, subjects: pd.DataFrame, metrics: dict[str, Sequence[str]], by: Sequence[str] = (),
) -> pd.DataFrame:
    """The sufficient statistics of every (experiment, variant, metric): `sums`
    (`sufficient_statistics`) with n, the variant's analysable subjects (`subjects`: experiment_id,
    variant_id, n), and zero sums where no subject has a value. `by`: further keys of both
    (SEGMENT_KEY: per segment, `subjects` then being the assignment counts)."""
    keys = ["experiment_id", "variant_id", *by]
    grid = pd.DataFrame(
        [(e, m) for e, ids in metrics.items() for m in ids], columns=["experiment_id", "metric"]
    ).merge(subjects[[*keys, "n"]], on="experiment_id")
    full = grid.merge(sums, on=[*keys, "metric"], how="left")
    full[list(SUM_COLUMNS)] = full[list(SUM_COLUMNS)].astype("float64").fillna(0.0)
    return full.astype({"n": "int64"})[["experiment_id", "variant_id", "metric", *by, "n", *SUM_COLUMNS]]
