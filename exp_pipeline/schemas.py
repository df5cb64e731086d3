"""Pandera schemas of every table, validated inside the engine with pandera.ibis.

Schemas depend on the experiment (its variants and window), so they are built per experiment.
pandera.ibis ignores Column(unique=True): uniqueness is declared at schema level.
"""

from __future__ import annotations

from dataclasses import dataclass

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir
import pandera.ibis as pa
from pandera.api.base.checks import CheckResult
from pandera.api.checks import Check
from pandera.backends.ibis.checks import IbisCheckBackend
from pandera.backends.ibis.register import register_ibis_backends
from pandera.config import CONFIG
from pandera.constants import CHECK_OUTPUT_KEY
from pandera.errors import SchemaErrors

from exp_pipeline.registry import Experiment
from exp_pipeline.transforms import MULTIPLE_VARIANTS, UTC_TIMESTAMP, trim_whitespace

STRING = dt.String()
BOOLEAN = dt.Boolean()
INT64 = dt.Int64()
FLOAT64 = dt.Float64()


def _non_empty(data) -> ir.BooleanColumn:
    column = data.table[data.key]
    return trim_whitespace(column).length() > 0


def _experiment_column(experiment: Experiment) -> pa.Column:
    return pa.Column(STRING, pa.Check.equal_to(experiment.id), nullable=False)


def _inside_window(experiment: Experiment) -> pa.Check:
    def check(data) -> ir.BooleanColumn:
        column = data.table[data.key]
        inside = column >= ibis.literal(experiment.start_at, type=UTC_TIMESTAMP)
        if experiment.end_at is not None:
            inside &= column < ibis.literal(experiment.end_at, type=UTC_TIMESTAMP)
        return inside

    return pa.Check(check, name="inside_experiment_window")


def _variants(experiment: Experiment) -> pa.Check:
    return pa.Check.isin([v.id for v in experiment.variants])


def raw_assignments_schema(experiment: Experiment, properties: list[str]) -> pa.DataFrameSchema:
    # Unusable rows were set aside at ingestion (rejected_rows); exposures outside the window are
    # valid log rows, excluded later by the assignment rules.
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "subject_id": pa.Column(STRING, pa.Check(_non_empty, name="non_empty"), nullable=False),
            "variant_id": pa.Column(STRING, _variants(experiment), nullable=False),
            "assigned_at": pa.Column(UTC_TIMESTAMP, nullable=False),
            **{p: pa.Column(STRING, nullable=True) for p in properties},
            "source_file": pa.Column(STRING, nullable=False),
        },
        strict=True,
        name="raw_assignments",
    )


def deduped_assignments_schema(experiment: Experiment, properties: list[str]) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "subject_id": pa.Column(STRING, pa.Check(_non_empty, name="non_empty"), nullable=False),
            "variant_id": pa.Column(STRING, _variants(experiment), nullable=False),
            "assigned_at": pa.Column(UTC_TIMESTAMP, _inside_window(experiment), nullable=False),
            **{p: pa.Column(STRING, nullable=True) for p in properties},
            "n_exposures": pa.Column(INT64, pa.Check.ge(1), nullable=False),
            "n_variants_seen": pa.Column(INT64, pa.Check.ge(1), nullable=False),
            "exclusion_reason": pa.Column(STRING, pa.Check.isin([MULTIPLE_VARIANTS]), nullable=True),
            "is_active": pa.Column(BOOLEAN, nullable=False),
            "valid_from": pa.Column(UTC_TIMESTAMP, nullable=False),
            "valid_to": pa.Column(UTC_TIMESTAMP, nullable=True),
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


def _event_columns(experiment: Experiment) -> dict[str, pa.Column]:
    return {
        "experiment_id": _experiment_column(experiment),
        "subject_id": pa.Column(STRING, nullable=False),
        "variant_id": pa.Column(STRING, _variants(experiment), nullable=False),
        "assigned_at": pa.Column(UTC_TIMESTAMP, nullable=False),
        "event_at": pa.Column(UTC_TIMESTAMP, nullable=False),
        "event_name": pa.Column(STRING, nullable=False),
        "value": pa.Column(FLOAT64, nullable=True),
    }


def post_assignment_events_schema(experiment: Experiment) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        _event_columns(experiment),
        checks=[pa.Check(lambda d: d.table.event_at >= d.table.assigned_at, name="event_at_not_before_assigned_at")],
        strict=True,
        name="post_assignment_events",
    )


def pre_assignment_events_schema(experiment: Experiment) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        _event_columns(experiment),
        checks=[pa.Check(lambda d: d.table.event_at < d.table.assigned_at, name="event_at_before_assigned_at")],
        strict=True,
        name="pre_assignment_events",
    )


def _probability(name: str) -> pa.Column:
    return pa.Column(FLOAT64, pa.Check.in_range(0, 1), nullable=True, name=name)


def variant_metrics_schema(experiment: Experiment, metric_ids: list[str]) -> pa.DataFrameSchema:
    floats = [
        "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy", "mean", "std", "abs_lift", "abs_lift_ci_low",
        "abs_lift_ci_high", "rel_lift", "ci_low", "ci_high", "df", "cuped_theta", "cuped_rel_lift",
        "cuped_ci_low", "cuped_ci_high", "cuped_variance_reduction", "expected_share",
    ]
    probabilities = ["p_value", "p_value_holm", "cuped_p_value", "cuped_p_value_holm", "srm_p_value"]
    return pa.DataFrameSchema(
        {
            "experiment_id": _experiment_column(experiment),
            "variant_id": pa.Column(STRING, _variants(experiment), nullable=False),
            "metric": pa.Column(STRING, pa.Check.isin(metric_ids), nullable=False),
            "is_control": pa.Column(BOOLEAN, nullable=False),
            "aggregation": pa.Column(STRING, pa.Check.isin(["sum", "count", "conversion"])),
            "n": pa.Column(INT64, pa.Check.ge(0), nullable=False),
            **{c: pa.Column(FLOAT64, nullable=True) for c in floats},
            **{c: _probability(c) for c in probabilities},
            "srm_flagged": pa.Column(BOOLEAN, nullable=False),
        },
        unique=["experiment_id", "variant_id", "metric"],
        strict=True,
        name="variant_metrics",
    )


@dataclass(frozen=True)
class ValidationOutcome:
    passed: bool
    failures: list[dict]  # one per failed check: schema, column, check, error (truncated)

    @property
    def failed_checks(self) -> list[str]:
        return sorted({f"{f['column']}: {f['check']}" for f in self.failures})


MAX_ERROR_CHARS = 300
# Rows of a failing check that come back to Python to be reported (pandera would fetch them all,
# and its per-row verdicts besides: a billion-row table on Spark's driver).
MAX_FAILURE_ROWS = 100


class BoundedIbisCheckBackend(IbisCheckBackend):
    """pandera.ibis's check backend with what a failed check fetches capped at MAX_FAILURE_ROWS.

    Pass or fail is still decided over every row, in the engine; only the failure cases and the
    per-row verdicts pandera reads back are limited to failing rows, at most MAX_FAILURE_ROWS.
    """

    def postprocess(self, check_obj, check_output) -> CheckResult:
        result = super().postprocess(check_obj, check_output)
        verdicts = result.check_output
        if isinstance(verdicts, ir.BooleanColumn):
            verdicts = check_obj.table.select(verdicts.name(CHECK_OUTPUT_KEY))
        if isinstance(verdicts, ir.Table) and CHECK_OUTPUT_KEY in verdicts.columns:
            verdicts = verdicts.filter(~verdicts[CHECK_OUTPUT_KEY].fill_null(False)).limit(MAX_FAILURE_ROWS)
        failures = result.failure_cases
        if isinstance(failures, ir.Table):
            failures = failures.limit(MAX_FAILURE_ROWS)
        return CheckResult(
            check_output=verdicts,
            check_passed=result.check_passed,
            checked_object=result.checked_object,
            failure_cases=failures,
        )


def _bound_what_failures_fetch() -> None:
    # pandera registers its backends once (cached) with these arguments; ours replace its checks'.
    register_ibis_backends(use_narwhals_backend=CONFIG.use_narwhals_backend)
    Check.register_backend(ibis.Table, BoundedIbisCheckBackend, force=True)
    Check.register_backend(ibis.Column, BoundedIbisCheckBackend, force=True)


def validate(schema: pa.DataFrameSchema, table: ir.Table) -> ValidationOutcome:
    """Run every check of `schema` in the engine; collect failures instead of raising."""
    _bound_what_failures_fetch()
    try:
        schema.validate(table, lazy=True)
    except SchemaErrors as exc:
        failures = []
        for category in exc.message.values():
            for items in category.values():
                for item in items:
                    failures.append(
                        {
                            "schema": item.get("schema"),
                            "column": item.get("column"),
                            "check": item.get("check"),
                            "error": str(item.get("error"))[:MAX_ERROR_CHARS],
                        }
                    )
        return ValidationOutcome(passed=False, failures=failures)
    return ValidationOutcome(passed=True, failures=[])


# Column documentation shown in the Dagster UI (the schemas above enforce; these explain).
# Assignment properties named in the registry (device_type, country, ...) come after assigned_at.
COLUMN_DOCS: dict[str, list[tuple[str, str, str]]] = {
    "raw_assignments": [
        ("experiment_id", "string", "experiment (the partition)"),
        ("subject_id", "string", "randomization unit, a user by default"),
        ("variant_id", "string", "variant the subject was exposed to"),
        ("assigned_at", "timestamp UTC", "exposure time"),
        ("source_file", "string", "file (or table) the row was read from"),
    ],
    "deduped_assignments": [
        ("experiment_id", "string", "experiment (the partition)"),
        ("subject_id", "string", "unique per experiment among active rows"),
        ("variant_id", "string", "variant of the first exposure"),
        ("assigned_at", "timestamp UTC", "first exposure inside the experiment window"),
        ("n_exposures", "int64", "usable exposure rows of the subject"),
        ("n_variants_seen", "int64", "distinct variants in those rows"),
        ("exclusion_reason", "string", "'multiple_variants' when excluded from analysis, else null"),
        ("is_active", "boolean", "false for rows superseded by a correction"),
        ("valid_from", "timestamp UTC", "when this row became the subject's assignment"),
        ("valid_to", "timestamp UTC", "when a correction superseded it (null while active)"),
    ],
    "post_assignment_events": [
        ("experiment_id", "string", "experiment (the partition)"),
        ("subject_id", "string", "analysable subject"),
        ("variant_id", "string", "the subject's variant"),
        ("assigned_at", "timestamp UTC", "the subject's assignment"),
        ("event_at", "timestamp UTC", "event time, assigned_at <= event_at < end of the widest window"),
        ("event_name", "string", "event name (only those used by the experiment's metrics)"),
        ("value", "float64", "event value (null when the log has none)"),
    ],
    "pre_assignment_events": [
        ("experiment_id", "string", "experiment (the partition)"),
        ("subject_id", "string", "analysable subject"),
        ("variant_id", "string", "the subject's variant"),
        ("assigned_at", "timestamp UTC", "the subject's assignment"),
        ("event_at", "timestamp UTC", "event time in [assigned_at - pre window, assigned_at)"),
        ("event_name", "string", "event name"),
        ("value", "float64", "event value"),
    ],
    "variant_metrics": [
        ("experiment_id", "string", "experiment (the partition)"),
        ("variant_id", "string", "variant"),
        ("metric", "string", "metric id from the registry"),
        ("is_control", "boolean", "the control of the experiment"),
        ("n", "int64", "analysable subjects"),
        ("sum_y, sum_y2", "float64", "sufficient statistics of the per-subject metric value"),
        ("sum_x, sum_x2, sum_xy", "float64", "same for the pre-period covariate (CUPED)"),
        ("mean, std", "float64", "per-subject mean and standard deviation"),
        ("rel_lift, ci_low, ci_high", "float64", "relative lift vs control and its 95% CI (delta method, Welch df)"),
        ("p_value, p_value_holm", "float64", "two-sided p-value and Holm-adjusted across the experiment"),
        ("abs_lift, abs_lift_ci_low, abs_lift_ci_high", "float64", "difference in means and its Welch CI"),
        ("cuped_*", "float64", "the same, CUPED-adjusted, with theta and the variance reduction"),
        ("expected_share, srm_p_value, srm_flagged", "mixed", "configured weight and the SRM verdict"),
    ],
}
