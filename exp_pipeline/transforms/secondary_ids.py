"""Secondary IDs: whose events a log keyed by another ID holds (docs/data-model.md#secondary-ids).

A pre-authentication experiment randomizes an anonymous id (the subject) while purchases are logged
by `user_id`; an email experiment randomizes sends (`email_send_id`). The exposure log carries the
secondary ID (nullable, many-to-many with the subject). In each experiment an ID's events belong to
the FIRST subject observed with it: the earliest exposure carrying the ID, ties broken by the
smaller subject_id, so the rule never depends on the engine's row order. Events of an ID no
subject was seen with belong to nobody; a subject seen with no ID has no such events and counts
as zero for metrics keyed by it.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir

ID_MAP_COLUMNS = ("experiment_id", "id_name", "secondary_id", "subject_id", "first_seen_at", "n_subjects")


def subject_id_map(exposures: ir.Table, id_name: str) -> ir.Table:
    """Per experiment and value of the secondary ID column `id_name`: the subject first observed
    with it, when, and how many distinct subjects were seen with it (`n_subjects` above 1 is a
    conflict the checks count). `exposures`: experiment_id, subject_id, assigned_at, `id_name`."""
    seen = exposures.filter(exposures[id_name].notnull())
    pairs = seen.group_by("experiment_id", secondary_id=seen[id_name].cast("string"), subject_id="subject_id").aggregate(
        first_seen_at=seen.assigned_at.min()
    )
    per_id = ibis.window(group_by=["experiment_id", "secondary_id"], order_by=["first_seen_at", "subject_id"])
    ranked = pairs.mutate(
        _rank=ibis.row_number().over(per_id),
        n_subjects=pairs.subject_id.count().over(group_by=["experiment_id", "secondary_id"]),
    )
    first = ranked.filter(ranked._rank == 0)
    return first.select(
        "experiment_id", id_name=ibis.literal(id_name), secondary_id="secondary_id", subject_id="subject_id",
        first_seen_at="first_seen_at", n_subjects=first.n_subjects.cast("int64"),
    )


def first_secondary_ids(exposures: ir.Table, id_names: list[str]) -> ir.Table:
    """Per experiment and subject, each secondary ID as first observed: the value on the subject's
    earliest exposure carrying one (null when none does). Joined onto deduped_assignments."""
    subjects = exposures.select("experiment_id", "subject_id").distinct()
    for name in id_names:
        seen = exposures.filter(exposures[name].notnull())
        per_subject = ibis.window(group_by=["experiment_id", "subject_id"], order_by=["assigned_at", name])
        ranked = seen.select("experiment_id", "subject_id", name, _rank=ibis.row_number().over(per_subject))
        first = ranked.filter(ranked._rank == 0).select("experiment_id", "subject_id", name)
        subjects = subjects.left_join(first, ["experiment_id", "subject_id"]).select(*subjects.columns, name)
    return subjects


def attributed_events(events: ir.Table, id_map: ir.Table, id_name: str) -> ir.Table:
    """Events keyed by the secondary ID `id_name` (in their `subject_id` column), each given the
    subject its ID belongs to in every experiment that saw the ID: experiment_id, subject_id and
    the event's other columns. The temporal join then applies the subject's own windows, so an
    ID's events before its subject's assignment do not count."""
    owners = id_map.filter(id_map.id_name == id_name)
    keyed = events.rename(secondary_id="subject_id")
    joined = keyed.join(owners, keyed.secondary_id == owners.secondary_id.cast(keyed.secondary_id.type()))
    others = [c for c in events.columns if c != "subject_id"]
    return joined.select("experiment_id", "subject_id", *others)
