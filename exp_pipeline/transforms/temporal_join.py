"""The temporal join: each subject's events inside its windows, computed at query time from the
assignments and the event log (no variant column ever sits on the event log), for every
experiment of a run at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import Experiment, Metric
from exp_pipeline.vocabulary import whole_seconds

WINDOW_COLUMNS = ("experiment_id", "subject_id", "variant_id", "assigned_at", "event_at", "event_name", "value")


def metric_windows_frame(experiments: Sequence[tuple[Experiment, Sequence[Metric]]]) -> pd.DataFrame:
    """Per experiment and metric: the event it counts, how, its window after assignment and the
    experiment's CUPED pre-period, in whole seconds (the table the join and the values read)."""
    rows = [
        {
            "experiment_id": experiment.id,
            "metric": m.id,
            "event_name": m.event_name,
            "aggregation": m.aggregation,
            "start_seconds": whole_seconds(m.window_start_days),
            "end_seconds": whole_seconds(m.window_end_days),
            "pre_seconds": whole_seconds(experiment.cuped_pre_window_days),
        }
        for experiment, metrics in experiments
        for m in metrics
    ]
    columns = ["experiment_id", "metric", "event_name", "aggregation", "start_seconds", "end_seconds", "pre_seconds"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"start_seconds": "int64", "end_seconds": "int64", "pre_seconds": "int64"})


def events_in_span(events: ir.Table, experiments: Sequence[tuple[Experiment, Sequence[Metric]]]) -> ir.Table:
    """The events any of the experiments can use: from the earliest start minus its pre-period to
    the latest end plus the widest metric window (no upper bound while one is running). Literal
    bounds, so the engine skips whole files and row groups of a time-sorted log."""
    lower = min(e.start_at - dt.timedelta(seconds=whole_seconds(e.cuped_pre_window_days)) for e, _ in experiments)
    rows = events.filter(events.event_at >= lower)
    ends = [
        e.end_at + dt.timedelta(seconds=max(whole_seconds(m.window_end_days) for m in metrics))
        for e, metrics in experiments
        if e.end_at is not None and metrics
    ]
    if len(ends) == len(experiments):
        rows = rows.filter(rows.event_at < max(ends))
    return rows


def window_rows(assignments: ir.Table, events: ir.Table, windows: ir.Table) -> ir.Table:
    """The temporal join of every experiment at once: a subject's events from its experiment's
    pre-period before assignment (the CUPED covariate) to the end of the widest window of a metric
    on that event name. Split it with `post_assignment_rows` and `pre_assignment_rows`.

    `assignments`: analysable subjects of any number of experiments (experiment_id, subject_id,
    variant_id, assigned_at); `windows`: `metric_windows_frame` as a table. Window ends are
    exclusive; an event exactly at `assigned_at` is post-assignment. Exact duplicate events (logged
    twice) count once.
    """
    spans = windows.group_by("experiment_id", "event_name").aggregate(
        start_seconds=windows.start_seconds.min(),
        end_seconds=windows.end_seconds.max(),
        pre_seconds=windows.pre_seconds.max(),
    )
    # Window bounds per subject and event name, computed on the (small) assignment side: the filter
    # after the join compares timestamps instead of adding intervals to every matched event.
    subjects = assignments.select("experiment_id", "subject_id", "variant_id", "assigned_at").join(
        spans, "experiment_id"
    )
    subjects = subjects.select(
        "experiment_id", "subject_id", "variant_id", "assigned_at", "event_name",
        _pre_start=subjects.assigned_at - subjects.pre_seconds.as_interval("s"),
        _start=subjects.assigned_at + subjects.start_seconds.as_interval("s"),
        _end=subjects.assigned_at + subjects.end_seconds.as_interval("s"),
    )
    joined = subjects.join(events, ["subject_id", "event_name"])
    in_window = ((joined.event_at >= joined._pre_start) & (joined.event_at < joined.assigned_at)) | (
        (joined.event_at >= joined._start) & (joined.event_at < joined._end)
    )
    return joined.filter(in_window).select(*WINDOW_COLUMNS).distinct()


def post_assignment_rows(window_events: ir.Table) -> ir.Table:
    """The rows of `window_rows` at or after assignment: post_assignment_events."""
    return window_events.filter(window_events.event_at >= window_events.assigned_at)


def pre_assignment_rows(window_events: ir.Table) -> ir.Table:
    """The rows of `window_rows` before assignment: pre_assignment_events."""
    return window_events.filter(window_events.event_at < window_events.assigned_at)
