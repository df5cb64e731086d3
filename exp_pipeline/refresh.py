"""The incremental refresh, in one place: what a run keeps from the last one, what it recomputes.

Each run *settles* the events logged before a watermark: the newest event time it sees minus the
events source's `late_arrival_days`. Their per-subject exact sums per window segment (the run's
aggregated join, `temporal_join.segment_sums`) are stored in SETTLED_SUMS, and the subjects they
were summed for in SETTLED_SUBJECTS (with the `assigned_at` they were summed at). The next run
joins only the events at or after the old watermark for those subjects, every event for subjects
new since (or whose assignment moved), and adds the stored sums: fixed-point sums add exactly, so
the results are bit-identical to a full recomputation.

An experiment is recomputed from nothing when it has no state, when its definition changed
(`definition_fingerprint`), or when the log now holds other events before the old watermark than
it did (a different count per event name: rows later than the lookback, or removed ones).

Writes are ordered so that a run that dies half way cannot corrupt the next one: the sums go in as
a new batch, and only the state written with variant_metrics names the committed batches; rows of
batches it does not name are ignored, then deleted (`prune_uncommitted`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline import schemas
from exp_pipeline.registry import SUBJECT, Experiment, Metric, Source
from exp_pipeline.warehouse.interface import WarehouseSession

REFRESH_STATE = "refresh_state"
SETTLED_SUMS = "settled_segment_sums"
SETTLED_SUBJECTS = "settled_subjects"
# Raise it whenever the join's rules or the meaning of the stored sums change: every experiment is
# then recomputed from nothing once.
LOGIC_VERSION = 2
# The watermark of a log without a single event: nothing is settled.
NOTHING_SETTLED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
PERIODS = ("post", "pre")


def definition_fingerprint(experiment: Experiment, metrics: Sequence[Metric], events: Source) -> str:
    """What the stored sums depend on: the experiment, its metrics, the events source, the logic."""
    described = {
        "logic": LOGIC_VERSION,
        "experiment": experiment.model_dump(mode="json"),
        # Fields added since a warehouse was written, at values that change nothing, are left out:
        # an upgrade must not recompute every experiment (nor say its definition changed).
        "metrics": [m.model_dump(mode="json", exclude={"entity"} if m.entity == SUBJECT else None) for m in metrics],
        "events": events.model_dump(mode="json", exclude={"secondary_ids", "max_conflicting_id_share"}),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def settle_point(newest_event_at: dt.datetime | None, late_arrival_days: float) -> dt.datetime:
    """The watermark a run settles: rows may still arrive up to `late_arrival_days` (by event time)
    behind the newest event seen; the UTC midnight at or before that (a day's events settle
    together, whatever the hour the run starts)."""
    if newest_event_at is None:
        return NOTHING_SETTLED
    reach = newest_event_at.astimezone(dt.UTC) - dt.timedelta(days=late_arrival_days)
    return max(dt.datetime.combine(reach.date(), dt.time(), dt.UTC), NOTHING_SETTLED)


def new_batch_id() -> int:
    """A run's batch of settled rows: unique per run (microseconds; runs of one warehouse are
    serialized by its lock)."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class RefreshState:
    """One experiment's stored state: which settled rows are its, and what they were settled on."""

    experiment_id: str
    fingerprint: str
    settled_until: dt.datetime
    # Per event name: [rows, checksum] of the usable events in the experiment's span before
    # settled_until (checks.EventCounts: a changed value or id changes the checksum).
    settled_events: dict[str, list[int]]
    # Per period: did every settled row pass the experiment's row checks (None: not known)?
    settled_rows_pass: dict[str, bool | None]
    batches: tuple[int, ...]  # the committed batches of SETTLED_SUMS and SETTLED_SUBJECTS
    settled_rows: int  # their rows in the two tables (fewer now: rows lost, recompute)

    def row(self) -> dict:
        return {
            "experiment_id": self.experiment_id,
            "fingerprint": self.fingerprint,
            "settled_until": self.settled_until,
            "settled_events": json.dumps(self.settled_events, sort_keys=True),
            "settled_rows_pass": json.dumps(self.settled_rows_pass, sort_keys=True),
            "batches": json.dumps(list(self.batches)),
            "settled_rows": self.settled_rows,
        }

    @classmethod
    def from_row(cls, row: Mapping) -> RefreshState:
        settled_until = pd.Timestamp(row["settled_until"])
        settled_until = settled_until.tz_localize("UTC") if settled_until.tzinfo is None else settled_until.tz_convert("UTC")
        return cls(
            experiment_id=str(row["experiment_id"]),
            fingerprint=str(row["fingerprint"]),
            settled_until=settled_until.to_pydatetime(),
            settled_events={str(k): [int(x) for x in v] for k, v in json.loads(row["settled_events"]).items()},
            settled_rows_pass=dict(json.loads(row["settled_rows_pass"])),
            batches=tuple(int(b) for b in json.loads(row["batches"])),
            settled_rows=int(row["settled_rows"]),
        )


def rows_pass(*values: bool | None) -> bool | None:
    """Three-valued AND: False if any failed, None if any is not known, else True."""
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


@dataclass(frozen=True)
class RefreshPlan:
    """What one run does for one experiment."""

    experiment_id: str
    fingerprint: str
    settle_until: dt.datetime
    previous: RefreshState | None  # the state it adds to; None: everything recomputed
    reason: str  # why, in words (the run's metadata)

    @property
    def incremental(self) -> bool:
        return self.previous is not None

    @property
    def fresh_from(self) -> dt.datetime | None:
        """Events at or after this are joined again for the settled subjects (None: all)."""
        return self.previous.settled_until if self.previous else None

    def next_state(
        self, settled_events: dict[str, list[int]], fresh_rows_pass: dict[str, bool | None], batch: int, batch_rows: int,
    ) -> RefreshState:
        """The state after this run: `settled_events` counted before settle_until, whether the rows
        it settled passed their row checks (per period), and its batch with its rows."""
        if self.previous is None:
            passes, batches, rows = dict(fresh_rows_pass), (batch,), batch_rows
        else:
            before = self.previous.settled_rows_pass
            passes = {p: rows_pass(before.get(p), fresh_rows_pass.get(p)) for p in PERIODS}
            batches, rows = (*self.previous.batches, batch), self.previous.settled_rows + batch_rows
        return RefreshState(
            self.experiment_id, self.fingerprint, self.settle_until, dict(settled_events), passes, batches, rows
        )


def plan_refresh(
    experiment_id: str, fingerprint: str, state: RefreshState | None, settle_until: dt.datetime,
    events_before_settled: dict[str, list[int]] | None, settled_rows_now: int | None, keyed_by_secondary_ids: bool = False,
) -> RefreshPlan:
    """Incremental when the stored state still describes the log and its rows: the same
    definition, the watermark not moving back, the same events before it as when they were
    settled (`events_before_settled`: their rows and checksum per name now, before
    state.settled_until), and every settled row still there (`settled_rows_now`: the committed
    rows counted now). Never for an experiment with metrics `keyed_by_secondary_ids`: a subject
    seen with a new ID gains that ID's earlier events, which no stored sum holds."""

    def full(reason: str) -> RefreshPlan:
        return RefreshPlan(experiment_id, fingerprint, settle_until, None, reason)

    if keyed_by_secondary_ids:
        return full("metrics keyed by a secondary id: a subject's ids (subject_id_map) can change with every run")
    if state is None:
        return full("first analysis: nothing settled yet")
    if state.fingerprint != fingerprint:
        return full("the experiment, its metrics or the events source changed since the last run")
    if settle_until < state.settled_until:
        return full(f"the newest event is older than the last run's watermark {state.settled_until.isoformat()}")
    if settled_rows_now != state.settled_rows:
        return full(f"{state.settled_rows} settled rows were stored, {settled_rows_now or 0} are there now")
    if events_before_settled != state.settled_events:
        return full(
            f"the event log before {state.settled_until.isoformat()} changed since it was settled "
            f"({_event_count_change(state.settled_events, events_before_settled or {})}): rows arrived later "
            "than late_arrival_days, or were removed"
        )
    return RefreshPlan(experiment_id, fingerprint, settle_until, state, f"incremental: events from {state.settled_until.isoformat()}")


def _event_count_change(before: dict[str, list[int]], now: dict[str, list[int]]) -> str:
    changes = []
    for name in sorted(set(before) | set(now)):
        (rows_then, sum_then), (rows_now, sum_now) = before.get(name, [0, 0]), now.get(name, [0, 0])
        if rows_then != rows_now:
            changes.append(f"{name}: {rows_then} -> {rows_now} rows")
        elif sum_then != sum_now:
            changes.append(f"{name}: {rows_now} rows, but other contents")
    return ", ".join(changes)


# -- the stored tables ------------------------------------------------------------------------------


def read_states(session: WarehouseSession, experiment_ids: Sequence[str]) -> dict[str, RefreshState]:
    if not session.has_table(REFRESH_STATE):
        return {}
    table = session.table(REFRESH_STATE)
    frame = session.to_pandas(table.filter(table.experiment_id.isin(list(experiment_ids))))
    return {str(r["experiment_id"]): RefreshState.from_row(r) for r in frame.to_dict("records")}


def state_frame(states: Sequence[RefreshState]) -> pd.DataFrame:
    frame = pd.DataFrame([s.row() for s in states], columns=list(STATE_COLUMNS))
    frame["settled_until"] = pd.to_datetime(frame["settled_until"], utc=True)
    return frame


STATE_COLUMNS = tuple(schemas.refresh_state_schema().columns)


def _committed(session: WarehouseSession, name: str, plans: Sequence[RefreshPlan]) -> ir.Table | None:
    """The committed rows of `name` of the incremental plans' experiments (None: no such rows)."""
    building = [p for p in plans if p.incremental]
    if not building or not session.has_table(name):
        return None
    table = session.table(name)
    mine = table.filter(table.experiment_id.isin([p.experiment_id for p in building]))
    return mine.semi_join(_batch_keys({p.experiment_id: p.previous.batches for p in building}), BATCH_KEY)


BATCH_KEY = ["experiment_id", "batch"]


def _batch_keys(batches: Mapping[str, Sequence[int]]) -> ir.Table:
    """(experiment_id, batch) of every batch given per experiment, as a small table to join on."""
    pairs = [(experiment_id, b) for experiment_id, mine in batches.items() for b in mine]
    return ibis.memtable(pd.DataFrame(pairs, columns=BATCH_KEY).astype({"batch": "int64"}))


def batch_rows(session: WarehouseSession, batches: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Per experiment: its rows in the two settled tables, of the batches given for it."""
    counts: dict[str, int] = {}
    if not any(batches.values()):
        return counts
    keys = _batch_keys(batches)
    for name in (SETTLED_SUMS, SETTLED_SUBJECTS):
        if not session.has_table(name):
            continue
        rows = session.table(name).semi_join(keys, BATCH_KEY)
        frame = session.to_pandas(rows.group_by("experiment_id").aggregate(rows=rows.count()))
        for experiment_id, n in zip(frame["experiment_id"], frame["rows"], strict=True):
            counts[str(experiment_id)] = counts.get(str(experiment_id), 0) + int(n)
    return counts


SUBJECT_KEY = ["experiment_id", "subject_id", "assigned_at"]


def settled_subjects(session: WarehouseSession, plans: Sequence[RefreshPlan]) -> ir.Table | None:
    """The subjects whose events before the watermark are summed in the incremental plans'
    committed batches: (experiment_id, subject_id, assigned_at) and the key of their sums (the
    batch and unit of the run that first settled them). A subject revoked since (a run went on
    without it at that assignment, so its sums missed that run's events) is not among them."""
    rows = _committed(session, SETTLED_SUBJECTS, plans)
    if rows is None:
        return None
    entries, revoked = rows.filter(rows.revokes_batch.isnull()), rows.filter(rows.revokes_batch.notnull())
    kept = entries.anti_join(revoked, [
        *(entries[k] == revoked[k] for k in SUBJECT_KEY), entries.batch == revoked.revokes_batch, entries.unit == revoked.unit,
    ])
    return kept.select(*SUBJECT_KEY, "batch", "unit")


def revocations(settled: ir.Table, current: ir.Table, batch: int) -> ir.Table:
    """Rows revoking the entries of settled subjects (`settled_subjects`) that are not analysable
    at the same assignment in this run (`current`: experiment_id, subject_id, assigned_at): their
    sums miss this run's events, so they are never used again (a subject back later is summed
    anew, under a new entry)."""
    gone = settled.anti_join(current, SUBJECT_KEY)
    return gone.select(*SUBJECT_KEY, batch=ibis.literal(batch, "int64"), unit=gone.unit, revokes_batch=gone.batch)


def settled_sums(session: WarehouseSession, plans: Sequence[RefreshPlan]) -> ir.Table | None:
    rows = _committed(session, SETTLED_SUMS, plans)
    return None if rows is None else rows.drop("batch")


def append_settled(session: WarehouseSession, sums: ir.Table, subjects: ir.Table, batch: int) -> None:
    """A run's newly settled rows as batch `batch` (not read until a state names it): `sums`
    (`temporal_join.settled_rows`) and the subjects settled for the first time or revoked
    (experiment_id, subject_id, assigned_at, batch, unit, revokes_batch)."""
    session.append(SETTLED_SUBJECTS, subjects)
    session.append(SETTLED_SUMS, sums.mutate(batch=ibis.literal(batch, "int64")))


def prune_uncommitted(session: WarehouseSession, states: Sequence[RefreshState]) -> None:
    """Delete the settled rows of these experiments that their states do not name (superseded by
    a recomputation, or left by a run that failed before it committed)."""
    if not states:
        return
    committed = _batch_keys({s.experiment_id: s.batches for s in states})
    for name in (SETTLED_SUMS, SETTLED_SUBJECTS):
        if not session.has_table(name):
            continue
        table = session.table(name)
        mine = table.filter(table.experiment_id.isin([s.experiment_id for s in states]))
        stale = mine.anti_join(committed, BATCH_KEY)
        if session.count(stale):
            session.delete_rows(name, stale.select(*BATCH_KEY).distinct())
