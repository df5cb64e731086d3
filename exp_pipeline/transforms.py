"""Pure table -> table functions (Ibis expressions): they run inside the engine, on any backend.

Nothing here executes a query or pulls rows into Python; assets decide when to run and where to
write. No engine-specific SQL: only Ibis.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import ibis
import ibis.expr.datatypes as dtypes
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import Experiment, Metric, Source

UTC_TIMESTAMP = dtypes.Timestamp(timezone="UTC", scale=6)
SECONDS_PER_DAY = 86_400

MULTIPLE_VARIANTS = "multiple_variants"


def trim_whitespace(column: ir.StringValue) -> ir.StringValue:
    """The text without leading and trailing whitespace.

    Not Ibis's strip(): on Spark it becomes TRIM(' \\t\\n\\r\\v\\f' FROM ...), and Spark reads '\\v' and
    '\\f' as the letters v and f, so a subject named "v" would come out blank.
    """
    return column.re_replace(r"^\s+|\s+$", "")


def to_utc_timestamp(column: ir.Value) -> ir.TimestampValue:
    """Normalize any timestamp form to one type: UTC, microseconds.

    Naive timestamps are taken as UTC (the session's time zone); aware ones are converted; strings
    are parsed, unparsable ones become null. Doing this once at ingestion is what lets later
    comparisons work whatever wrote the source (pandas writes nanoseconds, others microseconds).
    """
    if column.type().is_string():
        return column.try_cast(UTC_TIMESTAMP)
    return column.cast(UTC_TIMESTAMP)


def _require_columns(table: ir.Table, source: Source, canonical: Sequence[str], what: str) -> None:
    missing = []
    for name in canonical:
        column = source.source_column(name)
        if column not in table.columns:
            mapped = f" (mapped from {name!r})" if column != name else ""
            missing.append(f"{column!r}{mapped}")
    if missing:
        raise ValueError(
            f"{what}: missing columns {', '.join(missing)}; the source has {list(table.columns)}. "
            "Fix the column mapping under sources in the registry."
        )


def canonical_assignments(source_rows: ir.Table, source: Source, experiment_id: str | None) -> ir.Table:
    """One experiment's exposure rows (all rows with None), mapped onto canonical names and types.

    `assigned_at_text` keeps the timestamp as logged, so a rejected row shows what was wrong.
    """
    _require_columns(
        source_rows,
        source,
        ("subject_id", "experiment_id", "variant_id", "assigned_at", *source.properties),
        "assignments source",
    )
    experiment_column = source_rows[source.source_column("experiment_id")].cast("string")
    rows = source_rows if experiment_id is None else source_rows.filter(trim_whitespace(experiment_column) == experiment_id)
    logged_at = rows[source.source_column("assigned_at")]
    return rows.select(
        experiment_id=trim_whitespace(rows[source.source_column("experiment_id")].cast("string")),
        subject_id=rows[source.source_column("subject_id")].cast("string"),
        variant_id=rows[source.source_column("variant_id")].cast("string"),
        assigned_at=to_utc_timestamp(logged_at),
        **{p: rows[p].cast("string") for p in source.properties},
        source_file=rows.source_file.cast("string"),
        **_logged_text("assigned_at", logged_at, _is_time(logged_at)),
    )


def _is_time(column: ir.Value) -> bool:
    return column.type().is_timestamp() or column.type().is_date()


def _logged_text(name: str, logged: ir.Value, parses: bool) -> dict[str, ir.Value]:
    """`{name}_text`, the value as logged, for a column whose parsing may fail (text from CSV or
    Parquet, or a type that does not convert, like a timestamp mapped as `value`): a rejected row
    must show what was there. A column that `parses` (already the right kind of type) gets no
    twin: formatting every timestamp of a large log as text costs more than the rest of the join.
    """
    return {} if parses else {f"{name}_text": logged.cast("string")}


def _text_or_value(rows: ir.Table, name: str) -> ir.Value:
    """The logged text of a column when it was logged as text, else the typed value."""
    return rows[f"{name}_text"] if f"{name}_text" in rows.columns else rows[name]


def _missing(rows: ir.Table, name: str) -> ir.BooleanValue:
    """Nothing logged in the column: null, or (logged as text) only whitespace."""
    if f"{name}_text" in rows.columns:
        return _blank(rows[f"{name}_text"])
    return rows[name].isnull()


def canonical_events(source_rows: ir.Table, source: Source) -> ir.Table:
    """Every event row, mapped onto canonical names and types, with the logged text kept.

    Unparsable timestamps and non-numeric values become null here; `classify_events` says why.
    """
    _require_columns(source_rows, source, ("subject_id", "event_at", "event_name"), "events source")
    value_column = source.source_column("value")
    if value_column in source_rows.columns:
        logged_value = source_rows[value_column]
        kind = logged_value.type()
        if kind.is_numeric() or kind.is_boolean() or kind.is_string():
            value = logged_value.try_cast("float64")
            # NaN and infinity are no amounts: missing, as a null is (Spark, unlike DuckDB, sums NaN
            # to NaN); logged as text they are rejected as non-numeric values.
            # (Not isinf(): Ibis compiles it to FALSE on Spark.)
            infinite = value.abs() > ibis.literal(sys.float_info.max)
            value = ibis.ifelse(value.isnan() | infinite, ibis.null("float64"), value)
        else:
            # A timestamp or date mapped as the value is not an amount (Spark would cast it to seconds).
            value = ibis.null("float64")
        value_text = _logged_text("value", logged_value, kind.is_numeric() or kind.is_boolean())
    else:
        value = ibis.null("float64")  # a count-only event log
        value_text = {}
    logged_at = source_rows[source.source_column("event_at")]
    return source_rows.select(
        subject_id=source_rows[source.source_column("subject_id")].cast("string"),
        event_at=to_utc_timestamp(logged_at),
        event_name=source_rows[source.source_column("event_name")].cast("string"),
        value=value,
        source_file=source_rows.source_file.cast("string"),
        **_logged_text("event_at", logged_at, _is_time(logged_at)),
        **value_text,
    )


def _blank(column: ir.StringValue) -> ir.BooleanValue:
    return column.isnull() | (trim_whitespace(column) == "")


def _duplicate_rank(rows: ir.Table, columns: Sequence[str]) -> ir.IntegerValue:
    """0 for the first copy of a row (by source file), 1, 2, ... for exact repeats of it."""
    window = ibis.window(group_by=[rows[c] for c in columns], order_by=[rows.source_file])
    return ibis.row_number().over(window)


# Why a source row cannot be ingested at all. Such rows go to rejected_rows, never silently away.
ASSIGNMENT_REJECTIONS = (
    "missing_subject_id", "missing_variant_id", "missing_timestamp", "unparsable_timestamp",
    "unknown_variant", "duplicate_row",
)
EVENT_REJECTIONS = (
    "missing_subject_id", "missing_event_name", "missing_timestamp", "unparsable_timestamp",
    "non_numeric_value", "duplicate_row",
)


def classify_assignments(rows: ir.Table, experiment: Experiment, properties: Sequence[str]) -> ir.Table:
    """Canonical exposure rows with `rejection_reason` (null for rows that are ingested)."""
    keyed = rows.mutate(_at=_text_or_value(rows, "assigned_at"))
    ranked = keyed.mutate(
        _copy=_duplicate_rank(keyed, ["experiment_id", "subject_id", "variant_id", "_at", *properties])
    ).drop("_at")
    known = [v.id for v in experiment.variants]
    reason = ibis.cases(
        (_blank(ranked.subject_id), "missing_subject_id"),
        (_blank(ranked.variant_id), "missing_variant_id"),
        (_missing(ranked, "assigned_at"), "missing_timestamp"),
        (ranked.assigned_at.isnull(), "unparsable_timestamp"),
        (~ranked.variant_id.isin(known), "unknown_variant"),
        (ranked._copy > 0, "duplicate_row"),
        else_=ibis.null("string"),
    )
    return ranked.mutate(rejection_reason=reason).drop("_copy")


def classify_events(rows: ir.Table, detect_duplicates: bool = True) -> ir.Table:
    """Canonical event rows with `rejection_reason` (null for usable events).

    Finding duplicates needs a window over every event; the per-experiment path skips it and
    drops exact duplicates after the (much smaller) temporal join instead.
    """
    if detect_duplicates:
        keyed = rows.mutate(_at=_text_or_value(rows, "event_at"), _value=_text_or_value(rows, "value"))
        ranked = keyed.mutate(
            _copy=_duplicate_rank(keyed, ["subject_id", "_at", "event_name", "_value"])
        ).drop("_at", "_value")
    else:
        ranked = rows.mutate(_copy=ibis.literal(0))
    # Only a value logged as text can fail to parse.
    non_numeric = (
        ~_blank(ranked.value_text) & ranked.value.isnull() if "value_text" in ranked.columns else ibis.literal(False)
    )
    reason = ibis.cases(
        (_blank(ranked.subject_id), "missing_subject_id"),
        (_blank(ranked.event_name), "missing_event_name"),
        (_missing(ranked, "event_at"), "missing_timestamp"),
        (ranked.event_at.isnull(), "unparsable_timestamp"),
        (non_numeric, "non_numeric_value"),
        (ranked._copy > 0, "duplicate_row"),
        else_=ibis.null("string"),
    )
    return ranked.mutate(rejection_reason=reason).drop("_copy")


def usable_events(rows: ir.Table, event_names: Sequence[str]) -> ir.Table:
    """The events a metric may use: of the named events, not rejected, canonical columns only.

    The same rows `classify_events` accepts, less two tests that the temporal join makes for free:
    a blank subject id equals no assigned subject's (blank ids are rejected at ingestion), and
    exact duplicates are dropped after the (much smaller) join. Testing every id of the log for
    whitespace would cost a third of the scan.
    """
    usable = rows.filter(rows.event_name.isin(list(event_names)), rows.event_at.notnull())
    if "value_text" in rows.columns:
        usable = usable.filter(_blank(usable.value_text) | usable.value.notnull())
    return usable.select("subject_id", "event_at", "event_name", "value")


def ingested(classified: ir.Table) -> ir.Table:
    return classified.filter(classified.rejection_reason.isnull()).drop(
        "rejection_reason", *[c for c in classified.columns if c.endswith("_text")]
    )


def rejected(classified: ir.Table, source_name: str, experiment_id: str | None) -> ir.Table:
    """Rejected rows in the rejected_rows layout: where from, why, and the row as logged."""
    rows = classified.filter(classified.rejection_reason.notnull())
    # Show each value as logged: the *_text copy stands in for its parsed column.
    parsed_twins = {c.removesuffix("_text") for c in rows.columns if c.endswith("_text")}
    shown = [c for c in rows.columns if c not in ("rejection_reason", "source_file", *parsed_twins)]
    record = ibis.literal("")
    for i, column in enumerate(shown):
        name = column.removesuffix("_text")
        text = rows[column].cast("string").fill_null("<null>")
        record = record + ibis.literal(("; " if i else "") + f"{name}=") + text
    return rows.select(
        experiment_id=ibis.literal(experiment_id, type="string"),
        source=ibis.literal(source_name),
        source_file=rows.source_file,
        reason=rows.rejection_reason,
        record=record,
    )


def unassignable_rows(rows: ir.Table, experiment_ids: Sequence[str]) -> ir.Table:
    """Exposure rows that belong to no experiment of the registry, with the reason."""
    reason = ibis.cases(
        (_blank(rows.experiment_id), "missing_experiment_id"),
        (~trim_whitespace(rows.experiment_id).isin(list(experiment_ids)), "unknown_experiment"),
        else_=ibis.null("string"),
    )
    return rows.mutate(rejection_reason=reason)


def rejection_counts(classified: ir.Table) -> ir.Table:
    """Small table: rows per rejection reason ('ingested' for the rows kept)."""
    return classified.group_by(reason=classified.rejection_reason.fill_null("ingested")).aggregate(
        rows=classified.count()
    )


def _row_reason(rows: ir.Table, experiment: Experiment) -> ir.StringValue:
    """Why an ingested exposure row does not count for the assignment, or null when it does."""
    in_window = rows.assigned_at >= experiment.start_at
    if experiment.end_at is not None:
        in_window &= rows.assigned_at < experiment.end_at
    return ibis.ifelse(in_window, ibis.null("string"), ibis.literal("outside_window"))


def classify_exposures(raw: ir.Table, experiment: Experiment) -> ir.Table:
    """Raw exposure rows with `exclusion_reason` (null for usable rows)."""
    return raw.mutate(exclusion_reason=_row_reason(raw, experiment))


def exposure_row_counts(raw: ir.Table, experiment: Experiment) -> ir.Table:
    """Small table: raw rows per exclusion reason ('used' for usable rows)."""
    classified = classify_exposures(raw, experiment)
    return classified.group_by(
        reason=classified.exclusion_reason.fill_null("used")
    ).aggregate(rows=classified.count())


def first_exposures(raw: ir.Table, experiment: Experiment, properties: Sequence[str]) -> ir.Table:
    """One row per subject: the first usable exposure wins, with its properties.

    Subjects whose usable exposures name more than one variant keep a row too, marked
    `exclusion_reason = 'multiple_variants'`, so they are counted and reported, not lost.
    """
    usable = classify_exposures(raw, experiment)
    usable = usable.filter(usable.exclusion_reason.isnull()).drop("exclusion_reason")
    per_subject = ibis.window(
        group_by=usable.subject_id,
        # Ties on the timestamp are broken deterministically so reruns give the same answer.
        order_by=[usable.assigned_at, usable.variant_id, *(usable[p] for p in properties), usable.source_file],
    )
    ranked = usable.mutate(
        _rank=ibis.row_number().over(per_subject),
    )
    summary = usable.group_by("subject_id").aggregate(
        n_exposures=usable.count(),
        n_variants_seen=usable.variant_id.nunique(),
    )
    first = ranked.filter(ranked._rank == 0).drop("_rank", "source_file")
    joined = first.join(summary, "subject_id")
    return joined.select(
        "experiment_id",
        "subject_id",
        "variant_id",
        "assigned_at",
        *properties,
        n_exposures=joined.n_exposures.cast("int64"),
        n_variants_seen=joined.n_variants_seen.cast("int64"),
        exclusion_reason=ibis.ifelse(
            joined.n_variants_seen > 1, ibis.literal(MULTIPLE_VARIANTS), ibis.null("string")
        ),
    )


# Columns that, when they change for a subject, make a correction (old row kept inactive).
TRACKED_COLUMNS = ("variant_id", "assigned_at", "exclusion_reason")
# Counts of an unchanged subject follow the log in place; everything else stays as first recorded.
COUNT_COLUMNS = ("n_exposures", "n_variants_seen")


def apply_assignment_history(
    current: ir.Table, previous: ir.Table | None, recorded_at: dt.datetime
) -> ir.Table:
    """The new contents of an experiment's deduped_assignments partition, history included.

    `current` is the assignment state computed from the log now; `previous` is what the table held.
    Unchanged subjects keep their row (properties and `valid_from` included), so reruns are
    idempotent; only their counts (n_exposures, n_variants_seen) follow the log.
    A subject whose variant, first exposure or exclusion changed is a correction: the old row is
    kept with `is_active = false` and `valid_to` set, and the new row is inserted active. Rows that
    were already inactive stay forever. Nothing is deleted.
    """
    recorded = ibis.literal(recorded_at, type=UTC_TIMESTAMP)
    fresh = current.mutate(
        is_active=ibis.literal(True),
        valid_from=recorded,
        valid_to=ibis.null(UTC_TIMESTAMP),
    )
    if previous is None:
        return fresh
    columns = fresh.columns
    previous = previous.select(*columns)
    history = previous.filter(~previous.is_active)
    active = previous.filter(previous.is_active)

    key = ["experiment_id", "subject_id"]
    # Unchanged subjects keep their row and its valid_from; counts (n_exposures, ...) are updated
    # in place: they are not history.
    same = [active[c].identical_to(current[c]) for c in TRACKED_COLUMNS]
    unchanged = active.semi_join(current, [*(active[k] == current[k] for k in key), *same])
    counts = current.select(*key, *(ibis._[c].name(f"_{c}") for c in COUNT_COLUMNS))
    kept = unchanged.join(counts, key).mutate(**{c: ibis._[f"_{c}"] for c in COUNT_COLUMNS}).select(*columns)
    # Changed or vanished subjects: the previous active row closes.
    closed = active.anti_join(kept, key).mutate(is_active=ibis.literal(False), valid_to=recorded)
    # New or changed subjects: the current row opens.
    opened = fresh.anti_join(kept, key)
    return ibis.union(history, kept, closed, opened.select(*columns), distinct=False)


def analysable_assignments(deduped: ir.Table) -> ir.Table:
    """Active, not excluded assignments: the subjects whose metrics are analysed."""
    return deduped.filter(deduped.is_active & deduped.exclusion_reason.isnull())


def metric_windows(metrics: Sequence[Metric]) -> ir.Table:
    """Small in-engine table of the metric definitions the per-subject computation joins on."""
    frame = pd.DataFrame(
        {
            "metric": [m.id for m in metrics],
            "event_name": [m.event_name for m in metrics],
            "aggregation": [m.aggregation for m in metrics],
            "start_seconds": [int(round(m.window_start_days * SECONDS_PER_DAY)) for m in metrics],
            "end_seconds": [int(round(m.window_end_days * SECONDS_PER_DAY)) for m in metrics],
        }
    )
    return ibis.memtable(frame)


def _seconds(days: float) -> int:
    # Whole seconds, as the registry's day windows are turned into intervals everywhere.
    return int(round(days * SECONDS_PER_DAY))


def experiment_events(
    events: ir.Table, experiment: Experiment, metrics: Sequence[Metric], pre_window_days: float
) -> ir.Table:
    """The events an experiment can use at all: from its start minus the pre-assignment window to
    its end plus the widest metric window. Literal bounds, so the engine skips whole files and row
    groups of a time-sorted log instead of joining every event ever logged.
    """
    lower = experiment.start_at - dt.timedelta(seconds=_seconds(pre_window_days))
    rows = events.filter(events.event_at >= lower)
    if experiment.end_at is not None and metrics:
        widest = max(_seconds(m.window_end_days) for m in metrics)
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
    bounds = {"_pre_start": assignments.assigned_at - ibis.interval(seconds=_seconds(pre_window_days))}
    names = sorted({m.event_name for m in metrics})
    for i, event_name in enumerate(names):
        of_name = [m for m in metrics if m.event_name == event_name]
        start = min(_seconds(m.window_start_days) for m in of_name)
        end = max(_seconds(m.window_end_days) for m in of_name)
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


# -- incremental refresh of the window events ----------------------------------------------------


def refresh_lower_bound(
    events_through: dt.datetime, lookback_days: float, earliest_new_assignment: dt.datetime | None,
    pre_window_days: float,
) -> tuple[dt.datetime, dt.datetime]:
    """(cutoff, scan_from) of an incremental refresh.

    Events at or after `cutoff` (the newest event already processed minus the late-arrival
    lookback) are recomputed for every subject. Subjects assigned or changed since the last
    refresh need their whole window, back to `scan_from`.
    """
    cutoff = events_through - dt.timedelta(seconds=_seconds(lookback_days))
    if earliest_new_assignment is None:
        return cutoff, cutoff
    window_start = earliest_new_assignment - dt.timedelta(seconds=_seconds(pre_window_days))
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


# Float sums are accumulated as integers (fixed point, DECIMAL(38, 0)): an engine's float sum
# depends on the order it meets the rows in (storage order, threads), so the same rows could give
# results differing in the last bits from one run to the next, or between an incremental refresh
# and a full recomputation. Integer sums do not; 120 bits leave room under DECIMAL(38, 0)'s 126.
FIXED_POINT = dtypes.Decimal(38, 0)
FIXED_POINT_BITS = 120
_SCALE_PARTS = ("up1", "up2", "down1", "down2")


class SumBound(NamedTuple):
    """What a fixed-point sum needs to know of its terms: how many, and how large at most."""

    rows: int
    max_abs: float

    def scale_columns(self, term: str) -> dict[str, float | None]:
        """The scale of a term's sum as four columns `{term}_up1/_up2/_down1/_down2`.

        up1 * up2 is the power of two that makes `rows` terms of at most `max_abs` fit
        FIXED_POINT_BITS (two factors: tiny values need up to 2**1194, beyond a float);
        down1 * down2 undoes it. All None when a term is beyond float range (|value| > 1e154
        squared): such a metric is summed as floats.
        """
        if not math.isfinite(self.max_abs):
            return {f"{term}_{part}": None for part in _SCALE_PARTS}
        exponent = 0  # all terms zero: any scale is exact
        if self.rows and self.max_abs:
            exponent = FIXED_POINT_BITS - math.ceil(math.log2(self.rows) + math.log2(self.max_abs))
        half = exponent // 2
        factors = (2.0**half, 2.0 ** (exponent - half), 2.0**-half, 2.0 ** (half - exponent))
        return {f"{term}_{part}": factor for part, factor in zip(_SCALE_PARTS, factors)}


NO_TERMS = SumBound(0, 0.0)
# A subject's sum has few terms: its scale leaves room for 2**40 of them, so that it depends only on
# the largest value of the event (its power of two), not on how many rows the partition holds that
# day. The same rows then give the same bits in any run, and stored per-subject values can be
# reused by a later run (see subject_values_reuse). 2**-80 of the largest value per term.
PER_SUBJECT_TERMS = 2**40


def value_bounds(table: ir.Table, by: str) -> ir.Table:
    """Per value of column `by`: the rows and the largest |value| (null when no value)."""
    return table.group_by(by).aggregate(rows=table.count(), max_abs=table.value.abs().max())


def read_bounds(frame: pd.DataFrame, by: str) -> dict[str, SumBound]:
    """`value_bounds` rows as {key: SumBound}."""
    return {
        row[by]: SumBound(int(row["rows"]), 0.0 if pd.isna(row["max_abs"]) else float(row["max_abs"]))
        for _, row in frame.iterrows()
    }


def fixed_point_sum(table: ir.Table, term: ir.NumericColumn, name: str) -> ir.NumericScalar:
    """The sum of a float column, the same whatever order the rows come in.

    Every term is multiplied by its scale (the `{name}_up1/_up2` columns of `table`, exact powers of
    two), rounded to an integer and summed exactly; on DuckDB rounding costs at most 2**-120 of
    (rows x largest term) per term (Spark converts through text: float precision per term). Every
    row of a group must carry the same scale (one per metric).
    """
    up1, up2, down1, down2 = (table[f"{name}_{part}"] for part in _SCALE_PARTS)
    fixed = up1.notnull()
    scaled = ibis.ifelse(fixed, term * up1 * up2, ibis.null("float64")).cast(FIXED_POINT)
    exact = scaled.sum().cast("float64") * down1.max() * down2.max()
    return ibis.ifelse(fixed.any(), exact, term.sum())


def _scales(rows: Sequence[dict], terms: Sequence[str]) -> ir.Table:
    """Small in-engine table: per metric, the `scale_columns` of each term (nulls as nulls)."""
    schema = {"metric": "string", **{f"{term}_{part}": "float64" for term in terms for part in _SCALE_PARTS}}
    frame = pd.DataFrame(list(rows), columns=list(schema))
    return ibis.memtable(frame.astype(object).where(frame.notna(), None), schema=schema)


def subject_metric_values(
    assignments: ir.Table,
    events: ir.Table,
    metrics: Sequence[Metric],
    event_bounds: dict[str, SumBound],
    *,
    apply_metric_windows: bool = True,
) -> ir.Table:
    """Per (subject, metric) value; subjects without events count as zero.

    For post-assignment events each metric's own window applies. Pre-assignment events (the CUPED
    covariate) are already cut to the pre window: pass `apply_metric_windows=False`.
    `event_bounds` bounds the events' values per event name (`value_bounds`: a sum metric's terms
    are its event's values). Capping is applied separately (`cap_subject_values`).
    """
    windows = metric_windows(metrics)
    scales = _scales(
        [{"metric": metric, **scale} for metric, scale in subject_value_scales(event_bounds, metrics).items()],
        ["value"],
    )
    matched = events.join(windows, "event_name").join(scales, "metric")
    if apply_metric_windows:
        matched = matched.filter(
            matched.event_at >= matched.assigned_at + matched.start_seconds.as_interval("s"),
            matched.event_at < matched.assigned_at + matched.end_seconds.as_interval("s"),
        )
    # Only sum metrics use the values: the others skip the fixed-point conversion (null terms).
    summed = ibis.ifelse(matched.aggregation == "sum", matched.value.fill_null(0.0), ibis.null("float64"))
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


def subject_value_scales(event_bounds: dict[str, SumBound], metrics: Sequence[Metric]) -> dict[str, dict]:
    """Per metric, the scale columns of its per-subject sums (`PER_SUBJECT_TERMS`)."""
    return {
        m.id: SumBound(PER_SUBJECT_TERMS, event_bounds.get(m.event_name, NO_TERMS).max_abs).scale_columns("value")
        for m in metrics
    }


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
    stored: dict | None, events_state: dict | None, fingerprint: str, scales: dict, widest_window_days: float
) -> SubjectValuesReuse | None:
    """Whether the stored per-subject values can be partly reused, and which; None: recompute all.

    `stored` is what the last computation recorded (fingerprint, scales, the window events'
    refreshed_at and assignments_as_of it read, its own assignments_as_of); `events_state` the
    window events' state now
    (refreshed_at, mode, refreshed_from, previous_refreshed_at). Reuse needs the same definitions
    and scales, and at most one window-events refresh since, an incremental one: it rewrote only
    rows at or after its cutoff (`refreshed_from`) and the whole windows of changed subjects. A
    subject's post-assignment rows lie before assigned_at + the widest metric window, its
    pre-period rows before assigned_at: earlier subjects have no row at or after the cutoff.
    """
    if stored is None or events_state is None or None in (
        stored["assignments_as_of"], stored["events_assignments_as_of"]
    ):
        return None
    if stored["fingerprint"] != fingerprint or stored["scales"] != scales:
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
        post_assigned_after=cutoff - dt.timedelta(seconds=_seconds(widest_window_days)),
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
    joined = joined.join(_scales(scale_rows, ["y", "y2", "x", "x2", "xy"]), "metric")
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


def assignment_counts(assignments: ir.Table, properties: Sequence[str]) -> ir.Table:
    """Small table of subject counts per variant, overall (property '') and per property value."""
    overall = assignments.group_by("variant_id").aggregate(n=assignments.count()).mutate(
        property=ibis.literal(""), value=ibis.literal("")
    )
    parts = [overall]
    for prop in properties:
        parts.append(
            assignments.group_by("variant_id", value=assignments[prop].cast("string").fill_null("(null)"))
            .aggregate(n=assignments.count())
            .mutate(property=ibis.literal(prop))
        )
    columns = ["property", "value", "variant_id", "n"]
    return ibis.union(*(p.select(*columns) for p in parts), distinct=False)
