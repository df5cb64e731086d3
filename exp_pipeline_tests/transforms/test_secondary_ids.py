"""Secondary IDs on small tables: the first subject wins, conflicts are counted, a subject without
an ID counts as zero, an ID's events before its subject's assignment do not count."""

import ibis
import pandas as pd

from exp_pipeline.transforms.assignments import first_exposures
from exp_pipeline.transforms.secondary_ids import ID_MAP_COLUMNS, subject_id_map, subject_id_maps
from exp_pipeline.transforms.temporal_join import post_assignment_rows, window_rows
from exp_pipeline_tests.tables import assignments_table, events_table, experiment, metric, values_of, windows_table


def exposures(con, rows):
    """Exposure rows (experiment, anonymous subject, time, user_id or None)."""
    frame = pd.DataFrame(rows, columns=["experiment_id", "subject_id", "assigned_at", "user_id"])
    frame["assigned_at"] = pd.to_datetime(frame["assigned_at"], utc=True)
    return con.create_table("exposures", frame)


def id_map(con, rows):
    out = con.to_pandas(subject_id_map(exposures(con, rows), "user_id"))
    assert tuple(out.columns) == ID_MAP_COLUMNS
    return {(r.experiment_id, r.secondary_id): (r.subject_id, r.n_subjects) for r in out.itertuples()}


def test_the_first_subject_seen_with_an_id_owns_it_and_conflicts_are_counted(con):
    got = id_map(con, [
        ("exp", "anon_b", "2026-10-02T10:00:00Z", "u1"),  # u1 first seen on anon_b ...
        ("exp", "anon_a", "2026-10-02T11:00:00Z", "u1"),  # ... then on anon_a: a conflict
        ("exp", "anon_a", "2026-10-01T09:00:00Z", None),  # anon_a's earlier exposure had no user_id
        ("exp", "anon_c", "2026-10-03T00:00:00Z", "u2"),
        ("exp", "anon_c", "2026-10-04T00:00:00Z", "u2"),  # the same pair again: not a conflict
        ("other", "anon_a", "2026-10-01T00:00:00Z", "u1"),  # each experiment has its own map
    ])
    assert got == {("exp", "u1"): ("anon_b", 2), ("exp", "u2"): ("anon_c", 1), ("other", "u1"): ("anon_a", 1)}


def test_a_tie_goes_to_the_smaller_subject_id(con):
    got = id_map(con, [
        ("exp", "anon_z", "2026-10-02T10:00:00Z", "u1"),
        ("exp", "anon_y", "2026-10-02T10:00:00Z", "u1"),
    ])
    assert got == {("exp", "u1"): ("anon_y", 2)}


def test_a_subjects_first_logged_id_is_on_its_earliest_usable_exposure_carrying_one(con):
    rows = exposures(con, [
        ("exp", "anon_a", "2026-09-30T00:00:00Z", "u0"),  # before the experiment: not usable
        ("exp", "anon_a", "2026-10-01T00:00:00Z", None),
        ("exp", "anon_a", "2026-10-02T00:00:00Z", "u2"),
        ("exp", "anon_a", "2026-10-03T00:00:00Z", "u1"),
        ("exp", "anon_b", "2026-10-01T00:00:00Z", None),
    ]).mutate(variant_id=ibis.literal("control"), source_file=ibis.literal("f.parquet"))
    out = con.to_pandas(first_exposures(rows, [experiment()], [], ["user_id"]))
    got = dict(zip(out["subject_id"], out["user_id"].where(out["user_id"].notna(), None), strict=True))
    assert got == {"anon_a": "u2", "anon_b": None}
    assert set(out.loc[out.subject_id == "anon_a", "assigned_at"]) == {pd.Timestamp("2026-10-01", tz="UTC")}


def test_without_secondary_ids_the_map_is_empty(con):
    rows = exposures(con, [("exp", "anon_a", "2026-10-01T00:00:00Z", "u1")])
    out = con.to_pandas(subject_id_maps(rows, []))
    assert out.empty and tuple(out.columns) == ID_MAP_COLUMNS


def test_user_keyed_events_count_for_their_subject_from_its_assignment_on(con):
    owners = con.create_table("id_map", subject_id_map(exposures(con, [
        ("exp", "anon_a", "2026-10-05T00:00:00Z", None),  # assigned before logging in
        ("exp", "anon_a", "2026-10-06T00:00:00Z", "u1"),
        ("exp", "anon_b", "2026-10-05T00:00:00Z", None),  # never logs in
        ("exp", "anon_c", "2026-10-07T00:00:00Z", "u1"),  # u1 again: anon_a saw it first
    ]), "user_id"))
    assignments = assignments_table(con, [
        ("anon_a", "treatment", "2026-10-05T00:00:00Z"),
        ("anon_b", "treatment", "2026-10-05T00:00:00Z"),
        ("anon_c", "control", "2026-10-07T00:00:00Z"),
    ])
    purchases = events_table(con, [
        ("u1", "2026-10-04T00:00:00Z", "purchase", 1.0),   # before anon_a's assignment: out
        ("u1", "2026-10-05T12:00:00Z", "purchase", 2.0),   # after assignment, before login: in
        ("u1", "2026-10-08T00:00:00Z", "purchase", 4.0),   # in, and anon_a's, not anon_c's
        ("u9", "2026-10-08T00:00:00Z", "purchase", 8.0),   # an ID no subject was seen with
    ])
    orders = metric(entity="user_id")
    rows = con.to_pandas(post_assignment_rows(window_rows(assignments, purchases, windows_table(con, [orders]), owners)))
    assert sorted(zip(rows["subject_id"], rows["value"], strict=True)) == [("anon_a", 2.0), ("anon_a", 4.0)]
    # The subject's own events (keyed by anon ids) are not the metric's: none has the key u1.
    assert con.to_pandas(post_assignment_rows(window_rows(assignments, purchases, windows_table(con, [metric()])))).empty
    # The pass's aggregated join agrees, and every assigned subject is analysed: anon_b (no user_id)
    # and anon_c (a user_id anon_a saw first) as zero.
    values = values_of(con, assignments, purchases, [orders], id_map=owners)
    subjects = pd.DataFrame({"experiment_id": ["exp", "exp"], "variant_id": ["control", "treatment"], "n": [1, 2]})
    stats = con.statistics(values, subjects).set_index("variant_id")
    assert stats.loc["treatment", "n"] == 2 and stats.loc["treatment", "sum_y"] == 6.0
    assert stats.loc["control", "sum_y"] == 0.0
