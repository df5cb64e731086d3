"""Deterministic sample logs for the pipeline, with the ground truth they were generated from.

Writes an assignments (exposure) log and a product-event log as daily Parquet files, in the shape
``data/registry.yaml`` expects, plus ``ground_truth.json`` describing what the pipeline should find:
subjects per variant after cleaning, injected lifts and the injected sample ratio mismatch.

The logs carry the mess real ones have: repeated exposures, properties that change between
exposures, subjects exposed to several variants, QA traffic outside the experiment window,
events before assignment and assigned users without any events.

Usage: ``python -m exp_pipeline.sample_data --out data/sample --users 100000 --seed 20261123``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_USERS = 100_000
DEFAULT_SEED = 20261123

# All times are int64 microseconds since the Unix epoch (UTC). Microseconds, not nanoseconds,
# so the values survive DuckDB's microsecond TIMESTAMPTZ unchanged.
US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND


def _utc_us(iso: str) -> int:
    """Microseconds since the epoch of an ISO timestamp given in UTC."""
    return int(np.datetime64(iso.removesuffix("Z"), "us").astype(np.int64))


def _iso_z(us: int) -> str:
    return str(np.datetime64(us, "us").astype("datetime64[s]")) + "Z"


EVENTS_START = _utc_us("2026-09-10T00:00:00Z")
EVENTS_END = _utc_us("2026-11-16T00:00:00Z")

# Population.
DEVICES = ("ios", "android", "web")
DEVICE_WEIGHTS = (0.45, 0.40, 0.15)
COUNTRIES = ("US", "DE", "BR", "IN", "GB")
COUNTRY_WEIGHTS = (0.35, 0.15, 0.20, 0.20, 0.10)
INACTIVE_SHARE = 0.10
ACTIVITY_SIGMA = 0.9
SPEND_SIGMA = 0.3

# Events: Poisson processes per user, rates per day at activity level 1.
SESSION_RATE_PER_DAY = 0.4
PURCHASE_RATE_PER_DAY = 0.04
AMOUNT_SHAPE = 2.0
AMOUNT_SCALE = 15.0
SESSION = "session"
PURCHASE = "purchase"

# Exposures.
ENROLL_SHARE = 0.5
ENROLL_DAYS = 14
REPEAT_EXTRA_MEAN = 2.0  # every subject is re-exposed 1 + Poisson(this) times
REPEAT_SPREAD_DAYS = 10
PROPERTY_CHANGE_SHARE = 0.10
MULTI_VARIANT_SHARE = 0.005
QA_BEFORE_START_SHARE = 0.01
LATE_AFTER_END_SHARE = 0.005
OUTSIDE_MIN_DAYS = 1
OUTSIDE_MAX_DAYS = 5
SRM_LOSS_SHARE = 0.5
# Later exposures are at least this long after the first, so "first exposure" is never a tie.
MIN_GAP_US = US_PER_SECOND

ASSIGNMENTS_DIR = "assignments"
EVENTS_DIR = "events"
GROUND_TRUTH_FILE = "ground_truth.json"
OWNED_ENTRIES = (ASSIGNMENTS_DIR, EVENTS_DIR, GROUND_TRUTH_FILE)


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float
    amount_multiplier: float = 1.0
    # The multiplier applies to subjects on this device only (a heterogeneous effect).
    only_device: str | None = None

    def segment_lifts(self) -> dict[str, float]:
        """The true relative revenue lift per device."""
        return {
            d: round(self.amount_multiplier - 1.0, 12) if self.only_device in (None, d) else 0.0 for d in DEVICES
        }

    def revenue_lift(self) -> float:
        """The true overall relative revenue lift: device is independent of spend, so each device
        holds its weight's share of the control's revenue in expectation."""
        return round(sum(w * self.segment_lifts()[d] for d, w in zip(DEVICES, DEVICE_WEIGHTS, strict=True)), 12)


@dataclass(frozen=True)
class ExperimentSpec:
    key: str
    start: str
    end: str | None
    arms: tuple[Arm, ...]  # the first arm is the control
    # Exposure rows of subjects with this device in this arm are lost with SRM_LOSS_SHARE.
    srm_device: str | None = None
    srm_arm: str | None = None
    enroll_share: float = ENROLL_SHARE  # of all users, enrolled in the experiment

    @property
    def start_us(self) -> int:
        return _utc_us(self.start)

    @property
    def window_end_us(self) -> int:
        """End of the window exposures are logged in; a running experiment runs to the data end."""
        return EVENTS_END if self.end is None else _utc_us(self.end)


EXPERIMENTS = (
    ExperimentSpec(
        key="checkout_redesign",
        start="2026-10-01T00:00:00Z",
        end="2026-10-29T00:00:00Z",
        # The redesign helps iOS only: +25% revenue there, about +11% overall.
        arms=(Arm("control", 0.5), Arm("treatment", 0.5, 1.25, only_device="ios")),
    ),
    ExperimentSpec(
        key="aa_homepage",
        start="2026-10-01T00:00:00Z",
        end=None,
        arms=(Arm("control", 0.5), Arm("treatment", 0.5)),
    ),
    ExperimentSpec(
        key="pricing_three_arm",
        start="2026-10-05T00:00:00Z",
        end="2026-11-02T00:00:00Z",
        arms=(Arm("control", 0.5), Arm("price_low", 0.25, 1.08), Arm("price_high", 0.25, 0.95)),
    ),
    ExperimentSpec(
        key="onboarding_srm",
        start="2026-10-01T00:00:00Z",
        end="2026-10-29T00:00:00Z",
        arms=(Arm("control", 0.5), Arm("treatment", 0.5)),
        srm_device="android",
        srm_arm="treatment",
    ),
)


@dataclass(frozen=True)
class Population:
    device: np.ndarray  # index into DEVICES
    country: np.ndarray  # index into COUNTRIES
    activity: np.ndarray  # g_u: event rate multiplier, 0 for inactive users
    spend: np.ndarray  # h_u: purchase amount multiplier


@dataclass(frozen=True)
class ExposureRows:
    """Exposure log rows as aligned arrays: user index, arm index, time, device index."""

    user: np.ndarray
    arm: np.ndarray
    at: np.ndarray
    device: np.ndarray

    def select(self, mask: np.ndarray) -> ExposureRows:
        return ExposureRows(self.user[mask], self.arm[mask], self.at[mask], self.device[mask])

    @staticmethod
    def concat(parts: Sequence[ExposureRows]) -> ExposureRows:
        return ExposureRows(
            np.concatenate([p.user for p in parts]),
            np.concatenate([p.arm for p in parts]),
            np.concatenate([p.at for p in parts]),
            np.concatenate([p.device for p in parts]),
        )


@dataclass(frozen=True)
class ExperimentDraw:
    """One experiment's enrolled subjects (index-aligned arrays) and its exposure log."""

    spec: ExperimentSpec
    subject: np.ndarray  # user index
    arm: np.ndarray
    first_exposure: np.ndarray
    logged: np.ndarray  # False when the SRM dropped all the subject's rows
    multi_variant: np.ndarray
    rows: ExposureRows
    repeated_rows: int
    property_changed_rows: int
    rows_outside_window: int

    @property
    def analysable(self) -> np.ndarray:
        return self.logged & ~self.multi_variant


@dataclass(frozen=True)
class Events:
    user: np.ndarray
    at: np.ndarray
    is_purchase: np.ndarray
    amount: np.ndarray  # NaN for sessions


def draw_population(rng: np.random.Generator, n_users: int) -> Population:
    device = rng.choice(len(DEVICES), size=n_users, p=DEVICE_WEIGHTS)
    country = rng.choice(len(COUNTRIES), size=n_users, p=COUNTRY_WEIGHTS)
    # mean -sigma^2/2 makes the lognormal's expectation 1.
    activity = rng.lognormal(-(ACTIVITY_SIGMA**2) / 2, ACTIVITY_SIGMA, size=n_users)
    activity[rng.random(n_users) < INACTIVE_SHARE] = 0.0
    spend = rng.lognormal(0.0, SPEND_SIGMA, size=n_users)
    return Population(device=device, country=country, activity=activity, spend=spend)


def _uniform_us(
    rng: np.random.Generator, low: np.ndarray | int, span: np.ndarray | int, size: int
) -> np.ndarray:
    """Uniform whole microseconds in [low, low + span)."""
    return np.asarray(low, dtype=np.int64) + np.floor(rng.random(size) * span).astype(np.int64)


def _later_times(rng: np.random.Generator, first: np.ndarray, window_end: int) -> np.ndarray:
    """Re-exposure times after `first`, within REPEAT_SPREAD_DAYS and before the window end."""
    span = np.minimum(REPEAT_SPREAD_DAYS * US_PER_DAY, window_end - first) - MIN_GAP_US
    return _uniform_us(rng, first + MIN_GAP_US, span, len(first))


def _outside_rows(
    rng: np.random.Generator,
    spec: ExperimentSpec,
    population: Population,
    users: np.ndarray,
    edge: int,
    direction: int,
) -> ExposureRows:
    """One stray exposure each, 1-5 days before (direction -1) or after (+1) the window edge."""
    offset = _uniform_us(
        rng,
        OUTSIDE_MIN_DAYS * US_PER_DAY,
        (OUTSIDE_MAX_DAYS - OUTSIDE_MIN_DAYS) * US_PER_DAY,
        len(users),
    )
    arm = rng.choice(len(spec.arms), size=len(users), p=[a.weight for a in spec.arms])
    return ExposureRows(
        user=users, arm=arm, at=edge + direction * offset, device=population.device[users]
    )


def draw_experiment(
    rng: np.random.Generator, spec: ExperimentSpec, population: Population
) -> ExperimentDraw:
    n_users = len(population.device)
    n_arms = len(spec.arms)
    enrolled = rng.random(n_users) < spec.enroll_share
    subject = np.flatnonzero(enrolled)
    n = len(subject)
    arm = rng.choice(n_arms, size=n, p=[a.weight for a in spec.arms])
    first = _uniform_us(rng, spec.start_us, ENROLL_DAYS * US_PER_DAY, n)
    device = population.device[subject]
    window_end = spec.window_end_us

    # Repeated exposures of the same arm; a few report another device than the first one.
    repeats = 1 + rng.poisson(REPEAT_EXTRA_MEAN, size=n)
    owner = np.repeat(np.arange(n), repeats)
    changed = rng.random(len(owner)) < PROPERTY_CHANGE_SHARE
    other_device = (device[owner] + rng.integers(1, len(DEVICES), size=len(owner))) % len(DEVICES)
    repeat_device = np.where(changed, other_device, device[owner])
    repeat_at = _later_times(rng, first[owner], window_end)

    # A few subjects later see another arm: the pipeline must drop them.
    multi_variant = rng.random(n) < MULTI_VARIANT_SHARE
    multi = np.flatnonzero(multi_variant)
    other_arm = (arm[multi] + rng.integers(1, n_arms, size=len(multi))) % n_arms
    multi_at = _later_times(rng, first[multi], window_end)

    # The SRM: a logging bug that loses every row of some subjects of one device in one arm.
    logged = np.ones(n, dtype=bool)
    if spec.srm_device is not None:
        srm_arm = [a.name for a in spec.arms].index(spec.srm_arm)
        at_risk = (device == DEVICES.index(spec.srm_device)) & (arm == srm_arm)
        logged = ~(at_risk & (rng.random(n) < SRM_LOSS_SHARE))
    multi_variant &= logged

    inside = ExposureRows.concat([
        ExposureRows(user=subject, arm=arm, at=first, device=device),
        ExposureRows(user=subject[owner], arm=arm[owner], at=repeat_at, device=repeat_device),
        ExposureRows(user=subject[multi], arm=other_arm, at=multi_at, device=device[multi]),
    ]).select(np.concatenate([logged, logged[owner], logged[multi]]))

    # Stray traffic (QA, late clients) from users who are not in the experiment.
    outsiders = np.flatnonzero(~enrolled)
    early = outsiders[rng.random(len(outsiders)) < QA_BEFORE_START_SHARE]
    outside = [_outside_rows(rng, spec, population, early, spec.start_us, -1)]
    if spec.end is not None:
        late = outsiders[rng.random(len(outsiders)) < LATE_AFTER_END_SHARE]
        outside.append(_outside_rows(rng, spec, population, late, window_end, +1))

    return ExperimentDraw(
        spec=spec,
        subject=subject,
        arm=arm,
        first_exposure=first,
        logged=logged,
        multi_variant=multi_variant,
        rows=ExposureRows.concat([inside, *outside]),
        repeated_rows=int(logged[owner].sum()),
        property_changed_rows=int((logged[owner] & changed).sum()),
        rows_outside_window=sum(len(o.user) for o in outside),
    )


def draw_events(
    rng: np.random.Generator,
    population: Population,
    draws: Sequence[ExperimentDraw],
    activity_scale: float = 1.0,
) -> Events:
    n_users = len(population.activity)
    days = (EVENTS_END - EVENTS_START) / US_PER_DAY
    rate = days * activity_scale * population.activity
    n_sessions = rng.poisson(SESSION_RATE_PER_DAY * rate)
    n_purchases = rng.poisson(PURCHASE_RATE_PER_DAY * rate)
    user = np.concatenate([
        np.repeat(np.arange(n_users), n_sessions),
        np.repeat(np.arange(n_users), n_purchases),
    ])
    is_purchase = np.arange(len(user)) >= n_sessions.sum()
    at = _uniform_us(rng, EVENTS_START, EVENTS_END - EVENTS_START, len(user))

    buyer, bought_at = user[is_purchase], at[is_purchase]
    amount = rng.gamma(AMOUNT_SHAPE, AMOUNT_SCALE * population.spend[buyer])
    for draw in draws:
        # Per user: the arm's multiplier, applied from the true first exposure on.
        multiplier = np.ones(n_users)
        multiplier[draw.subject] = np.array([a.amount_multiplier for a in draw.spec.arms])[draw.arm]
        only = np.array([-1 if a.only_device is None else DEVICES.index(a.only_device) for a in draw.spec.arms])[draw.arm]
        multiplier[draw.subject] = np.where((only < 0) | (population.device[draw.subject] == only), multiplier[draw.subject], 1.0)
        since = np.full(n_users, np.iinfo(np.int64).max)
        since[draw.subject] = draw.first_exposure
        amount *= np.where(bought_at >= since[buyer], multiplier[buyer], 1.0)

    amounts = np.full(len(user), np.nan)
    amounts[is_purchase] = np.round(amount, 2)  # money is logged in cents
    return Events(user=user, at=at, is_purchase=is_purchase, amount=amounts)


def _user_ids(n_users: int) -> np.ndarray:
    # Fixed-width ids so string order equals numeric order (the files are sorted by user_id).
    width = max(7, len(str(n_users - 1)))
    return np.char.add("u", np.char.zfill(np.arange(n_users).astype(str), width))


def _write_daily(
    folder: Path,
    prefix: str,
    columns: dict[str, np.ndarray],
    at: np.ndarray,
    user: np.ndarray,
    user_ids: np.ndarray,
) -> int:
    """Write one Parquet file per UTC day of `at`, rows sorted by time then user.

    `columns` holds numpy arrays (or (labels, codes) pairs, decoded per day) aligned with `at`;
    the first column is `user_id`, looked up per day so that large logs never hold every row's
    id string at once. datetime64 columns are written as UTC. Returns the number of files written.
    """
    order = np.lexsort((user, at))
    days, starts = np.unique(at[order] // US_PER_DAY, return_index=True)
    ends = np.append(starts[1:], len(order))
    folder.mkdir(parents=True)
    for day, lo, hi in zip(days, starts, ends, strict=True):
        rows = order[lo:hi]
        frame = pd.DataFrame({
            "user_id": user_ids[user[rows]],
            **{
                name: values[0][values[1][rows]] if isinstance(values, tuple) else values[rows]
                for name, values in columns.items()
            },
        })
        for name in frame.select_dtypes("datetime64[ns]").columns:
            frame[name] = frame[name].dt.tz_localize("UTC")
        # Microseconds (the times are whole microseconds): Spark cannot read nanosecond timestamps.
        frame.to_parquet(
            folder / f"{prefix}_{np.datetime64(int(day), 'D')}.parquet", index=False, coerce_timestamps="us"
        )
    return len(days)


def _as_datetime(at: np.ndarray) -> np.ndarray:
    return (at * 1_000).astype("datetime64[ns]")


def write_assignments(
    out_dir: Path, draws: Sequence[ExperimentDraw], population: Population, user_ids: np.ndarray
) -> tuple[int, int]:
    """Write the exposure log; returns (files, rows)."""
    user = np.concatenate([d.rows.user for d in draws])
    at = np.concatenate([d.rows.at for d in draws])
    columns = {
        "experiment_key": np.concatenate([np.full(len(d.rows.user), d.spec.key) for d in draws]),
        "variation": np.concatenate(
            [np.array([a.name for a in d.spec.arms])[d.rows.arm] for d in draws]
        ),
        "exposed_at": _as_datetime(at),
        "device_type": np.array(DEVICES)[np.concatenate([d.rows.device for d in draws])],
        "country": np.array(COUNTRIES)[population.country[user]],
    }
    files = _write_daily(out_dir / ASSIGNMENTS_DIR, "exposures", columns, at, user, user_ids)
    return files, len(user)


def write_events(out_dir: Path, events: Events, user_ids: np.ndarray) -> tuple[int, int]:
    """Write the event log; returns (files, rows)."""
    columns = {
        "event_ts": _as_datetime(events.at),
        "event_type": (np.array([SESSION, PURCHASE]), events.is_purchase.astype(np.int8)),
        "amount": events.amount,
    }
    files = _write_daily(out_dir / EVENTS_DIR, "events", columns, events.at, events.user, user_ids)
    return files, len(events.user)


def experiment_truth(draw: ExperimentDraw, events: Events, n_users: int) -> dict:
    spec = draw.spec
    control = spec.arms[0].name
    analysable = draw.analysable
    analysable_arm = draw.arm[analysable]
    # Per user: first exposure if analysable, else the minimum so no event counts as "before".
    first = np.full(n_users, np.iinfo(np.int64).min)
    first[draw.subject[analysable]] = draw.first_exposure[analysable]
    has_events = np.bincount(events.user, minlength=n_users) > 0
    return {
        "start_at": _iso_z(spec.start_us),
        "end_at": None if spec.end is None else _iso_z(spec.window_end_us),
        "weights": {a.name: a.weight for a in spec.arms},
        "control": control,
        "exposure_rows": len(draw.rows.user),
        "rows_outside_window": draw.rows_outside_window,
        "multi_variant_subjects": int(draw.multi_variant.sum()),
        "analysable_subjects": {
            a.name: int((analysable_arm == i).sum()) for i, a in enumerate(spec.arms)
        },
        "true_relative_lift": {
            a.name: {
                "revenue": a.revenue_lift(),
                "purchases": 0.0,
                "conversion": 0.0,
                "sessions": 0.0,
            }
            for a in spec.arms[1:]
        },
        "true_revenue_lift_by_device": {a.name: a.segment_lifts() for a in spec.arms[1:]},
        "srm_injected": spec.srm_device is not None,
        "srm_cause": None
        if spec.srm_device is None
        else {"property": "device_type", "value": spec.srm_device},
        # The mess, counted: the pipeline's cleaning can be checked against these.
        "repeated_exposure_rows": draw.repeated_rows,
        "property_changed_rows": draw.property_changed_rows,
        "srm_lost_subjects": int((~draw.logged).sum()),
        "analysable_subjects_without_events": int((~has_events[draw.subject[analysable]]).sum()),
        "events_before_first_exposure": int((events.at < first[events.user]).sum()),
    }


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace "
                "the sample data"
            )
        for name in OWNED_ENTRIES:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: Path,
    n_users: int = DEFAULT_USERS,
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
    *,
    activity_scale: float = 1.0,
    experiments: Sequence[ExperimentSpec] = EXPERIMENTS,
) -> dict:
    """Write the sample logs and ground_truth.json into out_dir; return the ground truth.

    `activity_scale` multiplies every user's event rate (the benchmark's knob for events per
    assignment); `experiments` defaults to the four of data/registry.yaml, whose streams stay the
    same when specs are appended.
    """
    if n_users < 1:
        raise ValueError(f"n_users must be positive, got {n_users}")
    if activity_scale <= 0:
        raise ValueError(f"activity_scale must be positive, got {activity_scale}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    # Independent streams per component: changing one experiment does not reshuffle the others.
    population_seed, events_seed, *experiment_seeds = np.random.SeedSequence(seed).spawn(
        2 + len(experiments)
    )
    population = draw_population(np.random.default_rng(population_seed), n_users)
    draws = [
        draw_experiment(np.random.default_rng(s), spec, population)
        for s, spec in zip(experiment_seeds, experiments, strict=True)
    ]
    events = draw_events(np.random.default_rng(events_seed), population, draws, activity_scale)

    user_ids = _user_ids(n_users)
    assignment_files, assignment_rows = write_assignments(out_dir, draws, population, user_ids)
    event_files, event_rows = write_events(out_dir, events, user_ids)

    truth = {
        "seed": seed,
        "n_users": n_users,
        "activity_scale": activity_scale,
        "generated_files": {"assignments": assignment_files, "events": event_files},
        "rows": {"assignments": assignment_rows, "events": event_rows},
        "inactive_users": int((population.activity == 0).sum()),
        "experiments": {d.spec.key: experiment_truth(d, events, n_users) for d in draws},
    }
    (out_dir / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exp_pipeline.sample_data", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help="population size")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--overwrite", action="store_true", help="replace existing sample data")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be positive")
    started = time.perf_counter()
    try:
        truth = generate(args.out, n_users=args.users, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    files, rows = truth["generated_files"], truth["rows"]
    seconds = time.perf_counter() - started
    print(
        f"wrote {args.out}: "
        f"assignments {files['assignments']} files / {rows['assignments']:,} rows, "
        f"events {files['events']} files / {rows['events']:,} rows ({seconds:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
