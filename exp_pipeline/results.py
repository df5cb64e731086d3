"""Pure assembly of an experiment's results from its (small) sufficient-statistics table.

Input and output are small pandas frames: one row per (variant, metric). The numbers come from
stats.py; this module only decides which comparisons to make and lays the rows out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.ibis as pa

from exp_pipeline import stats
from exp_pipeline.registry import PRE_PERIOD, Experiment, Metric
from exp_pipeline.schemas import (
    VARIANT_METRICS_COLUMNS,
    segment_heterogeneity_schema,
    segment_metrics_schema,
    variant_metrics_schema,
)

SUFFICIENT_COLUMNS = ("n", "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy")


def sufficient_stats_of(row: pd.Series) -> stats.SufficientStats:
    """A (variant, metric) row's sums as SufficientStats."""
    return stats.SufficientStats(
        n=int(row["n"]), **{c: float(row[c]) for c in SUFFICIENT_COLUMNS if c != "n"}
    )


def _empty_stats() -> stats.SufficientStats:
    return stats.SufficientStats(n=0, sum_y=0.0, sum_y2=0.0)


def _group_columns(s: stats.SufficientStats) -> dict:
    """A group's sums, mean and standard deviation."""
    return {
        "n": s.n, "sum_y": s.sum_y, "sum_y2": s.sum_y2, "sum_x": s.sum_x, "sum_x2": s.sum_x2, "sum_xy": s.sum_xy,
        "mean": s.mean,
        "std": math.sqrt(s.variance) if s.variance == s.variance else math.nan,
    }


def _raw_columns(raw: stats.LiftResult) -> dict:
    """The raw comparison with the control."""
    return {
        "abs_lift": raw.abs_lift, "abs_lift_ci_low": raw.abs_ci_low, "abs_lift_ci_high": raw.abs_ci_high,
        "rel_lift": raw.rel_lift, "ci_low": raw.ci_low, "ci_high": raw.ci_high, "df": raw.df, "p_value": raw.p_value,
    }


def _design(covariates: list[str], segments: pd.DataFrame) -> list[tuple[str, str | None]]:
    """CUPED++'s covariate columns: the pre-period, and per property one indicator per value seen
    in the experiment but the first (the reference level, absorbed by the intercept)."""
    columns: list[tuple[str, str | None]] = []
    for covariate in covariates:
        if covariate == PRE_PERIOD:
            columns.append((covariate, None))
        else:
            levels = sorted(set(segments.loc[segments["property"] == covariate, "value"]))
            columns += [(covariate, level) for level in levels[1:]]
    return columns


def covariate_moments(
    overall: stats.SufficientStats, segments: dict[tuple[str, str], stats.SufficientStats],
    pairs: dict[tuple[str, str, str, str], int], columns: list[tuple[str, str | None]],
) -> stats.Moments:
    """One variant's Moments of (y, covariates) for one metric, from its sufficient statistics
    (`overall`), its segments' (by (property, value)) and its subjects per pair of values of two
    properties: an indicator's sums are its segment's n, sum_y and sum_x; two values of one
    property never meet."""
    k = len(columns)
    sums, cross = np.zeros(k + 1), np.zeros((k + 1, k + 1))
    sums[0], cross[0, 0] = overall.sum_y, overall.sum_y2
    empty = _empty_stats()
    for i, (prop, value) in enumerate(columns, start=1):
        if prop == PRE_PERIOD:
            sums[i], cross[0, i], cross[i, i] = overall.sum_x, overall.sum_xy, overall.sum_x2
        else:
            seg = segments.get((prop, value), empty)
            sums[i], cross[0, i], cross[i, i] = seg.n, seg.sum_y, seg.n
        for j, (other, other_value) in enumerate(columns[: i - 1], start=1):
            if prop == PRE_PERIOD or other == PRE_PERIOD:
                indicator = (other, other_value) if prop == PRE_PERIOD else (prop, value)
                cross[i, j] = segments.get(indicator, empty).sum_x
            elif prop != other:
                cross[i, j] = pairs.get((other, other_value, prop, value), pairs.get((prop, value, other, other_value), 0))
    # Each off-diagonal sum was set on one side of the diagonal only.
    cross = cross + cross.T - np.diag(np.diag(cross))
    return stats.Moments(n=overall.n, sums=sums, cross=cross)


def _adjusted_columns(prefix: str, adjusted: stats.LiftResult, raw: stats.LiftResult) -> dict:
    """A variance-reduced comparison's columns (CUPED, CUPED++), with its variance reduction
    1 - (adjusted relative standard error / raw)^2."""
    reduction = 1 - (adjusted.rel_se / raw.rel_se) ** 2 if raw.rel_se and raw.rel_se == raw.rel_se else math.nan
    return {
        f"{prefix}_abs_lift": adjusted.abs_lift, f"{prefix}_rel_lift": adjusted.rel_lift,
        f"{prefix}_ci_low": adjusted.ci_low, f"{prefix}_ci_high": adjusted.ci_high,
        f"{prefix}_p_value": adjusted.p_value, f"{prefix}_variance_reduction": reduction,
    }


def variant_metric_rows(
    sufficient: pd.DataFrame,
    experiment: Experiment,
    metrics: list[Metric],
    srm: stats.SrmResult,
    covariates: list[str] | None = None,
    segments: pd.DataFrame | None = None,
    pairs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (variant, metric) with the inference of each treatment against the control.

    Variants or metrics without any subject still get a row (n = 0, statistics NaN), so an empty
    arm is visible rather than missing. CUPED++ on `covariates` needs the experiment's segment
    statistics (`segments`, complete_statistics by SEGMENT_KEY) and, with two properties or more,
    its subjects per pair of property values (`pairs`, assignments.property_pair_counts).
    """
    by_key = {(row["variant_id"], row["metric"]): sufficient_stats_of(row) for _, row in sufficient.iterrows()}
    control_id = experiment.control.id
    columns = _design(covariates or [], segments) if covariates and segments is not None else []
    if columns:
        by_segment = {
            (r["variant_id"], r["metric"], r["property"], r["value"]): sufficient_stats_of(r) for _, r in segments.iterrows()
        }
        pair_counts = {} if pairs is None else {
            (r.variant_id, (r.property_a, r.value_a, r.property_b, r.value_b)): int(r.n) for r in pairs.itertuples()
        }

        def moments(variant: str, metric: str) -> stats.Moments:
            mine = {(p, v): st for (va, m, p, v), st in by_segment.items() if va == variant and m == metric}
            its_pairs = {key: n for (va, key), n in pair_counts.items() if va == variant}
            return covariate_moments(by_key.get((variant, metric), _empty_stats()), mine, its_pairs, columns)
    rows = []
    for metric in metrics:
        control = by_key.get((control_id, metric.id), _empty_stats())
        for variant in experiment.variants:
            s = by_key.get((variant.id, metric.id), _empty_stats())
            row = {
                "experiment_id": experiment.id,
                "variant_id": variant.id,
                "metric": metric.id,
                "is_control": variant.control,
                "aggregation": metric.aggregation,
                **_group_columns(s),
                "expected_share": variant.weight,
                "srm_p_value": srm.p_value,
                "srm_flagged": srm.flagged,
                "srm_verdict": srm.verdict,
            }
            if variant.control:
                rows.append(row)
                continue
            raw = stats.compare(s, control, alpha=experiment.alpha)
            row.update(_raw_columns(raw))
            if experiment.cuped_pre_window_days > 0:
                theta = stats.cuped_theta([s, control])
                adjusted = stats.compare_cuped(s, control, alpha=experiment.alpha, theta=theta)
                row.update(
                    cuped_theta=theta,
                    cuped_abs_lift_ci_low=adjusted.abs_ci_low,
                    cuped_abs_lift_ci_high=adjusted.abs_ci_high,
                    **_adjusted_columns("cuped", adjusted, raw),
                )
            if columns:
                adjusted = stats.compare_regression_adjusted(
                    moments(variant.id, metric.id), moments(control_id, metric.id), alpha=experiment.alpha
                )
                row.update(cuped_pp_covariates=", ".join(covariates), **_adjusted_columns("cuped_pp", adjusted, raw))
            rows.append(row)
    frame = pd.DataFrame(rows).reindex(columns=list(VARIANT_METRICS_COLUMNS))
    # Holm across the experiment's treatment x metric comparisons (the family a reader scans).
    for raw_col, adjusted_col in (("p_value", "p_value_holm"), ("cuped_p_value", "cuped_p_value_holm")):
        compared = ~frame["is_control"].astype(bool)
        frame.loc[compared, adjusted_col] = stats.holm(frame.loc[compared, raw_col].astype(float).tolist())
    return frame.astype(_FRAME_TYPES)


def _frame_types(schema: pa.DataFrameSchema) -> dict[str, object]:
    """The pandas type of each column, from the table's schema."""
    return {
        name: {"float64": "float64", "int64": "int64", "boolean": bool, "string": object}[str(column.dtype)]
        for name, column in schema.columns.items()
    }


_FRAME_TYPES = _frame_types(variant_metrics_schema(None))


@dataclass(frozen=True)
class _Segment:
    """One segment's arms for one metric, and each treatment's raw comparison (none when too small)."""

    prop: str
    value: str
    metric: str
    arms: dict[str, stats.SufficientStats]
    too_small: bool
    lifts: dict[str, stats.LiftResult]


def _segments(segments: pd.DataFrame, experiment: Experiment, metrics: list[Metric]) -> list[_Segment]:
    """The segments of `segments` (`complete_statistics` by SEGMENT_KEY). A segment with an arm
    below `segments.min_subjects` is too small: no comparison is made."""
    by_key = {
        (r["property"], r["value"], r["variant_id"], r["metric"]): sufficient_stats_of(r) for _, r in segments.iterrows()
    }
    control_id, least = experiment.control.id, experiment.segments.min_subjects
    found = []
    # Sorted: the engine returns the rows in any order, and Cochran's Q sums in this one.
    for prop, value in sorted(set(zip(segments["property"], segments["value"], strict=True))):
        for metric in metrics:
            arms = {v.id: by_key.get((prop, value, v.id, metric.id), _empty_stats()) for v in experiment.variants}
            too_small = min(s.n for s in arms.values()) < least
            lifts = {} if too_small else {
                v.id: stats.compare(arms[v.id], arms[control_id], alpha=experiment.alpha)
                for v in experiment.variants if not v.control
            }
            found.append(_Segment(prop, value, metric.id, arms, too_small, lifts))
    return found


def segment_metric_rows(segments: pd.DataFrame, experiment: Experiment, metrics: list[Metric]) -> pd.DataFrame:
    """variant_metric_rows' sums and raw comparison per segment: one row per (property, value,
    variant, metric); a too-small segment's rows keep the sums, without lifts."""
    rows = []
    for seg in _segments(segments, experiment, metrics):
        for variant in experiment.variants:
            row = {
                "experiment_id": experiment.id, "property": seg.prop, "value": seg.value, "variant_id": variant.id,
                "metric": seg.metric, "is_control": variant.control, **_group_columns(seg.arms[variant.id]),
                "too_small": seg.too_small,
            }
            if variant.id in seg.lifts:
                row.update(_raw_columns(seg.lifts[variant.id]))
            rows.append(row)
    schema = segment_metrics_schema(None)
    return pd.DataFrame(rows).reindex(columns=list(schema.columns)).astype(_frame_types(schema))


def heterogeneity_rows(segments: pd.DataFrame, experiment: Experiment, metrics: list[Metric]) -> pd.DataFrame:
    """Per (property, treatment, metric): Cochran's Q on the relative lifts of the property's
    segments that are not too small, Holm across the experiment's tests, `differs` below its alpha."""
    groups: dict[tuple[str, str, str], list[_Segment]] = {}
    for seg in _segments(segments, experiment, metrics):
        for variant in experiment.variants:
            if not variant.control:
                groups.setdefault((seg.prop, variant.id, seg.metric), []).append(seg)
    rows = []
    for (prop, variant, metric), segs in groups.items():
        judged = [seg.lifts[variant] for seg in segs if not seg.too_small]
        het = stats.cochran_q([r.rel_lift for r in judged], [r.rel_se for r in judged])
        rows.append({
            "experiment_id": experiment.id, "property": prop, "variant_id": variant, "metric": metric,
            "segments": het.k, "segments_too_small": sum(seg.too_small for seg in segs), "pooled_rel_lift": het.pooled,
            "q": het.q, "df": het.df, "p_value": het.p_value, "i_squared": het.i_squared,
        })
    schema = segment_heterogeneity_schema(None)
    frame = pd.DataFrame(rows).reindex(columns=list(schema.columns))
    if len(frame):
        frame["p_value_holm"] = stats.holm(frame["p_value"].astype(float).tolist())
        frame["differs"] = frame["p_value_holm"] < experiment.alpha  # False for NaN: not judged
    return frame.astype(_frame_types(schema))


def srm_of(counts: pd.DataFrame, experiment: Experiment) -> tuple[stats.SrmResult, list[stats.SrmCause]]:
    """SRM verdict from the assignment_counts table, and the property values that explain it.

    A segment explains the mismatch when it is itself imbalanced (Bonferroni-corrected) and the
    subjects outside it are balanced. An imbalance present in every segment (a global assignment or
    logging bug) has no single cause, and then the list is empty.
    """
    overall = counts[counts["property"] == ""]
    observed = {v: int(n) for v, n in zip(overall["variant_id"], overall["n"], strict=True)}
    threshold, min_total = experiment.srm.p_threshold, experiment.srm.min_subjects
    result = stats.srm_test(observed, experiment.weights, threshold=threshold, min_total=min_total)
    if not result.flagged:
        return result, []
    segments: dict[tuple[str, str], dict[str, int]] = {}
    for row in counts[counts["property"] != ""].itertuples(index=False):
        segments.setdefault((row.property, row.value), {})[row.variant_id] = int(row.n)
    causes = []
    for cause in stats.srm_by_property(segments, experiment.weights, min_total=min_total):
        if cause.p_value_bonferroni >= threshold:
            continue
        segment = segments[(cause.property, cause.value)]
        rest = {v: observed.get(v, 0) - segment.get(v, 0) for v in observed}
        if not stats.srm_test(rest, experiment.weights, threshold=threshold, min_total=min_total).flagged:
            causes.append(cause)
    return result, causes
