"""The sample-data generator: layout, determinism, injected mess and ground truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exp_pipeline import sample_data

USERS = 4_000
SEED = 7
ASSIGNMENT_COLUMNS = ["user_id", "experiment_key", "variation", "exposed_at", "device_type", "country"]
EVENT_COLUMNS = ["user_id", "event_ts", "event_type", "amount"]
FILE_NAME = re.compile(r"^(exposures|events)_(\d{4}-\d{2}-\d{2})\.parquet$")
# The pre-period for the correlation check ends when the first experiments start.
PRE_PERIOD_END = pd.Timestamp("2026-10-01", tz="UTC")


def _read_folder(folder: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(path) for path in sorted(folder.glob("*.parquet"))], ignore_index=True
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sample") / "data"
    truth = sample_data.generate(out, n_users=USERS, seed=SEED)
    return out, truth


@pytest.fixture(scope="module")
def exposures(generated) -> pd.DataFrame:
    return _read_folder(generated[0] / "assignments")


@pytest.fixture(scope="module")
def events(generated) -> pd.DataFrame:
    return _read_folder(generated[0] / "events")


def _in_window(exposures: pd.DataFrame, exp: dict) -> pd.Series:
    start = pd.Timestamp(exp["start_at"])
    inside = exposures["exposed_at"] >= start
    if exp["end_at"] is not None:
        inside &= exposures["exposed_at"] < pd.Timestamp(exp["end_at"])
    return inside


def _subjects(exposures: pd.DataFrame, experiment_key: str, exp: dict) -> pd.DataFrame:
    """One row per subject of an experiment, by the pipeline's rules, with a multi-variant flag.

    Rows inside the window only; the first exposure gives the variant, time and properties.
    """
    rows = exposures[(exposures["experiment_key"] == experiment_key)]
    rows = rows[_in_window(rows, exp)].sort_values(["exposed_at", "user_id"], kind="stable")
    first = rows.groupby("user_id").first()
    first["n_variants"] = rows.groupby("user_id")["variation"].nunique()
    first["n_rows"] = rows.groupby("user_id").size()
    return first


def test_same_seed_same_data_other_seed_differs(generated, tmp_path):
    out, truth = generated
    again = sample_data.generate(tmp_path / "again", n_users=USERS, seed=SEED)
    assert again == truth
    for kind in ("assignments", "events"):
        names = sorted(p.name for p in (out / kind).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "again" / kind).iterdir())
        for name in names:
            pd.testing.assert_frame_equal(
                pd.read_parquet(out / kind / name), pd.read_parquet(tmp_path / "again" / kind / name)
            )

    sample_data.generate(tmp_path / "other", n_users=USERS, seed=SEED + 1)
    assert not _read_folder(tmp_path / "other" / "events").equals(_read_folder(out / "events"))
    assert not _read_folder(tmp_path / "other" / "assignments").equals(
        _read_folder(out / "assignments")
    )


@pytest.mark.parametrize(
    ("kind", "columns", "time_column"),
    [("assignments", ASSIGNMENT_COLUMNS, "exposed_at"), ("events", EVENT_COLUMNS, "event_ts")],
)
def test_daily_files_with_the_promised_columns(generated, kind, columns, time_column):
    out, truth = generated
    paths = sorted((out / kind).iterdir())
    assert len(paths) == truth["generated_files"][kind]
    total = 0
    for path in paths:
        match = FILE_NAME.match(path.name)
        assert match, path.name
        schema = pq.read_schema(path)
        assert schema.names == columns
        assert schema.field(time_column).type == pa.timestamp("us", tz="UTC")  # Spark reads no ns
        frame = pd.read_parquet(path)
        assert str(frame[time_column].dt.tz) == "UTC"
        # Only that UTC day, sorted by time then user.
        assert (frame[time_column].dt.strftime("%Y-%m-%d") == match.group(2)).all()
        ordered = frame.sort_values([time_column, "user_id"], kind="stable", ignore_index=True)
        pd.testing.assert_frame_equal(frame, ordered)
        total += len(frame)
    assert total == truth["rows"][kind]


def test_column_values(exposures, events):
    assert exposures["user_id"].str.fullmatch(r"u\d{7}").all()
    assert set(exposures["device_type"]) == {"ios", "android", "web"}
    assert set(exposures["country"]) <= {"US", "DE", "BR", "IN", "GB"}
    assert set(events["event_type"]) == {"purchase", "session"}
    assert events["amount"].dtype == np.float64
    purchases = events["event_type"] == "purchase"
    assert events.loc[~purchases, "amount"].isna().all()
    assert (events.loc[purchases, "amount"] > 0).all()
    assert events["event_ts"].between(
        pd.Timestamp("2026-09-10", tz="UTC"), pd.Timestamp("2026-11-16", tz="UTC"), "left"
    ).all()


def test_ground_truth_file_matches_the_return_value(generated):
    out, truth = generated
    assert json.loads((out / "ground_truth.json").read_text()) == truth
    assert truth["seed"] == SEED and truth["n_users"] == USERS
    checkout = truth["experiments"]["checkout_redesign"]
    assert checkout["start_at"] == "2026-10-01T00:00:00Z"
    assert checkout["end_at"] == "2026-10-29T00:00:00Z"
    assert truth["experiments"]["aa_homepage"]["end_at"] is None
    # +25% on iOS only, which holds 45% of the control's revenue in expectation.
    assert checkout["true_relative_lift"]["treatment"] == {
        "revenue": 0.1125, "purchases": 0.0, "conversion": 0.0, "sessions": 0.0,
    }
    assert checkout["true_revenue_lift_by_device"]["treatment"] == {"ios": 0.25, "android": 0.0, "web": 0.0}
    pricing = truth["experiments"]["pricing_three_arm"]
    assert pricing["weights"] == {"control": 0.5, "price_low": 0.25, "price_high": 0.25}
    assert pricing["true_relative_lift"]["price_low"]["revenue"] == 0.08
    assert pricing["true_relative_lift"]["price_high"]["revenue"] == -0.05
    assert set(pricing["true_relative_lift"]) == {"price_low", "price_high"}


def test_exposure_counts_match_the_files(generated, exposures):
    _, truth = generated
    for key, exp in truth["experiments"].items():
        rows = exposures[exposures["experiment_key"] == key]
        assert len(rows) == exp["exposure_rows"], key
        assert (~_in_window(rows, exp)).sum() == exp["rows_outside_window"], key
        assert exp["rows_outside_window"] > 0, key


def test_analysable_subjects_follow_the_cleaning_rules(generated, exposures):
    _, truth = generated
    for key, exp in truth["experiments"].items():
        subjects = _subjects(exposures, key, exp)
        multi = subjects["n_variants"] > 1
        assert multi.sum() == exp["multi_variant_subjects"], key
        counts = subjects.loc[~multi, "variation"].value_counts()
        expected = {v: int(counts.get(v, 0)) for v in exp["weights"]}
        assert expected == exp["analysable_subjects"], key


def test_repeated_exposures_with_changing_properties(generated, exposures):
    _, truth = generated
    for key, exp in truth["experiments"].items():
        subjects = _subjects(exposures, key, exp)
        # Every subject is exposed at least twice (1 + Poisson(2) repeats).
        assert (subjects["n_rows"] >= 2).all(), key
        assert subjects["n_rows"].mean() == pytest.approx(4.0, abs=0.2), key
        rows = exposures[(exposures["experiment_key"] == key) & _in_window(exposures, exp)]
        changed = (rows["device_type"] != rows["user_id"].map(subjects["device_type"])).sum()
        assert changed == exp["property_changed_rows"], key
        assert changed / exp["repeated_exposure_rows"] == pytest.approx(0.10, abs=0.02), key


def test_multi_variant_subjects_are_about_half_a_percent(generated):
    _, truth = generated
    multi = sum(e["multi_variant_subjects"] for e in truth["experiments"].values())
    subjects = sum(
        e["multi_variant_subjects"] + sum(e["analysable_subjects"].values())
        for e in truth["experiments"].values()
    )
    assert 0.002 < multi / subjects < 0.01


def test_outside_window_users_are_not_subjects(generated, exposures):
    _, truth = generated
    for key, exp in truth["experiments"].items():
        rows = exposures[exposures["experiment_key"] == key]
        inside = _in_window(rows, exp)
        stray_users = set(rows.loc[~inside, "user_id"])
        assert stray_users, key
        assert not stray_users & set(rows.loc[inside, "user_id"]), key
        before = rows.loc[~inside, "exposed_at"] < pd.Timestamp(exp["start_at"])
        assert before.any(), key
        assert (~before).any() == (exp["end_at"] is not None), key


def test_inactive_subjects_and_events_before_assignment(generated, exposures, events):
    _, truth = generated
    active_users = set(events["user_id"])
    first_event = events.groupby("user_id")["event_ts"].min()
    for key, exp in truth["experiments"].items():
        subjects = _subjects(exposures, key, exp)
        subjects = subjects[subjects["n_variants"] == 1]
        silent = (~subjects.index.isin(active_users)).sum()
        assert silent == exp["analysable_subjects_without_events"], key
        assert 0.05 < silent / len(subjects) < 0.2, key
        before = first_event.reindex(subjects.index) < subjects["exposed_at"]
        assert before.mean() > 0.5, key
        assert exp["events_before_first_exposure"] > 0, key


def test_sample_ratio_mismatch_only_among_android_in_onboarding(generated, exposures):
    _, truth = generated
    for key, exp in truth["experiments"].items():
        subjects = _subjects(exposures, key, exp)
        subjects = subjects[subjects["n_variants"] == 1]
        control_weight = exp["weights"]["control"]
        for device, group in subjects.groupby("device_type"):
            treated = (group["variation"] != "control").sum()
            control = (group["variation"] == "control").sum()
            # Treated/control ratio relative to the expected one: 1, or 0.5 where rows are lost.
            ratio = treated / control / ((1 - control_weight) / control_weight)
            expected = 0.5 if exp["srm_injected"] and device == "android" else 1.0
            four_sigma = 4 * expected * np.sqrt(1 / treated + 1 / control)
            assert ratio == pytest.approx(expected, abs=four_sigma), (key, device)
        assert exp["srm_injected"] == (key == "onboarding_srm")
    assert truth["experiments"]["onboarding_srm"]["srm_cause"] == {
        "property": "device_type", "value": "android",
    }
    assert truth["experiments"]["onboarding_srm"]["srm_lost_subjects"] > 0


def test_arms_multiply_purchase_amounts_after_first_exposure():
    # In memory and large: per-purchase amounts are too noisy to see a 5% effect at test sizes.
    rng = np.random.default_rng(SEED)
    population = sample_data.draw_population(rng, 100_000)
    draws = [sample_data.draw_experiment(rng, s, population) for s in sample_data.EXPERIMENTS]
    events = sample_data.draw_events(rng, population, draws)
    buyer = events.user[events.is_purchase]
    bought_at = events.at[events.is_purchase]
    amount = events.amount[events.is_purchase]
    for draw in draws:
        arm = np.full(len(population.device), -1)
        arm[draw.subject] = draw.arm
        since = np.zeros(len(population.device), dtype=np.int64)
        since[draw.subject] = draw.first_exposure
        after = (arm[buyer] >= 0) & (bought_at >= since[buyer])
        for device_index, device in enumerate(sample_data.DEVICES):
            on = after & (population.device[buyer] == device_index)
            means = [amount[on & (arm[buyer] == i)].mean() for i in range(len(draw.spec.arms))]
            for i, spec_arm in enumerate(draw.spec.arms):
                # An arm with only_device multiplies that device's amounts, the others' not at all.
                assert means[i] / means[0] == pytest.approx(1 + spec_arm.segment_lifts()[device], abs=0.06), (device, i)


def test_pre_and_post_purchase_totals_correlate(generated, events):
    purchases = events[events["event_type"] == "purchase"]
    users = [f"u{i:07d}" for i in range(USERS)]
    pre = purchases[purchases["event_ts"] < PRE_PERIOD_END].groupby("user_id")["amount"].sum()
    post = purchases[purchases["event_ts"] >= PRE_PERIOD_END].groupby("user_id")["amount"].sum()
    correlation = np.corrcoef(pre.reindex(users, fill_value=0), post.reindex(users, fill_value=0))
    assert correlation[0, 1] > 0.3


def test_refuses_to_overwrite_without_the_flag(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        sample_data.generate(out, n_users=200, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    sample_data.generate(out, n_users=200, seed=1, overwrite=True)
    (out / "events" / "events_1999-01-01.parquet").write_text("stale")
    truth = sample_data.generate(out, n_users=300, seed=2, overwrite=True)
    # Its own files are replaced, anything else in the folder is left alone.
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list((out / "events").iterdir())) == truth["generated_files"]["events"]
    assert json.loads((out / "ground_truth.json").read_text())["n_users"] == 300


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert sample_data.main(["--out", str(out), "--users", "300", "--seed", "3"]) == 0
    truth = json.loads((out / "ground_truth.json").read_text())
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert f"{truth['rows']['events']:,} rows" in line
    assert f"{truth['generated_files']['assignments']} files" in line

    with pytest.raises(SystemExit) as refused:
        sample_data.main(["--out", str(out), "--users", "300"])
    assert refused.value.code == 2
    assert "overwrite" in capsys.readouterr().err
    assert sample_data.main(["--out", str(out), "--users", "300", "--overwrite"]) == 0
