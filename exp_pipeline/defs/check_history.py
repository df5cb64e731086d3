"""Reads of asset check evaluations from the Dagster instance: the latest per experiment (for the
report) and the failed ones since a moment (for the alert sensor). The one place that imports
Dagster's private check-execution records (no public API reads them across runs).
"""

from collections.abc import Iterable

from dagster import AssetCheckKey, DagsterInstance
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)

# How far back to look for a partition's latest check evaluation (one entry per run and partition).
CHECK_HISTORY_DEPTH = 200
CHECK_HISTORY_PAGE = 100


def latest_check_results(
    instance: DagsterInstance, check_keys: Iterable[AssetCheckKey], partition: str
) -> list[dict]:
    """The newest evaluation of every check of this partition: asset, check, passed, severity, description."""
    storage = instance.event_log_storage
    found = []
    for key in check_keys:
        history = storage.get_asset_check_execution_history(key, limit=CHECK_HISTORY_DEPTH)
        latest = next((r for r in history if r.partition == partition and r.event is not None), None)
        evaluation = getattr(latest.event.dagster_event, "event_specific_data", None) if latest else None
        if evaluation is None or not hasattr(evaluation, "passed"):
            continue
        found.append(
            {
                "asset": key.asset_key.to_user_string(),
                "check": key.name,
                "passed": evaluation.passed,
                "severity": evaluation.severity.value,
                "description": evaluation.description,
            }
        )
    return found


def failed_check_executions(
    storage, check_keys: Iterable[AssetCheckKey], evaluated_after: float | None
) -> list[AssetCheckExecutionRecord]:
    """Failed check executions (WARN or ERROR) evaluated after `evaluated_after`, oldest first.

    Read per check key from the check execution index, which every event log storage keeps (the
    default SQLite storage cannot list evaluation events across runs).
    """
    found = []
    for key in check_keys:
        cursor = None
        while True:
            page = storage.get_asset_check_execution_history(
                key, limit=CHECK_HISTORY_PAGE, cursor=cursor,
                status={AssetCheckExecutionRecordStatus.FAILED},
            )
            new = [r for r in page if evaluated_after is None or r.event.timestamp > evaluated_after]
            found.extend(new)
            # Pages run newest-created first; stop once a whole page is older than the cursor.
            if len(page) < CHECK_HISTORY_PAGE or not new:
                break
            cursor = page[-1].id
    return sorted(found, key=lambda r: (r.event.timestamp, r.id))
