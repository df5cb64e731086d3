"""One experiment's analysis on a warehouse session: per-subject values (stored ones reused where
the refresh allows), caps, sufficient statistics in the engine, inference in Python, and one
partition write of variant_metrics with the values and their state."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.refresh import (
    SUBJECT_VALUES,
    SUBJECT_VALUES_STATE,
    WINDOW_EVENTS_STATE,
    engine_timestamp,
    one_state_row,
    period_values,
    state_frame,
    stored_values_state,
    subject_values_reuse,
)
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.results import srm_of, variant_metric_rows
from exp_pipeline.stats import SrmCause, SrmResult
from exp_pipeline.transforms.assignments import analysable_assignments, assignment_counts
from exp_pipeline.transforms.fixed_point import SumBound, read_bounds, value_bounds
from exp_pipeline.transforms.subject_values import cap_subject_values, sufficient_statistics
from exp_pipeline.warehouse.interface import WarehouseSession


def sum_bounds(session: WarehouseSession, table: ir.Table, by: str) -> dict[str, SumBound]:
    """The fixed-point bounds of `table`'s values per value of `by` (a small query)."""
    return read_bounds(session.to_pandas(value_bounds(table, by)), by)


@dataclass(frozen=True)
class ExperimentAnalysis:
    frame: pd.DataFrame  # the variant_metrics rows
    srm: SrmResult
    causes: list[SrmCause]  # the property values that explain an SRM, likeliest first
    rows: int  # variant_metrics rows written
    analysable_subjects: int
    subject_values: str  # full or incremental
    subjects_recomputed: dict[str, int]  # per period


def analyse_experiment(
    session: WarehouseSession, registry: Registry, experiment: Experiment, now: dt.datetime
) -> ExperimentAnalysis:
    """Compute and write the experiment's variant_metrics partition (with subject_metric_values
    and their state, in one partition write) from its assignments and window events."""
    metrics = registry.metrics_of(experiment)
    properties = registry.sources.assignments.properties
    periods = ["post", "pre"] if experiment.cuped_pre_window_days > 0 else ["post"]
    fingerprint = registry.subject_values_fingerprint(experiment)
    deduped = session.partition("deduped_assignments", experiment.id)
    assignments_as_of = engine_timestamp(session.scalar(deduped.valid_from.max()))
    assignments = session.temp_table(
        "tmp_metric_assignments",
        analysable_assignments(deduped).select(
            "experiment_id", "subject_id", "variant_id", "assigned_at", "valid_from", *properties
        ),
    )
    events_state = one_state_row(session, WINDOW_EVENTS_STATE, experiment.id)
    reuse = subject_values_reuse(
        stored_values_state(session, experiment.id), events_state, fingerprint,
        max(m.window_end_days for m in metrics),
    )
    values, recomputed = {}, {}
    for period in periods:
        values[period], recomputed[period] = period_values(
            session, assignments, period, experiment.id, metrics, reuse
        )
    # Caps are quantiles over the (materialized) values: cheap enough to compute in each query.
    capped = {p: cap_subject_values(v.drop("period"), metrics) for p, v in values.items()}
    post, pre = capped["post"], capped.get("pre")
    x_bounds = sum_bounds(session, pre, "metric") if pre is not None else None
    # Only these small tables leave the engine.
    sufficient = session.to_pandas(
        sufficient_statistics(post, pre, sum_bounds(session, post, "metric"), x_bounds)
    )
    counts = session.to_pandas(assignment_counts(assignments, properties))
    srm, causes = srm_of(counts, experiment)
    frame = variant_metric_rows(sufficient, experiment, metrics, srm)
    values_state = state_frame({
        "experiment_id": experiment.id,
        "fingerprint": fingerprint,
        "events_refreshed_at": events_state["refreshed_at"] if events_state else None,
        "events_assignments_as_of": events_state["assignments_as_of"] if events_state else None,
        "assignments_as_of": assignments_as_of,
        "computed_at": now,
        "mode": "full" if reuse is None else "incremental",
    })
    all_values = ibis.union(*values.values(), distinct=False)
    written = session.replace_partitions(
        experiment.id,
        {"variant_metrics": frame, SUBJECT_VALUES: all_values, SUBJECT_VALUES_STATE: values_state},
    )["variant_metrics"]
    subjects = int(counts.query("property == ''").n.sum())
    return ExperimentAnalysis(
        frame=frame, srm=srm, causes=causes, rows=written, analysable_subjects=subjects,
        subject_values="full" if reuse is None else "incremental", subjects_recomputed=recomputed,
    )
