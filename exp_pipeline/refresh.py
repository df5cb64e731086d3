"""The incremental refresh: what the last refresh recorded, and which rows and per-subject values a
refresh must recompute (the rest are kept). Planning is pure; the state rows are read and written
through a warehouse session.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline import sources
from exp_pipeline.registry import Experiment, Metric, Registry
from exp_pipeline.transforms import temporal_join
from exp_pipeline.transforms.assignments import analysable_assignments
from exp_pipeline.transforms.subject_values import subject_metric_values
from exp_pipeline.transforms.temporal_join import join_window_events
from exp_pipeline.vocabulary import whole_seconds
from exp_pipeline.warehouse.interface import PartitionRefresh, RefreshCounts, WarehouseSession

WINDOW_EVENTS_STATE = "window_events_state"
SUBJECT_VALUES = "subject_metric_values"
SUBJECT_VALUES_STATE = "subject_metric_values_state"
# period -> the events table its per-subject values come from
PERIOD_EVENTS = {"post": "post_assignment_events", "pre": "pre_assignment_events"}


def refresh_lower_bound(
    events_through: dt.datetime, lookback_days: float, earliest_new_assignment: dt.datetime | None,
    pre_window_days: float,
) -> tuple[dt.datetime, dt.datetime]:
    """(cutoff, scan_from) of an incremental refresh.

    Events at or after `cutoff` (the newest event already processed minus the late-arrival
    lookback) are recomputed for every subject. Subjects assigned or changed since the last
    refresh need their whole window, back to `scan_from`.
    """
    cutoff = events_through - dt.timedelta(seconds=whole_seconds(lookback_days))
    if earliest_new_assignment is None:
        return cutoff, cutoff
    window_start = earliest_new_assignment - dt.timedelta(seconds=whole_seconds(pre_window_days))
    return cutoff, min(cutoff, window_start)


def assignments_changed_since(deduped: ir.Table, as_of: dt.datetime) -> ir.Table:
    """Subjects whose assignment history changed after `as_of` (a row added, corrected, excluded
    or deactivated since): their stored window events are stale whatever their time. Every other
    stored row still belongs to its subject's current analysable assignment."""
    changed = deduped.filter((deduped.valid_from > as_of) | (deduped.valid_to > as_of))
    return changed.select("subject_id").distinct()


def history_reaches(earliest_valid_from: dt.datetime | None, assignments_as_of: dt.datetime | None) -> bool:
    """Whether the assignment history still holds rows from before the last refresh. A rebuilt
    history (the table or partition lost) holds none: stored window events of subjects no longer in
    it could not be found from it, and the refresh must start over."""
    return None not in (earliest_valid_from, assignments_as_of) and earliest_valid_from <= assignments_as_of


def next_events_through(
    newest_processed: dt.datetime | None, previous: dt.datetime | None, now: dt.datetime
) -> dt.datetime | None:
    """Where the next refresh starts from (less the lookback): the newest event processed so far,
    but never later than now. An event from a client with a wrong clock would otherwise move the
    start past days that have not arrived yet, and they would never be counted.
    """
    seen = [t for t in (newest_processed, previous) if t is not None]
    return min(max(seen), now) if seen else None


def refreshed_window_events(
    assignments: ir.Table, events: ir.Table, metrics: Sequence[Metric], pre_window_days: float,
    cutoff: dt.datetime, scan_from: dt.datetime,
) -> ir.Table:
    """The rows an incremental refresh inserts: every subject's window events at or after `cutoff`,
    and all window events of subjects flagged `is_new` (assigned or changed since the last refresh).

    `assignments` carries a boolean `is_new`; `events` may be the whole log: only events from
    `scan_from` on are read.
    """
    recent = events.filter(events.event_at >= scan_from)
    window = join_window_events(assignments, recent, metrics, pre_window_days)
    new_subjects = assignments.filter(assignments.is_new).select("subject_id")
    return window.filter(
        (window.event_at >= cutoff) | window.subject_id.isin(new_subjects.subject_id)
    )

class SubjectValuesReuse(NamedTuple):
    """Which stored per-subject values a run recomputes; every other analysable subject's are reused.

    Recomputed: subjects assigned after `post_assigned_after` (post-assignment values) or after
    `pre_assigned_after` (pre-period values), None meaning none by assignment time, and every
    subject whose assignment row changed after `changed_since`.
    """

    post_assigned_after: dt.datetime | None
    pre_assigned_after: dt.datetime | None
    changed_since: dt.datetime


def subject_values_reuse(
    stored: dict | None, events_state: dict | None, fingerprint: str, widest_window_days: float
) -> SubjectValuesReuse | None:
    """Whether the stored per-subject values can be partly reused, and which; None: recompute all.

    `stored` is what the last computation recorded (fingerprint, the window events'
    refreshed_at and assignments_as_of it read, its own assignments_as_of); `events_state` the
    window events' state now
    (refreshed_at, mode, refreshed_from, previous_refreshed_at). Reuse needs the same definitions
    (a subject's value depends on its own rows only, its fixed-point scale included), and at most
    one window-events refresh since, an incremental one: it rewrote only
    rows at or after its cutoff (`refreshed_from`) and the whole windows of changed subjects. A
    subject's post-assignment rows lie before assigned_at + the widest metric window, its
    pre-period rows before assigned_at: earlier subjects have no row at or after the cutoff.
    """
    if stored is None or events_state is None or None in (
        stored["assignments_as_of"], stored["events_assignments_as_of"]
    ):
        return None
    if stored["fingerprint"] != fingerprint:
        return None
    if events_state["refreshed_at"] == stored["events_refreshed_at"]:
        # No window events written since: only assignments may have changed.
        return SubjectValuesReuse(None, None, stored["assignments_as_of"])
    incremental_refresh_since = (
        events_state["mode"] == "incremental"
        and events_state["previous_refreshed_at"] == stored["events_refreshed_at"]
        and events_state["refreshed_from"] is not None
    )
    if not incremental_refresh_since:
        return None
    cutoff = events_state["refreshed_from"]
    return SubjectValuesReuse(
        post_assigned_after=cutoff - dt.timedelta(seconds=whole_seconds(widest_window_days)),
        pre_assigned_after=cutoff,
        # The refresh rewrote every subject changed after the assignments its window events had
        # seen, which can be earlier than those the stored values saw (deduped_assignments can
        # run between the two): a subject changed in between was valued on its old rows.
        changed_since=min(stored["assignments_as_of"], stored["events_assignments_as_of"]),
    )


def recomputed_subjects(assignments: ir.Table, assigned_after: dt.datetime | None, changed_since: dt.datetime):
    """The filter of `SubjectValuesReuse` on an assignments table (with valid_from)."""
    changed = assignments.valid_from > changed_since
    if assigned_after is not None:
        changed |= assignments.assigned_at > assigned_after
    return changed


# -- per-subject values -------------------------------------------------------------------------


def period_values(
    session: WarehouseSession, assignments: ibis.Table, period: str, experiment_id: str, metrics,
    reuse: SubjectValuesReuse | None,
) -> tuple[ibis.Table, int]:
    """Uncapped per-(subject, metric) values of one period, materialized, and how many subjects
    were computed from their events (the others' stored values are reused)."""
    events = session.partition(PERIOD_EVENTS[period], experiment_id)
    windows = period == "post"  # pre-assignment events are already cut to the covariate window
    if reuse is None:
        values = subject_metric_values(
            assignments, events, metrics, apply_metric_windows=windows
        )
        table = session.temp_table(f"tmp_{period}_values", values.mutate(period=ibis.literal(period)))
        return table, session.count(assignments)
    assigned_after = reuse.post_assigned_after if period == "post" else reuse.pre_assigned_after
    recompute = recomputed_subjects(assignments, assigned_after, reuse.changed_since)
    changed = session.temp_table(f"tmp_{period}_recomputed", assignments.filter(recompute))
    reassigned = changed.filter(changed.valid_from > reuse.changed_since)
    # Rows carry their subject's assigned_at: most recomputed subjects are found by it, the few
    # whose assignment changed by id.
    of_changed = events.subject_id.isin(reassigned.subject_id)
    if assigned_after is not None:
        of_changed |= events.assigned_at > assigned_after
    fresh = subject_metric_values(
        changed, events.filter(of_changed), metrics, apply_metric_windows=windows
    )
    stored = session.partition(SUBJECT_VALUES, experiment_id)
    stored = stored.filter(stored.period == period)
    unchanged = assignments.filter(~recompute).select("subject_id", "variant_id")
    kept = stored.join(unchanged, ["subject_id", "variant_id"]).select(
        "experiment_id", "subject_id", "variant_id", "metric", "value"
    )
    values = ibis.union(kept, fresh.select(*kept.columns), distinct=False)
    table = session.temp_table(f"tmp_{period}_values", values.mutate(period=ibis.literal(period)))
    return table, session.count(changed)


# -- the window events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowEventsWrite:
    """What a refresh of an experiment's window events wrote."""

    rows: dict[str, int]  # per events table: its rows in the partition after the write
    refreshed_from: dt.datetime | None  # the cutoff of an incremental refresh; None: recomputed in full
    refreshed: dict[str, RefreshCounts] | None  # incremental: rows deleted and inserted per table

    @property
    def mode(self) -> str:
        return "full" if self.refreshed_from is None else "incremental"


def write_window_events(
    session: WarehouseSession, registry: Registry, experiment: Experiment, full_refresh: bool, now: dt.datetime,
    event_rows_read: int,
) -> WindowEventsWrite:
    """Join the experiment's analysable subjects with the event log (one temporal join for both
    periods) and write post_assignment_events, pre_assignment_events and the refresh state in one
    partition write: incrementally on top of the last refresh when it can, else in full.
    `event_rows_read` (the log's rows now) is kept in the state for the next run to compare."""
    metrics = registry.metrics_of(experiment)
    pre_window = experiment.cuped_pre_window_days
    fingerprint = registry.window_events_fingerprint(experiment)
    deduped = session.partition("deduped_assignments", experiment.id)
    assignments_as_of = engine_timestamp(session.scalar(deduped.valid_from.max()))
    state = None if full_refresh else window_events_state(session, experiment.id, fingerprint)
    if state is not None and not history_reaches(
        engine_timestamp(session.scalar(deduped.valid_from.min())), state["assignments_as_of"]
    ):
        state = None
    analysable = analysable_assignments(deduped)
    analysable = analysable.mutate(
        is_new=ibis.literal(True) if state is None else analysable.valid_from > state["assignments_as_of"]
    )
    # Small (one row per subject); materialized so every query below sees the same subjects.
    analysable = session.temp_table("tmp_analysable", analysable)
    events = temporal_join.experiment_events(sources.usable_events(session, registry, experiment), experiment, metrics, pre_window)
    incremental = state is not None
    if incremental:
        earliest_new = session.scalar(analysable.filter(analysable.is_new).assigned_at.min())
        cutoff, scan_from = refresh_lower_bound(
            state["events_through"], registry.sources.events.late_arrival_days, engine_timestamp(earliest_new), pre_window
        )
        rows = refreshed_window_events(analysable, events, metrics, pre_window, cutoff, scan_from)
    else:
        rows = temporal_join.join_window_events(analysable, events, metrics, pre_window)
    rows = session.temp_table("tmp_window_events", rows)
    events_through = next_events_through(
        engine_timestamp(session.scalar(rows.event_at.max())), state and state["events_through"], now
    )
    new_state = state_frame({
        "experiment_id": experiment.id,
        "fingerprint": fingerprint,
        "events_through": events_through,
        "assignments_as_of": assignments_as_of,
        "refreshed_at": now,
        "mode": "incremental" if incremental else "full",
        # What variant_metrics needs to reuse per-subject values: the rows this refresh
        # rewrote are those at or after refreshed_from, on top of the refresh before it.
        "refreshed_from": cutoff if incremental else None,
        "previous_refreshed_at": state["refreshed_at"] if incremental else None,
        "event_rows_read": event_rows_read,
    })
    tables = {
        "post_assignment_events": temporal_join.post_assignment_rows(rows),
        "pre_assignment_events": temporal_join.pre_assignment_rows(rows),
    }
    if incremental:
        stale = session.temp_table(
            "tmp_stale_subjects", assignments_changed_since(deduped, state["assignments_as_of"])
        )
        refreshed = session.refresh_partitions(
            experiment.id,
            {
                name: PartitionRefresh(rows=expr, stale_from=("event_at", cutoff), stale_subjects=stale)
                for name, expr in tables.items()
            },
            replace={WINDOW_EVENTS_STATE: new_state},
        )
        written = {name: counts.rows for name, counts in refreshed.items()}
    else:
        written = session.replace_partitions(experiment.id, {**tables, WINDOW_EVENTS_STATE: new_state})
    return WindowEventsWrite(
        rows={name: written[name] for name in tables},
        refreshed_from=cutoff if incremental else None,
        refreshed=refreshed if incremental else None,
    )


# -- state rows ----------------------------------------------------------------------------------


def window_events_state(session: WarehouseSession, experiment_id: str, fingerprint: str) -> dict | None:
    """What the last refresh of this experiment's window events recorded, when an incremental
    refresh can build on it: same registry definition, tables present, some event seen."""
    if not all(session.has_table(t) for t in ("post_assignment_events", "pre_assignment_events")):
        return None
    state = one_state_row(session, WINDOW_EVENTS_STATE, experiment_id)
    if state is None or state["fingerprint"] != fingerprint or state["events_through"] is None:
        return None
    return state


def stored_values_state(session: WarehouseSession, experiment_id: str) -> dict | None:
    """What the last computation of the per-subject values recorded."""
    state = one_state_row(session, SUBJECT_VALUES_STATE, experiment_id)
    if state is None or not session.has_table(SUBJECT_VALUES):
        return None
    return state


def one_state_row(session: WarehouseSession, table: str, experiment_id: str) -> dict | None:
    """An experiment's row of a state table as a dict (timestamps as datetimes, null as None);
    None unless there is exactly one."""
    if not session.has_table(table):
        return None
    rows = session.to_pandas(session.partition(table, experiment_id))
    if len(rows) != 1:
        return None
    return {
        column: engine_timestamp(value) if isinstance(value, (pd.Timestamp, type(pd.NaT))) else value
        for column, value in rows.iloc[0].items()
    }


def state_frame(row: dict) -> pd.DataFrame:
    """A one-row state frame; datetime and None values as UTC timestamp columns."""
    frame = pd.DataFrame([row])
    for column, value in row.items():
        if value is None or isinstance(value, dt.datetime):
            frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def engine_timestamp(value) -> dt.datetime | None:
    """A timestamp from the engine as a datetime; None for null (NaT)."""
    return None if pd.isna(value) else pd.Timestamp(value).to_pydatetime()
