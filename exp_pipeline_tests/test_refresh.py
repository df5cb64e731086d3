"""The incremental refresh: its bounds and rows, and when stored per-subject values are reused."""

import datetime as dt

import ibis
import pandas as pd
import pytest

from exp_pipeline.refresh import (
    SubjectValuesReuse,
    assignments_changed_since,
    history_reaches,
    next_events_through,
    recomputed_subjects,
    refresh_lower_bound,
    refreshed_window_events,
    subject_values_reuse,
)
from exp_pipeline_tests.tables import events_table, metric


def test_refresh_bounds_reach_back_for_the_windows_of_new_subjects():
    through = dt.datetime(2026, 10, 29, 23, 0, tzinfo=dt.UTC)
    cutoff, scan_from = refresh_lower_bound(through, 2, None, 14)
    assert cutoff == scan_from == dt.datetime(2026, 10, 27, 23, 0, tzinfo=dt.UTC)
    new = dt.datetime(2026, 10, 29, 12, 0, tzinfo=dt.UTC)
    cutoff, scan_from = refresh_lower_bound(through, 2, new, 14)
    assert cutoff == dt.datetime(2026, 10, 27, 23, 0, tzinfo=dt.UTC)
    assert scan_from == dt.datetime(2026, 10, 15, 12, 0, tzinfo=dt.UTC)


def test_the_next_refresh_never_starts_in_the_future():
    now = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.UTC)
    yesterday, wrong_clock = now - dt.timedelta(days=1), now + dt.timedelta(days=9)
    assert next_events_through(yesterday, None, now) == yesterday
    assert next_events_through(None, yesterday, now) == yesterday
    assert next_events_through(wrong_clock, yesterday, now) == now
    assert next_events_through(None, None, now) is None


def test_refreshed_rows_are_recent_events_and_whole_windows_of_new_subjects(con):
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": ["old", "new"], "variant_id": "control",
        "assigned_at": pd.to_datetime(["2026-10-02T00:00:00Z", "2026-10-20T00:00:00Z"], utc=True),
        "is_new": [False, True],
    })
    a = con.create_table("flagged", frame, overwrite=True)
    e = events_table(con, [
        ("old", "2026-10-10T00:00:00Z", "purchase", 1.0),   # old subject, before the cutoff: kept as stored
        ("old", "2026-10-15T00:00:00Z", "purchase", 2.0),   # old subject, after the cutoff: refreshed
        ("new", "2026-10-10T00:00:00Z", "purchase", 4.0),   # new subject's pre-period: needed
        ("new", "2026-10-21T00:00:00Z", "purchase", 8.0),   # new subject's post-period
    ])
    cutoff = dt.datetime(2026, 10, 14, tzinfo=dt.UTC)
    scan_from = dt.datetime(2026, 10, 6, tzinfo=dt.UTC)
    rows = con.to_pandas(refreshed_window_events(a, e, [metric()], 14, cutoff, scan_from))
    assert sorted(zip(rows["subject_id"], rows["value"], strict=True)) == [("new", 4.0), ("new", 8.0), ("old", 2.0)]


T0 = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)


def _stored(**changes) -> dict:
    return {
        "fingerprint": "f", "events_refreshed_at": T0, "events_assignments_as_of": T0,
        "assignments_as_of": T0, **changes,
    }


def _events_state(**changes) -> dict:
    day = dt.timedelta(days=1)
    return {
        "refreshed_at": T0 + day, "mode": "incremental", "refreshed_from": T0 - 2 * day,
        "previous_refreshed_at": T0, **changes,
    }


def test_stored_values_after_one_incremental_refresh_are_reused_up_to_its_cutoff():
    reuse = subject_values_reuse(_stored(), _events_state(), "f", widest_window_days=14)
    cutoff = T0 - dt.timedelta(days=2)
    assert reuse == SubjectValuesReuse(
        post_assigned_after=cutoff - dt.timedelta(days=14), pre_assigned_after=cutoff, changed_since=T0
    )


def test_with_no_refresh_since_only_changed_assignments_are_recomputed():
    reuse = subject_values_reuse(
        _stored(), _events_state(refreshed_at=T0), "f", widest_window_days=14
    )
    assert reuse == SubjectValuesReuse(None, None, T0)


@pytest.mark.parametrize(
    ("stored", "events_state", "fingerprint"),
    [
        pytest.param(None, _events_state(), "f", id="nothing stored"),
        pytest.param(_stored(), None, "f", id="no window events state"),
        pytest.param(_stored(), _events_state(), "g", id="definitions changed"),
        pytest.param(_stored(), _events_state(mode="full", refreshed_from=None), "f", id="a full rebuild since"),
        pytest.param(_stored(), _events_state(previous_refreshed_at=T0 - dt.timedelta(days=1)), "f",
                     id="a refresh these values never saw"),
        pytest.param(_stored(assignments_as_of=None), _events_state(), "f", id="no assignments then"),
        pytest.param(_stored(events_assignments_as_of=None), _events_state(), "f",
                     id="window events of no assignments then"),
    ],
)
def test_stored_values_are_not_reused_when_anything_they_rest_on_changed(stored, events_state, fingerprint):
    assert subject_values_reuse(stored, events_state, fingerprint, 14) is None


def test_recomputed_subjects_are_the_recently_assigned_and_the_changed(con):
    assignments = ibis.memtable(pd.DataFrame({
        "subject_id": ["old", "recent", "corrected"],
        "assigned_at": pd.to_datetime([T0 - dt.timedelta(days=20), T0, T0 - dt.timedelta(days=20)], utc=True),
        "valid_from": pd.to_datetime([T0 - dt.timedelta(days=20), T0, T0 + dt.timedelta(hours=1)], utc=True),
    }))
    after = T0 - dt.timedelta(days=1)
    chosen = lambda assigned_after: sorted(  # noqa: E731
        con.to_pandas(assignments.filter(recomputed_subjects(assignments, assigned_after, T0))).subject_id
    )
    assert chosen(after) == ["corrected", "recent"]
    assert chosen(None) == ["corrected"]


def test_subjects_whose_assignment_history_changed_since_a_refresh(con):
    before, after = T0 - dt.timedelta(days=3), T0 + dt.timedelta(hours=1)
    rows = pd.DataFrame([
        # subject, valid_from, valid_to
        ("unchanged", before, None),
        ("corrected", before, after), ("corrected", after, None),
        ("deactivated", before, after),
        ("new", after, None),
        ("superseded_earlier", before - dt.timedelta(days=1), before), ("superseded_earlier", before, None),
    ], columns=["subject_id", "valid_from", "valid_to"])
    for column in ("valid_from", "valid_to"):
        rows[column] = pd.to_datetime(rows[column], utc=True)
    changed = con.to_pandas(assignments_changed_since(ibis.memtable(rows), T0))
    assert sorted(changed.subject_id) == ["corrected", "deactivated", "new"]


def test_values_valued_after_a_refresh_on_newer_assignments_are_recomputed_from_the_older():
    # deduped_assignments ran between the window events (assignments of T0) and the values
    # (assignments of T0 + 1 h): the next refresh rewrote subjects changed since T0.
    later = T0 + dt.timedelta(hours=1)
    stored = _stored(assignments_as_of=later, events_assignments_as_of=T0)
    reuse = subject_values_reuse(stored, _events_state(), "f", widest_window_days=14)
    assert reuse.changed_since == T0


def test_a_rebuilt_assignment_history_starts_the_refresh_over():
    assert history_reaches(T0 - dt.timedelta(days=1), T0)
    assert not history_reaches(T0 + dt.timedelta(seconds=1), T0)  # every row newer
    assert not history_reaches(None, T0)  # no rows at all
    assert not history_reaches(T0, None)
