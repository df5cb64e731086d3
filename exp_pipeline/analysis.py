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
import pandas as pd

from exp_pipeline import checks, results, schemas, sources, validation
from exp_pipeline.checks import BLOCKING, DEDUPED, ERROR, METRICS, POST, PRE, RAW, ROWS_READ, CheckOutcome
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.stats import SrmCause, SrmResult
from exp_pipeline.transforms import ingestion, temporal_join
from exp_pipeline.transforms.assignments import (
    analysable_assignments,
    apply_assignment_history,
    assignment_counts,
    exposure_row_counts,
    first_exposures,
)
from exp_pipeline.transforms.fixed_point import read_bounds, value_bounds
from exp_pipeline.transforms.subject_values import (
    VALUE_KEY,
    cap_subject_values,
    metric_bucket_sums,
    subject_metric_values,
    sufficient_statistics,
)
from exp_pipeline.vocabulary import MULTIPLE_VARIANTS
from exp_pipeline.warehouse.interface import WarehouseSession

ANALYSIS_STATE = "analysis_state"
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


def _preview(session: WarehouseSession, table: ir.Table) -> str:
    # Any few rows: ordering them would sort the whole partition for a preview.
    frame = session.to_pandas(table.limit(PREVIEW_ROWS))
    return frame.to_markdown(index=False) if len(frame) else "(no rows)"


def _stored_rows(session: WarehouseSession, table: str, experiment_id: str) -> int:
    return session.count(session.partition(table, experiment_id)) if session.has_table(table) else 0


def _previous_event_rows(session: WarehouseSession, experiment_id: str) -> int | None:
    if not session.has_table(ANALYSIS_STATE):
        return None
    frame = session.to_pandas(session.partition(ANALYSIS_STATE, experiment_id))
    if len(frame) != 1 or pd.isna(frame["event_rows_read"].iloc[0]):
        return None
    return int(frame["event_rows_read"].iloc[0])


# -- stage 1: the exposures of each experiment ------------------------------------------------------


def _ingest_exposures(
    session: WarehouseSession, registry: Registry, experiment: Experiment, exposures: ir.Table,
    accept_empty_source: bool, result: ExperimentResult,
) -> None:
    """raw_assignments and rejected_rows of one experiment, with their checks."""
    source = registry.sources.assignments
    what = f"the exposure log for {experiment.id}"
    rows = exposures.filter(exposures.experiment_id == experiment.id)
    classified = session.temp_table("_classified_assignments", ingestion.classify_assignments(rows, experiment, source.properties))
    accounting = ingestion.RowAccounting.of(session.to_pandas(ingestion.rejection_counts(classified)))
    stored = _stored_rows(session, RAW, experiment.id)
    if not accounting.read and stored and not accept_empty_source:
        # An export that came out empty (a header-only file) must not reset the experiment.
        result.record(RAW, ROWS_READ, checks.evaluate_rows_read(
            what, 0, stored, source.max_row_drop_share, kept=f"{stored} rows of {RAW}"))
        return
    written = session.replace_partitions(experiment.id, {
        RAW: ingestion.ingested(classified),
        "rejected_rows": ingestion.rejected(classified, "assignments", experiment.id),
    })
    # Every row read is either ingested or kept aside with its reason.
    if (written[RAW], written["rejected_rows"]) != (accounting.ingested, accounting.rejected):
        raise RuntimeError(
            f"row accounting broke for {experiment.id}: read {accounting.read}, wrote {written} (expected "
            f"{accounting.ingested} ingested and {accounting.rejected} rejected)"
        )
    result.metadata[RAW] = {
        "dagster/row_count": written[RAW],
        "rows_read": accounting.read,
        "rows_ingested": accounting.ingested,
        "rows_rejected": accounting.rejected,
        "rejected_share": accounting.rejected_share,
        "rejected_by_reason": accounting.rejected_by_reason,
        "empty_files_skipped": list(session.skipped_empty_files),
    }
    result.markdown[RAW] = {"preview": _preview(session, session.partition(RAW, experiment.id))}
    result.record(RAW, ROWS_READ, checks.evaluate_rows_read(
        what, accounting.ingested, stored or None, source.max_row_drop_share))
    result.record(RAW, "rejected_share_within_bound", checks.rejected_share(
        accounting, source.max_rejected_share, f"{experiment.id} exposure"))
    result.record(RAW, "matches_schema", checks.evaluate_schema(session, RAW, experiment, registry))


def _dedupe(
    session: WarehouseSession, registry: Registry, experiment: Experiment, now: dt.datetime,
    result: ExperimentResult,
) -> pd.DataFrame:
    """deduped_assignments of one experiment (history kept), with its checks; the subject counts
    per variant and property value (for SRM)."""
    properties = registry.sources.assignments.properties
    raw = session.partition(RAW, experiment.id)
    current = first_exposures(raw, experiment, properties)
    previous = session.partition(DEDUPED, experiment.id) if session.has_table(DEDUPED) else None
    if previous is not None:
        # Materialize the previous state first: the write below replaces it.
        previous = session.temp_table("_previous_deduped", previous)
    written = session.replace_partition(DEDUPED, experiment.id, apply_assignment_history(current, previous, now))
    deduped = session.partition(DEDUPED, experiment.id)
    reasons = session.to_pandas(exposure_row_counts(raw, experiment))
    counts = session.to_pandas(assignment_counts(analysable_assignments(deduped), properties))
    active = deduped.filter(deduped.is_active)
    excluded = session.count(active.filter(active.exclusion_reason == MULTIPLE_VARIANTS))
    overall = counts[counts["property"] == ""]
    observed = dict(zip(overall["variant_id"], overall["n"].astype(int), strict=True))
    analysable = sum(observed.values())
    per_variant = pd.DataFrame([
        {
            "variant": v.id,
            "subjects": observed.get(v.id, 0),
            "observed_share": observed.get(v.id, 0) / max(analysable, 1),
            "expected_share": v.weight,
        }
        for v in experiment.variants
    ])
    result.metadata[DEDUPED] = {
        "dagster/row_count": written,
        "analysable_subjects": analysable,
        "multi_variant_subjects": excluded,
        "multi_variant_share": excluded / (analysable + excluded) if analysable + excluded else 0.0,
        "exposure_rows_by_reason": dict(zip(reasons["reason"], reasons["rows"].astype(int), strict=True)),
    }
    result.markdown[DEDUPED] = {
        "preview": _preview(session, deduped),
        "subjects_per_variant": per_variant.to_markdown(index=False, floatfmt=".4f"),
    }
    result.record(DEDUPED, "matches_schema", checks.evaluate_schema(session, DEDUPED, experiment, registry))
    result.record(DEDUPED, "one_active_row_per_subject", checks.evaluate_unique_active_subject(session, experiment))
    result.record(DEDUPED, "multi_variant_share_within_bounds", checks.multi_variant_outcome(excluded, analysable + excluded, experiment))
    srm, causes = results.srm_of(counts, experiment)
    result.srm, result.causes = srm, causes
    result.record(DEDUPED, "no_sample_ratio_mismatch", checks.sample_ratio_outcome(srm, causes, experiment, properties))
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
    rows = temporal_join.window_rows(analysable, events, session.table(METRIC_WINDOWS))
    session.publish_view(POST, temporal_join.post_assignment_rows(rows))
    session.publish_view(PRE, temporal_join.pre_assignment_rows(rows))


# Columns of the window-event tables that come from the subject side of the join.
SUBJECT_COLUMNS = {"experiment_id", "subject_id", "variant_id", "assigned_at"}
WINDOW_SCHEMAS = ((POST, schemas.post_assignment_events_schema), (PRE, schemas.pre_assignment_events_schema))


@dataclass(frozen=True)
class RunJoin:
    """The run's temporal join, aggregated (`segment_sums`), and what reads it."""

    subjects: ir.Table  # the analysable subjects of every experiment going, with their unit
    events: ir.Table  # the usable metric events of the run's span
    windows: ir.Table  # metric_windows of the experiments going
    cut: temporal_join.WindowSegments
    rows: ir.Table  # segment_rows: the join itself (a query, never stored)
    segments: ir.Table  # segment_sums: per unit, span, segment and value bucket
    validations: dict[str, validation.JoinValidation]  # POST/PRE -> its schemas' batched verdicts

    def spans_of(self, experiment_ids: Sequence[str]) -> list[int]:
        spans = self.cut.spans
        return [int(s) for s in spans.span[spans.experiment_id.isin(list(experiment_ids))]]

    def rows_of(self, name: str, experiment_id: str) -> ir.Table:
        """One experiment's rows of the join in post/pre_assignment_events (read only to report a
        failing check)."""
        rows = self.rows.filter(self.rows.experiment_id == experiment_id)
        return temporal_join.rows_of_period(rows, ibis.memtable(self.cut.segments), "post" if name == POST else "pre")


def _run_join(session: WarehouseSession, registry: Registry, going: Sequence[Experiment], events: ir.Table) -> RunJoin:
    frame = temporal_join.metric_windows_frame([(e, registry.metrics_of(e)) for e in going])
    cut = temporal_join.window_segments(frame)
    assignments = ibis.union(
        *(analysable_assignments(session.partition(DEDUPED, e.id)) for e in going), distinct=False
    ).select("experiment_id", "subject_id", "variant_id", "assigned_at")
    # Small (one row per subject and experiment); materialized so every query sees the same subjects.
    subjects = session.temp_table("_analysable", temporal_join.numbered_subjects(assignments))
    validations = {
        name: validation.JoinValidation({e.id: schema_of(e) for e in going}, SUBJECT_COLUMNS, f"{name}_verdict_")
        for name, schema_of in WINDOW_SCHEMAS
    }
    spans = session.temp_table("_spans", ibis.memtable(cut.spans))

    def row_verdicts(rows: ir.Table) -> dict[str, ir.BooleanColumn]:
        shared: dict[str, ir.BooleanColumn] = {}
        for check in validations.values():  # a verdict both tables' schemas have is computed once
            shared = check.row_verdicts(rows, shared)
        return shared

    sides = session.temp_table("_subject_spans", temporal_join.subject_spans(subjects, spans))
    rows = temporal_join.segment_rows(sides, events)
    # The one join of the run, aggregated as it goes: nothing event-level is stored.
    segments = session.temp_table("_segment_sums", temporal_join.segment_sums(rows, row_verdicts))
    windows = session.table(METRIC_WINDOWS)
    windows = windows.filter(windows.experiment_id.isin([e.id for e in going]))
    return RunJoin(subjects, events, windows, cut, rows, segments, validations)


def _event_checks(
    session: WarehouseSession, registry: Registry, experiments: Sequence[Experiment], join: RunJoin,
    outcomes: dict[str, ExperimentResult],
) -> None:
    """The checks of the two window-event tables, for every experiment from a few grouped queries
    over the run's aggregated join (its segments) and the event log."""
    segments = join.segments.join(ibis.memtable(join.cut.segments), ["span", "segment"]).join(
        ibis.memtable(join.cut.spans[["span", "experiment_id", "event_name"]]), "span"
    )
    verdict_names = sorted({n for check in join.validations.values() for n in check.row_verdict_names})
    per_period = session.to_pandas(segments.group_by("experiment_id", "period").aggregate(
        rows=segments.n_events.sum(), before=segments.n_before_assignment.sum(),
        **{name: segments[name].all() for name in verdict_names},
    ))
    periods = {(r["experiment_id"], r["period"]): r for r in per_period.to_dict("records")}
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
            found = periods.get((e.id, period), {})
            rows = int(found.get("rows") or 0)
            if check.passed(e.id, rows, found, subject_results):
                verdict = validation.ValidationOutcome(passed=True, failures=[])
            else:
                verdict = validation.validate(schema_of(e), join.rows_of(name, e.id))
            outcomes[e.id].record(name, "matches_schema", checks.schema_outcome(verdict, rows))
    for e in experiments:
        leaked = int(periods.get((e.id, "post"), {}).get("before") or 0)
        sample = None
        if leaked:
            rows = join.rows_of(POST, e.id)
            sample = session.to_pandas(checks.leak_sample(rows.filter(rows.event_at < rows.assigned_at)))
        outcomes[e.id].record(POST, "no_events_before_assignment", checks.leak_outcome(leaked, sample))
    logged = checks.metric_event_counts(session, join.events, [(e, registry.metrics_of(e)) for e in experiments])
    matched = session.to_pandas(segments.group_by("experiment_id", "event_name").aggregate(matched=segments.n_events.sum()))
    for e in experiments:
        outcomes[e.id].record(
            POST, "metric_events_match_subjects",
            checks.metric_events_outcome(e, registry, logged[logged.experiment_id == e.id], matched[matched.experiment_id == e.id]),
        )


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
    for e in experiments:
        before = _previous_event_rows(session, e.id)
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
    with clock.stage("temporal join"):
        join = _run_join(session, registry, going, _metric_events(event_log, registry, going))
    with clock.stage("event checks"):
        _event_checks(session, registry, going, join, outcomes)
    analysed = [e for e in going if not outcomes[e.id].stop_if_blocked()]
    for e in going:
        outcomes[e.id].metadata[POST] = {"event_log_rows_read": rows_read}
        outcomes[e.id].metadata[PRE] = {}
    if not analysed:
        return
    ids = [e.id for e in analysed]
    with clock.stage("per-subject values"):
        sums = metric_bucket_sums(join.segments.filter(join.segments.span.isin(join.spans_of(ids))), ibis.memtable(join.cut.coverage))
        sums = session.temp_table("_metric_bucket_sums", sums)
        values = subject_metric_values(
            join.subjects.filter(join.subjects.experiment_id.isin(ids)), sums, join.windows.filter(join.windows.experiment_id.isin(ids)),
        )
        values = session.temp_table("_subject_values", values)
    with clock.stage("caps and sufficient statistics"):
        capped = cap_subject_values(values, [m for e in analysed for m in registry.metrics_of(e)])
        capped = session.temp_table("_capped_values", capped)
        bounds = read_bounds(session.to_pandas(value_bounds(capped, VALUE_KEY)), VALUE_KEY)
        # Only this small table leaves the engine.
        sufficient = session.to_pandas(sufficient_statistics(capped, bounds))
    with clock.stage("inference and writes"):
        _write_results(session, registry, analysed, sufficient, counts, rows_read, now, outcomes)


def _write_results(
    session: WarehouseSession, registry: Registry, analysed: Sequence[Experiment], sufficient: pd.DataFrame,
    counts: dict[str, pd.DataFrame], rows_read: int, now: dt.datetime, outcomes: dict[str, ExperimentResult],
) -> None:
    """Inference per experiment (pure Python on the sufficient statistics) and its partition write."""
    for e in analysed:
        outcome = outcomes[e.id]
        frame = results.variant_metric_rows(
            sufficient[sufficient.experiment_id == e.id], e, registry.metrics_of(e), outcome.srm
        )
        state = pd.DataFrame([{"experiment_id": e.id, "analysed_at": now, "event_rows_read": rows_read}])
        state["analysed_at"] = pd.to_datetime(state["analysed_at"], utc=True)
        written = session.replace_partitions(e.id, {METRICS: frame, ANALYSIS_STATE: state})[METRICS]
        outcome.frame = frame
        outcome.metadata[METRICS] = {
            "dagster/row_count": written,
            "srm_p_value": float(outcome.srm.p_value),
            "srm_flagged": outcome.srm.flagged,
            "analysable_subjects": int(counts[e.id].query("property == ''").n.sum()),
        }
        if outcome.causes:
            top = outcome.causes[0]
            outcome.metadata[METRICS]["srm_likely_cause"] = f"{top.property} = {top.value} (p = {top.p_value_bonferroni:.2e})"
        outcome.record(METRICS, "matches_schema", checks.evaluate_schema(session, METRICS, e, registry))


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
    counts = {}
    for e in experiments:
        with clock.stage("raw_assignments"):
            _ingest_exposures(session, registry, e, exposures, accept_empty_source, outcomes[e.id])
        if outcomes[e.id].stop_if_blocked():
            continue
        with clock.stage("deduped_assignments"):
            counts[e.id] = _dedupe(session, registry, e, now, outcomes[e.id])
        outcomes[e.id].stop_if_blocked()
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
