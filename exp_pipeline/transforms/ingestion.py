"""Ingestion: source rows mapped onto canonical names and types, then classified as ingested or
rejected with a reason (every rejected row is kept, never dropped).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import ASSIGNMENT_COLUMNS, REQUIRED_EVENT_COLUMNS, Experiment, Source
from exp_pipeline.vocabulary import (
    DUPLICATE_ROW,
    INGESTED,
    MISSING_EVENT_NAME,
    MISSING_EXPERIMENT_ID,
    MISSING_SUBJECT_ID,
    MISSING_TIMESTAMP,
    MISSING_VARIANT_ID,
    NON_NUMERIC_VALUE,
    UNKNOWN_EXPERIMENT,
    UNKNOWN_VARIANT,
    UNPARSABLE_TIMESTAMP,
    UTC_TIMESTAMP,
    trim_whitespace,
)

# Integer (or numeric text) timestamps are seconds, milliseconds, microseconds or nanoseconds since
# 1970, as the source mapping's timestamp_unit says. With "auto" each value's magnitude tells, for
# instants from 2001-09-09 (1e9 s) to the year 5138 (1e11 s): seconds from 1e9, milliseconds from
# 1e12, microseconds from 1e15, nanoseconds from 1e18. Anything else (a YYYYMMDD number, a 1970s
# epoch) is no timestamp under auto: unparsable, rejected with its reason. Declare the unit for
# older epochs.
EPOCH_UNIT_RANGES = (("s", 1e9, 1e11), ("ms", 1e12, 1e14), ("us", 1e15, 1e17), ("ns", 1e18, 1e20))
MICROSECONDS_PER = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_EPOCH_MICROSECONDS = 2.5e17
_NUMBER_TEXT = r"^\s*[-+]?[0-9]+(\.[0-9]+)?\s*$"
# The rows_read label of epoch numbers that auto recognizes as no unit.
NOT_AN_EPOCH = "out_of_auto_range"


def epoch_unit(number: ir.NumericValue, unit: str) -> ir.StringValue:
    """The unit of an epoch number: the declared one, or (auto) the one its magnitude says (null
    outside every range of EPOCH_UNIT_RANGES)."""
    if unit != "auto":
        return ibis.literal(unit)
    return ibis.cases(
        *(((number >= low) & (number < high), name) for name, low, high in EPOCH_UNIT_RANGES),
        else_=ibis.null("string"),
    )


def _from_epoch(number: ir.NumericValue, unit: str) -> ir.TimestampValue:
    detected = epoch_unit(number, unit)
    factor = ibis.cases(*((detected == name, per) for name, per in MICROSECONDS_PER.items()))
    microseconds = number.cast("float64") * factor
    # Beyond about year 9900 either way is no timestamp: unparsable (and no engine overflow).
    in_range = microseconds.abs() < MAX_EPOCH_MICROSECONDS
    at = ibis.literal(_EPOCH, type=UTC_TIMESTAMP) + microseconds.round().cast("int64").as_interval("us")
    return ibis.ifelse(in_range, at, ibis.null(UTC_TIMESTAMP))


def _epoch_number(column: ir.Value) -> tuple[ir.BooleanValue, ir.NumericValue] | None:
    """(is the value logged as an epoch number, that number) for a numeric or text column; None
    for a column of timestamps or dates."""
    kind = column.type()
    if kind.is_numeric():
        return column.notnull(), column
    if kind.is_string():
        return column.re_search(_NUMBER_TEXT), column.try_cast("float64")
    return None


def to_utc_timestamp(column: ir.Value, unit: str = "auto") -> ir.TimestampValue:
    """Normalize any timestamp form to one type: UTC, microseconds.

    Naive timestamps are taken as UTC (the session's time zone); aware ones are converted; numbers
    (and numeric text) are epochs in `unit` (see EPOCH_UNIT_RANGES); other strings are parsed,
    unparsable ones become null. Doing this once at ingestion is what lets later comparisons work
    whatever wrote the source (pandas writes nanoseconds, others microseconds or epoch numbers).
    """
    epoch = _epoch_number(column)
    if epoch is None:
        return column.cast(UTC_TIMESTAMP)
    logged_as_epoch, number = epoch
    # Text that is no number is parsed as a timestamp; epochs are rounded to the microsecond (a
    # nanosecond epoch is read as a float: within 1 us).
    parsed = column.try_cast(UTC_TIMESTAMP) if column.type().is_string() else ibis.null(UTC_TIMESTAMP)
    return ibis.ifelse(logged_as_epoch, _from_epoch(number, unit), parsed)


def epoch_unit_counts(source_rows: ir.Table, column: str, unit: str) -> ir.Table | None:
    """Rows per epoch unit (declared or detected) of a timestamp column logged as numbers; None
    when the column holds timestamps (nothing to detect)."""
    epoch = _epoch_number(source_rows[column])
    if epoch is None:
        return None
    logged_as_epoch, number = epoch
    rows = source_rows.mutate(_epoch=logged_as_epoch, _unit=epoch_unit(number, unit).fill_null(NOT_AN_EPOCH))
    rows = rows.filter(rows._epoch)
    return rows.group_by(unit=rows._unit).aggregate(rows=rows.count())


def canonical_id(column: ir.Value) -> ir.StringValue:
    """An id as text, so that 100000, 100000.0 and "100000" are one subject.

    Exports often write integer ids as floats (a column with a null becomes float in pandas):
    a whole float becomes its integer digits, and text of digits ending in ".0" (or ".00", ...)
    loses its zero decimals.
    """
    kind = column.type()
    if kind.is_floating():
        whole = (column == column.floor()) & (column.abs() < 2.0**53)
        return ibis.ifelse(whole, column.cast("int64").cast("string"), column.cast("string"))
    text = column.cast("string")
    # contains first: the regular expressions only run on the few ids that may need them (and no
    # backreference: Spark and DuckDB spell them differently). A DECIMAL id reads "100000.00".
    whole = text.contains(".") & text.re_search(r"^[-+]?[0-9]+\.0+$")
    return ibis.ifelse(whole, text.re_replace(r"\.0+$", ""), text)


def canonical_label(column: ir.Value) -> ir.StringValue:
    """An experiment or variant id as logged, trimmed and lowercased: registry ids are lowercase, so
    'EXP_A' and 'treatment ' are the registry's exp_a and treatment, not unknown ids."""
    return trim_whitespace(column.cast("string")).lower()


def _require_columns(table: ir.Table, source: Source, canonical: Sequence[str], what: str) -> None:
    missing = []
    for name in canonical:
        column = source.source_column(name)
        if column not in table.columns:
            mapped = f" (mapped from {name!r})" if column != name else ""
            missing.append(f"{column!r}{mapped}")
    if missing:
        raise ValueError(
            f"{what}: missing columns {', '.join(missing)}; the source has {[c for c in table.columns if c != 'source_file']}. "
            "Fix the column mapping under sources in the registry."
        )


def canonical_assignments(source_rows: ir.Table, source: Source, experiment_id: str | None) -> ir.Table:
    """One experiment's exposure rows (all rows with None), mapped onto canonical names and types.

    `assigned_at_text` keeps the timestamp as logged, so a rejected row shows what was wrong.
    """
    _require_columns(
        source_rows,
        source,
        (*ASSIGNMENT_COLUMNS, *source.kept_columns),
        "assignments source",
    )
    experiment_column = source_rows[source.source_column("experiment_id")]
    rows = source_rows if experiment_id is None else source_rows.filter(canonical_label(experiment_column) == experiment_id)
    logged_at = rows[source.source_column("assigned_at")]
    return rows.select(
        experiment_id=canonical_label(rows[source.source_column("experiment_id")]),
        subject_id=canonical_id(rows[source.source_column("subject_id")]),
        variant_id=canonical_label(rows[source.source_column("variant_id")]),
        assigned_at=to_utc_timestamp(logged_at, source.timestamp_unit),
        **{p: rows[p].cast("string") for p in source.properties},
        **{i: _present_id(rows[source.source_column(i)]) for i in source.secondary_ids},
        source_file=rows.source_file.cast("string"),
        **_logged_text("assigned_at", logged_at, _is_time(logged_at)),
    )


def _present_id(column: ir.Value) -> ir.StringValue:
    """A secondary id as text (`canonical_id`), null when blank: a visitor not logged in yet."""
    text = canonical_id(column)
    return ibis.ifelse(_blank(text), ibis.null("string"), text)


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
    _require_columns(source_rows, source, REQUIRED_EVENT_COLUMNS, "events source")
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
        subject_id=canonical_id(source_rows[source.source_column("subject_id")]),
        event_at=to_utc_timestamp(logged_at, source.timestamp_unit),
        event_name=source_rows[source.source_column("event_name")].cast("string"),
        value=value,
        source_file=source_rows.source_file.cast("string"),
        **_logged_text("event_at", logged_at, _is_time(logged_at)),
        **value_text,
    )


def _blank(column: ir.StringValue) -> ir.BooleanValue:
    return column.isnull() | (trim_whitespace(column) == "")


def _with_copy_rank(rows: ir.Table, columns: Sequence[str]) -> ir.Table:
    """`rows` with `_copy`: 0 for the first copy of a row (by source file), 1, 2, ... for exact
    repeats of it.

    Logs repeat few rows: one hash aggregate finds the repeated keys and only their rows are
    ranked (a window over every row would sort the whole log).
    """
    repeated = rows.group_by(columns).aggregate(_copies=rows.count())
    repeated = repeated.filter(repeated._copies > 1).drop("_copies")
    same = [rows[c].identical_to(repeated[c]) for c in columns]  # null-safe: a missing id is a key too
    single = rows.anti_join(repeated, same).mutate(_copy=ibis.literal(0, type="int64"))
    repeats = rows.semi_join(repeated, same)
    window = ibis.window(group_by=[repeats[c] for c in columns], order_by=[repeats.source_file])
    return ibis.union(single, repeats.mutate(_copy=ibis.row_number().over(window).cast("int64")), distinct=False)


def classify_assignments(rows: ir.Table, experiments: Sequence[Experiment], properties: Sequence[str]) -> ir.Table:
    """Canonical exposure rows of these experiments with `rejection_reason` (null for rows that
    are ingested), every experiment in one query."""
    keyed = rows.mutate(_at=_text_or_value(rows, "assigned_at"))
    ranked = _with_copy_rank(keyed, ["experiment_id", "subject_id", "variant_id", "_at", *properties]).drop("_at")
    known = ibis.or_(*(
        (ranked.experiment_id == e.id) & ranked.variant_id.isin([v.id for v in e.variants]) for e in experiments
    ))
    reason = ibis.cases(
        (_blank(ranked.subject_id), MISSING_SUBJECT_ID),
        (_blank(ranked.variant_id), MISSING_VARIANT_ID),
        (_missing(ranked, "assigned_at"), MISSING_TIMESTAMP),
        (ranked.assigned_at.isnull(), UNPARSABLE_TIMESTAMP),
        (~known, UNKNOWN_VARIANT),
        (ranked._copy > 0, DUPLICATE_ROW),
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
        ranked = _with_copy_rank(keyed, ["subject_id", "_at", "event_name", "_value"]).drop("_at", "_value")
    else:
        ranked = rows.mutate(_copy=ibis.literal(0))
    # Only a value logged as text can fail to parse.
    non_numeric = (
        ~_blank(ranked.value_text) & ranked.value.isnull() if "value_text" in ranked.columns else ibis.literal(False)
    )
    reason = ibis.cases(
        (_blank(ranked.subject_id), MISSING_SUBJECT_ID),
        (_blank(ranked.event_name), MISSING_EVENT_NAME),
        (_missing(ranked, "event_at"), MISSING_TIMESTAMP),
        (ranked.event_at.isnull(), UNPARSABLE_TIMESTAMP),
        (non_numeric, NON_NUMERIC_VALUE),
        (ranked._copy > 0, DUPLICATE_ROW),
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
        (_blank(rows.experiment_id), MISSING_EXPERIMENT_ID),
        (~rows.experiment_id.isin(list(experiment_ids)), UNKNOWN_EXPERIMENT),
        else_=ibis.null("string"),
    )
    return rows.mutate(rejection_reason=reason)


def rejection_counts(classified: ir.Table, by: Sequence[str] = ()) -> ir.Table:
    """Small table: rows per rejection reason ('ingested' for the rows kept), per group of `by`."""
    return classified.group_by(*by, reason=classified.rejection_reason.fill_null(INGESTED)).aggregate(
        rows=classified.count()
    )



@dataclass(frozen=True)
class RowAccounting:
    """Where a source's rows went: every row read is ingested or kept aside with its reason."""

    ingested: int
    rejected_by_reason: dict[str, int]

    @classmethod
    def of(cls, counts: pd.DataFrame) -> RowAccounting:
        """From a small table of rows per reason (`rejection_counts`: 'ingested' for the rows kept)."""
        by_reason = dict(zip(counts["reason"], counts["rows"].astype(int), strict=True))
        ingested = by_reason.pop(INGESTED, 0)
        return cls(ingested=ingested, rejected_by_reason=by_reason)

    @classmethod
    def of_rejected(cls, counts: pd.DataFrame, read: int) -> RowAccounting:
        """From the rows read and a small table of the rejected rows per reason."""
        by_reason = dict(zip(counts["reason"], counts["rows"].astype(int), strict=True))
        return cls(ingested=read - sum(by_reason.values()), rejected_by_reason=by_reason)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def read(self) -> int:
        return self.ingested + self.rejected

    @property
    def rejected_share(self) -> float:
        return self.rejected / self.read if self.read else 0.0
