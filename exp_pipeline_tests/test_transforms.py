"""Transforms on small tables built here, executed by an in-memory DuckDB through Ibis."""

import datetime as dt
import math

import duckdb
import ibis
import numpy as np
import pandas as pd
import pytest

from exp_pipeline import transforms
from exp_pipeline.registry import Experiment, Metric, Source
from exp_pipeline.warehouse import DuckDBWarehouseSession
from exp_pipeline_tests.conftest import ENGINES, spark_warehouse_at

UTC = dt.timezone.utc
START = dt.datetime(2026, 10, 1, tzinfo=UTC)
END = dt.datetime(2026, 10, 29, tzinfo=UTC)


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


class EngineTables:
    """Tables built from frames and run on one engine, through the warehouse session's interface."""

    def __init__(self, session):
        self.session = session
        self.tables: dict[str, ibis.Table] = {}

    def create_table(self, name: str, obj, overwrite: bool = True) -> ibis.Table:
        if not isinstance(obj, ibis.Table):
            # A missing value is a null on every engine (Spark would keep pandas' NaN as NaN).
            obj = ibis.memtable(obj.astype(object).where(obj.notna(), None), schema=ibis.memtable(obj).schema())
        expr = obj
        self.tables[name] = self.session.temp_table(name, expr)
        return self.tables[name]

    def bounds(self, table: ibis.Table, by: str = "metric") -> dict[str, transforms.SumBound]:
        return transforms.read_bounds(self.session.to_pandas(transforms.value_bounds(table, by)), by)

    def table(self, name: str) -> ibis.Table:
        return self.tables[name]

    def to_pandas(self, expr) -> pd.DataFrame:
        return self.session.to_pandas(expr)


@pytest.fixture(params=ENGINES)
def con(request, tmp_path):
    """The transforms on each engine: DuckDB in memory, Spark in local mode."""
    if request.param == "duckdb":
        yield EngineTables(DuckDBWarehouseSession(duckdb.connect(), "exp"))
    else:
        with spark_warehouse_at(tmp_path).session() as session:
            yield EngineTables(session)


@pytest.fixture()
def duck():
    """DuckDB alone: reading files is the engine's part (see test_warehouse for both engines)."""
    return ibis.duckdb.connect()


def experiment(**overrides) -> Experiment:
    fields = dict(
        id="exp",
        name="Exp",
        start_at=START,
        end_at=END,
        variants=[{"id": "control", "weight": 0.5, "control": True}, {"id": "treatment", "weight": 0.5}],
        metrics=["revenue"],
    )
    fields.update(overrides)
    return Experiment.model_validate(fields)


def raw_rows(con, rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "variant_id", "assigned_at", "device_type"])
    frame["assigned_at"] = pd.to_datetime(frame["assigned_at"], utc=True, format="ISO8601")
    frame.insert(0, "experiment_id", "exp")
    frame["source_file"] = "f.parquet"
    return con.create_table("raw", frame, overwrite=True)


def dedupe(con, rows, exp=None) -> pd.DataFrame:
    raw = raw_rows(con, rows)
    out = transforms.first_exposures(raw, exp or experiment(), ["device_type"])
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
    assert out.loc["both", "exclusion_reason"] == transforms.MULTIPLE_VARIANTS
    assert out.loc["both", "n_variants_seen"] == 2
    assert out.loc["clean", "exclusion_reason"] is None


def test_exposures_outside_the_window_are_counted_per_reason(con):
    raw = raw_rows(con, [
        ("ok", "control", "2026-10-02T00:00:00Z", "ios"),
        ("early", "control", "2026-09-01T00:00:00Z", "ios"),
        ("late", "control", "2026-11-01T00:00:00Z", "ios"),
    ])
    counts = con.to_pandas(transforms.exposure_row_counts(raw, experiment()))
    assert dict(zip(counts["reason"], counts["rows"])) == {"used": 1, "outside_window": 2}


# -- ingestion: every row ingested or rejected with a reason --------------------------------------

def logged_exposures(con, rows):
    frame = pd.DataFrame(rows, columns=["user_id", "exp_key", "arm", "device_type", "ts"])
    frame["source_file"] = "log.csv"
    return transforms.canonical_assignments(con.create_table("log", frame, overwrite=True), SOURCE, "exp")


def test_assignment_rows_are_ingested_or_rejected_with_a_reason(con):
    rows = logged_exposures(con, [
        ("ok", "exp", "control", "ios", "2026-10-02T00:00:00Z"),
        ("ok", "exp", "control", "ios", "2026-10-02T00:00:00Z"),       # exact duplicate
        ("ok", "exp", "control", "ios", "2026-10-03T00:00:00Z"),       # a repeat exposure, not a duplicate
        (None, "exp", "control", "ios", "2026-10-02T00:00:00Z"),
        ("  ", "exp", "control", "ios", "2026-10-02T00:00:00Z"),
        ("v", "exp", None, "ios", "2026-10-02T00:00:00Z"),
        ("t", "exp", "control", "ios", None),
        ("u", "exp", "control", "ios", "yesterday-ish"),
        ("x", "exp", "purple", "ios", "2026-10-02T00:00:00Z"),
        ("other", "exp2", "control", "ios", "2026-10-02T00:00:00Z"),   # another experiment: not read here
    ])
    classified = transforms.classify_assignments(rows, experiment(), ["device_type"])
    counts = con.to_pandas(transforms.rejection_counts(classified))
    got = dict(zip(counts["reason"], counts["rows"]))
    assert got == {
        "ingested": 2, "duplicate_row": 1, "missing_subject_id": 2, "missing_variant_id": 1,
        "missing_timestamp": 1, "unparsable_timestamp": 1, "unknown_variant": 1,
    }
    ingested = con.to_pandas(transforms.ingested(classified))
    assert list(ingested.columns) == [
        "experiment_id", "subject_id", "variant_id", "assigned_at", "device_type", "source_file"
    ]
    rejected = con.to_pandas(transforms.rejected(classified, "assignments", "exp"))
    assert len(ingested) + len(rejected) == 9  # ingested + rejected = read
    unparsable = rejected[rejected.reason == "unparsable_timestamp"].iloc[0]
    assert unparsable.source_file == "log.csv" and unparsable.experiment_id == "exp"
    assert "assigned_at=yesterday-ish" in unparsable.record and "subject_id=u" in unparsable.record


def test_rows_of_no_known_experiment_are_found(con):
    frame = pd.DataFrame({
        "user_id": ["a", "b", "c", "d"], "exp_key": ["exp", "nope", None, " "], "arm": "control",
        "device_type": "ios", "ts": "2026-10-02T00:00:00Z", "source_file": "f",
    })
    rows = transforms.canonical_assignments(con.create_table("log", frame), SOURCE, None)
    counts = con.to_pandas(transforms.rejection_counts(transforms.unassignable_rows(rows, ["exp"])))
    assert dict(zip(counts["reason"], counts["rows"])) == {
        "ingested": 1, "unknown_experiment": 1, "missing_experiment_id": 2,
    }


EVENT_SOURCE = Source(path="e.csv", columns={"subject_id": "user_id", "event_at": "ts", "event_name": "event", "value": "amount"})


def test_event_rows_are_usable_or_rejected_with_a_reason(con):
    frame = pd.DataFrame(
        [
            ("a", "2026-10-02T00:00:00Z", "purchase", "10.5"),
            ("a", "2026-10-02T00:00:00Z", "purchase", "10.5"),   # logged twice
            ("a", "2026-10-03T00:00:00Z", "session", None),       # no value: fine
            ("b", "2026-10-02T00:00:00Z", "purchase", "ten"),
            ("f", "2026-10-02T00:00:00Z", "purchase", "inf"),     # a number, but no amount
            ("g", "2026-10-02T00:00:00Z", "purchase", "-Infinity"),
            ("c", "not a time", "purchase", "1"),
            ("d", None, "purchase", "1"),
            (None, "2026-10-02T00:00:00Z", "purchase", "1"),
            ("e", "2026-10-02T00:00:00Z", "", "1"),
        ],
        columns=["user_id", "ts", "event", "amount"],
    )
    frame["source_file"] = "events.csv"
    events = transforms.canonical_events(con.create_table("ev", frame), EVENT_SOURCE)
    counts = con.to_pandas(transforms.rejection_counts(transforms.classify_events(events)))
    assert dict(zip(counts["reason"], counts["rows"])) == {
        "ingested": 2, "duplicate_row": 1, "non_numeric_value": 3, "unparsable_timestamp": 1,
        "missing_timestamp": 1, "missing_subject_id": 1, "missing_event_name": 1,
    }
    usable = transforms.usable_events(events, ["purchase"])
    # The per-experiment path keeps both copies and the row without a subject here: the temporal
    # join drops the duplicate, and a missing subject id matches no assigned subject.
    assert sorted(con.to_pandas(usable)["value"]) == [1.0, 10.5, 10.5]
    assigned = assignments_table(con, [("a", "control", "2026-10-01T00:00:00Z")])
    joined = con.to_pandas(post_rows(assigned, usable, [metric()]))
    assert joined["value"].tolist() == [10.5]


def test_a_value_column_of_the_wrong_type_is_rejected_not_read_as_missing(con):
    frame = pd.DataFrame({
        "user_id": ["a", "b"],
        "ts": pd.to_datetime(["2026-10-02T00:00:00Z", "2026-10-02T00:00:00Z"], utc=True),
        "event": ["purchase", "purchase"],
        "amount": pd.to_datetime(["2026-10-02T00:00:00Z", None], utc=True),  # mapped to the wrong column
        "source_file": "events.parquet",
    })
    events = transforms.canonical_events(con.create_table("typed", frame), EVENT_SOURCE)
    counts = con.to_pandas(transforms.rejection_counts(transforms.classify_events(events)))
    assert dict(zip(counts["reason"], counts["rows"])) == {"non_numeric_value": 1, "ingested": 1}


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


# -- corrections keep history -------------------------------------------------------------------

def history(con, current_rows, previous: str | None, at: str, name: str) -> pd.DataFrame:
    """Run one dedupe + history step; the state is kept as table `name` for the next step."""
    current = transforms.first_exposures(raw_rows(con, current_rows), experiment(), ["device_type"])
    prev = con.table(previous) if previous is not None else None
    out = transforms.apply_assignment_history(current, prev, dt.datetime.fromisoformat(at))
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


# -- temporal join edges ------------------------------------------------------------------------

def metric(**overrides) -> Metric:
    fields = dict(id="revenue", event_name="purchase", aggregation="sum", window_start_days=0, window_end_days=14)
    fields.update(overrides)
    return Metric.model_validate(fields)


def post_rows(assignments, events, metrics):
    """post_assignment_events as the pipeline builds it: the window join, post-assignment half."""
    return transforms.post_assignment_rows(transforms.join_window_events(assignments, events, metrics, 0))


def assignments_table(con, rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "variant_id", "assigned_at"])
    frame["assigned_at"] = pd.to_datetime(frame["assigned_at"], utc=True)
    frame.insert(0, "experiment_id", "exp")
    return con.create_table("assignments", frame, overwrite=True)


def events_table(con, rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "event_at", "event_name", "value"])
    frame["event_at"] = pd.to_datetime(frame["event_at"], utc=True, format="ISO8601")
    frame["value"] = frame["value"].astype("float64")
    return con.create_table("events", frame, overwrite=True)


def test_temporal_join_edges(con):
    a = assignments_table(con, [("s", "control", "2026-10-02T12:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-02T12:00:00Z", "purchase", 1.0),          # exactly at assignment: in
        ("s", "2026-10-02T11:59:59.999999Z", "purchase", 2.0),   # just before: out
        ("s", "2026-10-16T11:59:59.999999Z", "purchase", 4.0),   # just before window end: in
        ("s", "2026-10-16T12:00:00Z", "purchase", 8.0),          # at window end (exclusive): out
        ("other", "2026-10-03T00:00:00Z", "purchase", 16.0),     # not assigned: out
    ])
    out = con.to_pandas(post_rows(a, e, [metric()]))
    assert sorted(out["value"]) == [1.0, 4.0]
    assert (out["event_at"] >= out["assigned_at"]).all()


def test_pre_assignment_window_edges(con):
    a = assignments_table(con, [("s", "control", "2026-10-15T00:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-01T00:00:00Z", "purchase", 1.0),          # exactly 14 days before: in
        ("s", "2026-09-30T23:59:59.999999Z", "purchase", 2.0),   # older: out
        ("s", "2026-10-14T23:59:59.999999Z", "purchase", 4.0),   # just before assignment: in
        ("s", "2026-10-15T00:00:00Z", "purchase", 8.0),          # at assignment: post, out
    ])
    out = con.to_pandas(transforms.pre_assignment_rows(transforms.join_window_events(a, e, [], 14)))
    assert sorted(out["value"]) == [1.0, 4.0]


def test_one_window_join_splits_into_post_and_pre_with_each_event_names_window(con):
    a = assignments_table(con, [("s", "control", "2026-10-15T00:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-01T00:00:00Z", "session", 1.0),     # pre-period start (14 days): pre
        ("s", "2026-10-14T00:00:00Z", "purchase", 2.0),    # pre
        ("s", "2026-10-21T23:59:59Z", "session", 4.0),     # inside the 7-day session window: post
        ("s", "2026-10-22T00:00:00Z", "session", 8.0),     # day 7 on: no session metric reaches it
        ("s", "2026-10-28T00:00:00Z", "purchase", 16.0),   # inside the 14-day purchase window: post
        ("s", "2026-10-28T00:00:00Z", "purchase", 16.0),   # logged twice: counts once
    ])
    metrics = [metric(), metric(id="sessions", event_name="session", aggregation="count", window_end_days=7)]
    window = transforms.join_window_events(a, e, metrics, 14)
    assert sorted(con.to_pandas(transforms.post_assignment_rows(window))["value"]) == [4.0, 16.0]
    assert sorted(con.to_pandas(transforms.pre_assignment_rows(window))["value"]) == [1.0, 2.0]


def test_experiment_events_keep_only_the_span_the_experiment_can_use(con):
    experiment = Experiment.model_validate({
        "id": "exp", "name": "Exp", "start_at": "2026-10-15T00:00:00Z", "end_at": "2026-10-20T00:00:00Z",
        "variants": [{"id": "control", "weight": 0.5, "control": True}, {"id": "treatment", "weight": 0.5}],
        "metrics": ["revenue"],
    })
    e = events_table(con, [
        ("s", "2026-09-30T23:59:59Z", "purchase", 1.0),    # before start minus the 15-day pre window
        ("s", "2026-09-30T00:00:00Z", "purchase", 2.0),    # also before it
        ("s", "2026-10-01T00:00:00Z", "purchase", 4.0),    # first usable instant (pre window)
        ("s", "2026-11-02T23:59:59Z", "purchase", 8.0),    # before end + 14 days
        ("s", "2026-11-03T00:00:00Z", "purchase", 16.0),   # end + 14 days: out
    ])
    kept = con.to_pandas(transforms.experiment_events(e, experiment, [metric()], 14))
    assert sorted(kept["value"]) == [4.0, 8.0]


def test_refresh_bounds_reach_back_for_the_windows_of_new_subjects():
    through = dt.datetime(2026, 10, 29, 23, 0, tzinfo=dt.timezone.utc)
    cutoff, scan_from = transforms.refresh_lower_bound(through, 2, None, 14)
    assert cutoff == scan_from == dt.datetime(2026, 10, 27, 23, 0, tzinfo=dt.timezone.utc)
    new = dt.datetime(2026, 10, 29, 12, 0, tzinfo=dt.timezone.utc)
    cutoff, scan_from = transforms.refresh_lower_bound(through, 2, new, 14)
    assert cutoff == dt.datetime(2026, 10, 27, 23, 0, tzinfo=dt.timezone.utc)
    assert scan_from == dt.datetime(2026, 10, 15, 12, 0, tzinfo=dt.timezone.utc)


def test_the_next_refresh_never_starts_in_the_future():
    now = dt.datetime(2026, 11, 23, 6, 0, tzinfo=dt.timezone.utc)
    yesterday, wrong_clock = now - dt.timedelta(days=1), now + dt.timedelta(days=9)
    assert transforms.next_events_through(yesterday, None, now) == yesterday
    assert transforms.next_events_through(None, yesterday, now) == yesterday
    assert transforms.next_events_through(wrong_clock, yesterday, now) == now
    assert transforms.next_events_through(None, None, now) is None


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
    cutoff = dt.datetime(2026, 10, 14, tzinfo=dt.timezone.utc)
    scan_from = dt.datetime(2026, 10, 6, tzinfo=dt.timezone.utc)
    rows = con.to_pandas(transforms.refreshed_window_events(a, e, [metric()], 14, cutoff, scan_from))
    assert sorted(zip(rows["subject_id"], rows["value"])) == [("new", 4.0), ("new", 8.0), ("old", 2.0)]


# -- per-subject metrics and sufficient statistics ----------------------------------------------

def test_per_subject_values_with_zeros_and_metric_windows(con):
    a = assignments_table(con, [
        ("buyer", "treatment", "2026-10-02T00:00:00Z"),
        ("idle", "control", "2026-10-02T00:00:00Z"),
    ])
    e = events_table(con, [
        ("buyer", "2026-10-02T01:00:00Z", "purchase", 10.0),
        ("buyer", "2026-10-03T01:00:00Z", "purchase", None),      # value missing: counts, sums 0
        ("buyer", "2026-10-10T00:00:00Z", "purchase", 5.0),       # day 8: outside the 7-day metric
        ("buyer", "2026-10-02T02:00:00Z", "session", None),
    ])
    metrics = [
        metric(),
        metric(id="purchases_7d", aggregation="count", window_end_days=7),
        metric(id="conversion", aggregation="conversion"),
        metric(id="sessions", event_name="session", aggregation="count"),
    ]
    post = post_rows(a, e, metrics)
    values = con.to_pandas(transforms.subject_metric_values(a, post, metrics, con.bounds(post, "event_name")))
    got = values.set_index(["subject_id", "metric"])["value"].to_dict()
    assert got == {
        ("buyer", "revenue"): 15.0, ("buyer", "purchases_7d"): 2.0,
        ("buyer", "conversion"): 1.0, ("buyer", "sessions"): 1.0,
        ("idle", "revenue"): 0.0, ("idle", "purchases_7d"): 0.0,
        ("idle", "conversion"): 0.0, ("idle", "sessions"): 0.0,
    }


def test_capping_winsorizes_at_the_percentile(con):
    values = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(101)],
        "variant_id": "control", "metric": "revenue", "value": np.arange(101, dtype=float),
    })
    t = con.create_table("values", values)
    capped = con.to_pandas(transforms.cap_subject_values(t, [metric(cap_percentile=0.9)]))
    # The percentile is of the non-zero values (the zero of subject s0 does not pull it down).
    assert capped["value"].max() == pytest.approx(np.quantile(np.arange(1, 101), 0.9))
    uncapped = con.to_pandas(transforms.cap_subject_values(t, [metric()]))
    assert uncapped["value"].max() == 100


def test_capping_a_sparse_metric_keeps_its_signal(con):
    # 8 buyers among 1000 subjects: a 99th percentile over everyone would be 0 and erase them.
    values = np.zeros(1000)
    values[:8] = [1, 1, 2, 1, 3, 1, 40, 2]
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(1000)],
        "variant_id": "control", "metric": "revenue", "value": values,
    })
    capped = con.to_pandas(transforms.cap_subject_values(con.create_table("v", frame), [metric(cap_percentile=0.99)]))
    kept = np.sort(capped["value"].to_numpy())[-8:]
    assert (kept > 0).all() and kept.max() < 40  # the outlier is capped, the buyers stay


def test_sufficient_statistics_match_numpy(con):
    rng = np.random.default_rng(7)
    n = 500
    frame = pd.DataFrame({
        "experiment_id": "exp", "subject_id": [f"s{i}" for i in range(n)],
        "variant_id": rng.choice(["control", "treatment"], n), "metric": "revenue",
        "value": rng.gamma(2, 10, n),
    })
    pre = frame.assign(value=frame["value"] * 0.5 + rng.normal(0, 1, n))
    pre = pre[pre.index % 10 != 0]  # subjects without pre-period events get x = 0
    post_t = con.create_table("post", frame)
    pre_t = con.create_table("pre", pre)
    out = con.to_pandas(
        transforms.sufficient_statistics(post_t, pre_t, con.bounds(post_t), con.bounds(pre_t))
    ).set_index("variant_id")
    merged = frame.merge(pre[["subject_id", "value"]].rename(columns={"value": "x"}), on="subject_id", how="left")
    merged["x"] = merged["x"].fillna(0.0)
    for variant, group in merged.groupby("variant_id"):
        row = out.loc[variant]
        y, x = group["value"], group["x"]
        assert row["n"] == len(group)
        # Correctly rounded sums (math.fsum) to the last bits: the fixed-point sums are exact but
        # for each term's rounding at 2**-120 of the largest possible total.
        for column, terms in [("sum_y", y), ("sum_y2", y * y), ("sum_x", x), ("sum_x2", x * x), ("sum_xy", x * y)]:
            assert row[column] == pytest.approx(math.fsum(terms), rel=1e-15, abs=0), column


def test_sums_do_not_depend_on_the_order_rows_are_stored_in(con):
    # A float sum of these gives 1 in this order (1e16 + 1 rounds back to 1e16) and 2 in others.
    values = [1e16, 1.0, -1e16, 1.0]
    orders = [[0, 1, 2, 3], [1, 3, 0, 2], [3, 2, 1, 0]]
    got = []
    for i, order in enumerate(orders):
        frame = pd.DataFrame({
            "experiment_id": "exp", "subject_id": [f"s{j}" for j in order], "variant_id": "control",
            "metric": "revenue", "value": [values[j] for j in order],
        })
        t = con.create_table(f"stored_{i}", frame)
        out = con.to_pandas(transforms.sufficient_statistics(t, None, con.bounds(t), None))
        got.append(out[["n", "sum_y", "sum_y2"]].iloc[0].tolist())
    assert got == [[4, 2.0, 2e32 + 2.0]] * len(orders)


def _sums(con, name: str, values: dict[str, list[float]]) -> pd.DataFrame:
    """sum_y and sum_y2 per metric of the given values (one subject each, one variant)."""
    frame = pd.DataFrame(
        [{"metric": metric, "value": v} for metric, vs in values.items() for v in vs]
    ).assign(experiment_id="exp", variant_id="control")
    frame["subject_id"] = [f"s{i}" for i in range(len(frame))]
    t = con.create_table(name, frame)
    out = con.to_pandas(transforms.sufficient_statistics(t, None, con.bounds(t), None))
    return out.set_index("metric")


@pytest.mark.parametrize("values", [
    [3e-300, 4e-300, 5e-310],   # tiny (the scale is beyond what one float can hold)
    [1e150, 1e150, -3e149],     # huge
    [-2.5, 1e-9, 7.25, 0.1],    # mixed signs and sizes
    [0.0, 0.0],                 # all zero: the bound is 0
])
def test_fixed_point_sums_are_the_correctly_rounded_sums(con, values):
    got = _sums(con, "values", {"m": values}).loc["m"]
    # Spark turns a double into a decimal through its shortest text (17 digits): each term is
    # rounded there at float precision, so its sums are within an ulp, not correctly rounded.
    rel = 0 if isinstance(con.session, DuckDBWarehouseSession) else 4e-16
    assert got["sum_y"] == pytest.approx(math.fsum(values), rel=rel, abs=0)
    assert got["sum_y2"] == pytest.approx(math.fsum(v * v for v in values), rel=rel, abs=0)


def test_each_metric_is_summed_on_its_own_scale(con):
    # A metric of small values beside one with a huge value: one shared scale would round the
    # small squares to nothing (sum_y2 off by 22% in a review's example); each its own keeps them.
    small = [0.001] * 1000
    got = _sums(con, "scales", {"small": small, "big": [1e13]})
    assert got.loc["small", "sum_y2"] == pytest.approx(math.fsum(v * v for v in small), rel=1e-15, abs=0)
    assert got.loc["small", "sum_y"] == pytest.approx(math.fsum(small), rel=1e-15, abs=0)
    assert got.loc["big", "sum_y2"] == 1e26


def test_a_term_beyond_float_range_is_summed_as_floats(con):
    # y * y overflows: that metric's sums are the engine's float sums (infinite), the others exact.
    got = _sums(con, "overflow", {"wild": [1e200, 1.0], "m": [0.1, 0.2, 0.3]})
    assert got.loc["wild", "sum_y2"] == math.inf and got.loc["wild", "sum_y"] == 1e200
    assert got.loc["m", "sum_y"] == math.fsum([0.1, 0.2, 0.3])


def test_bounds_of_values(con):
    t = con.create_table("bounded", pd.DataFrame({"metric": ["a", "a", "b"], "value": [-7.5, 2.0, 3.0]}))
    assert con.bounds(t) == {"a": transforms.SumBound(2, 7.5), "b": transforms.SumBound(1, 3.0)}
    assert con.bounds(t.filter(t.value > 100)) == {}


def test_assignment_counts_overall_and_per_property(con):
    frame = pd.DataFrame({
        "variant_id": ["control", "control", "treatment"],
        "device_type": ["ios", None, "ios"],
    })
    out = con.to_pandas(transforms.assignment_counts(con.create_table("a", frame), ["device_type"]))
    got = {(r.property, r.value, r.variant_id): r.n for r in out.itertuples()}
    assert got == {
        ("", "", "control"): 2, ("", "", "treatment"): 1,
        ("device_type", "ios", "control"): 1, ("device_type", "(null)", "control"): 1,
        ("device_type", "ios", "treatment"): 1,
    }


# -- ingestion: canonical names and timestamps from different writers ---------------------------

SOURCE = Source(
    path="x.parquet",
    columns={"subject_id": "user_id", "experiment_id": "exp_key", "variant_id": "arm", "assigned_at": "ts"},
    properties=["device_type"],
)


def _expected_instants():
    return [ts("2026-10-02T10:00:00.000001Z"), ts("2026-10-02T08:00:00Z")]


def test_canonical_assignments_from_pandas_nanosecond_parquet(duck, tmp_path):
    frame = pd.DataFrame({
        "user_id": ["a", "b"], "exp_key": "exp", "arm": "control", "device_type": "ios",
        "ts": pd.to_datetime(["2026-10-02T10:00:00.000001Z", "2026-10-02T08:00:00Z"], format="ISO8601"),
    })
    frame.to_parquet(tmp_path / "a.parquet")
    raw = duck.read_parquet(tmp_path / "a.parquet").mutate(source_file=ibis.literal("a.parquet"))
    out = duck.to_pandas(transforms.canonical_assignments(raw, SOURCE, "exp"))
    assert list(out["assigned_at"]) == _expected_instants()
    assert str(out["assigned_at"].dt.tz) == "UTC"


def test_canonical_assignments_from_duckdb_parquet_and_csv_with_offsets(duck, tmp_path):
    db = duckdb.connect()
    db.execute(
        "COPY (SELECT * FROM (VALUES ('a', 'exp', 'control', 'ios', TIMESTAMPTZ '2026-10-02 12:00:00.000001+02'),"
        " ('b', 'exp', 'control', 'ios', TIMESTAMPTZ '2026-10-02 08:00:00+00'))"
        " t(user_id, exp_key, arm, device_type, ts)) TO ? (FORMAT parquet)",
        [str(tmp_path / "b.parquet")],
    )
    raw = duck.read_parquet(tmp_path / "b.parquet").mutate(source_file=ibis.literal("b.parquet"))
    out = duck.to_pandas(transforms.canonical_assignments(raw, SOURCE, "exp"))
    assert list(out["assigned_at"]) == _expected_instants()
    # CSV: an offset, and a naive timestamp taken as UTC, in one file.
    (tmp_path / "c.csv").write_text(
        "user_id,exp_key,arm,device_type,ts\n"
        "a,exp,control,ios,2026-10-02T12:00:00.000001+02:00\n"
        "b,exp,control,ios,2026-10-02 08:00:00\n"
        "c,other,control,ios,2026-10-02 08:00:00\n"
    )
    raw = duck.read_csv(tmp_path / "c.csv", all_varchar=True).mutate(source_file=ibis.literal("c.csv"))
    out = duck.to_pandas(transforms.canonical_assignments(raw, SOURCE, "exp"))
    assert list(out["assigned_at"]) == _expected_instants()


def test_a_mapping_to_a_missing_column_names_it(con):
    raw = ibis.memtable(pd.DataFrame({"user_id": ["a"], "exp_key": ["exp"], "source_file": ["f"]}))
    with pytest.raises(ValueError, match=r"'arm' \(mapped from 'variant_id'\)"):
        transforms.canonical_assignments(raw, SOURCE, "exp")


# -- reuse of stored per-subject values ---------------------------------------------------------

T0 = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
SCALES = {"post": {"revenue": {"value_up1": 2.0**20}}}


def _stored(**changes) -> dict:
    return {
        "fingerprint": "f", "scales": SCALES, "events_refreshed_at": T0, "events_assignments_as_of": T0,
        "assignments_as_of": T0, **changes,
    }


def _events_state(**changes) -> dict:
    day = dt.timedelta(days=1)
    return {
        "refreshed_at": T0 + day, "mode": "incremental", "refreshed_from": T0 - 2 * day,
        "previous_refreshed_at": T0, **changes,
    }


def test_stored_values_after_one_incremental_refresh_are_reused_up_to_its_cutoff():
    reuse = transforms.subject_values_reuse(_stored(), _events_state(), "f", SCALES, widest_window_days=14)
    cutoff = T0 - dt.timedelta(days=2)
    assert reuse == transforms.SubjectValuesReuse(
        post_assigned_after=cutoff - dt.timedelta(days=14), pre_assigned_after=cutoff, changed_since=T0
    )


def test_with_no_refresh_since_only_changed_assignments_are_recomputed():
    reuse = transforms.subject_values_reuse(
        _stored(), _events_state(refreshed_at=T0), "f", SCALES, widest_window_days=14
    )
    assert reuse == transforms.SubjectValuesReuse(None, None, T0)


@pytest.mark.parametrize(
    ("stored", "events_state", "fingerprint", "scales"),
    [
        pytest.param(None, _events_state(), "f", SCALES, id="nothing stored"),
        pytest.param(_stored(), None, "f", SCALES, id="no window events state"),
        pytest.param(_stored(), _events_state(), "g", SCALES, id="definitions changed"),
        pytest.param(_stored(), _events_state(), "f", {"post": {"revenue": {"value_up1": 2.0**19}}}, id="a larger value"),
        pytest.param(_stored(), _events_state(mode="full", refreshed_from=None), "f", SCALES, id="a full rebuild since"),
        pytest.param(_stored(), _events_state(previous_refreshed_at=T0 - dt.timedelta(days=1)), "f", SCALES,
                     id="a refresh these values never saw"),
        pytest.param(_stored(assignments_as_of=None), _events_state(), "f", SCALES, id="no assignments then"),
        pytest.param(_stored(events_assignments_as_of=None), _events_state(), "f", SCALES,
                     id="window events of no assignments then"),
    ],
)
def test_stored_values_are_not_reused_when_anything_they_rest_on_changed(stored, events_state, fingerprint, scales):
    assert transforms.subject_values_reuse(stored, events_state, fingerprint, scales, 14) is None


def test_recomputed_subjects_are_the_recently_assigned_and_the_changed(con):
    assignments = ibis.memtable(pd.DataFrame({
        "subject_id": ["old", "recent", "corrected"],
        "assigned_at": pd.to_datetime([T0 - dt.timedelta(days=20), T0, T0 - dt.timedelta(days=20)], utc=True),
        "valid_from": pd.to_datetime([T0 - dt.timedelta(days=20), T0, T0 + dt.timedelta(hours=1)], utc=True),
    }))
    after = T0 - dt.timedelta(days=1)
    chosen = lambda assigned_after: sorted(  # noqa: E731
        con.to_pandas(assignments.filter(transforms.recomputed_subjects(assignments, assigned_after, T0))).subject_id
    )
    assert chosen(after) == ["corrected", "recent"]
    assert chosen(None) == ["corrected"]


def test_a_subjects_sum_has_the_same_scale_however_many_rows_the_partition_holds():
    metric = Metric(id="revenue", event_name="purchase", aggregation="sum")
    few = transforms.subject_value_scales({"purchase": transforms.SumBound(10, 30.0)}, [metric])
    many = transforms.subject_value_scales({"purchase": transforms.SumBound(10**9, 31.9)}, [metric])
    larger = transforms.subject_value_scales({"purchase": transforms.SumBound(10, 32.5)}, [metric])
    assert few == many != larger


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
    changed = con.to_pandas(transforms.assignments_changed_since(ibis.memtable(rows), T0))
    assert sorted(changed.subject_id) == ["corrected", "deactivated", "new"]


def test_values_valued_after_a_refresh_on_newer_assignments_are_recomputed_from_the_older():
    # deduped_assignments ran between the window events (assignments of T0) and the values
    # (assignments of T0 + 1 h): the next refresh rewrote subjects changed since T0.
    later = T0 + dt.timedelta(hours=1)
    stored = _stored(assignments_as_of=later, events_assignments_as_of=T0)
    reuse = transforms.subject_values_reuse(stored, _events_state(), "f", SCALES, widest_window_days=14)
    assert reuse.changed_since == T0


def test_a_rebuilt_assignment_history_starts_the_refresh_over():
    assert transforms.history_reaches(T0 - dt.timedelta(days=1), T0)
    assert not transforms.history_reaches(T0 + dt.timedelta(seconds=1), T0)  # every row newer
    assert not transforms.history_reaches(None, T0)  # no rows at all
    assert not transforms.history_reaches(T0, None)
