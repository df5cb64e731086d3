"""Secondary IDs: whose events a log keyed by another ID holds (docs/data-model.md#secondary-ids).

A pre-authentication experiment randomizes an anonymous id (the subject) while purchases are logged
by `user_id`; an email experiment randomizes sends (`email_send_id`). The exposure log carries the
secondary ID (nullable, many-to-many with the subject). In each experiment an ID's events belong to
the FIRST subject observed with it: the earliest exposure carrying the ID, ties broken by the
smaller subject_id, so the rule never depends on the engine's row order. The temporal join keys
a subject's side by the IDs it owns (`temporal_join._keyed_sides`): events of an ID no subject was
seen with belong to nobody, and a subject seen with no ID counts as zero for metrics keyed by it.
(A subject's own first-logged ids, in deduped_assignments, are `assignments.first_exposures`'.)
"""

from __future__ import annotations

from collections.abc import Sequence

import ibis
import ibis.expr.types as ir

from exp_pipeline.schemas import ibis_schema, subject_id_map_schema

ID_MAP_COLUMNS = tuple(subject_id_map_schema().columns)


def subject_id_maps(exposures: ir.Table, id_names: Sequence[str]) -> ir.Table:
    """`subject_id_map` of every secondary id, in one table (none: an empty one)."""
    if not id_names:
        return ibis.memtable(ibis_schema(subject_id_map_schema()).to_pyarrow().empty_table())
    parts = [subject_id_map(exposures, name) for name in id_names]
    return ibis.union(*parts, distinct=False) if len(parts) > 1 else parts[0]


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
