"""Assignments: exposure rows -> one row per subject (first exposure wins), with history."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import ibis
import ibis.expr.types as ir

from exp_pipeline.registry import Experiment
from exp_pipeline.vocabulary import MULTIPLE_VARIANTS, OUTSIDE_WINDOW, USED, UTC_TIMESTAMP


def _row_reason(rows: ir.Table, experiments: Sequence[Experiment]) -> ir.StringValue:
    """Why an ingested exposure row does not count for its experiment's assignment, or null when
    it does (inside the experiment's window)."""
    windows = []
    for experiment in experiments:
        inside = (rows.experiment_id == experiment.id) & (rows.assigned_at >= experiment.start_at)
        if experiment.end_at is not None:
            inside &= rows.assigned_at < experiment.end_at
        windows.append(inside)
    return ibis.ifelse(ibis.or_(*windows), ibis.null("string"), ibis.literal(OUTSIDE_WINDOW))


def classify_exposures(raw: ir.Table, experiments: Sequence[Experiment]) -> ir.Table:
    """Raw exposure rows of these experiments with `exclusion_reason` (null for usable rows)."""
    return raw.mutate(exclusion_reason=_row_reason(raw, experiments))


def exposure_row_counts(raw: ir.Table, experiments: Sequence[Experiment]) -> ir.Table:
    """Small table: raw rows per experiment and exclusion reason ('used' for usable rows)."""
    classified = classify_exposures(raw, experiments)
    return classified.group_by(
        "experiment_id", reason=classified.exclusion_reason.fill_null(USED)
    ).aggregate(rows=classified.count())


def usable_exposures(raw: ir.Table, experiments: Sequence[Experiment]) -> ir.Table:
    """The raw exposure rows that count for their experiment's assignment (inside its window)."""
    usable = classify_exposures(raw, experiments)
    return usable.filter(usable.exclusion_reason.isnull()).drop("exclusion_reason")


def first_exposures(
    raw: ir.Table, experiments: Sequence[Experiment], properties: Sequence[str], secondary_ids: Sequence[str] = ()
) -> ir.Table:
    """One row per experiment and subject: the first usable exposure wins, with its properties;
    each secondary id is the first one logged (on the earliest usable exposure carrying one, the
    smaller value on a tie). One query for every experiment of `raw` (only rows of `experiments`
    can be usable).

    Subjects whose usable exposures name more than one variant keep a row too, marked
    `exclusion_reason = 'multiple_variants'`, so they are counted and reported, not lost.
    """
    usable = usable_exposures(raw, experiments)
    # The first exposure is the smallest of (time, variant, properties, file): ties on the
    # timestamp are broken deterministically so reruns give the same answer. One aggregate, not a
    # window over every exposure row (which would sort the log).
    order = ["assigned_at", "variant_id", *properties, "source_file"]
    per_subject = usable.group_by("experiment_id", "subject_id").aggregate(
        _first=ibis.struct({c: usable[c] for c in order}).min(),
        n_exposures=usable.count(),
        n_variants_seen=usable.variant_id.nunique(),
        **{
            f"_first_{i}": ibis.struct({"at": usable.assigned_at, "id": usable[i]}).min(where=usable[i].notnull())
            for i in secondary_ids
        },
    )
    return per_subject.select(
        "experiment_id",
        "subject_id",
        variant_id=per_subject._first["variant_id"],
        assigned_at=per_subject._first["assigned_at"],
        **{p: per_subject._first[p] for p in properties},
        **{i: per_subject[f"_first_{i}"]["id"] for i in secondary_ids},
        n_exposures=per_subject.n_exposures.cast("int64"),
        n_variants_seen=per_subject.n_variants_seen.cast("int64"),
        exclusion_reason=ibis.ifelse(
            per_subject.n_variants_seen > 1, ibis.literal(MULTIPLE_VARIANTS), ibis.null("string")
        ),
    )


# Columns that, when they change for a subject, make a correction (old row kept inactive).
TRACKED_COLUMNS = ("variant_id", "assigned_at", "exclusion_reason")
# Counts of an unchanged subject follow the log in place; everything else stays as first recorded.
COUNT_COLUMNS = ("n_exposures", "n_variants_seen")


def apply_assignment_history(
    current: ir.Table, previous: ir.Table | None, recorded_at: dt.datetime, properties: Sequence[str] = (),
    secondary_ids: Sequence[str] = (),
) -> ir.Table:
    """The new contents of an experiment's deduped_assignments partition, history included.

    `current` is the assignment state computed from the log now; `previous` is what the table held
    (written under any earlier registry: columns it lacks read as null, columns the registry no
    longer names are left out, history rows included: a removed property's values go from the
    rewritten partition). Unchanged subjects keep their row (`valid_from` included), so
    reruns are idempotent; only their counts (n_exposures, n_variants_seen) and secondary ids (a
    visitor who logs in later) follow the log, and
    a property they have no value of (one added to the registry since) is filled from the log.
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
    previous = previous.select(
        *(previous[c] if c in previous.columns else ibis.null(fresh[c].type()).name(c) for c in columns)
    )
    history = previous.filter(~previous.is_active)
    active = previous.filter(previous.is_active)

    key = ["experiment_id", "subject_id"]
    # Unchanged subjects keep their row and its valid_from; counts (n_exposures, ...) are updated
    # in place: they are not history.
    same = [active[c].identical_to(current[c]) for c in TRACKED_COLUMNS]
    unchanged = active.semi_join(current, [*(active[k] == current[k] for k in key), *same])
    followed = current.select(*key, *(ibis._[c].name(f"_{c}") for c in (*COUNT_COLUMNS, *secondary_ids, *properties)))
    kept = unchanged.join(followed, key).mutate(
        **{c: ibis._[f"_{c}"] for c in (*COUNT_COLUMNS, *secondary_ids)},
        **{p: ibis._[p].coalesce(ibis._[f"_{p}"]) for p in properties},
    ).select(*columns)
    # Changed or vanished subjects: the previous active row closes.
    closed = active.anti_join(kept, key).mutate(is_active=ibis.literal(False), valid_to=recorded)
    # New or changed subjects: the current row opens.
    opened = fresh.anti_join(kept, key)
    return ibis.union(history, kept, closed, opened.select(*columns), distinct=False)


def analysable_assignments(deduped: ir.Table) -> ir.Table:
    """Active, not excluded assignments: the subjects whose metrics are analysed."""
    return deduped.filter(deduped.is_active & deduped.exclusion_reason.isnull())



def _property_value(assignments: ir.Table, prop: str) -> ir.StringValue:
    """A property's value as segments name it: text, a missing one as '(null)'."""
    return assignments[prop].cast("string").fill_null("(null)")


def subject_segments(subjects: ir.Table, assignments: ir.Table, properties: Sequence[str]) -> ir.Table:
    """(experiment_id, subject_id, property, value): the segments each subject belongs to, one per
    property (from `assignments`, which hold the properties), and the overall ('', '') of every one
    of `subjects`, the subjects analysed (the grain of `assignment_counts`). The overall rows come
    from the analysed subjects themselves: no subject with values can miss the overall sums."""
    parts = [subjects.select("experiment_id", "subject_id", property=ibis.literal(""), value=ibis.literal(""))]
    parts += [
        assignments.select("experiment_id", "subject_id", property=ibis.literal(prop), value=_property_value(assignments, prop))
        for prop in properties
    ]
    return ibis.union(*parts, distinct=False)


def assignment_counts(assignments: ir.Table, properties: Sequence[str], by: Sequence[str] = ()) -> ir.Table:
    """Small table of subject counts per variant, overall (property '') and per property value,
    per group of `by` (e.g. every experiment at once)."""
    overall = assignments.group_by(*by, "variant_id").aggregate(n=assignments.count()).mutate(
        property=ibis.literal(""), value=ibis.literal("")
    )
    parts = [overall]
    for prop in properties:
        parts.append(
            assignments.group_by(*by, "variant_id", value=_property_value(assignments, prop))
            .aggregate(n=assignments.count())
            .mutate(property=ibis.literal(prop))
        )
    columns = [*by, "property", "value", "variant_id", "n"]
    return ibis.union(*(p.select(*columns) for p in parts), distinct=False)


PAIR_COLUMNS = ("variant_id", "property_a", "value_a", "property_b", "value_b", "n")


def property_pair_counts(assignments: ir.Table, properties: Sequence[str], by: Sequence[str] = ()) -> ir.Table | None:
    """Subjects per variant and pair of values of two different properties (the cross products of
    their one-hot indicators, for CUPED++), per group of `by`; None with fewer than two properties."""
    pairs = [(a, b) for i, a in enumerate(properties) for b in properties[i + 1:]]
    if not pairs:
        return None
    parts = [
        assignments.group_by(*by, "variant_id", value_a=_property_value(assignments, a), value_b=_property_value(assignments, b))
        .aggregate(n=assignments.count())
        .mutate(property_a=ibis.literal(a), property_b=ibis.literal(b))
        for a, b in pairs
    ]
    return ibis.union(*(p.select(*by, *PAIR_COLUMNS) for p in parts), distinct=False)
