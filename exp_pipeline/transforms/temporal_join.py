"""The temporal join: each subject's events inside its windows, computed at query time from the
assignments and the event log (no variant column ever sits on the event log), for every
experiment of a run at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import SUBJECT, Experiment, Metric
from exp_pipeline.transforms.fixed_point import FIXED_POINT, exact_terms
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
            "entity": m.entity,
        }
        for experiment, metrics in experiments
        for m in metrics
    ]
    columns = ["experiment_id", "metric", "event_name", "aggregation", "start_seconds", "end_seconds", "pre_seconds", "entity"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"start_seconds": "int64", "end_seconds": "int64", "pre_seconds": "int64"})


def experiment_span(experiment: Experiment, metrics: Sequence[Metric]) -> tuple[dt.datetime, dt.datetime | None]:
    """The event times an experiment can use: [its start minus its pre-period, its end plus its
    widest metric window); no upper bound while it runs."""
    lower = experiment.start_at - dt.timedelta(seconds=whole_seconds(experiment.cuped_pre_window_days))
    if experiment.end_at is None or not metrics:
        return lower, None
    return lower, experiment.end_at + dt.timedelta(seconds=max(whole_seconds(m.window_end_days) for m in metrics))


def events_in_span(events: ir.Table, experiments: Sequence[tuple[Experiment, Sequence[Metric]]]) -> ir.Table:
    """The events any of the experiments can use (the union of their `experiment_span`s). Literal
    bounds, so the engine skips whole files and row groups of a time-sorted log."""
    spans = [experiment_span(e, metrics) for e, metrics in experiments]
    rows = events.filter(events.event_at >= min(lower for lower, _ in spans))
    if all(upper is not None for _, upper in spans):
        rows = rows.filter(rows.event_at < max(upper for _, upper in spans))
    return rows


def _keyed_sides(sides: ir.Table, id_map: ir.Table | None) -> ir.Table:
    """`sides` (subjects joined with their spans, which name an `entity`) with `_key`, the value
    their events are keyed by: the subject_id for the subject's own events, and for a secondary
    id every value of it the subject owns in its experiment (`subject_id_map`), so an ID's events
    reach only the subject first seen with it."""
    own = sides.filter(sides.entity == SUBJECT).mutate(_key=sides.subject_id)
    if id_map is None:
        return own
    owned = id_map.select("experiment_id", "subject_id", entity="id_name", _key="secondary_id")
    return ibis.union(own, sides.join(owned, ["experiment_id", "subject_id", "entity"]), distinct=False)


def _join_events(sides: ir.Table, events: ir.Table) -> ir.Table:
    """Each keyed side row with the events of its key and event name."""
    return sides.join(events, [sides._key == events.subject_id, sides.event_name == events.event_name])


def window_rows(assignments: ir.Table, events: ir.Table, windows: ir.Table, id_map: ir.Table | None = None) -> ir.Table:
    """The temporal join of every experiment at once: a subject's events from its experiment's
    pre-period before assignment (the CUPED covariate) to the end of the widest window of a metric
    on that event name. Split it with `post_assignment_rows` and `pre_assignment_rows`.

    `assignments`: analysable subjects of any number of experiments (experiment_id, subject_id,
    variant_id, assigned_at); `windows`: `metric_windows_frame` as a table; `id_map`:
    subject_id_map, for metrics keyed by a secondary id. Window ends are exclusive; an event
    exactly at `assigned_at` is post-assignment. Exact duplicate events (logged twice) count once.
    """
    spans = windows.group_by("experiment_id", "event_name", "entity").aggregate(
        start_seconds=windows.start_seconds.min(),
        end_seconds=windows.end_seconds.max(),
        pre_seconds=windows.pre_seconds.max(),
    )
    # Window bounds per subject and event name, computed on the (small) assignment side: the filter
    # after the join compares timestamps instead of adding intervals to every matched event.
    subjects = assignments.select("experiment_id", "subject_id", "variant_id", "assigned_at").join(
        spans, "experiment_id"
    )
    subjects = _keyed_sides(subjects.select(
        "experiment_id", "subject_id", "variant_id", "assigned_at", "event_name", "entity",
        _low=subjects.assigned_at - subjects.pre_seconds.as_interval("s"),
        _start=subjects.assigned_at + subjects.start_seconds.as_interval("s"),
        _end=subjects.assigned_at + subjects.end_seconds.as_interval("s"),
    ), id_map)
    joined = _join_events(subjects, events)
    return joined.filter(_in_windows(joined)).select(*WINDOW_COLUMNS).distinct()


def _in_windows(joined: ir.Table) -> ir.BooleanValue:
    """The window rule on the joined rows: the pre-period [_low, assigned_at) or the reach
    [_start, _end). As one range less the gap between them (the registry guarantees
    _low <= assigned_at <= _start < _end): cheaper than two ranges on every candidate row."""
    at = joined.event_at
    return (at >= joined._low) & (at < joined._end) & ((at < joined.assigned_at) | (at >= joined._start))


def post_assignment_rows(window_events: ir.Table) -> ir.Table:
    """The rows of `window_rows` at or after assignment: post_assignment_events."""
    return window_events.filter(window_events.event_at >= window_events.assigned_at)


def pre_assignment_rows(window_events: ir.Table) -> ir.Table:
    """The rows of `window_rows` before assignment: pre_assignment_events."""
    return window_events.filter(window_events.event_at < window_events.assigned_at)


# -- the run's join, aggregated: per subject, event name and window segment -------------------------

SPAN_COLUMNS = ("span", "experiment_id", "event_name", "entity", "pre_seconds", "start_seconds", "end_seconds")
SEGMENT_KEY = ("unit", "span", "segment")
# A subject's settled events (the incremental refresh) end here: only later ones are joined.
FRESH_FROM = "_fresh_from"
# Where a subject's settled sums are stored: the batch and unit of the run that first settled it.
SETTLED_BATCH, SETTLED_UNIT = "_settled_batch", "_settled_unit"
SEGMENT_TOTALS = ("n_events", "n_before_assignment", "sum_value_fixed")


class WindowSegments(NamedTuple):
    spans: pd.DataFrame  # SPAN_COLUMNS and bound_1..bound_K
    segments: pd.DataFrame  # span, segment, period: every segment of every span
    coverage: pd.DataFrame  # span, segment, metric, period: the segments of each metric's windows


def window_segments(windows: pd.DataFrame) -> WindowSegments:
    """The windows of every (experiment, event name) cut into segments for the aggregated join.

    `windows`: `metric_windows_frame`. A span is one experiment's event name: its pre-period
    [-pre, 0) and its post-assignment reach [earliest start, latest end) (offsets in seconds from
    assignment). The offsets where any of its metrics' windows begins or ends cut it into
    segments; every metric window is a union of whole segments, so summing a subject's events per
    segment once gives every metric of the name (a segment inside no metric's window is still in
    post_assignment_events, and counted there).

    Returns `spans` (SPAN_COLUMNS, and `bound_1..bound_K`: each span's inner cut offsets, padded
    with its end; a row's segment is how many of them it reaches), every segment's period (`pre`
    before assignment), and `coverage`: which segments make up each metric's post window, and its
    pre-period.
    """
    spans, segments, coverage = [], [], []
    keyed = windows.sort_values(["experiment_id", "event_name", "entity", "metric"])
    groups = keyed.groupby(["experiment_id", "event_name", "entity"], sort=True)
    for span, ((experiment_id, event_name, entity), group) in enumerate(groups):
        pre = int(group.pre_seconds.max())
        start, end = int(group.start_seconds.min()), int(group.end_seconds.max())
        cuts = sorted({-pre, 0, *map(int, group.start_seconds), *map(int, group.end_seconds)})
        spans.append({
            "span": span, "experiment_id": experiment_id, "event_name": event_name, "entity": entity,
            "pre_seconds": pre, "start_seconds": start, "end_seconds": end, "inner": cuts[1:-1],
        })
        for segment, (low, high) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            segments.append((span, segment, "pre" if high <= 0 and pre else "post"))
            for m in group.itertuples(index=False):
                if high <= 0 and pre:
                    coverage.append((span, segment, m.metric, "pre"))
                elif low >= m.start_seconds and high <= m.end_seconds:
                    coverage.append((span, segment, m.metric, "post"))
    width = max((len(s["inner"]) for s in spans), default=0)
    for s in spans:
        inner = s.pop("inner")
        s.update({f"bound_{k + 1}": (inner[k] if k < len(inner) else s["end_seconds"]) for k in range(width)})
    columns = [*SPAN_COLUMNS, *(f"bound_{k + 1}" for k in range(width))]
    spans_frame = pd.DataFrame(spans, columns=columns).astype(
        {c: "int64" for c in columns if c not in ("experiment_id", "event_name", "entity")}
    )
    keys = {"span": "int64", "segment": "int64"}
    return WindowSegments(
        spans_frame,
        pd.DataFrame(segments, columns=["span", "segment", "period"]).astype(keys),
        pd.DataFrame(coverage, columns=["span", "segment", "metric", "period"]).astype(keys),
    )


def numbered_subjects(subjects: ir.Table) -> ir.Table:
    """`subjects` with `unit`, an integer key per (experiment, subject): the aggregated join
    deduplicates and groups on integers, not on the ids' text."""
    return subjects.mutate(unit=ibis.row_number().over(order_by=[subjects.experiment_id, subjects.subject_id]))


def subject_spans(subjects: ir.Table, spans: ir.Table, id_map: ir.Table | None = None) -> ir.Table:
    """The build side of the run's join: per subject and span, the span's bounds as timestamps,
    and `_key`, what its events are keyed by (`_keyed_sides`: per owned value of a secondary id).

    `subjects`: analysable subjects of every experiment (experiment_id, subject_id, variant_id,
    assigned_at) with their `unit` (`numbered_subjects`), and FRESH_FROM if some have settled
    events (`segment_rows` then joins only their later ones); `spans`: `window_segments(...).spans`.
    Materialize it before `segment_rows`: computed inside the join query, the engine moves the
    interval arithmetic after the join, to every matched event.
    """
    bounds = [c for c in spans.columns if c.startswith("bound_")]
    sides = subjects.join(spans, "experiment_id")
    at = sides.assigned_at
    pre_start = at - sides.pre_seconds.as_interval("s")
    fresh = [FRESH_FROM] if FRESH_FROM in subjects.columns else []
    # The lowest event time joined: the pre-period's start, or a settled subject's watermark if later.
    low = ibis.greatest(pre_start, sides[FRESH_FROM].fill_null(pre_start)) if fresh else pre_start
    return _keyed_sides(sides.select(
        "unit", "span", "experiment_id", "subject_id", "variant_id", "assigned_at", "event_name", "entity", *fresh,
        _pre_start=pre_start,
        _low=low,
        _start=at + sides.start_seconds.as_interval("s"),
        _end=at + sides.end_seconds.as_interval("s"),
        **{f"_{b}": at + sides[b].as_interval("s") for b in bounds},
    ), id_map)


def with_every_event(sides: ir.Table) -> ir.Table:
    """`subject_spans` without the settled watermarks: `segment_rows` of it joins every event of
    the windows (the whole join, as post/pre_assignment_events hold it)."""
    return sides.drop(FRESH_FROM).mutate(_low=sides._pre_start) if FRESH_FROM in sides.columns else sides


def segment_rows(sides: ir.Table, events: ir.Table) -> ir.Table:
    """The run's temporal join: each subject's events inside its spans' windows (`window_rows`'
    rules), with WINDOW_COLUMNS and the row's `unit`, `span` and `segment` (not deduplicated).
    `sides`: `subject_spans`, materialized; where it has FRESH_FROM, a subject's events before it
    are left out (they are settled)."""
    bounds = [c for c in sides.columns if c.startswith("_bound_")]
    joined = _join_events(sides, events)
    joined = joined.filter(_in_windows(joined))
    segment = sum((joined.event_at >= joined[b]).cast("int64") for b in bounds) if bounds else ibis.literal(0, "int64")
    return joined.select("unit", "span", *WINDOW_COLUMNS, segment=segment)


def rows_of_period(rows: ir.Table, segments: ir.Table, period: str) -> ir.Table:
    """The deduplicated `segment_rows` of one period's segments (`window_segments(...).segments`
    as a table): what post_assignment_events ("post") or pre_assignment_events ("pre") hold."""
    of_period = segments.filter(segments.period == period).select("span", "segment")
    return rows.semi_join(of_period, ["span", "segment"]).select(*WINDOW_COLUMNS).distinct()


def segment_sums(
    rows: ir.Table, row_verdicts: Callable[[ir.Table], dict[str, ir.BooleanColumn]] = lambda rows: {},
    settle_until: dt.datetime | None = None,
) -> ir.Table:
    """The run's join (`segment_rows`) aggregated as it goes, per (unit, span, segment, value
    bucket, settled): the events, their exact value sum (`sum_value_bucket/_fixed`, `exact_terms`),
    the rows before assignment and the row verdicts. The join's rows are never stored. `settled`:
    the events are before `settle_until` (the incremental refresh stores those; never without one).

    Exact duplicate events count once, decided on integer keys (unit, span) with the event's time
    and value. `row_verdicts(rows)` gives boolean columns over the rows, aggregated with all().
    """
    verdicts = row_verdicts(rows)
    settled = ibis.literal(False) if settle_until is None else rows.event_at < ibis.literal(settle_until, "timestamp('UTC')")
    rows = rows.select(
        "unit", "span", "segment", "event_at", "value", _before=rows.event_at < rows.assigned_at, **verdicts,
    ).distinct()
    rows = exact_terms(rows.mutate(settled=settled), rows.value, "sum_value")
    return rows.group_by(*SEGMENT_KEY, "sum_value_bucket", "settled").aggregate(
        n_events=rows.count(),
        n_before_assignment=rows._before.cast("int64").sum(),
        sum_value_fixed=rows.sum_value_fixed.sum().cast(FIXED_POINT),
        **{name: rows[name].all() for name in verdicts},
    )


def with_settled_keys(
    subjects: ir.Table, settled: ir.Table | None, fresh_from: Mapping[str, dt.datetime], batch: int,
) -> ir.Table:
    """`numbered_subjects` with what the incremental refresh needs: FRESH_FROM, the watermark of
    the subject's experiment when its earlier events are settled (it is in `settled`, the stored
    subjects of experiments refreshed incrementally, at the same `assigned_at`), else null (all
    its events are joined); and the key its settled sums are stored under (SETTLED_BATCH,
    SETTLED_UNIT: the batch and unit of the run that first settled it, this run's for the others).
    """
    if settled is None or not fresh_from:
        return subjects.mutate(**{
            FRESH_FROM: ibis.null("timestamp('UTC')"), SETTLED_BATCH: ibis.literal(batch, "int64"), SETTLED_UNIT: subjects.unit,
        })
    since = pd.DataFrame({"experiment_id": list(fresh_from), "_since": list(fresh_from.values())})
    since["_since"] = pd.to_datetime(since["_since"], utc=True).astype("datetime64[us, UTC]")
    known = settled.select("experiment_id", "subject_id", "assigned_at", _batch="batch", _unit="unit")
    joined = subjects.left_join(known, ["experiment_id", "subject_id", "assigned_at"]).left_join(
        ibis.memtable(since), "experiment_id"
    )
    old = joined._batch.notnull() & joined._since.notnull()
    return joined.select(*subjects.columns, **{
        FRESH_FROM: ibis.ifelse(old, joined._since, ibis.null("timestamp('UTC')")),
        SETTLED_BATCH: ibis.ifelse(old, joined._batch, ibis.literal(batch, "int64")),
        SETTLED_UNIT: ibis.ifelse(old, joined._unit, joined.unit),
    })


def settled_rows(segments: ir.Table, subjects: ir.Table, spans: ir.Table) -> ir.Table:
    """The settled rows `segment_sums` computed this run (not the stored ones), in their stored
    form: experiment and event name for the span, the subject's settled key for the unit, no
    verdicts. What the next run adds instead of joining those events again."""
    fresh = segments.filter(segments.settled & ~segments.stored)
    keyed = fresh.join(subjects.select("unit", SETTLED_BATCH, SETTLED_UNIT), "unit").join(
        spans.select("span", "experiment_id", "event_name"), "span"
    )
    return keyed.select(
        # Cast: Spark numbers rows as 32-bit integers.
        "experiment_id", "event_name", subject_batch=keyed[SETTLED_BATCH].cast("int64"), subject_unit=keyed[SETTLED_UNIT].cast("int64"),
        segment=keyed.segment, sum_value_bucket=keyed.sum_value_bucket, **{c: keyed[c] for c in SEGMENT_TOTALS},
    )


def stored_segment_sums(stored: ir.Table, subjects: ir.Table, spans: ir.Table, verdicts: Sequence[str]) -> ir.Table:
    """Stored settled rows (`settled_rows`' form) as rows of this run's `segment_sums`, for the
    subjects whose settled key they carry (analysable still, at the same `assigned_at`). Their
    row verdicts are null (all() passes over them: the stored state says whether they passed)."""
    keys = subjects.filter(subjects[FRESH_FROM].notnull()).select(
        "unit", subject_batch=subjects[SETTLED_BATCH], subject_unit=subjects[SETTLED_UNIT]
    )
    keyed = stored.join(keys, ["subject_batch", "subject_unit"]).join(
        spans.select("span", "experiment_id", "event_name"), ["experiment_id", "event_name"]
    )
    return keyed.select(
        *SEGMENT_KEY, "sum_value_bucket", settled=ibis.literal(True), n_events=keyed.n_events,
        n_before_assignment=keyed.n_before_assignment, sum_value_fixed=keyed.sum_value_fixed.cast(FIXED_POINT),
        **{v: ibis.null("boolean") for v in verdicts}, stored=ibis.literal(True),
    )
