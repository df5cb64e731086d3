"""Assignment rules on small tables: the exposure window, first exposure wins, multi-variant
subjects, corrections with history, subject counts; on both engines."""

import datetime as dt

import pandas as pd

from exp_pipeline.transforms.assignments import (
    apply_assignment_history,
    assignment_counts,
    exposure_row_counts,
    first_exposures,
)
from exp_pipeline.vocabulary import MULTIPLE_VARIANTS
from exp_pipeline_tests.tables import experiment, raw_rows, ts


def dedupe(con, rows, exp=None) -> pd.DataFrame:
    raw = raw_rows(con, rows)
    out = first_exposures(raw, [exp or experiment()], ["device_type"])
    return con.to_pandas(out).set_index("subject_id").sort_index()


# -- assignment rules ---------------------------------------------------------------------------


def test_only_exposures_inside_the_experiment_window_count(con):
    out = dedupe(con, [
        ("before", "control", "2026-09-30T23:59:59.999999Z", "ios"),
        ("at_start", "control", "2026-10-01T00:00:00Z", "ios"),
        ("at_end", "control", "2026-10-29T00:00:00Z", "ios"),
        ("late_first", "treatment", "2026-09-25T00:00:00Z", "ios"),   # QA exposure before start
        ("late_first", "control", "2026-10-03T00:00:00Z", "web"),     # the real one
    ])
    assert sorted(out.index) == ["at_start", "late_first"]
    # The pre-start exposure of another variant neither wins nor makes the subject multi-variant.
    assert out.loc["late_first", "variant_id"] == "control"
    assert out.loc["late_first", "exclusion_reason"] is None


def test_first_exposure_wins_and_freezes_properties(con):
    out = dedupe(con, [
        ("s1", "treatment", "2026-10-05T10:00:00Z", "android"),
        ("s1", "treatment", "2026-10-02T08:00:00Z", "ios"),
        ("s1", "treatment", "2026-10-09T00:00:00Z", "web"),
    ])
    row = out.loc["s1"]
    assert row["assigned_at"] == ts("2026-10-02T08:00:00Z")
    assert row["device_type"] == "ios"
    assert row["n_exposures"] == 3 and row["n_variants_seen"] == 1


def test_subjects_seeing_two_variants_are_kept_but_excluded(con):
    out = dedupe(con, [
        ("both", "control", "2026-10-02T00:00:00Z", "ios"),
        ("both", "treatment", "2026-10-03T00:00:00Z", "ios"),
        ("clean", "treatment", "2026-10-02T00:00:00Z", "ios"),
    ])
    assert out.loc["both", "exclusion_reason"] == MULTIPLE_VARIANTS
    assert out.loc["both", "n_variants_seen"] == 2
    assert out.loc["clean", "exclusion_reason"] is None


def test_exposures_outside_the_window_are_counted_per_reason(con):
    raw = raw_rows(con, [
        ("ok", "control", "2026-10-02T00:00:00Z", "ios"),
        ("early", "control", "2026-09-01T00:00:00Z", "ios"),
        ("late", "control", "2026-11-01T00:00:00Z", "ios"),
    ])
    counts = con.to_pandas(exposure_row_counts(raw, [experiment()]))
    assert dict(zip(counts["reason"], counts["rows"], strict=True)) == {"used": 1, "outside_window": 2}


def test_every_experiment_is_deduplicated_in_one_query_by_its_own_rules(con):
    rows = pd.DataFrame([
        ("exp", "s", "control", "2026-10-02T00:00:00Z"),
        ("exp", "s", "treatment", "2026-10-03T00:00:00Z"),     # two variants in exp: multi-variant there
        ("later", "s", "treatment", "2026-10-03T00:00:00Z"),   # the same subject id in another experiment
        ("later", "t", "control", "2026-10-02T00:00:00Z"),     # before later's start: not counted there
    ], columns=["experiment_id", "subject_id", "variant_id", "assigned_at"])
    rows["assigned_at"] = pd.to_datetime(rows["assigned_at"], utc=True)
    rows["device_type"], rows["source_file"] = "ios", "f.parquet"
    raw = con.create_table("raw_two", rows)
    experiments = [experiment(), experiment(id="later", start_at=dt.datetime(2026, 10, 3, tzinfo=dt.UTC))]
    out = con.to_pandas(first_exposures(raw, experiments, ["device_type"])).set_index(["experiment_id", "subject_id"])
    assert sorted(out.index) == [("exp", "s"), ("later", "s")]
    assert out.loc[("exp", "s"), "exclusion_reason"] == MULTIPLE_VARIANTS
    assert out.loc[("later", "s"), "exclusion_reason"] is None and out.loc[("later", "s"), "variant_id"] == "treatment"
    counts = con.to_pandas(exposure_row_counts(raw, experiments))
    assert set(zip(counts.experiment_id, counts.reason, counts.rows, strict=True)) == {
        ("exp", "used", 2), ("later", "used", 1), ("later", "outside_window", 1),
    }


def test_running_experiment_has_no_upper_bound(con):
    out = dedupe(con, [("s", "control", "2027-01-01T00:00:00Z", "ios")], experiment(end_at=None))
    assert list(out.index) == ["s"]


def test_ties_on_the_first_timestamp_are_broken_deterministically(con):
    rows = [
        ("s", "treatment", "2026-10-02T00:00:00Z", "web"),
        ("s", "treatment", "2026-10-02T00:00:00Z", "ios"),
    ]
    first = dedupe(con, rows)
    again = dedupe(con, list(reversed(rows)))
    assert first.loc["s", "device_type"] == again.loc["s", "device_type"]


def history(con, current_rows, previous: str | None, at: str, name: str, properties=("device_type",)) -> pd.DataFrame:
    """Run one dedupe + history step; the state is kept as table `name` for the next step."""
    current = first_exposures(raw_rows(con, current_rows), [experiment()], list(properties))
    prev = con.table(previous) if previous is not None else None
    out = apply_assignment_history(current, prev, dt.datetime.fromisoformat(at), list(properties))
    con.create_table(name, out)
    return con.to_pandas(con.table(name)).sort_values(["subject_id", "valid_from"]).reset_index(drop=True)


def test_rerun_on_the_same_log_changes_nothing(con):
    rows = [("a", "control", "2026-10-02T00:00:00Z", "ios"), ("b", "treatment", "2026-10-02T00:00:00Z", "ios")]
    first = history(con, rows, None, "2026-10-10T00:00:00+00:00", "s1")
    assert first["is_active"].all() and first["valid_to"].isna().all()
    second = history(con, rows, "s1", "2026-10-11T00:00:00+00:00", "s2")
    pd.testing.assert_frame_equal(first, second)


def test_a_corrected_variant_closes_the_old_row_and_opens_a_new_one(con):
    before = [("a", "control", "2026-10-02T00:00:00Z", "ios"), ("b", "treatment", "2026-10-02T00:00:00Z", "ios")]
    history(con, before, None, "2026-10-10T00:00:00+00:00", "s1")
    corrected = [("a", "treatment", "2026-10-02T00:00:00Z", "ios"), ("b", "treatment", "2026-10-02T00:00:00Z", "ios")]
    second = history(con, corrected, "s1", "2026-10-11T00:00:00+00:00", "s2")
    a = second[second.subject_id == "a"]
    assert len(a) == 2
    old, new = a.iloc[0], a.iloc[1]
    assert (old.variant_id, old.is_active, old.valid_to) == ("control", False, ts("2026-10-11T00:00:00Z"))
    assert (new.variant_id, new.is_active, new.valid_from) == ("treatment", True, ts("2026-10-11T00:00:00Z"))
    # One active row per subject, and the untouched subject keeps its original row.
    assert second[second.is_active].groupby("subject_id").size().max() == 1
    b = second[second.subject_id == "b"]
    assert len(b) == 1 and b.iloc[0].valid_from == ts("2026-10-10T00:00:00Z")
    # A third run keeps the closed row forever.
    third = history(con, corrected, "s2", "2026-10-12T00:00:00+00:00", "s3")
    pd.testing.assert_frame_equal(second, third)


def test_a_property_added_to_the_registry_is_filled_from_the_log_without_a_correction(con):
    rows = [("a", "control", "2026-10-02T00:00:00Z", "ios"), ("b", "treatment", "2026-10-03T00:00:00Z", "web")]
    first = history(con, rows, None, "2026-10-10T00:00:00+00:00", "s1", properties=())
    assert "device_type" not in first.columns
    second = history(con, rows, "s1", "2026-10-11T00:00:00+00:00", "s2")
    # The same subjects, rows and valid_from: no correction, and the new property's values.
    assert second.is_active.all() and len(second) == 2
    assert list(second.valid_from) == [ts("2026-10-10T00:00:00Z")] * 2
    assert list(second.device_type) == ["ios", "web"]
    # A value recorded stays as recorded, even when the log's first exposure now says otherwise.
    relabelled = [("a", "control", "2026-10-02T00:00:00Z", "android"), rows[1]]
    third = history(con, relabelled, "s2", "2026-10-12T00:00:00+00:00", "s3")
    assert list(third.device_type) == ["ios", "web"]


def test_a_property_removed_from_the_registry_leaves_the_rows_and_their_history(con):
    before = [("a", "control", "2026-10-02T00:00:00Z", "ios"), ("b", "treatment", "2026-10-03T00:00:00Z", "web")]
    history(con, before, None, "2026-10-10T00:00:00+00:00", "s1")
    corrected = [("a", "treatment", "2026-10-02T00:00:00Z", "ios"), before[1]]
    history(con, corrected, "s1", "2026-10-11T00:00:00+00:00", "s2")
    third = history(con, corrected, "s2", "2026-10-12T00:00:00+00:00", "s3", properties=())
    assert "device_type" not in third.columns
    assert len(third) == 3 and third.is_active.sum() == 2  # the closed row of a stays
    assert third[third.subject_id == "b"].valid_from.tolist() == [ts("2026-10-10T00:00:00Z")]


def test_assignment_counts_overall_and_per_property(con):
    frame = pd.DataFrame({
        "variant_id": ["control", "control", "treatment"],
        "device_type": ["ios", None, "ios"],
    })
    out = con.to_pandas(assignment_counts(con.create_table("a", frame), ["device_type"]))
    got = {(r.property, r.value, r.variant_id): r.n for r in out.itertuples()}
    assert got == {
        ("", "", "control"): 2, ("", "", "treatment"): 1,
        ("device_type", "ios", "control"): 1, ("device_type", "(null)", "control"): 1,
        ("device_type", "ios", "treatment"): 1,
    }
