"""The analysis pass: every experiment of a run in one pass over the logs.

The exposure log is read once; each experiment's exposures are ingested and deduplicated (small
work, per experiment); then ONE temporal join of the event log against the analysable subjects of
every experiment goes straight into per-subject values and per-variant sufficient statistics.
Checks are evaluated inside the pass, per experiment, and a blocking check that fails stops that
experiment's later stages only: the others are analysed and written as usual.

It returns plain data (metadata, check outcomes, results) per experiment; defs/assets.py turns
them into Dagster events. post_assignment_events and pre_assignment_events are views over the event
log and deduped_assignments (the same join, at query time), published once per run.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import ibis
import ibis.expr.types as ir
import numpy as np
import pandas as pd

from exp_pipeline import checks, refresh, reports, results, schemas, sources, validation
from exp_pipeline.checks import BLOCKING, DEDUPED, ERROR, METRICS, POST, PRE, RAW, ROWS_READ, CheckOutcome
from exp_pipeline.registry import SUBJECT, Experiment, Registry
from exp_pipeline.stats import SrmCause, SrmResult
from exp_pipeline.transforms import ingestion, temporal_join
from exp_pipeline.transforms.assignments import (
    PAIR_COLUMNS,
    analysable_assignments,
    apply_assignment_history,
    assignment_counts,
    exposure_row_counts,
    first_exposures,
    property_pair_counts,
    subject_segments,
    usable_exposures,
)
from exp_pipeline.transforms.fixed_point import read_bounds, value_bounds
from exp_pipeline.transforms.secondary_ids import subject_id_maps
from exp_pipeline.transforms.subject_values import (
    SEGMENT_KEY,
    VALUE_KEY,
    cap_subject_values,
    complete_statistics,
    metric_bucket_sums,
    subject_bounds,
    subject_metric_values,
    sufficient_statistics,
)
from exp_pipeline.vocabulary import MULTIPLE_VARIANTS
from exp_pipeline.warehouse.interface import WarehouseSession

ANALYSIS_STATE = "analysis_state"
ID_MAP = "subject_id_map"  # written with deduped_assignments, in the same transaction
# Written with variant_metrics, in the same transaction.
SEGMENT_METRICS, SEGMENT_HETEROGENEITY = "segment_metrics", "segment_heterogeneity"
METRIC_WINDOWS = "metric_windows"
# The assets of the pass, in the order their stages run.
PASS_ASSETS = (RAW, DEDUPED, POST, PRE, METRICS)
PREVIEW_ROWS = 5


@dataclass(frozen=True)
class CheckRecord:
    """One check evaluation of one experiment."""

    asset: str
    check: str
    outcome: CheckOutcome

    @property
    def stops(self) -> bool:
        """A failed blocking check of ERROR severity stops the experiment's later stages."""
        return BLOCKING[(self.asset, self.check)] and not self.outcome.passed and self.outcome.severity == ERROR

    @property
    def name(self) -> str:
        return f"{self.asset}.{self.check}"


@dataclass
class ExperimentResult:
    """What the pass did for one experiment."""

    experiment_id: str
    metadata: dict[str, dict] = field(default_factory=dict)  # asset -> its materialization's metadata
    markdown: dict[str, dict[str, str]] = field(default_factory=dict)  # asset -> markdown metadata
    checks: list[CheckRecord] = field(default_factory=list)
    stopped_by: str | None = None  # the check that stopped it ("asset.check"), None: analysed
    frame: pd.DataFrame | None = None  # the variant_metrics rows written
    segments: pd.DataFrame | None = None  # its segment_metrics rows
    heterogeneity: pd.DataFrame | None = None  # its segment_heterogeneity rows
    srm: SrmResult | None = None
    causes: list[SrmCause] = field(default_factory=list)  # property values explaining an SRM

    def record(self, asset: str, check: str, outcome: CheckOutcome) -> None:
        self.checks.append(CheckRecord(asset, check, outcome))

    def stop_if_blocked(self) -> bool:
        """Stop the experiment when a blocking check failed; whether it stopped."""
        if self.stopped_by is None:
            self.stopped_by = next((c.name for c in self.checks if c.stops), None)
        return self.stopped_by is not None


class StageClock:
    """Wall seconds per stage of the pass (reported with the results: where a run's time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def _previews(session: WarehouseSession, table: ir.Table, experiment_ids: Sequence[str]) -> dict[str, str]:
    """A few rows of each experiment's partition (any few: ordering them would sort the whole
    partition for a preview), in one query."""
    if not experiment_ids:
        return {}
    firsts = [table.filter(table.experiment_id == i).limit(PREVIEW_ROWS) for i in experiment_ids]
    frame = session.to_pandas(ibis.union(*firsts, distinct=False) if len(firsts) > 1 else firsts[0])
    shown = {}
    for experiment_id in experiment_ids:
        rows = frame[frame.experiment_id == experiment_id].reset_index(drop=True)
        shown[experiment_id] = rows.to_markdown(index=False) if len(rows) else "(no rows)"
    return shown


def _rows_per_experiment(session: WarehouseSession, table: ir.Table) -> dict[str, int]:
    counts = session.to_pandas(table.group_by("experiment_id").aggregate(rows=table.count()))
    return {str(k): int(v) for k, v in zip(counts["experiment_id"], counts["rows"], strict=True)}


def _union(parts: list[ir.Table]) -> ir.Table:
    return ibis.union(*parts, distinct=False) if len(parts) > 1 else parts[0]


def _previous_event_rows(session: WarehouseSession, experiment_ids: Sequence[str]) -> dict[str, int]:
    """Per experiment: the event rows its last analysis read (none before its first)."""
    if not session.has_table(ANALYSIS_STATE):
        return {}
    state = session.table(ANALYSIS_STATE)
    frame = session.to_pandas(state.filter(state.experiment_id.isin(list(experiment_ids))))
    return {
        str(r.experiment_id): int(r.event_rows_read)
        for r in frame.itertuples(index=False) if not pd.isna(r.event_rows_read)
    }


# -- stage 1: the exposures of every experiment, in a few queries -----------------------------------


def _ingest_exposures(
    session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment], exposures: ir.Table,
    accept_empty_source: bool, outcomes: dict[str, ExperimentResult],
) -> None:
    """raw_assignments and rejected_rows of every experiment, with their checks."""
    source = registry.sources.assignments
    classified = session.temp_table(
        "_classified_assignments", ingestion.classify_assignments(exposures, experiments, source.kept_columns)
    )
    reasons = session.to_pandas(ingestion.rejection_counts(classified, by=["experiment_id"]))
    stored = _rows_per_experiment(session, session.table(RAW)) if session.has_table(RAW) else {}
    writing = []
    accounts = {}
    for e in experiments:
        accounting = accounts[e.id] = ingestion.RowAccounting.of(reasons[reasons.experiment_id == e.id])
        if not accounting.read and stored.get(e.id) and not accept_empty_source:
            # An export that came out empty (a header-only file) must not reset the experiment.
            outcomes[e.id].record(RAW, ROWS_READ, checks.evaluate_rows_read(
                f"the exposure log for {e.id}", 0, stored[e.id], source.max_row_drop_share, kept=f"{stored[e.id]} rows of {RAW}"))
            outcomes[e.id].stop_if_blocked()
        else:
            writing.append(e)
    if not writing:
        return
    ids = [e.id for e in writing]
    mine = classified.filter(classified.experiment_id.isin(ids))
    written = session.replace_experiments(ids, {
        RAW: ingestion.ingested(mine),
        "rejected_rows": _union([
            ingestion.rejected(mine.filter(mine.experiment_id == i), "assignments", i) for i in ids
        ]),
    })
    raw = session.table(RAW)
    raw = raw.filter(raw.experiment_id.isin(ids))
    previews = _previews(session, raw, ids)
    schema_outcomes = checks.schema_outcomes(session, RAW, writing, registry)
    for e in writing:
        accounting, result = accounts[e.id], outcomes[e.id]
        # Every row read is either ingested or kept aside with its reason.
        if (written[RAW][e.id], written["rejected_rows"][e.id]) != (accounting.ingested, accounting.rejected):
            raise RuntimeError(
                f"row accounting broke for {e.id}: read {accounting.read}, wrote "
                f"{written[RAW][e.id]} ingested and {written['rejected_rows'][e.id]} rejected (expected "
                f"{accounting.ingested} and {accounting.rejected})"
            )
        result.metadata[RAW] = {
            "dagster/row_count": written[RAW][e.id],
            "rows_read": accounting.read,
            "rows_ingested": accounting.ingested,
            "rows_rejected": accounting.rejected,
            "rejected_share": accounting.rejected_share,
            "rejected_by_reason": accounting.rejected_by_reason,
            "empty_files_skipped": list(session.skipped_empty_files),
        }
        result.markdown[RAW] = {"preview": previews[e.id]}
        result.record(RAW, ROWS_READ, checks.evaluate_rows_read(
            f"the exposure log for {e.id}", accounting.ingested, stored.get(e.id) or None, source.max_row_drop_share))
        result.record(RAW, "rejected_share_within_bound", checks.rejected_share(
            accounting, source.max_rejected_share, f"{e.id} exposure"))
        result.record(RAW, "matches_schema", schema_outcomes[e.id])
        result.stop_if_blocked()


def _dedupe(
    session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment], now: dt.datetime,
    outcomes: dict[str, ExperimentResult],
) -> dict[str, pd.DataFrame]:
    """deduped_assignments of every experiment (history kept), with their checks; per experiment
    the subject counts per variant and property value (for SRM)."""
    if not experiments:
        return {}
    properties, secondary_ids = registry.sources.assignments.properties, list(registry.sources.assignments.secondary_ids)
    ids = [e.id for e in experiments]
    raw = session.table(RAW)
    mine = raw.filter(raw.experiment_id.isin(ids))
    # Materialized: the history compares it with the previous rows three ways.
    current = session.temp_table("_current_assignments", first_exposures(mine, experiments, properties, secondary_ids))
    previous = None
    if session.has_table(DEDUPED):
        # Materialize the previous state first: the write below replaces it.
        stored = session.table(DEDUPED)
        previous = session.temp_table("_previous_deduped", stored.filter(stored.experiment_id.isin(ids)))
    written = session.replace_experiments(ids, {
        DEDUPED: apply_assignment_history(current, previous, now, properties, secondary_ids),
        ID_MAP: subject_id_maps(usable_exposures(mine, experiments), secondary_ids),
    })
    id_map_rows, written = written[ID_MAP], written[DEDUPED]
    deduped = session.table(DEDUPED)
    deduped = deduped.filter(deduped.experiment_id.isin(ids))
    active = deduped.filter(deduped.is_active)
    reasons = session.to_pandas(exposure_row_counts(raw.filter(raw.experiment_id.isin(ids)), experiments))
    all_counts = session.to_pandas(assignment_counts(analysable_assignments(deduped), properties, by=["experiment_id"]))
    excluded = _rows_per_experiment(session, active.filter(active.exclusion_reason == MULTIPLE_VARIANTS))
    previews = _previews(session, deduped, ids)
    schema_outcomes = checks.schema_outcomes(session, DEDUPED, experiments, registry)
    unique = checks.unique_active_subject_outcomes(session, active, ids)
    id_map_outcomes = checks.schema_outcomes(session, ID_MAP, experiments, registry)
    id_map = session.table(ID_MAP)
    id_map = id_map.filter(id_map.experiment_id.isin(ids))
    conflicts = session.to_pandas(id_map.group_by("experiment_id", "id_name").aggregate(
        values=id_map.count(), conflicting=(id_map.n_subjects > 1).cast("int64").sum()
    ))
    counts = {}
    for e in experiments:
        result = outcomes[e.id]
        counts[e.id] = all_counts[all_counts.experiment_id == e.id].drop(columns="experiment_id")
        overall = counts[e.id][counts[e.id]["property"] == ""]
        observed = dict(zip(overall["variant_id"], overall["n"].astype(int), strict=True))
        analysable = sum(observed.values())
        multi = excluded.get(e.id, 0)
        per_variant = pd.DataFrame([
            {
                "variant": v.id,
                "subjects": observed.get(v.id, 0),
                "observed_share": observed.get(v.id, 0) / max(analysable, 1),
                "expected_share": v.weight,
            }
            for v in e.variants
        ])
        mine = reasons[reasons.experiment_id == e.id]
        result.metadata[DEDUPED] = {
            "dagster/row_count": written[e.id],
            "subject_id_map_rows": id_map_rows[e.id],
            "analysable_subjects": analysable,
            "multi_variant_subjects": multi,
            "multi_variant_share": multi / (analysable + multi) if analysable + multi else 0.0,
            "exposure_rows_by_reason": dict(zip(mine["reason"], mine["rows"].astype(int), strict=True)),
        }
        result.markdown[DEDUPED] = {
            "preview": previews[e.id],
            "subjects_per_variant": per_variant.to_markdown(index=False, floatfmt=".4f"),
        }
        result.record(DEDUPED, "matches_schema", schema_outcomes[e.id])
        result.record(DEDUPED, "one_active_row_per_subject", unique[e.id])
        result.record(DEDUPED, "one_subject_per_secondary_id", id_map_outcomes[e.id])
        result.record(DEDUPED, "conflicting_secondary_ids_within_bound", checks.conflicting_ids_outcome(
            conflicts[conflicts.experiment_id == e.id], secondary_ids, registry.sources.assignments.max_conflicting_id_share))
        result.record(DEDUPED, "multi_variant_share_within_bounds", checks.multi_variant_outcome(multi, analysable + multi, e))
        srm, causes = results.srm_of(counts[e.id], e)
        result.srm, result.causes = srm, causes
        result.record(DEDUPED, "no_sample_ratio_mismatch", checks.sample_ratio_outcome(srm, causes, e, properties))
        result.stop_if_blocked()
    return counts


# -- stage 2: one temporal join for every experiment ------------------------------------------------


def _metric_events(event_log: ir.Table, registry: Registry, experiments: Sequence[Experiment]) -> ir.Table:
    """The usable events of the experiments' metrics, in the span of the log they can use."""
    everything = [(e, registry.metrics_of(e)) for e in experiments]
    names = sorted({m.event_name for _, metrics in everything for m in metrics})
    events = ingestion.usable_events(ingestion.canonical_events(event_log, registry.sources.events), names)
    return temporal_join.events_in_span(events, everything)


def _window_views(session: WarehouseSession, registry: Registry) -> None:
    """post_assignment_events and pre_assignment_events as the temporal join at query time, for
    every experiment of the registry (views on DuckDB)."""
    event_log = sources.read_source(session, registry, "events", persist=True)
    events = _metric_events(event_log, registry, registry.experiments)
    analysable = analysable_assignments(session.table(DEDUPED)).select(
        "experiment_id", "subject_id", "variant_id", "assigned_at"
    )
    rows = temporal_join.window_rows(analysable, events, session.table(METRIC_WINDOWS), _id_map(session, registry, registry.experiments))
    session.publish_view(POST, temporal_join.post_assignment_rows(rows))
    session.publish_view(PRE, temporal_join.pre_assignment_rows(rows))


def _id_map(session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment]) -> ir.Table | None:
    """subject_id_map of the experiments, when one of their metrics is keyed by a secondary id."""
    if not any(_keyed_by_secondary_ids(registry, e) for e in experiments) or not session.has_table(ID_MAP):
        return None  # (no map yet: a warehouse where no experiment reached deduped_assignments since)
    id_map = session.table(ID_MAP)
    return id_map.filter(id_map.experiment_id.isin([e.id for e in experiments]))


# Columns of the window-event tables that come from the subject side of the join.
SUBJECT_COLUMNS = {"experiment_id", "subject_id", "variant_id", "assigned_at"}
WINDOW_SCHEMAS = ((POST, schemas.post_assignment_events_schema), (PRE, schemas.pre_assignment_events_schema))


@dataclass(frozen=True)
class RunJoin:
    """The run's temporal join, aggregated (`segment_sums`), and what reads it."""

    subjects: ir.Table  # the analysable subjects of every experiment going, with their unit and settled key
    events: ir.Table  # the usable metric events of the run's span
    windows: ir.Table  # metric_windows of the experiments going
    cut: temporal_join.WindowSegments
    rows: ir.Table  # segment_rows: the whole join (a query, never stored)
    segments: ir.Table  # segment_sums of the events joined now, and the stored settled ones
    validations: dict[str, validation.JoinValidation]  # POST/PRE -> its schemas' batched verdicts

    def spans_of(self, experiment_ids: Sequence[str]) -> list[int]:
        spans = self.cut.spans
        return [int(s) for s in spans.span[spans.experiment_id.isin(list(experiment_ids))]]

    def rows_of(self, name: str, experiment_id: str) -> ir.Table:
        """One experiment's rows of the join in post/pre_assignment_events (read only to report a
        failing check)."""
        rows = self.rows.filter(self.rows.experiment_id == experiment_id)
        return temporal_join.rows_of_period(rows, ibis.memtable(self.cut.segments), "post" if name == POST else "pre")


@dataclass(frozen=True)
class RunRefresh:
    """What the run keeps from the last one, per experiment (refresh.py)."""

    plans: dict[str, refresh.RefreshPlan]
    settle_until: dt.datetime
    batch: int
    counts: checks.EventCounts  # the metric events of the log, per experiment and name

    def fresh_from(self) -> dict[str, dt.datetime]:
        return {i: p.fresh_from for i, p in self.plans.items() if p.fresh_from is not None}


def _newest_event(session: WarehouseSession, event_log: ir.Table, registry: Registry, now: dt.datetime) -> dt.datetime | None:
    """The newest event time of the log (any event name, any experiment: the watermark must not
    depend on which experiments share a run), never later than `now` (a row stamped in the
    future must not settle what is still to come)."""
    events = ingestion.canonical_events(event_log, registry.sources.events)
    newest = session.ibis.execute(events.event_at.max())
    if newest is None or pd.isna(newest):
        return None
    newest = pd.Timestamp(newest)
    newest = newest.tz_localize("UTC") if newest.tzinfo is None else newest.tz_convert("UTC")
    return min(newest.to_pydatetime(), now.astimezone(dt.UTC))


def _plan_refresh(
    session: WarehouseSession, registry: Registry, going: Sequence[Experiment], event_log: ir.Table, events: ir.Table,
    now: dt.datetime,
) -> RunRefresh:
    """Per experiment: refreshed from its stored state, or recomputed (refresh.plan_refresh): the
    newest event sets the watermark, then one count of the event log (which the run's checks read
    too) says what changed before the last one."""
    states = refresh.read_states(session, [e.id for e in going])
    settle_until = refresh.settle_point(_newest_event(session, event_log, registry, now), registry.sources.events.late_arrival_days)
    counts = checks.metric_event_counts(
        session, events, [(e, registry.metrics_of(e)) for e in going],
        times=[settle_until, *(s.settled_until for s in states.values())],
    )
    stored_rows = refresh.batch_rows(session, {i: s.batches for i, s in states.items()})
    run = RunRefresh({}, settle_until, refresh.new_batch_id(), counts)
    for e in going:
        state = states.get(e.id)
        run.plans[e.id] = refresh.plan_refresh(
            e.id, refresh.definition_fingerprint(e, registry.metrics_of(e), registry.sources.events), state, settle_until,
            counts.before(e.id, state.settled_until) if state else None, stored_rows.get(e.id, 0) if state else None,
            keyed_by_secondary_ids=_keyed_by_secondary_ids(registry, e),
        )
    return run


def _run_join(
    session: WarehouseSession, registry: Registry, going: Sequence[Experiment], events: ir.Table, run: RunRefresh,
) -> RunJoin:
    frame = temporal_join.metric_windows_frame([(e, registry.metrics_of(e)) for e in going])
    cut = temporal_join.window_segments(frame)
    assignments = ibis.union(
        *(analysable_assignments(session.partition(DEDUPED, e.id)) for e in going), distinct=False
    ).select("experiment_id", "subject_id", "variant_id", "assigned_at")
    fresh_from = run.fresh_from()
    keyed = temporal_join.with_settled_keys(
        temporal_join.numbered_subjects(assignments), refresh.settled_subjects(session, list(run.plans.values())),
        fresh_from, run.batch,
    )
    # Small (one row per subject and experiment); materialized so every query sees the same subjects.
    subjects = session.temp_table("_analysable", keyed)
    validations = {
        name: validation.JoinValidation({e.id: schema_of(e) for e in going}, SUBJECT_COLUMNS, f"{name}_verdict_")
        for name, schema_of in WINDOW_SCHEMAS
    }
    spans = session.temp_table("_spans", ibis.memtable(cut.spans))
    verdicts: dict[str, ir.BooleanColumn] = {}

    def row_verdicts(rows: ir.Table) -> dict[str, ir.BooleanColumn]:
        shared: dict[str, ir.BooleanColumn] = {}
        for check in validations.values():  # a verdict both tables' schemas have is computed once
            shared = check.row_verdicts(rows, shared)
        verdicts.update(shared)
        return shared

    sides = session.temp_table("_subject_spans", temporal_join.subject_spans(subjects, spans, _id_map(session, registry, going)))
    if fresh_from:
        # Settled subjects need only their events from the watermark on: the log before the
        # earliest watermark is read for the others (new subjects, experiments recomputed) only.
        low = ibis.literal(min(fresh_from.values()), "timestamp('UTC')")
        fresh_rows = ibis.union(
            temporal_join.segment_rows(sides, events.filter(events.event_at >= low)),
            temporal_join.segment_rows(sides.filter(sides[temporal_join.FRESH_FROM].isnull()), events.filter(events.event_at < low)),
            distinct=False,
        )
    else:
        fresh_rows = temporal_join.segment_rows(sides, events)
    # The one join of the run, aggregated as it goes: nothing event-level is stored.
    segments = temporal_join.segment_sums(fresh_rows, row_verdicts, run.settle_until).mutate(stored=ibis.literal(False))
    stored = refresh.settled_sums(session, list(run.plans.values()))
    if stored is not None:
        segments = ibis.union(segments, temporal_join.stored_segment_sums(stored, subjects, spans, list(verdicts)), distinct=False)
    segments = session.temp_table("_segment_sums", segments)
    windows = session.table(METRIC_WINDOWS)
    windows = windows.filter(windows.experiment_id.isin([e.id for e in going]))
    rows = temporal_join.segment_rows(temporal_join.with_every_event(sides), events)
    return RunJoin(subjects, events, windows, cut, rows, segments, validations)


def _known(value) -> bool | None:
    return bool(value) if isinstance(value, bool | np.bool_) else None


def _event_checks(
    session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment], join: RunJoin, run: RunRefresh,
    outcomes: dict[str, ExperimentResult],
) -> dict[str, dict[str, bool | None]]:
    """The checks of the two window-event tables, for every experiment from a few grouped queries
    over the run's aggregated join (its segments) and the event log. Returns, per experiment and
    period, whether the rows this run settled pass their row checks (for the stored state)."""
    segments = join.segments.join(ibis.memtable(join.cut.segments), ["span", "segment"]).join(
        ibis.memtable(join.cut.spans[["span", "experiment_id", "event_name"]]), "span"
    )
    verdict_names = sorted({n for check in join.validations.values() for n in check.row_verdict_names})
    groups = session.to_pandas(segments.group_by("experiment_id", "period", "settled", "stored").aggregate(
        rows=segments.n_events.sum(), before=segments.n_before_assignment.sum(),
        **{name: segments[name].all() for name in verdict_names},
    )).to_dict("records")
    settled_pass: dict[str, dict[str, bool | None]] = {e.id: {} for e in experiments}
    leaked: dict[str, int] = {}
    for name, schema_of in WINDOW_SCHEMAS:
        period = "post" if name == POST else "pre"
        check = join.validations[name]
        # The subject-side verdicts, over the subjects with rows in this period.
        units = segments.filter(segments.period == period).select("unit").distinct()
        subjects = join.subjects.semi_join(units, "unit")
        subjects = subjects.mutate(event_at=subjects.assigned_at, event_name=ibis.literal(""), value=ibis.null("float64"))
        aggregates = check.subject_verdicts(subjects)
        subject_results = subjects.aggregate(**aggregates).to_pyarrow().to_pylist()[0] if aggregates else {}
        for e in experiments:
            mine = [g for g in groups if g["experiment_id"] == e.id and g["period"] == period]
            rows = sum(int(g["rows"] or 0) for g in mine)
            if period == "post":
                leaked[e.id] = sum(int(g["before"] or 0) for g in mine)

            def all_of(selected: list[dict]) -> dict[str, bool | None]:
                # all() of each verdict over the rows of these groups (vacuously true over none).
                return {v: refresh.rows_pass(*(_known(g[v]) for g in selected)) for v in verdict_names}

            fresh = all_of([g for g in mine if not g["stored"]])
            settled_pass[e.id][period] = check.rows_pass(e.id, all_of([g for g in mine if g["settled"] and not g["stored"]]))
            plan = run.plans[e.id]
            earlier = plan.previous.settled_rows_pass.get(period) if plan.previous else True
            if earlier is True and check.passed(e.id, rows, fresh, subject_results):
                verdict = validation.ValidationOutcome(passed=True, failures=[])
            else:
                verdict = validation.validate(schema_of(e), join.rows_of(name, e.id))
            outcomes[e.id].record(name, "matches_schema", checks.schema_outcome(verdict, rows))
    for e in experiments:
        sample = None
        if leaked[e.id]:
            rows = join.rows_of(POST, e.id)
            sample = session.to_pandas(checks.leak_sample(rows.filter(rows.event_at < rows.assigned_at)))
        outcomes[e.id].record(POST, "no_events_before_assignment", checks.leak_outcome(leaked[e.id], sample))
    matched = session.to_pandas(segments.group_by("experiment_id", "event_name").aggregate(matched=segments.n_events.sum()))
    for e in experiments:
        outcomes[e.id].record(
            POST, "metric_events_match_subjects",
            checks.metric_events_outcome(e, registry, run.counts.logged(e.id), matched[matched.experiment_id == e.id]),
        )
    return settled_pass


def _analyse(
    session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment], counts: dict[str, pd.DataFrame],
    accept_empty_source: bool, now: dt.datetime, outcomes: dict[str, ExperimentResult], clock: StageClock,
) -> None:
    """The temporal join, the event checks and the statistics of every experiment still going."""
    source = registry.sources.events
    with clock.stage("event log rows"):
        event_log = sources.read_source(session, registry, "events")
        rows_read = session.count(event_log)
    going = []
    previous = _previous_event_rows(session, [e.id for e in experiments])
    for e in experiments:
        before = previous.get(e.id)
        outcome = outcomes[e.id]
        if not rows_read and before and not accept_empty_source:
            outcome.record(POST, ROWS_READ, checks.evaluate_rows_read(
                "the event log", 0, before, source.max_row_drop_share, kept=f"variant_metrics rows (analysed on {before} event rows)"))
        else:
            outcome.record(POST, ROWS_READ, checks.evaluate_rows_read("the event log", rows_read, before, source.max_row_drop_share))
        if not outcome.stop_if_blocked():
            going.append(e)
    if not going:
        return
    events = _metric_events(event_log, registry, going)
    with clock.stage("refresh plan"):
        run = _plan_refresh(session, registry, going, event_log, events, now)
    with clock.stage("temporal join"):
        join = _run_join(session, registry, going, events, run)
    with clock.stage("event checks"):
        settled_pass = _event_checks(session, registry, going, join, run, outcomes)
    analysed = [e for e in going if not outcomes[e.id].stop_if_blocked()]
    for e in going:
        plan = run.plans[e.id]
        outcomes[e.id].metadata[POST] = {
            "event_log_rows_read": rows_read,
            "refresh": "incremental" if plan.incremental else "full",
            "refresh_reason": plan.reason,
            "settled_until": plan.settle_until.isoformat(),
        }
        outcomes[e.id].metadata[PRE] = {}
    if not analysed:
        return
    ids = [e.id for e in analysed]
    with clock.stage("per-subject values"):
        sums = metric_bucket_sums(join.segments.filter(join.segments.span.isin(join.spans_of(ids))), ibis.memtable(join.cut.coverage))
        values = subject_metric_values(
            join.subjects.filter(join.subjects.experiment_id.isin(ids)), sums, join.windows.filter(join.windows.experiment_id.isin(ids)),
        )
        values = session.temp_table("_subject_values", values)
    with clock.stage("caps and sufficient statistics"):
        capped = cap_subject_values(
            values, [m for e in analysed for m in registry.metrics_of(e)],
            join.subjects.filter(join.subjects.experiment_id.isin(ids)), join.windows.filter(join.windows.experiment_id.isin(ids)),
        )
        capped = session.temp_table("_capped_values", capped)
        segment_counts = pd.concat([counts[i].assign(experiment_id=i) for i in ids], ignore_index=True)
        per_experiment = segment_counts.query("property == ''").groupby("experiment_id")["n"].sum().astype(int).to_dict()
        bounds = subject_bounds(read_bounds(session.to_pandas(value_bounds(capped, VALUE_KEY)), VALUE_KEY), per_experiment)
        analysable = ibis.union(*(analysable_assignments(session.partition(DEDUPED, i)) for i in ids), distinct=False)
        segments = session.temp_table("_subject_segments", subject_segments(
            join.subjects.filter(join.subjects.experiment_id.isin(ids)), analysable, registry.sources.assignments.properties,
        ))
        # Only this small table leaves the engine: every variant's and every segment's sums at once.
        sums = session.to_pandas(sufficient_statistics(capped, bounds, segments))
        full = complete_statistics(
            sums, segment_counts, {e.id: [m.id for m in registry.metrics_of(e)] for e in analysed}, by=SEGMENT_KEY,
        )
        overall = full["property"] == ""
        sufficient = full[overall].drop(columns=list(SEGMENT_KEY))
        by_segment = full[~overall]
        pair_counts = property_pair_counts(analysable, registry.sources.assignments.properties, by=["experiment_id"])
        pairs = session.to_pandas(pair_counts) if pair_counts is not None else pd.DataFrame(columns=["experiment_id", *PAIR_COLUMNS])
    with clock.stage("settled rows"):
        states = _settle(session, registry, analysed, join, run, settled_pass)
    with clock.stage("inference and writes"):
        _write_results(session, registry, analysed, sufficient, by_segment, pairs, counts, rows_read, now, states, outcomes)
        # After the commit: the rows no state names any more (recomputed, or left by a failed run).
        refresh.prune_uncommitted(session, states)


def _keyed_by_secondary_ids(registry: Registry, experiment: Experiment) -> bool:
    return any(m.entity != SUBJECT for m in registry.metrics_of(experiment))


def _settle(
    session: WarehouseSession, registry: Registry, analysed: Sequence[Experiment], join: RunJoin, run: RunRefresh,
    settled_pass: dict[str, dict[str, bool | None]],
) -> list[refresh.RefreshState]:
    """Store the rows this run settled as its batch; the analysed experiments' next states (not
    committed until they are written with the results). Experiments with metrics keyed by a
    secondary id store none: they are recomputed in full (refresh.plan_refresh)."""
    ids = [e.id for e in analysed]
    stored_ids = [e.id for e in analysed if not _keyed_by_secondary_ids(registry, e)]
    spans = ibis.memtable(join.cut.spans[["span", "experiment_id", "event_name"]])
    sums = temporal_join.settled_rows(join.segments, join.subjects, spans)
    mine = join.subjects.filter(join.subjects.experiment_id.isin(stored_ids))
    new = mine.filter(mine[temporal_join.FRESH_FROM].isnull())
    subjects = new.select(
        *refresh.SUBJECT_KEY, batch=new[temporal_join.SETTLED_BATCH].cast("int64"), unit=new[temporal_join.SETTLED_UNIT].cast("int64"),
        revokes_batch=ibis.null("int64"),
    )
    settled = refresh.settled_subjects(session, [run.plans[i] for i in stored_ids])
    if settled is not None:
        # Computed before this batch is appended: subjects the run went on without.
        gone = session.temp_table("_revoked_subjects", refresh.revocations(settled, mine.select(*refresh.SUBJECT_KEY), run.batch))
        subjects = ibis.union(subjects, gone, distinct=False)
    refresh.append_settled(session, sums.filter(sums.experiment_id.isin(stored_ids)), subjects, run.batch)
    written = refresh.batch_rows(session, {i: [run.batch] for i in ids})
    return [
        run.plans[i].next_state(run.counts.before(i, run.settle_until) or {}, settled_pass[i], run.batch, written.get(i, 0))
        for i in ids
    ]


def _write_results(
    session: WarehouseSession, registry: Registry, analysed: Sequence[Experiment], sufficient: pd.DataFrame,
    by_segment: pd.DataFrame, pairs: pd.DataFrame, counts: dict[str, pd.DataFrame], rows_read: int, now: dt.datetime,
    states: Sequence[refresh.RefreshState], outcomes: dict[str, ExperimentResult],
) -> None:
    """Inference per experiment (pure Python on the sufficient statistics) and one write of every
    experiment's partitions, with its refresh state (the commit of the rows it settled)."""
    segment_frames = {e.id: by_segment[by_segment.experiment_id == e.id] for e in analysed}
    frames = {
        e.id: results.variant_metric_rows(
            sufficient[sufficient.experiment_id == e.id], e, registry.metrics_of(e), outcomes[e.id].srm,
            covariates=registry.covariates_of(e), segments=segment_frames[e.id], pairs=pairs[pairs.experiment_id == e.id],
        )
        for e in analysed
    }
    state = pd.DataFrame([{"experiment_id": e.id, "analysed_at": now, "event_rows_read": rows_read} for e in analysed])
    state["analysed_at"] = pd.to_datetime(state["analysed_at"], utc=True)
    ids = [e.id for e in analysed]
    metrics = pd.concat(list(frames.values()), ignore_index=True)
    segment_rows = {e.id: results.segment_metric_rows(segment_frames[e.id], e, registry.metrics_of(e)) for e in analysed}
    heterogeneity = {e.id: results.heterogeneity_rows(segment_frames[e.id], e, registry.metrics_of(e)) for e in analysed}
    written = session.replace_experiments(ids, {
        METRICS: ibis.memtable(metrics),
        SEGMENT_METRICS: _rows_table(list(segment_rows.values()), schemas.segment_metrics_schema(None)),
        SEGMENT_HETEROGENEITY: _rows_table(list(heterogeneity.values()), schemas.segment_heterogeneity_schema(None)),
        ANALYSIS_STATE: ibis.memtable(state),
        refresh.REFRESH_STATE: ibis.memtable(refresh.state_frame(states)),
    })[METRICS]
    schema_outcomes = checks.schema_outcomes(session, METRICS, analysed, registry)
    for e in analysed:
        outcome = outcomes[e.id]
        outcome.frame, outcome.segments, outcome.heterogeneity = frames[e.id], segment_rows[e.id], heterogeneity[e.id]
        outcome.metadata[METRICS] = {
            "dagster/row_count": written[e.id],
            "srm_p_value": float(outcome.srm.p_value),
            "srm_flagged": outcome.srm.flagged,
            "analysable_subjects": int(counts[e.id].query("property == ''").n.sum()),
        }
        outcome.metadata[METRICS]["effect_differs_by"] = reports.differs_lines(heterogeneity[e.id])
        if outcome.causes:
            top = outcome.causes[0]
            outcome.metadata[METRICS]["srm_likely_cause"] = f"{top.property} = {top.value} (p = {top.p_value_bonferroni:.2e})"
        outcome.record(METRICS, "matches_schema", schema_outcomes[e.id])
        outcome.record(METRICS, "no_pre_period_bias", checks.pre_period_bias_outcome(frames[e.id], e))


def _rows_table(frames: list[pd.DataFrame], schema) -> ir.Table:
    """Frames of one table as an engine table with the table's types (none may have rows)."""
    return ibis.memtable(pd.concat(frames, ignore_index=True), schema=schemas.ibis_schema(schema))


@dataclass(frozen=True)
class PassResult:
    experiments: dict[str, ExperimentResult]
    seconds: dict[str, float]  # wall seconds per stage of the pass


def analyse_experiments(
    session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment], now: dt.datetime,
    accept_empty_source: bool = False,
) -> PassResult:
    """Run the pass for `experiments` (any number, one is fine) and write their partitions."""
    outcomes = {e.id: ExperimentResult(e.id) for e in experiments}
    clock = StageClock()
    if not experiments:
        return PassResult(outcomes, clock.seconds)
    source = registry.sources.assignments
    with clock.stage("exposure log"):
        exposure_log = ingestion.canonical_assignments(sources.read_source(session, registry, "assignments"), source, None)
        # The exposure log is read once per run, for every experiment.
        exposures = session.temp_table(
            "_exposures", exposure_log.filter(exposure_log.experiment_id.isin([e.id for e in experiments]))
        )
    with clock.stage("raw_assignments"):
        _ingest_exposures(session, registry, experiments, exposures, accept_empty_source, outcomes)
    with clock.stage("deduped_assignments"):
        going = [e for e in experiments if outcomes[e.id].stopped_by is None]
        counts = _dedupe(session, registry, going, now, outcomes)
    session.replace_table(
        METRIC_WINDOWS,
        temporal_join.metric_windows_frame([(e, registry.metrics_of(e)) for e in registry.experiments]),
    )
    _analyse(
        session, registry, [e for e in experiments if outcomes[e.id].stopped_by is None], counts,
        accept_empty_source, now, outcomes, clock,
    )
    with clock.stage("event views"):
        if session.has_table(DEDUPED):
            _window_views(session, registry)
    return PassResult(outcomes, clock.seconds)
