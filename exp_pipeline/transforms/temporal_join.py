"""The temporal join: each subject's events inside its windows, computed at query time from the
assignments and the event log (no variant column ever sits on the event log).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import Experiment, Metric
from exp_pipeline.vocabulary import whole_seconds


def metric_windows(metrics: Sequence[Metric]) -> ir.Table:
    """Small in-engine table of the metric definitions the per-subject computation joins on."""
    frame = pd.DataFrame(
        {
            "metric": [m.id for m in metrics],
            "event_name": [m.event_name for m in metrics],
            "aggregation": [m.aggregation for m in metrics],
            "start_seconds": [whole_seconds(m.window_start_days) for m in metrics],
            "end_seconds": [whole_seconds(m.window_end_days) for m in metrics],
        }
    )
    return ibis.memtable(frame)


def experiment_events(
    events: ir.Table, experiment: Experiment, metrics: Sequence[Metric], pre_window_days: float
) -> ir.Table:
    """The events an experiment can use at all: from its start minus the pre-assignment window to
    its end plus the widest metric window. Literal bounds, so the engine skips whole files and row
    groups of a time-sorted log instead of joining every event ever logged.
    """
    lower = experiment.start_at - dt.timedelta(seconds=whole_seconds(pre_window_days))
    rows = events.filter(events.event_at >= lower)
    if experiment.end_at is not None and metrics:
        widest = max(whole_seconds(m.window_end_days) for m in metrics)
        rows = rows.filter(rows.event_at < experiment.end_at + dt.timedelta(seconds=widest))
    return rows


def join_window_events(
    assignments: ir.Table, events: ir.Table, metrics: Sequence[Metric], pre_window_days: float
) -> ir.Table:
    """The temporal join, one pass for both periods: a subject's events from `pre_window_days`
    before its assignment (the CUPED covariate period) to the end of the widest window of a metric
    on that event name. Split it with `post_assignment_rows` and `pre_assignment_rows`.

    Window ends are exclusive; an event exactly at `assigned_at` is post-assignment. Exact duplicate
    events (logged twice) count once.
    """
    # Window bounds per subject, computed once on the (small) assignment side: the filter after the
    # join then compares timestamps instead of adding intervals to every matched event.
    bounds = {"_pre_start": assignments.assigned_at - ibis.interval(seconds=whole_seconds(pre_window_days))}
    names = sorted({m.event_name for m in metrics})
    for i, event_name in enumerate(names):
        of_name = [m for m in metrics if m.event_name == event_name]
        start = min(whole_seconds(m.window_start_days) for m in of_name)
        end = max(whole_seconds(m.window_end_days) for m in of_name)
        bounds[f"_start{i}"] = assignments.assigned_at + ibis.interval(seconds=start)
        bounds[f"_end{i}"] = assignments.assigned_at + ibis.interval(seconds=end)
    subjects = assignments.select("experiment_id", "subject_id", "variant_id", "assigned_at", **bounds)
    joined = subjects.join(events, "subject_id")
    in_window = (joined.event_at >= joined._pre_start) & (joined.event_at < joined.assigned_at)
    for i, event_name in enumerate(names):
        in_window |= (
            (joined.event_name == event_name)
            & (joined.event_at >= joined[f"_start{i}"])
            & (joined.event_at < joined[f"_end{i}"])
        )
    return joined.filter(in_window).select(
        "experiment_id", "subject_id", "variant_id", "assigned_at", "event_at", "event_name", "value"
    ).distinct()


def post_assignment_rows(window_events: ir.Table) -> ir.Table:
    """The rows of `join_window_events` at or after assignment: post_assignment_events."""
    return window_events.filter(window_events.event_at >= window_events.assigned_at)


def pre_assignment_rows(window_events: ir.Table) -> ir.Table:
    """The rows of `join_window_events` before assignment: pre_assignment_events."""
    return window_events.filter(window_events.event_at < window_events.assigned_at)

