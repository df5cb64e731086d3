"""The rules of the asset checks: each returns a CheckOutcome (pass or fail, severity, description,
figures). `evaluate_*` functions read one experiment's tables through a warehouse session; the
`*_outcome` ones judge figures the analysis pass computed for every experiment at once.

They are tested on tables built in the tests; exp_pipeline.analysis evaluates them in its pass and
defs/ records them. Blocking checks that fail with ERROR stop the later stages of that experiment
(and only that one).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline import results, schemas, stats, validation
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.stats import SrmCause, SrmResult
from exp_pipeline.transforms.ingestion import RowAccounting
from exp_pipeline.transforms.temporal_join import experiment_span
from exp_pipeline.vocabulary import HARMLESS_REJECTIONS, UTC_TIMESTAMP
from exp_pipeline.warehouse.interface import WarehouseSession

SAMPLE_SIZE = 20
ERROR, WARN = "ERROR", "WARN"


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict: `metadata` holds plain numbers, text, and lists or dicts (shown as JSON)."""

    passed: bool
    severity: str = ERROR  # what a failure means: ERROR or WARN
    description: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckDefinition:
    """A check of every experiment: on which asset, and whether a failure of ERROR severity stops
    that experiment's later stages (blocking; the others go on)."""

    asset: str
    check: str
    blocking: bool
    description: str


RAW, DEDUPED, POST, PRE, METRICS = (
    "raw_assignments", "deduped_assignments", "post_assignment_events", "pre_assignment_events", "variant_metrics",
)
ROWS_READ = "rows_read_not_dropped"
# In the order the pass evaluates them (the report lists them in this order).
EXPERIMENT_CHECKS = [CheckDefinition(*c) for c in (
    (RAW, ROWS_READ, True,
     "The assignments source is not empty where the warehouse holds rows from the last run (ERROR: they "
     "are kept, not reset to nothing, and the experiment stops) and read at most "
     "sources.assignments.max_row_drop_share fewer rows than the run before (WARN)."),
    (RAW, "rejected_share_within_bound", True,
     "Share of the experiment's exposure rows rejected at ingestion (kept in rejected_rows) is at most "
     "sources.assignments.max_rejected_share."),
    (RAW, "matches_schema", True, "raw_assignments matches its Pandera schema (types, nulls, allowed values)."),
    (DEDUPED, "matches_schema", True, "deduped_assignments (its active rows) matches its Pandera schema."),
    (DEDUPED, "one_active_row_per_subject", True,
     "UNIQUE(experiment_id, subject_id) among active rows: one subject, one experiment, one variant."),
    (DEDUPED, "one_subject_per_secondary_id", True,
     "subject_id_map matches its Pandera schema: UNIQUE(experiment_id, id_name, secondary_id), each value "
     "of a secondary id (sources.assignments.secondary_ids) belongs to one subject, the first seen with it."),
    (DEDUPED, "conflicting_secondary_ids_within_bound", False,
     "Share of a secondary id's values seen with several subjects (a shared device, a forwarded email): "
     "WARN above sources.assignments.max_conflicting_id_share; their events count for the first subject only."),
    (DEDUPED, "multi_variant_share_within_bounds", True,
     "Share of subjects excluded for seeing several variants: WARN above warn_share, ERROR above error_share."),
    (DEDUPED, "no_sample_ratio_mismatch", True,
     "Chi-square test of subjects per variant against the weights; when it fires, the same test per "
     "assignment property names the likely cause. Stops the metrics if the registry says so (srm.blocks_metrics)."),
    (POST, ROWS_READ, True,
     "The events source is not empty where the experiment was analysed on events before (ERROR: the "
     "results stay, the experiment stops) and read at most sources.events.max_row_drop_share fewer rows "
     "than the run before (WARN)."),
    (POST, "matches_schema", True,
     "The experiment's post-assignment rows of the run's temporal join match the table's Pandera schema."),
    (PRE, "matches_schema", True,
     "The experiment's pre-assignment rows of the run's temporal join match the table's Pandera schema."),
    (POST, "no_events_before_assignment", True,
     "No pre-assignment leakage: every post-assignment row has event_at >= its subject's current assigned_at."),
    (POST, "metric_events_match_subjects", False,
     "The metrics' events find the experiment's subjects: WARN when an event name never occurs in the "
     "experiment's span of the log, or when more than sources.events.max_unmatched_share of those events "
     "fall in no analysable subject's window."),
    (METRICS, "matches_schema", False, "variant_metrics matches its Pandera schema."),
    (METRICS, "no_pre_period_bias", False,
     "Each metric's pre-period value (the CUPED covariate) compared between each treatment and the control "
     "(Welch's test): WARN below pre_period_bias.p_threshold (default 0.001). CUPED adjusts for such an imbalance."),
)]
BLOCKING = {(c.asset, c.check): c.blocking for c in EXPERIMENT_CHECKS}


def _p(value: float, label: str = "p") -> str:
    # Chi-square p-values of large mismatches underflow to 0.0; say so rather than print "p = 0".
    return f"{label} < 1e-300" if value == 0 else f"{label} = {value:.3g}"


def schema_outcome(outcome: validation.ValidationOutcome, rows: int) -> CheckOutcome:
    return CheckOutcome(
        passed=outcome.passed,
        severity=ERROR,
        description=None if outcome.passed else "failed: " + "; ".join(outcome.failed_checks),
        metadata={
            "rows": rows,
            "failed_checks": len(outcome.failures),
            "failures": outcome.failures,
        },
    )


def schema_outcomes(
    session: WarehouseSession, table: str, experiments: Sequence[Experiment], registry: Registry
) -> dict[str, CheckOutcome]:
    """Each experiment's stored partition of `table` against its Pandera schema, every experiment
    in one aggregate query (validation.validate_partitions)."""
    source = registry.sources.assignments
    properties, ids = source.properties, list(source.secondary_ids)
    schema_of = {
        "raw_assignments": lambda e: schemas.raw_assignments_schema(e, properties, ids),
        "deduped_assignments": lambda e: schemas.deduped_assignments_schema(e, properties, ids),
        "subject_id_map": schemas.subject_id_map_schema,
        "variant_metrics": lambda e: schemas.variant_metrics_schema(e, e.metrics),
    }[table]
    rows = session.table(table)
    stored = rows.schema()
    rows = rows.filter(rows.experiment_id.isin([e.id for e in experiments]))
    if table == "deduped_assignments":
        # History rows keep the registry of their day (a moved window, a retired variant): the
        # rules apply to the active rows.
        rows = rows.filter(rows.is_active)
    counts = session.to_pandas(rows.group_by("experiment_id").aggregate(n=rows.count()))
    counts = dict(zip(counts["experiment_id"], counts["n"].astype(int), strict=True))
    verdicts = validation.validate_partitions(
        {e.id: schemas.with_retired_columns(schema_of(e), stored) for e in experiments}, rows
    )
    return {e.id: schema_outcome(verdicts[e.id], counts.get(e.id, 0)) for e in experiments}


def unique_active_subject_outcomes(
    session: WarehouseSession, active: ir.Table, experiment_ids: Sequence[str]
) -> dict[str, CheckOutcome]:
    """UNIQUE(experiment_id, subject_id) among the active rows of deduped_assignments (`active`),
    per experiment: pandera's unique check over every experiment at once (the key holds the
    experiment; when that fails, pandera again on each experiment's own keys, so that one
    experiment's failure is not another's), then the offending keys of each experiment from one
    grouped query."""
    keys = active.select("experiment_id", "subject_id")
    schema = schemas.active_assignments_unique_schema()
    everyone = validation.validate(schema, keys)
    # pandera names no offending keys on failure: find them in the engine.
    duplicated = keys.group_by("experiment_id", "subject_id").aggregate(active_rows=keys.count())
    duplicated = duplicated.filter(duplicated.active_rows > 1)
    counts = session.to_pandas(duplicated.group_by("experiment_id").aggregate(n=duplicated.count()))
    counts = {str(k): int(n) for k, n in zip(counts["experiment_id"], counts["n"], strict=True)}
    outcomes = {}
    for experiment_id in experiment_ids:
        count = counts.get(experiment_id, 0)
        own = everyone if everyone.passed else validation.validate(schema, keys.filter(keys.experiment_id == experiment_id))
        sample = []
        if count:
            mine = duplicated.filter(duplicated.experiment_id == experiment_id)
            sample = session.to_pandas(mine.order_by("subject_id").limit(SAMPLE_SIZE)).to_dict("records")
        outcomes[experiment_id] = CheckOutcome(
            passed=own.passed and count == 0,
            severity=ERROR,
            description=None if count == 0 else f"{count} subjects have more than one active assignment",
            metadata={"duplicated_subjects": count, "sample_duplicated_keys": sample},
        )
    return outcomes


def multi_variant_outcome(excluded: int, total: int, experiment: Experiment) -> CheckOutcome:
    """`excluded` of the experiment's `total` active subjects saw more than one variant."""
    share = excluded / total if total else 0.0
    bounds = experiment.multi_variant
    if share > bounds.error_share:
        passed, severity = False, ERROR
    elif share > bounds.warn_share:
        passed, severity = False, WARN
    else:
        passed, severity = True, WARN
    return CheckOutcome(
        passed=passed,
        severity=severity,
        description=(
            f"{share:.2%} of subjects ({excluded} of {total}) saw more than one variant "
            f"(warn above {bounds.warn_share:.2%}, error above {bounds.error_share:.2%})"
        ),
        metadata={
            "subjects": total,
            "multi_variant_subjects": excluded,
            "multi_variant_share": share,
            "warn_share": bounds.warn_share,
            "error_share": bounds.error_share,
        },
    )


def conflicting_ids_outcome(counts: pd.DataFrame, id_names: Sequence[str], max_share: float) -> CheckOutcome:
    """One experiment's values per secondary id (`counts`: id_name, values, conflicting) against
    the bound on the share seen with several subjects."""
    # Every mapped id, with (values, conflicting values): (0, 0) for an id no exposure carried.
    per_id = {name: (0, 0) for name in id_names}
    per_id.update({r.id_name: (int(r.values), int(r.conflicting)) for r in counts.itertuples(index=False)})
    shares = {name: (c / v if v else 0.0) for name, (v, c) in per_id.items()}
    over = [name for name, share in shares.items() if share > max_share]
    if not id_names:
        description = "no secondary ids mapped (sources.assignments.secondary_ids)"
    else:
        description = "; ".join(
            f"{name}: {c} of {v} values ({shares[name]:.2%}) seen with several subjects" for name, (v, c) in per_id.items()
        ) + f" (warn above {max_share:.2%}; their events count for the first subject seen with them)"
    return CheckOutcome(
        passed=not over,
        severity=WARN,
        description=description,
        metadata={
            "max_conflicting_id_share": max_share,
            **{f"{name}_values": v for name, (v, _) in per_id.items()},
            **{f"{name}_conflicting": c for name, (_, c) in per_id.items()},
        },
    )


def sample_ratio_outcome(
    srm: SrmResult, causes: list[SrmCause], experiment: Experiment, properties: Sequence[str]
) -> CheckOutcome:
    """The SRM verdict of `results.srm_of` as a check: ERROR when the registry says an SRM blocks
    the metrics, else WARN; the likely cause in the description."""
    severity = ERROR if experiment.srm.blocks_metrics else WARN
    observed = srm.observed
    metadata = {
        "observed": observed,
        "expected": {k: round(v, 1) for k, v in srm.expected.items()},
        "chi2": float(srm.chi2),
        "p_value": float(srm.p_value),
        "threshold": experiment.srm.p_threshold,
        "verdict": srm.verdict,
    }
    if not srm.judged:
        description = (
            f"not judged: {sum(observed.values())} subjects, fewer than {experiment.srm.min_subjects}"
        )
    elif not srm.flagged:
        description = f"no sample ratio mismatch (p = {srm.p_value:.3g})"
    else:
        description = f"sample ratio mismatch: observed {observed}, {_p(srm.p_value)}"
        if causes:
            top = causes[0]
            description += (
                f". Likely cause: {top.property} = {top.value} (observed {top.observed}, "
                f"{_p(top.p_value_bonferroni, 'Bonferroni p')})"
            )
            metadata["likely_cause"] = f"{top.property} = {top.value}"
            metadata["segments"] = (
                [
                    {"property": c.property, "value": c.value, "observed": c.observed,
                     "p_value_bonferroni": c.p_value_bonferroni}
                    for c in causes[:10]
                ]
            )
        else:
            description += (
                ". The imbalance is in every segment of "
                f"{', '.join(properties) or 'the data'}: no single property "
                "value explains it; look at assignment or exposure logging as a whole"
            )
            metadata["likely_cause"] = "none: imbalance in every segment"
    return CheckOutcome(
        passed=not srm.flagged, severity=severity, description=description, metadata=metadata
    )


def pre_period_bias_outcome(metrics: pd.DataFrame, experiment: Experiment) -> CheckOutcome:
    """Each metric's pre-period value (the CUPED covariate) compared between every treatment and the
    control with Welch's test, from the experiment's `variant_metrics` rows; WARN when any p-value is
    below `pre_period_bias.p_threshold`."""
    threshold = experiment.pre_period_bias.p_threshold
    if experiment.cuped_pre_window_days <= 0:
        return CheckOutcome(True, WARN, "not judged: the experiment has no pre-period (cuped_pre_window_days: 0)",
                            {"threshold": threshold, "tests": []})
    by_key = {(r["variant_id"], r["metric"]): results.sufficient_stats_of(r) for _, r in metrics.iterrows()}
    control = experiment.control.id
    tests = []
    for metric in dict.fromkeys(metrics["metric"]):
        for variant in experiment.variants:
            if variant.control or (variant.id, metric) not in by_key or (control, metric) not in by_key:
                continue
            t, c = (stats.covariate_stats(by_key[(v, metric)]) for v in (variant.id, control))
            test = stats.welch_test(t, c)
            tests.append({
                "metric": metric, "variant_id": variant.id, "treatment_pre_mean": _finite(t.mean),
                "control_pre_mean": _finite(c.mean), "difference": _finite(test.difference), "p_value": _finite(test.p_value),
            })
    judged = [t for t in tests if t["p_value"] is not None]
    metadata = {"threshold": threshold, "tests": tests}
    if not judged:
        return CheckOutcome(True, WARN, "not judged: no metric has pre-period values that vary", metadata)
    worst = min(judged, key=lambda t: t["p_value"])
    metadata["smallest_p_value"] = worst["p_value"]
    where = f"{worst['metric']}, {worst['variant_id']} vs {control}"
    if worst["p_value"] >= threshold:
        return CheckOutcome(True, WARN, f"no pre-period imbalance: smallest {_p(worst['p_value'])} ({where}; "
                            f"WARN below {threshold:g})", metadata)
    flagged = sum(t["p_value"] < threshold for t in judged)
    return CheckOutcome(False, WARN, (
        f"pre-period imbalance in {flagged} of {len(judged)} comparisons: {where}: pre-period means "
        f"{worst['treatment_pre_mean']:.4g} vs {worst['control_pre_mean']:.4g} ({_p(worst['p_value'])}, WARN below "
        f"{threshold:g}). Randomization makes this rare: check how subjects were assigned and exposures "
        "logged. CUPED adjusts (linearly) for the pre-period difference: read cuped_rel_lift rather than rel_lift."
    ), metadata)


def _finite(value: float) -> float | None:
    # Metadata is JSON: an undefined statistic is null, not NaN.
    return float(value) if math.isfinite(value) else None


def rejected_share(rows: RowAccounting, bound: float, what: str) -> CheckOutcome:
    """The share of a source's rows rejected (duplicates aside) against its bound."""
    by_reason = rows.rejected_by_reason
    rejected = sum(n for reason, n in by_reason.items() if reason not in HARMLESS_REJECTIONS)
    share = rejected / rows.read if rows.read else 0.0
    return CheckOutcome(
        passed=share <= bound,
        severity=ERROR,
        description=(
            f"{share:.2%} of {what} rows rejected ({rejected} of {rows.read}, duplicates aside; "
            f"bound {bound:.2%})"
        ),
        metadata={
            "rows_read": rows.read, "rows_rejected": rejected, "rejected_share": share, "bound": bound,
            "rejected_by_reason": by_reason,
        },
    )


def evaluate_source_rejected_share(session: WarehouseSession, registry: Registry, rows_read: int) -> CheckOutcome:
    """Share of the event log's rows rejected; `rows_read` is what source_audit read."""
    table = session.table("rejected_source_rows")
    table = table.filter(table.source == "events")
    counts = session.to_pandas(table.group_by("reason").aggregate(rows=table.count()))
    return rejected_share(RowAccounting.of_rejected(counts, rows_read), registry.sources.events.max_rejected_share, "event")


def leak_sample(leaked: ir.Table) -> ir.Table:
    """A few of the leaked rows, for the check's metadata."""
    return (
        leaked.select("subject_id", "assigned_at", "event_at", "event_name")
        .order_by("subject_id", "event_at")
        .limit(SAMPLE_SIZE)
    )


def leak_outcome(count: int, sample: pd.DataFrame | None) -> CheckOutcome:
    """No pre-assignment leakage: `count` post-assignment rows (of the run's join against the
    current assignments) happened before their subject's assignment."""
    records = []
    if sample is not None:
        sample = sample.copy()
        for column in ("assigned_at", "event_at"):
            sample[column] = sample[column].astype(str)
        records = sample.to_dict("records")
    return CheckOutcome(
        passed=count == 0,
        severity=ERROR,
        description=None if count == 0 else f"{count} events happened before their subject's current assignment",
        metadata={"leaked_events": count, "sample": records},
    )


def evaluate_rows_read(
    what: str, rows_now: int, rows_before: int | None, bound: float, kept: str | None = None
) -> CheckOutcome:
    """Did the source shrink? `kept` (what was kept, e.g. "600 rows of raw_assignments"): it read
    nothing and the experiment's stored rows were kept instead of being replaced by nothing (ERROR:
    the results would have reset to n = 0). A drop of more than `bound` against the rows the run
    before read is a WARN (files missing from a glob, a partial export)."""
    metadata = {"rows_read": rows_now, "rows_before": rows_before, "kept": kept, "bound": bound}
    if kept:
        return CheckOutcome(
            passed=False, severity=ERROR, metadata=metadata,
            description=(
                f"{what} has no rows now; the experiment's stored {kept} were kept, with the results "
                "built on them. Fix the export; if the source really is empty now, materialize with "
                "config accept_empty_source: true"
            ),
        )
    drop = 1 - rows_now / rows_before if rows_before else 0.0
    metadata["drop_share"] = drop
    return CheckOutcome(
        passed=drop <= bound, severity=WARN, metadata=metadata,
        description=(
            f"{what}: {rows_now} rows, {drop:.0%} fewer than the {rows_before} of the previous run "
            f"(warn above {bound:.0%})" if rows_before else f"{what}: {rows_now} rows (no previous run to compare)"
        ),
    )


# Row checksums are reduced below 2**20 before they are summed: order-independent, and no
# engine's integer arithmetic can overflow (Spark's hash is a 32-bit int).
CHECKSUM_MODULUS = 1 << 20


@ibis.udf.scalar.builtin(name="hash")
def _hash_of(subject_id: str, event_at: UTC_TIMESTAMP, value: float) -> int:
    """The engine's hash of several values in one call (DuckDB's and Spark's `hash` take any
    number): a third of the cost of hashing each and combining them."""


def row_checksum(events: ir.Table) -> ir.IntegerValue:
    """A number per event row from its subject, time and value (the engine's own hash: compare
    checksums of one engine only)."""
    return _hash_of(events.subject_id, events.event_at, events.value) % CHECKSUM_MODULUS


@dataclass(frozen=True)
class EventCounts:
    """The usable metric events of a run, counted in one scan of the log: per experiment and event
    name, those in the span the experiment can use (its pre-period before the start to the end
    plus the widest window), and of them, before each of a few times (the refresh's watermarks),
    their rows and checksum (`row_checksum` summed)."""

    per_name: pd.DataFrame  # experiment_id, event_name, rows, before_K and checksum_K for each time K
    times: tuple[dt.datetime, ...]

    def logged(self, experiment_id: str) -> pd.DataFrame:
        """Per event name: the experiment's events in its span (event_name, rows)."""
        return self.per_name[self.per_name.experiment_id == experiment_id][["event_name", "rows"]]

    def before(self, experiment_id: str, until: dt.datetime) -> dict[str, list[int]] | None:
        """Per event name: [rows, checksum] of the experiment's events in its span before `until`
        (None: not counted)."""
        if until not in self.times:
            return None
        k = self.times.index(until)
        mine = self.per_name[self.per_name.experiment_id == experiment_id]
        return {
            str(n): [int(c), int(h)]
            for n, c, h in zip(mine.event_name, mine[f"before_{k}"], mine[f"checksum_{k}"], strict=True) if c
        }


def metric_event_counts(
    session: WarehouseSession, events: ir.Table, experiments: Sequence[tuple[Experiment, Sequence]],
    times: Sequence[dt.datetime] = (),
) -> EventCounts:
    """`EventCounts` of the experiments: one query grouped by event name and time bucket.

    Every span's bounds and every time are cut points; an event's bucket is the number of cut
    points at or before it. Each count wanted is then a sum of whole buckets (in pandas), instead
    of a conditional sum per experiment and time over every row of the log.
    """
    times = tuple(dict.fromkeys(times))
    spans = [experiment_span(experiment, metrics) for experiment, metrics in experiments]
    cuts = sorted({*(b for span in spans for b in span if b is not None), *times})
    bucket = ibis.literal(0, type="int64")
    for cut in cuts:
        bucket = bucket + (events.event_at >= ibis.literal(cut, type=UTC_TIMESTAMP)).cast("int64")
    sums = {"rows": events.count()}
    if times:
        sums["checksum"] = row_checksum(events).sum()
    per_bucket = session.to_pandas(events.group_by("event_name", bucket=bucket).aggregate(**sums))
    per_bucket = per_bucket[per_bucket["bucket"].notna()]

    def total(frame: pd.DataFrame, low: dt.datetime, high: dt.datetime | None) -> pd.DataFrame:
        # Per event name, the sums of the events in [low, high): buckets after low's cut point, up
        # to and including high's.
        inside = frame["bucket"] > cuts.index(low)
        if high is not None:
            inside &= frame["bucket"] <= cuts.index(high)
        return frame[inside].groupby("event_name")[list(sums)].sum()

    rows = []
    for (experiment, metrics), (lower, upper) in zip(experiments, spans, strict=True):
        mine = per_bucket[per_bucket["event_name"].isin({m.event_name for m in metrics})]
        in_span = total(mine, lower, upper)
        before = [total(mine, lower, min(upper, until) if upper else until) if until > lower else None for until in times]

        def of(counted: pd.DataFrame | None, name: str, column: str) -> int:
            return int(counted.at[name, column]) if counted is not None and name in counted.index else 0

        for name, count in in_span["rows"].items():
            if count:
                rows.append({
                    "experiment_id": experiment.id, "event_name": name, "rows": int(count),
                    **{f"before_{k}": of(b, name, "rows") for k, b in enumerate(before)},
                    **{f"checksum_{k}": of(b, name, "checksum") for k, b in enumerate(before)},
                })
    columns = [
        "experiment_id", "event_name", "rows",
        *(f"before_{k}" for k in range(len(times))), *(f"checksum_{k}" for k in range(len(times))),
    ]
    return EventCounts(pd.DataFrame(rows, columns=columns), times)


def metric_events_outcome(
    experiment: Experiment, registry: Registry, logged: pd.DataFrame, matched: pd.DataFrame
) -> CheckOutcome:
    """Do the metrics' events find the experiment's subjects? `logged`: usable events per name in
    the experiment's span (`metric_event_counts`); `matched`: those inside an analysable subject's
    windows (the run's join). A high unmatched share means the two logs' ids do not line up
    (another id, another format); an event name that never occurs means every subject gets 0 for
    its metrics."""
    metrics = registry.metrics_of(experiment)
    names = sorted({m.event_name for m in metrics})
    in_windows = dict(zip(matched["event_name"], matched["matched"].astype(int), strict=True))
    by_name = {r.event_name: (int(r.rows), in_windows.get(r.event_name, 0)) for r in logged.itertuples(index=False)}
    rows = sum(n for n, _ in by_name.values())
    matched_rows = sum(m for _, m in by_name.values())
    share = 1 - matched_rows / rows if rows else 0.0
    never = [n for n in names if n not in by_name]
    bound = registry.sources.events.max_unmatched_share
    problems = []
    if never:
        event_metrics = {n: [m.id for m in metrics if m.event_name == n] for n in never}
        problems.append(
            "no event named " + ", ".join(f"{n!r} (metrics {event_metrics[n]})" for n in never)
            + " in the event log in the experiment's span: every subject gets 0; check event_name"
        )
    if rows and share > bound:
        problems.append(
            f"{share:.1%} of {rows} metric events in the experiment's span fall in no analysable subject's "
            f"window (warn above {bound:.0%}): do the two logs use the same subject id? (sources.*.columns.subject_id)"
        )
    return CheckOutcome(
        passed=not problems,
        severity=WARN,
        description="; ".join(problems) if problems else (
            f"{share:.1%} of {rows} metric events fall in no analysable subject's window (warn above {bound:.0%})"
        ),
        metadata={
            "metric_events": rows, "matched_events": matched_rows, "unmatched_share": share, "bound": bound,
            "events_by_name": {n: {"rows": r, "matched": m} for n, (r, m) in by_name.items()},
            "event_names_never_logged": never,
        },
    )
