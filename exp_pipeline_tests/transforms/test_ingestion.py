"""Ingestion: canonical names and timestamps from any writer, every row ingested or rejected with
a reason."""

import duckdb
import ibis
import pandas as pd
import pytest

from exp_pipeline.registry import Source
from exp_pipeline.transforms import ingestion
from exp_pipeline_tests.tables import assignments_table, experiment, metric, post_rows, ts


def logged_exposures(con, rows):
    frame = pd.DataFrame(rows, columns=["user_id", "exp_key", "arm", "device_type", "ts"])
    frame["source_file"] = "log.csv"
    return ingestion.canonical_assignments(con.create_table("log", frame, overwrite=True), SOURCE, "exp")


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
    classified = ingestion.classify_assignments(rows, [experiment()], ["device_type"])
    counts = con.to_pandas(ingestion.rejection_counts(classified))
    got = dict(zip(counts["reason"], counts["rows"], strict=True))
    assert got == {
        "ingested": 2, "duplicate_row": 1, "missing_subject_id": 2, "missing_variant_id": 1,
        "missing_timestamp": 1, "unparsable_timestamp": 1, "unknown_variant": 1,
    }
    ingested = con.to_pandas(ingestion.ingested(classified))
    assert list(ingested.columns) == [
        "experiment_id", "subject_id", "variant_id", "assigned_at", "device_type", "source_file"
    ]
    rejected = con.to_pandas(ingestion.rejected(classified, "assignments", "exp"))
    assert len(ingested) + len(rejected) == 9  # ingested + rejected = read
    unparsable = rejected[rejected.reason == "unparsable_timestamp"].iloc[0]
    assert unparsable.source_file == "log.csv" and unparsable.experiment_id == "exp"
    assert "assigned_at=yesterday-ish" in unparsable.record and "subject_id=u" in unparsable.record


def test_secondary_ids_are_kept_as_text_and_blank_ones_are_missing(con):
    source = SOURCE.model_copy(update={"secondary_ids": {"user_id": "login"}})
    frame = pd.DataFrame({
        "user_id": ["a", "b", "c", "d"], "exp_key": "exp", "arm": "control", "device_type": "ios",
        "ts": "2026-10-02T00:00:00Z", "login": [100000.0, None, 7.5, float("nan")], "source_file": "f",
    })
    text = frame.assign(login=["u1", "  ", "", None])
    numbers = con.to_pandas(ingestion.canonical_assignments(con.create_table("log", frame), source, "exp"))
    texts = con.to_pandas(ingestion.canonical_assignments(con.create_table("log_text", text), source, "exp"))
    present = lambda column: [v if isinstance(v, str) else None for v in column]  # noqa: E731
    assert present(numbers.user_id) == ["100000", None, "7.5", None]  # a float export of an integer id
    assert present(texts.user_id) == ["u1", None, None, None]
    # Rows differing only in their secondary id are not copies of each other.
    twice = pd.concat([text.iloc[[0]], text.iloc[[0]].assign(login="u2")])
    rows = ingestion.canonical_assignments(con.create_table("twice", twice), source, "exp")
    counts = con.to_pandas(ingestion.rejection_counts(ingestion.classify_assignments(rows, [experiment()], source.kept_columns)))
    assert dict(zip(counts["reason"], counts["rows"], strict=True)) == {"ingested": 2}


def test_rows_of_no_known_experiment_are_found(con):
    frame = pd.DataFrame({
        "user_id": ["a", "b", "c", "d"], "exp_key": ["exp", "nope", None, " "], "arm": "control",
        "device_type": "ios", "ts": "2026-10-02T00:00:00Z", "source_file": "f",
    })
    rows = ingestion.canonical_assignments(con.create_table("log", frame), SOURCE, None)
    counts = con.to_pandas(ingestion.rejection_counts(ingestion.unassignable_rows(rows, ["exp"])))
    assert dict(zip(counts["reason"], counts["rows"], strict=True)) == {
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
    events = ingestion.canonical_events(con.create_table("ev", frame), EVENT_SOURCE)
    counts = con.to_pandas(ingestion.rejection_counts(ingestion.classify_events(events)))
    assert dict(zip(counts["reason"], counts["rows"], strict=True)) == {
        "ingested": 2, "duplicate_row": 1, "non_numeric_value": 3, "unparsable_timestamp": 1,
        "missing_timestamp": 1, "missing_subject_id": 1, "missing_event_name": 1,
    }
    usable = ingestion.usable_events(events, ["purchase"])
    # The per-experiment path keeps both copies and the row without a subject here: the temporal
    # join drops the duplicate, and a missing subject id matches no assigned subject.
    assert sorted(con.to_pandas(usable)["value"]) == [1.0, 10.5, 10.5]
    assigned = assignments_table(con, [("a", "control", "2026-10-01T00:00:00Z")])
    joined = con.to_pandas(post_rows(con, assigned, usable, [metric()]))
    assert joined["value"].tolist() == [10.5]


def test_a_value_column_of_the_wrong_type_is_rejected_not_read_as_missing(con):
    frame = pd.DataFrame({
        "user_id": ["a", "b"],
        "ts": pd.to_datetime(["2026-10-02T00:00:00Z", "2026-10-02T00:00:00Z"], utc=True),
        "event": ["purchase", "purchase"],
        "amount": pd.to_datetime(["2026-10-02T00:00:00Z", None], utc=True),  # mapped to the wrong column
        "source_file": "events.parquet",
    })
    events = ingestion.canonical_events(con.create_table("typed", frame), EVENT_SOURCE)
    counts = con.to_pandas(ingestion.rejection_counts(ingestion.classify_events(events)))
    assert dict(zip(counts["reason"], counts["rows"], strict=True)) == {"non_numeric_value": 1, "ingested": 1}


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
    out = duck.to_pandas(ingestion.canonical_assignments(raw, SOURCE, "exp"))
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
    out = duck.to_pandas(ingestion.canonical_assignments(raw, SOURCE, "exp"))
    assert list(out["assigned_at"]) == _expected_instants()
    # CSV: an offset, and a naive timestamp taken as UTC, in one file.
    (tmp_path / "c.csv").write_text(
        "user_id,exp_key,arm,device_type,ts\n"
        "a,exp,control,ios,2026-10-02T12:00:00.000001+02:00\n"
        "b,exp,control,ios,2026-10-02 08:00:00\n"
        "c,other,control,ios,2026-10-02 08:00:00\n"
    )
    raw = duck.read_csv(tmp_path / "c.csv", all_varchar=True).mutate(source_file=ibis.literal("c.csv"))
    out = duck.to_pandas(ingestion.canonical_assignments(raw, SOURCE, "exp"))
    assert list(out["assigned_at"]) == _expected_instants()


def test_a_mapping_to_a_missing_column_names_it(con):
    raw = ibis.memtable(pd.DataFrame({"user_id": ["a"], "exp_key": ["exp"], "source_file": ["f"]}))
    with pytest.raises(ValueError, match=r"'arm' \(mapped from 'variant_id'\)"):
        ingestion.canonical_assignments(raw, SOURCE, "exp")


SECOND = 1_791_000_000  # 2026-10-03T02:40:00Z


@pytest.mark.parametrize(
    ("logged", "unit"),
    [
        (SECOND, "auto"), (SECOND * 1_000 + 123, "auto"), (SECOND * 1_000_000 + 123_456, "auto"),
        (SECOND * 1_000_000_000 + 123_456_000, "auto"), (SECOND * 1_000, "ms"), (SECOND * 1_000_000, "us"),
    ],
)
@pytest.mark.parametrize("as_text", [False, True], ids=["number", "text"])
def test_epoch_timestamps_in_any_unit_are_read_as_that_instant(con, logged, unit, as_text):
    scale = {"auto": None, "ms": 1e3, "us": 1e6}[unit]
    detected = next(u for u, low, high in ingestion.EPOCH_UNIT_RANGES if low <= logged < high)
    per_second = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[detected] if scale is None else scale
    expected = pd.Timestamp(SECOND, unit="s", tz="UTC") + pd.Timedelta(
        microseconds=round((logged / per_second - SECOND) * 1e6)
    )
    frame = pd.DataFrame({"ts": [str(logged) if as_text else logged]})
    table = con.create_table("epochs", frame, overwrite=True)
    got = con.to_pandas(table.select(read_at=ingestion.to_utc_timestamp(table.ts, unit))).read_at.iloc[0]
    assert got == expected
    counts = con.to_pandas(ingestion.epoch_unit_counts(table, "ts", unit))
    assert counts.to_dict("records") == [{"unit": unit if unit != "auto" else detected, "rows": 1}]


def test_epoch_numbers_beyond_any_date_are_unparsable(con):
    table = con.create_table("epochs", pd.DataFrame({"ts": ["1e30", "99999999999999999999999"]}), overwrite=True)
    got = con.to_pandas(table.select(read_at=ingestion.to_utc_timestamp(table.ts, "s")))
    assert got.read_at.isna().all()


def test_numbers_auto_cannot_place_are_unparsable_not_1970(con):
    # A YYYYMMDD number, a small counter, a 1970s epoch: no unit's range holds them.
    table = con.create_table("epochs", pd.DataFrame({"ts": ["20261002", "42", "500000000000"]}), overwrite=True)
    got = con.to_pandas(table.select(read_at=ingestion.to_utc_timestamp(table.ts, "auto")))
    assert got.read_at.isna().all()
    counts = con.to_pandas(ingestion.epoch_unit_counts(table, "ts", "auto"))
    assert counts.to_dict("records") == [{"unit": ingestion.NOT_AN_EPOCH, "rows": 3}]
    declared = con.to_pandas(table.select(read_at=ingestion.to_utc_timestamp(table.ts, "s")))
    assert declared.read_at.iloc[1] == pd.Timestamp("1970-01-01T00:00:42Z")


def test_ids_logged_as_floats_or_float_text_match_the_integer_ids(con):
    frame = pd.DataFrame({
        "as_float": [100000.0, 7.0, 1.5, None, 2.0], "as_text": ["100000.0", "7", "1.50", "a.0", "100000.00"],
    })
    table = con.create_table("ids", frame, overwrite=True)
    got = con.to_pandas(table.select(f=ingestion.canonical_id(table.as_float), t=ingestion.canonical_id(table.as_text)))
    assert got.f.tolist()[:3] == ["100000", "7", "1.5"] and pd.isna(got.f.iloc[3])
    assert got.t.tolist() == ["100000", "7", "1.50", "a.0", "100000"]


def test_experiment_and_variant_ids_are_matched_whatever_their_case_and_surrounding_space(con):
    rows = logged_exposures(con, [
        ("a", "EXP", "Control", "ios", "2026-10-02T00:00:00Z"),
        ("b", " exp", "treatment ", "ios", "2026-10-02T00:00:00Z"),
        ("c", "Exp\t", "TREATMENT", "ios", "2026-10-02T00:00:00Z"),
    ])
    classified = ingestion.classify_assignments(rows, [experiment()], ["device_type"])
    ingested = con.to_pandas(ingestion.ingested(classified)).sort_values("subject_id")
    assert ingested.experiment_id.tolist() == ["exp"] * 3
    assert ingested.variant_id.tolist() == ["control", "treatment", "treatment"]
