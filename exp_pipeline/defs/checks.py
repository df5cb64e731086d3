"""Asset checks per experiment partition: the rules are exp_pipeline.checks; this module wires
them to Dagster (a check per rule and asset, the run log, severity and blocking).
"""

import warnings

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    PreviewWarning,
    asset_check,
)

from exp_pipeline import checks
from exp_pipeline.checks import CheckOutcome
from exp_pipeline.defs.partitions import WRITER_POOL, experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.warehouse.resources import Warehouse

# The checked assets, by key: defs/assets.py imports this module (the report lists these checks).
raw_assignments = AssetKey("raw_assignments")
deduped_assignments = AssetKey("deduped_assignments")
post_assignment_events = AssetKey("post_assignment_events")
pre_assignment_events = AssetKey("pre_assignment_events")
variant_metrics = AssetKey("variant_metrics")
source_audit = AssetKey("source_audit")

# Partitioned asset checks are a Dagster preview feature; they are what lets each experiment's
# checks run, fail and alert on their own, so we use them knowingly.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)


# Evaluated by raw_assignments and window_events as they read their source (see defs/assets.py).
ROWS_READ_CHECK = "rows_read_not_dropped"


def check_result(outcome: CheckOutcome, check_name: str | None = None) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=check_name,
        passed=outcome.passed,
        severity=AssetCheckSeverity(outcome.severity),
        description=outcome.description,
        metadata=outcome.metadata,
    )


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
            return _logged(context, check_result(evaluate(session, experiment, reg)))

    return _check


def _schema_check(asset_def, blocking: bool = True):
    table = (asset_def if isinstance(asset_def, AssetKey) else asset_def.key).path[-1]
    return _experiment_check(
        asset_def,
        "matches_schema",
        lambda session, experiment, registry: checks.evaluate_schema(session, table, experiment, registry),
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
    checks.evaluate_rejected_share,
    "Share of the experiment's exposure rows rejected at ingestion (kept in rejected_rows) is at most "
    "sources.assignments.max_rejected_share.",
)
one_active_row_per_subject = _experiment_check(
    deduped_assignments,
    "one_active_row_per_subject",
    lambda session, experiment, _registry: checks.evaluate_unique_active_subject(session, experiment),
    "UNIQUE(experiment_id, subject_id) among active rows: one subject, one experiment, one variant.",
)
multi_variant_share_within_bounds = _experiment_check(
    deduped_assignments,
    "multi_variant_share_within_bounds",
    lambda session, experiment, _registry: checks.evaluate_multi_variant_share(session, experiment),
    "Share of subjects excluded for seeing several variants: WARN above warn_share, ERROR above error_share.",
)
no_sample_ratio_mismatch = _experiment_check(
    deduped_assignments,
    "no_sample_ratio_mismatch",
    checks.evaluate_sample_ratio,
    "Chi-square test of subjects per variant against the weights; when it fires, the same test per "
    "assignment property names the likely cause. Blocks variant_metrics if the registry says so.",
)
no_events_before_assignment = _experiment_check(
    post_assignment_events,
    "no_events_before_assignment",
    lambda session, experiment, _registry: checks.evaluate_no_pre_assignment_events(session, experiment),
    "No pre-assignment leakage: every event has event_at >= its subject's current assigned_at.",
)

metric_events_match_subjects = _experiment_check(
    post_assignment_events,
    "metric_events_match_subjects",
    checks.evaluate_metric_events_match_subjects,
    "The metrics' events find the experiment's subjects: WARN when an event name never occurs in the log, "
    "or when more than sources.events.max_unmatched_share of them belong to no analysable subject.",
    blocking=False,
)


@asset_check(
    asset=source_audit,
    name="rejected_share_within_bound",
    pool=WRITER_POOL,
    description="Share of event rows rejected (kept in rejected_source_rows) is at most sources.events.max_rejected_share.",
)
def source_audit_rejected_share(context: AssetCheckExecutionContext, registry: RegistryResource, warehouse: Warehouse):
    # The rows read are in the metadata of the materialization this check runs after.
    materialization = context.instance.get_latest_materialization_event(source_audit)
    if materialization is None:
        return AssetCheckResult(passed=False, description="source_audit has not been materialized yet")
    read = materialization.asset_materialization.metadata["event_rows_read"].value
    with warehouse.session() as session:
        result = check_result(checks.evaluate_source_rejected_share(session, registry.load(), read))
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
    metric_events_match_subjects,
    pre_assignment_events_matches_schema,
    variant_metrics_matches_schema,
]
ASSET_CHECKS = [*EXPERIMENT_CHECKS, source_audit_rejected_share]
# Every check key, in this order in the report and read in this order by the alert sensor (the
# checks the assets evaluate themselves first).
EXPERIMENT_CHECK_KEYS = [
    AssetCheckKey(raw_assignments, ROWS_READ_CHECK),
    AssetCheckKey(post_assignment_events, ROWS_READ_CHECK),
    *(key for check_def in EXPERIMENT_CHECKS for key in check_def.check_keys),
]
CHECK_KEYS = [*EXPERIMENT_CHECK_KEYS, *source_audit_rejected_share.check_keys]
