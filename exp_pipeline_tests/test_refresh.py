"""The incremental refresh: its plans (pure), and a refreshed warehouse equal to a full
recomputation bit for bit, on both engines."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import ibis
import pandas as pd
import pytest

from exp_pipeline import analysis, refresh, schemas, validation
from exp_pipeline.registry import load_registry
from exp_pipeline.sample_data import generate
from exp_pipeline.settings import DEFAULT_REGISTRY
from exp_pipeline_tests.conftest import warehouse_at

UTC = dt.UTC
T0 = dt.datetime(2026, 10, 20, tzinfo=UTC)


def state(**changes) -> refresh.RefreshState:
    values = {
        "experiment_id": "exp", "fingerprint": "f1", "settled_until": T0, "settled_events": {"purchase": [10, 77]},
        "settled_rows_pass": {"post": True, "pre": True}, "batches": (1,), "settled_rows": 7,
    }
    return refresh.RefreshState(**{**values, **changes})


KEEP = object()


def plan(previous=KEEP, fingerprint="f1", settle_until=T0 + dt.timedelta(days=1), before=None, rows=7):
    previous = state() if previous is KEEP else previous
    before = {"purchase": [10, 77]} if before is None else before
    return refresh.plan_refresh("exp", fingerprint, previous, settle_until, before, rows)


def test_a_state_that_still_describes_the_log_is_refreshed_from_its_watermark():
    p = plan()
    assert p.incremental and p.fresh_from == T0
    assert p.reason.startswith("incremental")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"previous": None}, "first analysis"),
        ({"fingerprint": "f2"}, "changed since the last run"),
        ({"settle_until": T0 - dt.timedelta(seconds=1)}, "older than the last run's watermark"),
        ({"before": {"purchase": [11, 77]}}, "purchase: 10 -> 11 rows"),
        ({"before": {"purchase": [10, 78]}}, "purchase: 10 rows, but other contents"),
        ({"before": {"purchase": [10, 77], "visit": [1, 5]}}, "visit: 0 -> 1 rows"),
        ({"rows": 6}, "7 settled rows were stored, 6 are there now"),
    ],
)
def test_anything_the_state_cannot_vouch_for_recomputes_the_experiment(changes, reason):
    p = plan(**changes)
    assert not p.incremental and p.fresh_from is None
    assert reason in p.reason


def test_the_next_state_adds_its_batch_and_keeps_what_earlier_rows_failed():
    after = plan().next_state({"purchase": [15, 9]}, {"post": True, "pre": None}, batch=2, batch_rows=3)
    assert after.batches == (1, 2) and after.settled_rows == 10 and after.settled_events == {"purchase": [15, 9]}
    assert after.settled_rows_pass == {"post": True, "pre": None}
    failed = plan(previous=state(settled_rows_pass={"post": False, "pre": True})).next_state({}, {"post": True, "pre": True}, 2, 0)
    assert failed.settled_rows_pass == {"post": False, "pre": True}
    # Recomputed: only its own batch, and only its own verdicts.
    fresh = plan(previous=None).next_state({"purchase": [15, 9]}, {"post": True, "pre": True}, 2, 3)
    assert fresh.batches == (2,) and fresh.settled_rows == 3


def test_a_state_row_reads_back_as_it_was_written():
    written = state(settled_rows_pass={"post": None, "pre": False}, batches=(3, 9))
    assert refresh.RefreshState.from_row(refresh.state_frame([written]).iloc[0].to_dict()) == written


def test_the_watermark_is_the_newest_event_minus_the_lookback():
    assert refresh.settle_point(T0, 2) == T0 - dt.timedelta(days=2)
    # At a UTC midnight (the log is counted per day): never later than the lookback allows.
    assert refresh.settle_point(T0 + dt.timedelta(hours=40), 1.5) == T0
    assert refresh.settle_point(None, 2) == refresh.NOTHING_SETTLED


def test_the_fingerprint_follows_what_the_sums_depend_on():
    registry = load_registry(DEFAULT_REGISTRY)
    experiment = registry.experiments[0]
    metrics = registry.metrics_of(experiment)
    events = registry.sources.events
    base = refresh.definition_fingerprint(experiment, metrics, events)
    assert refresh.definition_fingerprint(experiment, metrics, events) == base
    longer = [metrics[0].model_copy(update={"window_end_days": 21}), *metrics[1:]]
    assert refresh.definition_fingerprint(experiment, longer, events) != base
    remapped = events.model_copy(update={"columns": {**events.columns, "value": "price"}})
    assert refresh.definition_fingerprint(experiment, metrics, remapped) != base
    keyed = [metrics[0].model_copy(update={"entity": "user_id"}), *metrics[1:]]
    assert refresh.definition_fingerprint(experiment, keyed, events) != base


def test_fields_added_at_values_that_change_nothing_leave_stored_fingerprints_as_they_were():
    # The sample's checkout_redesign as fingerprinted before metrics had an `entity` and sources
    # `secondary_ids` (f8959b4): an upgraded warehouse goes on refreshing incrementally. A deliberate
    # LOGIC_VERSION bump changes it (then update this value).
    registry = load_registry(DEFAULT_REGISTRY)
    experiment = registry.experiment("checkout_redesign")
    fingerprint = refresh.definition_fingerprint(experiment, registry.metrics_of(experiment), registry.sources.events)
    assert fingerprint == "a181edf35213e915e608e4e091c71bfe"


# -- a refreshed warehouse against a full recomputation ---------------------------------------------

DAYS = 20  # of the sample's logs processed first
FIRST_DAY = dt.date(2026, 10, 1)


@pytest.fixture(scope="module")
def daily_logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("daily")
    generate(root / "sample", n_users=3000)
    shutil.copy(DEFAULT_REGISTRY, root / "registry.yaml")
    return root


def link_until(logs: Path, root: Path, last_day: dt.date) -> None:
    """The daily files of `logs` up to `last_day` (by the date in their name) linked into `root`."""
    for kind in ("assignments", "events"):
        folder = root / "sample" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((logs / "sample" / kind).glob("*.parquet")):
            if dt.date.fromisoformat(path.stem.rsplit("_", 1)[-1]) <= last_day and not (folder / path.name).exists():
                (folder / path.name).hardlink_to(path)
    if not (root / "registry.yaml").exists():
        shutil.copy(logs / "registry.yaml", root / "registry.yaml")


def analyse(root: Path, engine: str, now: dt.datetime) -> analysis.PassResult:
    registry = load_registry(root / "registry.yaml")
    with warehouse_at(root, engine).session() as session:
        return analysis.analyse_experiments(session, registry, registry.experiments, now)


def variant_metrics(root: Path, engine: str) -> pd.DataFrame:
    with warehouse_at(root, engine).session() as session:
        frame = session.to_pandas(session.table("variant_metrics"))
    return frame.sort_values(["experiment_id", "variant_id", "metric"], ignore_index=True)


def refresh_modes(result: analysis.PassResult) -> dict[str, str]:
    return {i: r.metadata["post_assignment_events"]["refresh"] for i, r in result.experiments.items() if "post_assignment_events" in r.metadata}


def late_event(root: Path, name: str, user_id: str, at: str, amount: float) -> None:
    """One purchase logged late, in a file of its own (as a late batch of a log would come)."""
    template = pd.read_parquet(next((root / "sample" / "events").glob("*.parquet")))
    row = template.iloc[:1].copy()
    row["user_id"], row["event_type"], row["amount"] = user_id, "purchase", amount
    row["event_ts"] = pd.Timestamp(at).tz_convert(template["event_ts"].dt.tz) if template["event_ts"].dt.tz else pd.Timestamp(at).tz_localize(None)
    row.to_parquet(root / "sample" / "events" / f"{name}.parquet")


def analysed_first_days(daily_logs: Path, tmp_path: Path, engine: str, days_to_now: int):
    """The first DAYS days of the logs analysed into tmp_path/refreshed, as a first run; returns
    (refreshed, full: a folder for the recomputation, the last day analysed, the runs' `now`:
    `days_to_now` days after it, at 06:00), and the first run's result."""
    refreshed, full = tmp_path / "refreshed", tmp_path / "full"
    cut = FIRST_DAY + dt.timedelta(days=DAYS - 1)
    now = dt.datetime.combine(cut + dt.timedelta(days=days_to_now), dt.time(6), UTC)
    link_until(daily_logs, refreshed, cut)
    return refreshed, full, cut, now, analyse(refreshed, engine, now)


def assert_same_results(refreshed: Path, full: Path, engine: str) -> None:
    """The refreshed warehouse's variant_metrics are the full recomputation's, bit for bit."""
    pd.testing.assert_frame_equal(variant_metrics(refreshed, engine), variant_metrics(full, engine), check_exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["duckdb", "spark"])
def test_a_daily_refresh_equals_a_full_recomputation_bit_for_bit(daily_logs, tmp_path, engine):
    refreshed, full, cut, morning, first = analysed_first_days(daily_logs, tmp_path, engine, 1)
    assert set(refresh_modes(first).values()) == {"full"}
    with warehouse_at(refreshed, engine).session() as session:
        for name in (refresh.REFRESH_STATE, refresh.SETTLED_SUBJECTS, refresh.SETTLED_SUMS):
            # The tables are what their contracts say.
            assert validation.validate(schemas.TABLES[name].schema(None), session.table(name)).passed, name

    # The next day, and a purchase logged a day late (inside the lookback) by a subject already settled.
    link_until(daily_logs, refreshed, cut + dt.timedelta(days=1))
    deduped = pd.read_parquet(next((refreshed / "sample" / "assignments").glob("*.parquet")))
    settled_user = str(deduped["user_id"].iloc[0])
    late_event(refreshed, "late_inside_lookback", settled_user, f"{cut.isoformat()}T12:00:00Z", 12.5)
    second = analyse(refreshed, engine, morning + dt.timedelta(days=1))
    modes = refresh_modes(second)
    assert "incremental" in modes.values(), modes

    link_until(daily_logs, full, cut + dt.timedelta(days=1))
    shutil.copy(refreshed / "sample" / "events" / "late_inside_lookback.parquet", full / "sample" / "events")
    analyse(full, engine, morning + dt.timedelta(days=1))
    assert_same_results(refreshed, full, engine)

    # A purchase older than the lookback: the experiments it can touch are recomputed, and still equal.
    late_event(refreshed, "late_beyond_lookback", settled_user, f"{(cut - dt.timedelta(days=10)).isoformat()}T12:00:00Z", 40.0)
    shutil.copy(refreshed / "sample" / "events" / "late_beyond_lookback.parquet", full / "sample" / "events")
    third = analyse(refreshed, engine, morning + dt.timedelta(days=1))
    assert "full" in refresh_modes(third).values()
    reasons = [r.metadata["post_assignment_events"]["refresh_reason"] for r in third.experiments.values() if "post_assignment_events" in r.metadata]
    assert any("changed since it was settled" in r for r in reasons), reasons
    analyse(full, engine, morning + dt.timedelta(days=1))
    assert_same_results(refreshed, full, engine)


def test_rows_of_a_run_that_died_before_its_commit_are_ignored_then_deleted(daily_logs, tmp_path):
    refreshed, full, cut, morning, _ = analysed_first_days(daily_logs, tmp_path, "duckdb", 2)
    with warehouse_at(refreshed, "duckdb").session() as session:
        # A run that wrote its batch and died: every stored row again, under a batch no state names.
        sums = session.table(refresh.SETTLED_SUMS).drop("batch")
        subjects = session.table(refresh.SETTLED_SUBJECTS)
        copied_sums = session.temp_table("_sums_copy", sums)
        copied_subjects = session.temp_table("_subjects_copy", subjects.mutate(batch=ibis.literal(1, "int64")))
        refresh.append_settled(session, copied_sums, copied_subjects, batch=1)
        stored = session.count(session.table(refresh.SETTLED_SUMS))
    link_until(daily_logs, refreshed, cut + dt.timedelta(days=1))
    assert set(refresh_modes(analyse(refreshed, "duckdb", morning)).values()) == {"incremental"}
    link_until(daily_logs, full, cut + dt.timedelta(days=1))
    analyse(full, "duckdb", morning)
    assert_same_results(refreshed, full, "duckdb")
    with warehouse_at(refreshed, "duckdb").session() as session:
        for name in (refresh.SETTLED_SUMS, refresh.SETTLED_SUBJECTS):
            table = session.table(name)
            assert session.count(table.filter(table.batch == 1)) == 0, name
        assert session.count(session.table(refresh.SETTLED_SUMS)) > stored // 2


def test_a_subject_back_after_a_run_without_it_and_a_rewritten_old_file_are_recomputed(daily_logs, tmp_path):
    refreshed, full, cut, morning, _ = analysed_first_days(daily_logs, tmp_path, "duckdb", 3)

    # Day 2: the most active buyer of the next days is briefly multi-variant (a stray exposure).
    link_until(daily_logs, refreshed, cut + dt.timedelta(days=1))
    # Its events of the day the last run settled past (the day before the old watermark's next).
    gap_day = cut - dt.timedelta(days=2)
    events = pd.read_parquet(next((daily_logs / "sample" / "events").glob(f"*_{gap_day.isoformat()}.parquet")))
    exposures = pd.concat(pd.read_parquet(p) for p in (refreshed / "sample" / "assignments").glob("*.parquet"))
    firsts = exposures.sort_values("exposed_at").groupby(["user_id", "experiment_key"], as_index=False).first()
    recent = firsts[firsts.exposed_at.between(pd.Timestamp(gap_day - dt.timedelta(days=10), tz="UTC"), pd.Timestamp(gap_day, tz="UTC"))]
    active = events[events.user_id.isin(recent.user_id)].user_id.value_counts().index[0]
    first = recent[recent.user_id == active].iloc[:1].copy()
    registry = load_registry(refreshed / "registry.yaml")
    experiment = next(e for e in registry.experiments if e.id == first.experiment_key.iloc[0])
    first["variation"] = next(v.id for v in experiment.variants if v.id != first.variation.iloc[0])
    first["exposed_at"] = first["exposed_at"] + pd.Timedelta(hours=1)
    stray = refreshed / "sample" / "assignments" / "stray.parquet"
    first.to_parquet(stray)
    analyse(refreshed, "duckdb", morning)
    # Day 3: the stray exposure is withdrawn; the subject is back at its first assignment.
    stray.unlink()
    link_until(daily_logs, refreshed, cut + dt.timedelta(days=2))
    assert refresh_modes(analyse(refreshed, "duckdb", morning))[experiment.id] == "incremental"
    link_until(daily_logs, full, cut + dt.timedelta(days=2))
    analyse(full, "duckdb", morning)
    assert_same_results(refreshed, full, "duckdb")

    # An old file re-exported with one amount corrected: the same rows, other contents.
    old = sorted((refreshed / "sample" / "events").glob("*.parquet"))[-10]
    frame = pd.read_parquet(old)
    frame.loc[frame.event_type == "purchase", "amount"] = frame.loc[frame.event_type == "purchase", "amount"] + 1.0
    for root in (refreshed, full):
        (root / "sample" / "events" / old.name).unlink()
        frame.to_parquet(root / "sample" / "events" / old.name)
    result = analyse(refreshed, "duckdb", morning)
    reasons = {i: r.metadata["post_assignment_events"]["refresh_reason"] for i, r in result.experiments.items() if "post_assignment_events" in r.metadata}
    assert any("other contents" in r for r in reasons.values()), reasons
    analyse(full, "duckdb", morning)
    assert_same_results(refreshed, full, "duckdb")
