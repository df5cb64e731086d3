"""Asset checks: the experiment checks are evaluated inside the analysis pass (exp_pipeline.analysis)
and recorded here as one evaluation per experiment partition; the source_audit check runs on its own.
"""

import warnings

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    PreviewWarning,
    asset_check,
)

from exp_pipeline import checks
from exp_pipeline.analysis import CheckRecord
from exp_pipeline.checks import EXPERIMENT_CHECKS, CheckOutcome
from exp_pipeline.defs.partitions import WRITER_POOL, experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.warehouse.resources import Warehouse

source_audit = AssetKey("source_audit")

# Partitioned asset checks are a Dagster preview feature; they are what lets each experiment's
# checks run, fail and alert on their own, so we use them knowingly.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)

EXPERIMENT_CHECK_SPECS = [
    AssetCheckSpec(c.check, asset=c.asset, description=c.description, partitions_def=experiment_partitions)
    for c in EXPERIMENT_CHECKS
]


def check_evaluation(record: CheckRecord, partition: str) -> AssetCheckEvaluation:
    """One experiment's evaluation of one check, recorded against its partition. Never blocking
    for Dagster: the pass gates per experiment."""
    outcome = record.outcome
    return AssetCheckEvaluation(
        asset_key=AssetKey(record.asset),
        check_name=record.check,
        passed=outcome.passed,
        partition=partition,
        severity=AssetCheckSeverity(outcome.severity),
        description=outcome.description,
        metadata=outcome.metadata,
        blocking=False,
    )


def check_result(outcome: CheckOutcome) -> AssetCheckResult:
    return AssetCheckResult(
        passed=outcome.passed,
        severity=AssetCheckSeverity(outcome.severity),
        description=outcome.description,
        metadata=outcome.metadata,
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


ASSET_CHECKS = [source_audit_rejected_share]
# Every check key, in this order in the report and read in this order by the alert sensor.
EXPERIMENT_CHECK_KEYS = [AssetCheckKey(AssetKey(c.asset), c.check) for c in EXPERIMENT_CHECKS]
CHECK_KEYS = [*EXPERIMENT_CHECK_KEYS, *source_audit_rejected_share.check_keys]
