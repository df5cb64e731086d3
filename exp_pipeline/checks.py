"""The rules of the asset checks: each `evaluate_*` function reads one experiment's tables through
a warehouse session and returns a CheckOutcome (pass or fail, severity, description, figures).

They are tested on tables built in the tests; defs/checks.py wires them to Dagster. Blocking
checks that fail with ERROR stop the downstream assets of that experiment (and only that one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from exp_pipeline import results, schemas, sources, validation
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.transforms import temporal_join
from exp_pipeline.transforms.assignments import analysable_assignments, assignment_counts
from exp_pipeline.transforms.ingestion import RowAccounting
from exp_pipeline.vocabulary import HARMLESS_REJECTIONS, MULTIPLE_VARIANTS
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


def _p(value: float, label: str = "p") -> str:
    # Chi-square p-values of large mismatches underflow to 0.0; say so rather than print "p = 0".
    return f"{label} < 1e-300" if value == 0 else f"{label} = {value:.3g}"


def _schema_result(outcome: validation.ValidationOutcome, rows: int) -> CheckOutcome:
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


def evaluate_schema(
    session: WarehouseSession, table: str, experiment: Experiment, registry: Registry
) -> CheckOutcome:
    properties = registry.sources.assignments.properties
    schema = {
        "raw_assignments": lambda: schemas.raw_assignments_schema(experiment, properties),
        "deduped_assignments": lambda: schemas.deduped_assignments_schema(experiment, properties),
        "post_assignment_events": lambda: schemas.post_assignment_events_schema(experiment),
        "pre_assignment_events": lambda: schemas.pre_assignment_events_schema(experiment),
        "variant_metrics": lambda: schemas.variant_metrics_schema(experiment, experiment.metrics),
    }[table]()
    rows = session.partition(table, experiment.id)
    if table == "deduped_assignments":
        # History rows keep the registry of their day (a moved window, a retired variant): the
        # rules apply to the active rows.
        rows = rows.filter(rows.is_active)
    return _schema_result(validation.validate(schema, rows), session.count(rows))


def evaluate_unique_active_subject(session: WarehouseSession, experiment: Experiment) -> CheckOutcome:
    deduped = session.partition("deduped_assignments", experiment.id)
    active = deduped.filter(deduped.is_active).select("experiment_id", "subject_id")
    outcome = validation.validate(schemas.active_assignments_unique_schema(), active)
    # pandera names no offending keys on failure: find them in the engine.
    duplicated = active.group_by("experiment_id", "subject_id").aggregate(active_rows=active.count())
    duplicated = duplicated.filter(duplicated.active_rows > 1)
    count = session.count(duplicated)
    sample = session.to_pandas(duplicated.order_by("subject_id").limit(SAMPLE_SIZE))
    return CheckOutcome(
        passed=outcome.passed and count == 0,
        severity=ERROR,
        description=None if count == 0 else f"{count} subjects have more than one active assignment",
        metadata={
            "duplicated_subjects": count,
            "sample_duplicated_keys": sample.to_dict("records"),
        },
    )


def evaluate_multi_variant_share(session: WarehouseSession, experiment: Experiment) -> CheckOutcome:
    deduped = session.partition("deduped_assignments", experiment.id)
    active = deduped.filter(deduped.is_active)
    total = session.count(active)
    excluded = session.count(active.filter(active.exclusion_reason == MULTIPLE_VARIANTS))
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


def evaluate_sample_ratio(
    session: WarehouseSession, experiment: Experiment, registry: Registry
) -> CheckOutcome:
    analysable = analysable_assignments(session.partition("deduped_assignments", experiment.id))
    counts = session.to_pandas(
        assignment_counts(analysable, registry.sources.assignments.properties)
    )
    srm, causes = results.srm_of(counts, experiment)
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
                f"{', '.join(registry.sources.assignments.properties) or 'the data'}: no single property "
                "value explains it; look at assignment or exposure logging as a whole"
            )
            metadata["likely_cause"] = "none: imbalance in every segment"
    return CheckOutcome(
        passed=not srm.flagged, severity=severity, description=description, metadata=metadata
    )


def _rejected_share_result(rows: RowAccounting, bound: float, what: str) -> CheckOutcome:
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


def _rejected_by_reason(session: WarehouseSession, rejected_rows) -> RowAccounting:
    counts = session.to_pandas(rejected_rows.group_by("reason").aggregate(rows=rejected_rows.count()))
    return RowAccounting.of(counts)


def evaluate_rejected_share(session: WarehouseSession, experiment: Experiment, registry: Registry) -> CheckOutcome:
    rejected_rows = session.partition("rejected_rows", experiment.id)
    rejected = _rejected_by_reason(session, rejected_rows.filter(rejected_rows.source == "assignments"))
    rows = replace(rejected, ingested=session.count(session.partition("raw_assignments", experiment.id)))
    return _rejected_share_result(rows, registry.sources.assignments.max_rejected_share, f"{experiment.id} exposure")


def evaluate_source_rejected_share(session: WarehouseSession, registry: Registry, rows_read: int) -> CheckOutcome:
    """Share of the event log's rows rejected; `rows_read` is what source_audit read."""
    table = session.table("rejected_source_rows")
    rejected = _rejected_by_reason(session, table.filter(table.source == "events"))
    rows = replace(rejected, ingested=rows_read - rejected.rejected)
    return _rejected_share_result(rows, registry.sources.events.max_rejected_share, "event")


def evaluate_no_pre_assignment_events(session: WarehouseSession, experiment: Experiment) -> CheckOutcome:
    events = session.partition("post_assignment_events", experiment.id)
    # Against the current assignments, not only the assigned_at copied into the events: a
    # correction that moved a subject's assignment later shows up here until events are rebuilt.
    assignments = analysable_assignments(session.partition("deduped_assignments", experiment.id))
    joined = events.join(
        assignments.select("subject_id", current_assigned_at="assigned_at"), "subject_id", how="left"
    )
    leaked = joined.filter(
        (joined.event_at < joined.assigned_at)
        | joined.current_assigned_at.isnull()
        | (joined.event_at < joined.current_assigned_at)
    )
    count = session.count(leaked)
    sample = session.to_pandas(
        leaked.select("subject_id", "assigned_at", "event_at", "event_name")
        .order_by("subject_id", "event_at")
        .limit(SAMPLE_SIZE)
    )
    for column in ("assigned_at", "event_at"):
        sample[column] = sample[column].astype(str)
    return CheckOutcome(
        passed=count == 0,
        severity=ERROR,
        description=None if count == 0 else (
            f"{count} events happened before their subject's current assignment (or belong to no "
            "analysable subject)"
        ),
        metadata={"leaked_events": count, "sample": sample.to_dict("records")},
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


def evaluate_metric_events_match_subjects(
    session: WarehouseSession, experiment: Experiment, registry: Registry
) -> CheckOutcome:
    """Do the metrics' events find the experiment's subjects? Among the usable events of the
    metrics' event names since the experiment started, the share whose subject is no analysable
    subject of it. A high share means the two logs' ids do not line up (another id, another
    format); an event name that never occurs means every subject gets 0 for its metrics."""
    metrics = registry.metrics_of(experiment)
    names = sorted({m.event_name for m in metrics})
    events = temporal_join.experiment_events(sources.usable_events(session, registry, experiment), experiment, metrics, 0)
    subjects = analysable_assignments(session.partition("deduped_assignments", experiment.id))
    subjects = subjects.select("subject_id").distinct().mutate(_assigned=True)
    joined = events.left_join(subjects, "subject_id")
    counts = session.to_pandas(
        joined.group_by("event_name").aggregate(rows=joined.count(), matched=joined._assigned.notnull().sum())
    )
    by_name = {row.event_name: (int(row.rows), int(row.matched)) for row in counts.itertuples()}
    rows = sum(n for n, _ in by_name.values())
    matched = sum(m for _, m in by_name.values())
    share = 1 - matched / rows if rows else 0.0
    never = [n for n in names if n not in by_name]
    bound = registry.sources.events.max_unmatched_share
    problems = []
    if never:
        event_metrics = {n: [m.id for m in metrics if m.event_name == n] for n in never}
        problems.append(
            "no event named " + ", ".join(f"{n!r} (metrics {event_metrics[n]})" for n in never)
            + " in the event log since the experiment started: every subject gets 0; check event_name"
        )
    if rows and share > bound:
        problems.append(
            f"{share:.1%} of {rows} metric events since the start match no analysable subject (warn above "
            f"{bound:.0%}): do the two logs use the same subject id? (sources.*.columns.subject_id)"
        )
    return CheckOutcome(
        passed=not problems,
        severity=WARN,
        description="; ".join(problems) if problems else (
            f"{share:.1%} of {rows} metric events match no analysable subject (warn above {bound:.0%})"
        ),
        metadata={
            "metric_events": rows, "matched_events": matched, "unmatched_share": share, "bound": bound,
            "events_by_name": {n: {"rows": r, "matched": m} for n, (r, m) in by_name.items()},
            "event_names_never_logged": never,
        },
    )
