"""Asset checks per experiment partition, built on the Pandera schemas and on stats.py.

Each `evaluate_*` function takes an open warehouse session and the experiment and returns the
AssetCheckResult, so it is tested on tables built in the tests; the `@asset_check` functions at the
bottom only wire them to Dagster. Blocking checks that fail with ERROR stop the downstream assets
of that experiment's run (and only that experiment's).
"""

import warnings

from dagster import (
    AssetCheckExecutionContext,
    AssetKey,
    PreviewWarning,
    AssetCheckResult,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)

from exp_pipeline import results, schemas, transforms
from exp_pipeline.assets import (
    WRITER_POOL,
    source_audit,
    deduped_assignments,
    experiment_partitions,
    post_assignment_events,
    pre_assignment_events,
    raw_assignments,
    variant_metrics,
)
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.resources import RegistryResource
from exp_pipeline.warehouse import Warehouse, WarehouseSession

SAMPLE_SIZE = 20

# Partitioned asset checks are a Dagster preview feature; they are what lets each experiment's
# checks run, fail and alert on their own, so we use them knowingly.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)


def _p(value: float, label: str = "p") -> str:
    # Chi-square p-values of large mismatches underflow to 0.0; say so rather than print "p = 0".
    return f"{label} < 1e-300" if value == 0 else f"{label} = {value:.3g}"


def _schema_result(outcome: schemas.ValidationOutcome, rows: int) -> AssetCheckResult:
    return AssetCheckResult(
        passed=outcome.passed,
        severity=AssetCheckSeverity.ERROR,
        description=None if outcome.passed else "failed: " + "; ".join(outcome.failed_checks),
        metadata={
            "rows": rows,
            "failed_checks": len(outcome.failures),
            "failures": MetadataValue.json(outcome.failures),
        },
    )


def evaluate_schema(
    session: WarehouseSession, table: str, experiment: Experiment, registry: Registry
) -> AssetCheckResult:
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
    return _schema_result(schemas.validate(schema, rows), session.count(rows))


def evaluate_unique_active_subject(session: WarehouseSession, experiment: Experiment) -> AssetCheckResult:
    deduped = session.partition("deduped_assignments", experiment.id)
    active = deduped.filter(deduped.is_active).select("experiment_id", "subject_id")
    outcome = schemas.validate(schemas.active_assignments_unique_schema(), active)
    # pandera names no offending keys on failure: find them in the engine.
    duplicated = active.group_by("experiment_id", "subject_id").aggregate(active_rows=active.count())
    duplicated = duplicated.filter(duplicated.active_rows > 1)
    count = session.count(duplicated)
    sample = session.to_pandas(duplicated.order_by("subject_id").limit(SAMPLE_SIZE))
    return AssetCheckResult(
        passed=outcome.passed and count == 0,
        severity=AssetCheckSeverity.ERROR,
        description=None if count == 0 else f"{count} subjects have more than one active assignment",
        metadata={
            "duplicated_subjects": count,
            "sample_duplicated_keys": MetadataValue.json(sample.to_dict("records")),
        },
    )


def evaluate_multi_variant_share(session: WarehouseSession, experiment: Experiment) -> AssetCheckResult:
    deduped = session.partition("deduped_assignments", experiment.id)
    active = deduped.filter(deduped.is_active)
    total = session.count(active)
    excluded = session.count(active.filter(active.exclusion_reason == transforms.MULTIPLE_VARIANTS))
    share = excluded / total if total else 0.0
    bounds = experiment.multi_variant
    if share > bounds.error_share:
        passed, severity = False, AssetCheckSeverity.ERROR
    elif share > bounds.warn_share:
        passed, severity = False, AssetCheckSeverity.WARN
    else:
        passed, severity = True, AssetCheckSeverity.WARN
    return AssetCheckResult(
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
) -> AssetCheckResult:
    analysable = transforms.analysable_assignments(session.partition("deduped_assignments", experiment.id))
    counts = session.to_pandas(
        transforms.assignment_counts(analysable, registry.sources.assignments.properties)
    )
    srm, causes = results.srm_of(counts, experiment)
    severity = AssetCheckSeverity.ERROR if experiment.srm.blocks_metrics else AssetCheckSeverity.WARN
    observed = srm.observed
    metadata = {
        "observed": MetadataValue.json(observed),
        "expected": MetadataValue.json({k: round(v, 1) for k, v in srm.expected.items()}),
        "chi2": float(srm.chi2),
        "p_value": float(srm.p_value),
        "threshold": experiment.srm.p_threshold,
        "verdict": "SRM" if srm.flagged else ("ok" if srm.judged else "not judged"),
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
            metadata["segments"] = MetadataValue.json(
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
    return AssetCheckResult(
        passed=not srm.flagged, severity=severity, description=description, metadata=metadata
    )


# Exact duplicates are kept aside and counted, but at-least-once logging makes them harmless and
# common: they do not count against the bound.
HARMLESS_REJECTIONS = ("duplicate_row",)


def _rejected_share_result(by_reason: dict, read: int, bound: float, what: str) -> AssetCheckResult:
    rejected = sum(n for reason, n in by_reason.items() if reason not in HARMLESS_REJECTIONS)
    share = rejected / read if read else 0.0
    return AssetCheckResult(
        passed=share <= bound,
        severity=AssetCheckSeverity.ERROR,
        description=(
            f"{share:.2%} of {what} rows rejected ({rejected} of {read}, duplicates aside; "
            f"bound {bound:.2%})"
        ),
        metadata={
            "rows_read": read, "rows_rejected": rejected, "rejected_share": share, "bound": bound,
            "rejected_by_reason": MetadataValue.json(by_reason),
        },
    )


def evaluate_rejected_share(session: WarehouseSession, experiment: Experiment, registry: Registry) -> AssetCheckResult:
    rejected_rows = session.partition("rejected_rows", experiment.id)
    rejected_rows = rejected_rows.filter(rejected_rows.source == "assignments")
    by_reason = session.to_pandas(rejected_rows.group_by("reason").aggregate(rows=rejected_rows.count()))
    counts = dict(zip(by_reason["reason"], by_reason["rows"].astype(int)))
    read = session.count(session.partition("raw_assignments", experiment.id)) + sum(counts.values())
    return _rejected_share_result(
        counts, read, registry.sources.assignments.max_rejected_share, f"{experiment.id} exposure"
    )


def evaluate_no_pre_assignment_events(session: WarehouseSession, experiment: Experiment) -> AssetCheckResult:
    events = session.partition("post_assignment_events", experiment.id)
    # Against the current assignments, not only the assigned_at copied into the events: a
    # correction that moved a subject's assignment later shows up here until events are rebuilt.
    assignments = transforms.analysable_assignments(session.partition("deduped_assignments", experiment.id))
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
    return AssetCheckResult(
        passed=count == 0,
        severity=AssetCheckSeverity.ERROR,
        description=None if count == 0 else (
            f"{count} events happened before their subject's current assignment (or belong to no "
            "analysable subject)"
        ),
        metadata={"leaked_events": count, "sample": MetadataValue.json(sample.to_dict("records"))},
    )


# -- Dagster glue --------------------------------------------------------------------------------


def _context(context: AssetCheckExecutionContext, registry: RegistryResource) -> tuple[Registry, Experiment]:
    reg = registry.load()
    return reg, reg.experiment(context.partition_key)


def _logged(context: AssetCheckExecutionContext, result: AssetCheckResult) -> AssetCheckResult:
    """Failed checks also go to the run log, where a person reading the run sees them first."""
    if not result.passed:
        log = context.log.error if result.severity == AssetCheckSeverity.ERROR else context.log.warning
        log(f"check {context.check_specs[0].name} failed for {context.partition_key}: {result.description}")
    return result


def _experiment_check(asset_def, name: str, evaluate, description: str, blocking: bool = True):
    """An asset check of one experiment's partition: evaluate(session, experiment, registry)."""

    @asset_check(
        asset=asset_def,
        name=name,
        partitions_def=experiment_partitions,
        pool=WRITER_POOL,
        blocking=blocking,
        description=description,
    )
    def _check(
        context: AssetCheckExecutionContext, registry: RegistryResource, warehouse: Warehouse
    ) -> AssetCheckResult:
        reg, experiment = _context(context, registry)
        with warehouse.session() as session:
            return _logged(context, evaluate(session, experiment, reg))

    return _check


def _schema_check(asset_def, blocking: bool = True):
    table = (asset_def if isinstance(asset_def, AssetKey) else asset_def.key).path[-1]
    return _experiment_check(
        asset_def,
        "matches_schema",
        lambda session, experiment, registry: evaluate_schema(session, table, experiment, registry),
        f"{table} matches its Pandera schema (types, nulls, allowed values), validated in the engine.",
        blocking=blocking,
    )


raw_assignments_matches_schema = _schema_check(raw_assignments)
deduped_assignments_matches_schema = _schema_check(deduped_assignments)
post_assignment_events_matches_schema = _schema_check(post_assignment_events)
pre_assignment_events_matches_schema = _schema_check(pre_assignment_events)
# The last asset: nothing downstream to block.
variant_metrics_matches_schema = _schema_check(variant_metrics, blocking=False)

raw_assignments_rejected_share = _experiment_check(
    raw_assignments,
    "rejected_share_within_bound",
    evaluate_rejected_share,
    "Share of the experiment's exposure rows rejected at ingestion (kept in rejected_rows) is at most "
    "sources.assignments.max_rejected_share.",
)
one_active_row_per_subject = _experiment_check(
    deduped_assignments,
    "one_active_row_per_subject",
    lambda session, experiment, _registry: evaluate_unique_active_subject(session, experiment),
    "UNIQUE(experiment_id, subject_id) among active rows: one subject, one experiment, one variant.",
)
multi_variant_share_within_bounds = _experiment_check(
    deduped_assignments,
    "multi_variant_share_within_bounds",
    lambda session, experiment, _registry: evaluate_multi_variant_share(session, experiment),
    "Share of subjects excluded for seeing several variants: WARN above warn_share, ERROR above error_share.",
)
no_sample_ratio_mismatch = _experiment_check(
    deduped_assignments,
    "no_sample_ratio_mismatch",
    evaluate_sample_ratio,
    "Chi-square test of subjects per variant against the weights; when it fires, the same test per "
    "assignment property names the likely cause. Blocks variant_metrics if the registry says so.",
)
no_events_before_assignment = _experiment_check(
    post_assignment_events,
    "no_events_before_assignment",
    lambda session, experiment, _registry: evaluate_no_pre_assignment_events(session, experiment),
    "No pre-assignment leakage: every event has event_at >= its subject's current assigned_at.",
)


@asset_check(
    asset=source_audit,
    name="rejected_share_within_bound",
    pool=WRITER_POOL,
    description="Share of event rows rejected (kept in rejected_source_rows) is at most sources.events.max_rejected_share.",
)
def source_audit_rejected_share(context: AssetCheckExecutionContext, registry: RegistryResource, warehouse: Warehouse):
    reg = registry.load()
    with warehouse.session() as session:
        table = session.table("rejected_source_rows")
        events = table.filter(table.source == "events")
        by_reason = session.to_pandas(events.group_by("reason").aggregate(rows=events.count()))
    # The rows read are in the metadata of the materialization this check runs after.
    materialization = context.instance.get_latest_materialization_event(source_audit.key)
    if materialization is None:
        return AssetCheckResult(passed=False, description="source_audit has not been materialized yet")
    read = materialization.asset_materialization.metadata["event_rows_read"].value
    result = _rejected_share_result(
        dict(zip(by_reason["reason"], by_reason["rows"].astype(int))),
        read, reg.sources.events.max_rejected_share, "event",
    )
    if not result.passed:
        context.log.error(f"check rejected_share_within_bound failed: {result.description}")
    return result


# Checks of one experiment's partition (they run in its analyze_experiment run).
EXPERIMENT_CHECKS = [
    raw_assignments_rejected_share,
    raw_assignments_matches_schema,
    deduped_assignments_matches_schema,
    one_active_row_per_subject,
    multi_variant_share_within_bounds,
    no_sample_ratio_mismatch,
    post_assignment_events_matches_schema,
    no_events_before_assignment,
    pre_assignment_events_matches_schema,
    variant_metrics_matches_schema,
]
ASSET_CHECKS = [*EXPERIMENT_CHECKS, source_audit_rejected_share]
