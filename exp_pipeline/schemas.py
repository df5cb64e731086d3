"""Each table's contract, declared once: its Pandera schema (columns, types, nulls, checks, and a
description per column), its grain and what it holds.

The checks validate against these schemas; the Dagster column schemas, the `variant_metrics`
column list and docs/tables.md are derived from them. Schemas that depend on the experiment (its
id, variants, window, metrics) take it; without one (`experiment=None`) they hold the columns and
the experiment-independent checks only, which is what the documentation needs. Assignment
properties named in the registry (device_type, country, ...) follow `assigned_at` in the
assignment tables.

pandera.ibis ignores Column(unique=True): uniqueness is declared at schema level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir
import pandera.ibis as pa

from exp_pipeline.registry import Experiment
from exp_pipeline.vocabulary import (
    ASSIGNMENT_REJECTIONS,
    EVENT_REJECTIONS,
    MULTIPLE_VARIANTS,
    SOURCE_REJECTIONS,
    UTC_TIMESTAMP,
    trim_whitespace,
)

STRING = dt.String()
BOOLEAN = dt.Boolean()
INT64 = dt.Int64()
FLOAT64 = dt.Float64()
AGGREGATIONS = ("sum", "count", "conversion")
SRM_VERDICTS = ("ok", "SRM", "not judged")


def _non_empty(data) -> ir.BooleanColumn:
    column = data.table[data.key]
    return trim_whitespace(column).length() > 0


def _column(dtype, description: str, *checks: pa.Check | None, nullable: bool = False) -> pa.Column:
    return pa.Column(dtype, [c for c in checks if c is not None], nullable=nullable, description=description)


def _experiment_column(experiment: Experiment | None) -> pa.Column:
    check = pa.Check.equal_to(experiment.id) if experiment else None
    return _column(STRING, "experiment (the partition)", check)


def _inside_window(experiment: Experiment | None) -> pa.Check | None:
    if experiment is None:
        return None

    def check(data) -> ir.BooleanColumn:
        column = data.table[data.key]
        inside = column >= ibis.literal(experiment.start_at, type=UTC_TIMESTAMP)
        if experiment.end_at is not None:
            inside &= column < ibis.literal(experiment.end_at, type=UTC_TIMESTAMP)
        return inside

    return pa.Check(check, name="inside_experiment_window")


def _variants(experiment: Experiment | None) -> pa.Check | None:
    return pa.Check.isin([v.id for v in experiment.variants]) if experiment else None


def _properties(properties: Sequence[str]) -> dict[str, pa.Column]:
    return {p: _column(STRING, "assignment property from the registry", nullable=True) for p in properties}


def _secondary_ids(names: Sequence[str], what: str) -> dict[str, pa.Column]:
    return {i: _column(STRING, f"secondary id from the registry: {what}", nullable=True) for i in names}


def raw_assignments_schema(
    experiment: Experiment | None, properties: Sequence[str] = (), secondary_ids: Sequence[str] = ()
) -> pa.DataFrameSchema:
    # Unusable rows were set aside at ingestion (rejected_rows); exposures outside the window are
    # valid log rows, excluded later by the assignment rules.
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "subject_id": _column(STRING, "randomization unit, a user by default", pa.Check(_non_empty, name="non_empty")),
            "variant_id": _column(STRING, "variant the subject was exposed to", _variants(experiment)),
            "assigned_at": _column(UTC_TIMESTAMP, "exposure time"),
            **_properties(properties),
            **_secondary_ids(secondary_ids, "as logged on the exposure"),
            "source_file": _column(STRING, "file (or table) the row was read from"),
        },
        strict=True,
        name="raw_assignments",
    )


def deduped_assignments_schema(
    experiment: Experiment | None, properties: Sequence[str] = (), secondary_ids: Sequence[str] = ()
) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "subject_id": _column(STRING, "unique per experiment among active rows", pa.Check(_non_empty, name="non_empty")),
            "variant_id": _column(STRING, "variant of the first exposure", _variants(experiment)),
            "assigned_at": _column(UTC_TIMESTAMP, "first exposure inside the experiment window", _inside_window(experiment)),
            **_properties(properties),
            **_secondary_ids(secondary_ids, "the first logged on a usable exposure of the subject"),
            "n_exposures": _column(INT64, "usable exposure rows of the subject", pa.Check.ge(1)),
            "n_variants_seen": _column(INT64, "distinct variants in those rows", pa.Check.ge(1)),
            "exclusion_reason": _column(
                STRING, f"'{MULTIPLE_VARIANTS}' when excluded from analysis, else null",
                pa.Check.isin([MULTIPLE_VARIANTS]), nullable=True,
            ),
            "is_active": _column(BOOLEAN, "false for rows superseded by a correction"),
            "valid_from": _column(UTC_TIMESTAMP, "when this row became the subject's assignment"),
            "valid_to": _column(UTC_TIMESTAMP, "when a correction superseded it (null while active)", nullable=True),
        },
        strict=True,
        name="deduped_assignments",
    )


def active_assignments_unique_schema() -> pa.DataFrameSchema:
    """UNIQUE(experiment_id, subject_id), validated on the active rows only."""
    return pa.DataFrameSchema(
        {"experiment_id": pa.Column(STRING), "subject_id": pa.Column(STRING)},
        unique=["experiment_id", "subject_id"],
        name="active_deduped_assignments",
    )


def _event_columns(experiment: Experiment | None, event_at: str) -> dict[str, pa.Column]:
    return {
        "experiment_id": _experiment_column(experiment),
        "subject_id": _column(STRING, "analysable subject"),
        "variant_id": _column(STRING, "the subject's variant", _variants(experiment)),
        "assigned_at": _column(UTC_TIMESTAMP, "the subject's assignment"),
        "event_at": _column(UTC_TIMESTAMP, event_at),
        "event_name": _column(STRING, "event name (only those used by the experiment's metrics)"),
        "value": _column(FLOAT64, "event value (null when the log has none)", nullable=True),
    }


def post_assignment_events_schema(experiment: Experiment | None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        _event_columns(experiment, "event time, assigned_at <= event_at < end of the widest window"),
        checks=[pa.Check(lambda d: d.table.event_at >= d.table.assigned_at, name="event_at_not_before_assigned_at")],
        strict=True,
        name="post_assignment_events",
    )


def pre_assignment_events_schema(experiment: Experiment | None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        _event_columns(experiment, "event time in [assigned_at - pre window, assigned_at)"),
        checks=[pa.Check(lambda d: d.table.event_at < d.table.assigned_at, name="event_at_before_assigned_at")],
        strict=True,
        name="pre_assignment_events",
    )


def _probability(description: str) -> pa.Column:
    return _column(FLOAT64, description, pa.Check.in_range(0, 1), nullable=True)


def _float(description: str) -> pa.Column:
    return _column(FLOAT64, description, nullable=True)


def _metric_column(metric_ids: Sequence[str] | None) -> pa.Column:
    return _column(
        STRING, "metric id from the registry", pa.Check.isin(list(metric_ids)) if metric_ids is not None else None
    )


def _comparison_columns() -> dict[str, pa.Column]:
    """The sufficient statistics of a group of subjects and the raw comparison with the control:
    the same columns in variant_metrics and segment_metrics."""
    return {
        "n": _column(INT64, "analysable subjects", pa.Check.ge(0)),
        "sum_y": _float("sum of the per-subject metric values (capped)"),
        "sum_y2": _float("sum of their squares"),
        "sum_x": _float("sum of the pre-period covariate (CUPED)"),
        "sum_x2": _float("sum of its squares"),
        "sum_xy": _float("sum of covariate x metric value"),
        "mean": _float("per-subject mean"),
        "std": _float("per-subject standard deviation"),
        "abs_lift": _float("difference in means, treatment - control"),
        "abs_lift_ci_low": _float("its Welch confidence interval, low end"),
        "abs_lift_ci_high": _float("its Welch confidence interval, high end"),
        "rel_lift": _float("relative lift mean_t / mean_c - 1"),
        "ci_low": _float("its confidence interval (delta method, Welch df), low end"),
        "ci_high": _float("its confidence interval, high end"),
        "df": _float("Welch-Satterthwaite degrees of freedom"),
        "p_value": _probability("two-sided p-value of the relative lift"),
    }


def variant_metrics_schema(experiment: Experiment | None, metric_ids: Sequence[str] | None = None) -> pa.DataFrameSchema:
    """One row per (experiment, variant, metric); lifts and p-values are null on the control row."""
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "variant_id": _column(STRING, "variant", _variants(experiment)),
            "metric": _metric_column(metric_ids),
            "is_control": _column(BOOLEAN, "the control of the experiment"),
            "aggregation": _column(
                STRING, "how the metric aggregates events: sum, count or conversion", pa.Check.isin(list(AGGREGATIONS))
            ),
            **_comparison_columns(),
            "p_value_holm": _probability("Holm-adjusted across the experiment's treatments x metrics"),
            "cuped_theta": _float("CUPED theta, pooled over the treatment and the control"),
            "cuped_rel_lift": _float("CUPED-adjusted difference / the unadjusted control mean (GrowthBook's convention)"),
            "cuped_ci_low": _float("its confidence interval, low end"),
            "cuped_ci_high": _float("its confidence interval, high end"),
            "cuped_p_value": _probability("two-sided p-value of the CUPED-adjusted lift"),
            "cuped_p_value_holm": _probability("Holm-adjusted across the experiment's treatments x metrics"),
            "cuped_variance_reduction": _float("1 - (CUPED standard error / raw standard error)^2"),
            "expected_share": _float("the variant's configured weight"),
            "srm_p_value": _probability("sample ratio mismatch: chi-square p-value of subjects per variant"),
            "srm_flagged": _column(BOOLEAN, "SRM detected (p below the experiment's threshold)"),
            "srm_verdict": _column(
                STRING, "the SRM verdict: 'ok', 'SRM' or 'not judged' (fewer subjects than srm.min_subjects)",
                pa.Check.isin(list(SRM_VERDICTS)),
            ),
            # Added after the columns above: existing warehouses gain them at the end.
            "cuped_abs_lift": _float("CUPED-adjusted difference in means (of y - theta x)"),
            "cuped_abs_lift_ci_low": _float("its Welch confidence interval on the adjusted variances, low end"),
            "cuped_abs_lift_ci_high": _float("its Welch confidence interval, high end"),
            "cuped_pp_covariates": _column(STRING, "CUPED++ covariates (registry covariates)", nullable=True),
            "cuped_pp_abs_lift": _float("CUPED++: difference in means adjusted on the covariates (OLS treatment coefficient)"),
            "cuped_pp_rel_lift": _float("CUPED++ adjusted difference / the unadjusted control mean"),
            "cuped_pp_ci_low": _float("its confidence interval, low end"),
            "cuped_pp_ci_high": _float("its confidence interval, high end"),
            "cuped_pp_p_value": _probability("two-sided p-value of the CUPED++ relative lift"),
            "cuped_pp_variance_reduction": _float("1 - (CUPED++ standard error / raw standard error)^2"),
        },
        unique=["experiment_id", "variant_id", "metric"],
        strict=True,
        name="variant_metrics",
    )


SEGMENT_KEY_COLUMNS = ("experiment_id", "property", "value", "variant_id", "metric")


def segment_metrics_schema(experiment: Experiment | None, metric_ids: Sequence[str] | None = None) -> pa.DataFrameSchema:
    """variant_metrics per segment: one row per (experiment, property, value, variant, metric)."""
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "property": _column(STRING, "assignment property (registry sources.assignments.properties)"),
            "value": _column(STRING, "its value at the subject's first exposure; '(null)' when missing"),
            "variant_id": _column(STRING, "variant", _variants(experiment)),
            "metric": _metric_column(metric_ids),
            "is_control": _column(BOOLEAN, "the control of the experiment"),
            **_comparison_columns(),
            "too_small": _column(
                BOOLEAN, "an arm of the segment has fewer than segments.min_subjects subjects: no lifts"
            ),
        },
        unique=list(SEGMENT_KEY_COLUMNS),
        strict=True,
        name="segment_metrics",
    )


def segment_heterogeneity_schema(experiment: Experiment | None, metric_ids: Sequence[str] | None = None) -> pa.DataFrameSchema:
    """Does a treatment's lift differ across a property's values? One row per (experiment,
    property, treatment, metric)."""
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "property": _column(STRING, "assignment property"),
            "variant_id": _column(STRING, "treatment compared with the control", _variants(experiment)),
            "metric": _metric_column(metric_ids),
            "segments": _column(INT64, "values of the property in the test: a relative lift with a standard error (a value "
                                          "not too small whose lift is undefined, e.g. a zero control mean, is in neither count)", pa.Check.ge(0)),
            "segments_too_small": _column(INT64, "values left out: an arm below segments.min_subjects", pa.Check.ge(0)),
            "pooled_rel_lift": _float("inverse-variance weighted mean of the segments' relative lifts"),
            "q": _float("Cochran's Q: sum of w (lift - pooled)^2, w = 1 / se^2"),
            "df": _column(INT64, "segments - 1", pa.Check.ge(0)),
            "p_value": _probability("chi-square(df) p-value of Q: small when the lift differs across values"),
            "p_value_holm": _probability("Holm-adjusted across the experiment's properties x treatments x metrics"),
            "i_squared": _probability("share of the variation between segments beyond chance, max(0, (Q - df) / Q)"),
            "differs": _column(BOOLEAN, "p_value_holm below the experiment's alpha"),
        },
        unique=["experiment_id", "property", "variant_id", "metric"],
        strict=True,
        name="segment_heterogeneity",
    )


def _rejected_rows_schema(name: str, reasons: Sequence[str], experiment_id: pa.Column) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": experiment_id,
            "source": _column(STRING, "which log: 'assignments' or 'events'", pa.Check.isin(["assignments", "events"])),
            "source_file": _column(STRING, "file (or table) the row was read from"),
            "reason": _column(STRING, "why the row was set aside: " + ", ".join(reasons), pa.Check.isin(list(reasons))),
            "record": _column(STRING, "the row as logged, 'column=value; ...'"),
        },
        strict=True,
        name=name,
    )


def rejected_rows_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return _rejected_rows_schema("rejected_rows", ASSIGNMENT_REJECTIONS, _experiment_column(experiment))


def rejected_source_rows_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return _rejected_rows_schema(
        "rejected_source_rows",
        sorted({*SOURCE_REJECTIONS, *EVENT_REJECTIONS}),
        _column(STRING, "always null: the logs as a whole", nullable=True),
    )


def dim_experiments_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _column(STRING, "experiment id from the registry"),
            "name": _column(STRING, "name for people"),
            "description": _column(STRING, "what the experiment tests", nullable=True),
            "start_at": _column(UTC_TIMESTAMP, "first moment exposures count"),
            "end_at": _column(UTC_TIMESTAMP, "end of the exposure window (null while running)", nullable=True),
            "status": _column(STRING, "scheduled, running or stopped, when the table was built",
                              pa.Check.isin(["scheduled", "running", "stopped"])),
            "metrics": _column(STRING, "the experiment's metric ids, comma-separated"),
            "alpha": _column(FLOAT64, "significance level of the intervals"),
            "srm_p_threshold": _column(FLOAT64, "SRM flagged below this p-value"),
            "srm_min_subjects": _column(INT64, "no SRM verdict below this many subjects"),
            "srm_blocks_metrics": _column(BOOLEAN, "a failed SRM check blocks variant_metrics"),
            "cuped_pre_window_days": _column(FLOAT64, "CUPED covariate period before assignment (0: off)"),
            "multi_variant_warn_share": _column(FLOAT64, "multi-variant share that warns"),
            "multi_variant_error_share": _column(FLOAT64, "multi-variant share that errors"),
            "pre_period_bias_p_threshold": _column(FLOAT64, "the pre-experiment bias check warns below this p-value"),
        },
        unique=["experiment_id"],
        strict=True,
        name="dim_experiments",
    )


def dim_variants_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _column(STRING, "experiment id from the registry"),
            "variant_id": _column(STRING, "variant id"),
            "is_control": _column(BOOLEAN, "the control (exactly one per experiment)"),
            "weight": _column(FLOAT64, "expected traffic share", pa.Check.in_range(0, 1)),
        },
        unique=["experiment_id", "variant_id"],
        strict=True,
        name="dim_variants",
    )


def subject_id_map_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "id_name": _column(STRING, "the secondary id (registry sources.assignments.secondary_ids)"),
            "secondary_id": _column(STRING, "a value of it seen on the experiment's usable exposures"),
            "subject_id": _column(STRING, "the subject first seen with it (ties: the smaller subject_id), whose events it keys"),
            "first_seen_at": _column(UTC_TIMESTAMP, "that subject's first exposure carrying it"),
            "n_subjects": _column(INT64, "distinct subjects seen with it (above 1: a conflict)", pa.Check.ge(1)),
        },
        unique=["experiment_id", "id_name", "secondary_id"],
        strict=True,
        name="subject_id_map",
    )


def analysis_state_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "analysed_at": _column(UTC_TIMESTAMP, "when its variant_metrics were last written"),
            "event_rows_read": _column(INT64, "rows of the event log then (an empty log later is not taken as the truth)"),
        },
        strict=True,
        name="analysis_state",
    )


def refresh_state_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "fingerprint": _column(STRING, "hash of the experiment, its metrics and the events source when settled"),
            "settled_until": _column(UTC_TIMESTAMP, "events before this are summed in settled_segment_sums"),
            "settled_events": _column(STRING, "per event name, [rows, checksum] of the usable events before settled_until then (JSON)"),
            "settled_rows_pass": _column(STRING, "per period: did the settled rows pass their row checks (JSON)"),
            "batches": _column(STRING, "the committed batches of the settled tables (JSON list)"),
            "settled_rows": _column(INT64, "their rows in the two settled tables", pa.Check.ge(0)),
        },
        strict=True,
        name="refresh_state",
    )


def settled_subjects_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "subject_id": _column(STRING, "the subject"),
            "assigned_at": _column(UTC_TIMESTAMP, "its assignment when its events were settled"),
            "batch": _column(INT64, "the run that first settled it"),
            "unit": _column(INT64, "its number in that run: with batch, the key of its settled sums"),
            "revokes_batch": _column(
                INT64, "on a revocation row (a later run went on without the subject at this assignment): the batch "
                "of the entry it revokes, whose sums are never used again", nullable=True,
            ),
        },
        strict=True,
        name="settled_subjects",
    )


def settled_segment_sums_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "event_name": _column(STRING, "the metric event"),
            "subject_batch": _column(INT64, "settled_subjects.batch of the subject"),
            "subject_unit": _column(INT64, "settled_subjects.unit of the subject"),
            "segment": _column(INT64, "the window segment of the event name (cut where a metric window begins or ends)"),
            "sum_value_bucket": _column(INT64, "exponent bucket of the values (fixed-point sums)"),
            "n_events": _column(INT64, "events", pa.Check.ge(0)),
            "n_before_assignment": _column(INT64, "of them before assignment", pa.Check.ge(0)),
            "sum_value_fixed": _column(dt.Decimal(38, 0), "their exact sum, as an integer of the bucket"),
            "batch": _column(INT64, "the run that settled these events"),
        },
        strict=True,
        name="settled_segment_sums",
    )


def metric_windows_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _column(STRING, "experiment of the registry"),
            "metric": _column(STRING, "one of its metrics"),
            "event_name": _column(STRING, "the event the metric counts"),
            "aggregation": _column(STRING, "sum, count or conversion", pa.Check.isin(list(AGGREGATIONS))),
            "start_seconds": _column(INT64, "window start after assignment, seconds", pa.Check.ge(0)),
            "end_seconds": _column(INT64, "window end after assignment (exclusive), seconds"),
            "pre_seconds": _column(INT64, "the experiment's CUPED pre-period before assignment, seconds", pa.Check.ge(0)),
            "entity": _column(STRING, "whose events: 'subject', or the secondary id they are keyed by (subject_id_map)"),
        },
        strict=True,
        name="metric_windows",
    )


def alerts_schema(experiment: Experiment | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "alert_id": _column(STRING, "one per failed check evaluation, failed run or late state: nothing is sent twice"),
            "kind": _column(STRING, "asset_check, run_failure or late_results",
                            pa.Check.isin(["asset_check", "run_failure", "late_results"])),
            "experiment_id": _column(STRING, "the experiment (the partition), if any", nullable=True),
            "source": _column(STRING, "'<asset> / <check>' or 'job <name>'"),
            "severity": _column(STRING, "ERROR or WARN", pa.Check.isin(["ERROR", "WARN"])),
            "summary": _column(STRING, "what failed, in words"),
            "run_id": _column(STRING, "the Dagster run (empty for late results)"),
            "run_url": _column(STRING, "link to the run in the UI (late results: to the experiment's variant_metrics)"),
            "created_at": _column(UTC_TIMESTAMP, "when the check was evaluated or the run failed"),
            "figures": _column(STRING, "the check's key figures (JSON)"),
            "delivered": _column(BOOLEAN, "the webhook accepted it"),
            "delivered_at": _column(UTC_TIMESTAMP, "when", nullable=True),
            "attempts": _column(INT64, "webhook deliveries tried", pa.Check.ge(0)),
            "last_error": _column(STRING, "why the last delivery failed", nullable=True),
        },
        unique=["alert_id"],
        strict=True,
        name="alerts",
    )


@dataclass(frozen=True)
class Table:
    """A warehouse table: its grain, what it holds, and its schema (`schema(experiment, properties)`)."""

    name: str
    grain: str
    holds: str
    schema: Callable[..., pa.DataFrameSchema]
    # How runs write it: "by partition" (one experiment's rows replaced), "appended", "whole"
    # (dropped and created again) or "as a view". The first two keep their columns across runs.
    written: str = "by partition"

    @property
    def keeps_its_columns(self) -> bool:
        """Stored columns outlive a run: a column's type cannot change (see preflight)."""
        return self.written in ("by partition", "appended")

    @property
    def per_experiment(self) -> bool:
        """Every row belongs to one registry experiment's partition (views read partitioned tables)."""
        return self.written in ("by partition", "as a view")

    def documented_schema(self) -> pa.DataFrameSchema:
        """The schema without an experiment: its columns and the checks that hold for every one."""
        return self.schema(None)

    def columns(self) -> list[tuple[str, str, bool, str]]:
        """(name, type, nullable, description) of every column."""
        return [
            (name, type_name(column.dtype.type), column.nullable, column.description or "")
            for name, column in self.documented_schema().columns.items()
        ]


TABLES = {
    t.name: t
    for t in (
        Table("dim_experiments", "experiment", "the registry's experiments: dates, status, analysis settings",
              dim_experiments_schema, written="whole"),
        Table("dim_variants", "experiment x variant", "the registry's variants: weight, which is the control",
              dim_variants_schema, written="whole"),
        Table("raw_assignments", "exposure row", "the exposure log of the experiment, canonical names, UTC",
              raw_assignments_schema),
        Table("rejected_rows", "rejected exposure row",
              "exposure rows of the experiment that could not be ingested, with the reason and the row as logged",
              rejected_rows_schema),
        Table("rejected_source_rows", "rejected log row",
              "exposure rows of no known experiment and unusable event rows (the logs as a whole)",
              rejected_source_rows_schema, written="whole"),
        Table("deduped_assignments", "experiment x subject (unique among is_active rows)",
              "first exposure per subject, properties frozen at it, exclusions, correction history",
              deduped_assignments_schema),
        Table("subject_id_map", "experiment x secondary id value",
              "which subject each secondary id value (e.g. a user_id) belongs to: the first seen with it",
              subject_id_map_schema),
        Table("metric_windows", "experiment x metric",
              "the registry's metric windows and pre-periods, which the two event views join with",
              metric_windows_schema, written="whole"),
        Table("post_assignment_events", "event x experiment",
              "a view: events of analysable subjects inside the widest window of a metric on that event",
              post_assignment_events_schema, written="as a view"),
        Table("pre_assignment_events", "event x experiment",
              "a view: events in the CUPED covariate period before assignment", pre_assignment_events_schema,
              written="as a view"),
        Table("analysis_state", "experiment", "when the experiment was last analysed, on how many event rows",
              analysis_state_schema),
        Table("refresh_state", "experiment",
              "what the incremental refresh settled: the watermark, the event counts before it, the committed batches",
              refresh_state_schema),
        Table("settled_subjects", "experiment x subject x assigned_at x batch (entries and revocations)",
              "subjects whose events before the watermark are summed in settled_segment_sums", settled_subjects_schema),
        Table("settled_segment_sums", "subject x event name x window segment x value bucket x batch",
              "per-subject exact sums of the events before the watermark, added by the next run instead of joined again",
              settled_segment_sums_schema),
        Table("variant_metrics", "experiment x variant x metric",
              "sufficient statistics, lifts with intervals and p-values, CUPED, Holm, the SRM verdict",
              variant_metrics_schema),
        Table("segment_metrics", "experiment x property x value x variant x metric",
              "variant_metrics per segment (assignment property value): sufficient statistics, lifts, too-small segments",
              segment_metrics_schema),
        Table("segment_heterogeneity", "experiment x property x treatment x metric",
              "whether a lift differs across a property's values: Cochran's Q on the segments' lifts, Holm",
              segment_heterogeneity_schema),
        Table("alerts", "alert", "one row per failed check evaluation or failed run, with its delivery state",
              alerts_schema, written="appended"),
    )
}

VARIANT_METRICS_COLUMNS = tuple(variant_metrics_schema(None).columns)


def type_name(dtype: dt.DataType) -> str:
    """A column type as people read it: string, int64, float64, boolean, timestamp UTC."""
    if dtype.is_timestamp():
        return f"timestamp {dtype.timezone}" if dtype.timezone else "timestamp"
    return str(dtype)


def with_retired_columns(schema: pa.DataFrameSchema, stored: ibis.Schema) -> pa.DataFrameSchema:
    """`schema` for a stored table that may also hold columns no longer written (a property taken
    out of the registry, kept for the partitions written before): each is allowed, and must be
    null in the rows validated (every partition written since leaves it null)."""
    retired = {c: dtype for c, dtype in stored.items() if c not in schema.columns}
    if not retired:
        return schema

    def is_null(data) -> ir.BooleanColumn:
        return data.table[data.key].isnull()

    return schema.add_columns({
        c: _column(dtype.copy(nullable=True), "retired: no longer in the registry; null in partitions written since",
                   pa.Check(is_null, name="retired_column_is_null"), nullable=True)
        for c, dtype in retired.items()
    })


def ibis_schema(schema: pa.DataFrameSchema) -> ibis.Schema:
    """The table's columns as an Ibis schema (to create it, or to build rows of it)."""
    return ibis.schema({name: column.dtype.type for name, column in schema.columns.items()})


def tables_markdown() -> str:
    """docs/tables.md: every table, its grain, and its columns (`python -m exp_pipeline.schemas`)."""
    lines = [
        "# The tables",
        "",
        "Generated from the Pandera schemas in `exp_pipeline/schemas.py` (`.venv/bin/python -m "
        "exp_pipeline.schemas > docs/tables.md`; a test fails when this page is stale). All tables live in "
        "the warehouse (DuckDB: `warehouse/warehouse.duckdb` beside the registry file, schema `exp`); tables per experiment "
        "are partitioned by `experiment_id`. The assignment tables also carry the assignment properties "
        "the registry names (device_type, country, ...), after `assigned_at`. How the rows are computed: "
        "[data-model.md](data-model.md).",
        "",
        "| table | grain | what it holds |",
        "|---|---|---|",
        *(f"| [`{t.name}`](#{t.name}) | {t.grain} | {t.holds} |" for t in TABLES.values()),
    ]
    for table in TABLES.values():
        lines += ["", f"## {table.name}", "", f"Grain: {table.grain}. {table.holds[0].upper()}{table.holds[1:]}.", ""]
        lines += ["| column | type | null | meaning |", "|---|---|---|---|"]
        lines += [
            f"| `{name}` | {kind} | {'yes' if nullable else 'no'} | {text} |"
            for name, kind, nullable, text in table.columns()
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(tables_markdown(), end="")
