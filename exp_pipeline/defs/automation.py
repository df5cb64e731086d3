"""Jobs, the daily schedule and the sensors (new experiments; alerts on failed checks, failed runs and late results)."""

import datetime as dt
import os

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    schedule,
    sensor,
)

from exp_pipeline import alerts
from exp_pipeline.checks import METRICS
from exp_pipeline.defs.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS
from exp_pipeline.defs.check_history import failed_check_executions
from exp_pipeline.defs.checks import CHECK_KEYS
from exp_pipeline.defs.partitions import experiment_partitions, run_over
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.warehouse.resources import Warehouse

analyze_experiment_job = define_asset_job(
    "analyze_experiment",
    selection=AssetSelection.assets(*ANALYSIS_ASSETS),
    description=(
        "Ingest, dedupe, join and analyse experiments: one partition, or a range of them in one pass."
    ),
)

refresh_registry_job = define_asset_job(
    "refresh_registry",
    selection=AssetSelection.assets(*REGISTRY_ASSETS),
    description="Rebuild dim_experiments and dim_variants from the registry.",
)


def new_experiment_ids(registry: Registry, known_partitions: set[str]) -> list[str]:
    """Experiments in the registry that have no partition yet, in registry order."""
    return [e.id for e in registry.experiments if e.id not in known_partitions]


@sensor(
    jobs=[analyze_experiment_job, refresh_registry_job],
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Adds a partition for every experiment new to the registry, analyses it once and refreshes "
        "dim_experiments / dim_variants."
    ),
)
def register_new_experiments(
    context: SensorEvaluationContext, registry: RegistryResource
) -> SensorResult:
    known = set(context.instance.get_dynamic_partitions(experiment_partitions.name))
    new_ids = new_experiment_ids(registry.load(), known)
    if not new_ids:
        return SensorResult(skip_reason="no new experiments in the registry")
    context.log.info(f"registering new experiments: {new_ids}")
    # Added after the known partitions, so the new ones are one range: one run analyses them all.
    tags, run_config = run_over([*context.instance.get_dynamic_partitions(experiment_partitions.name), *new_ids], new_ids)
    return SensorResult(
        dynamic_partitions_requests=[experiment_partitions.build_add_request(new_ids)],
        run_requests=[
            RunRequest(job_name=refresh_registry_job.name, run_key=f"registry-{'-'.join(new_ids)}"),
            RunRequest(
                job_name=analyze_experiment_job.name, run_key=f"register-{'-'.join(new_ids)}", tags=tags,
                run_config=run_config,
            ),
        ],
    )


def analysis_window_open(experiment: Experiment, registry: Registry, now: dt.datetime) -> bool:
    """Whether a refresh can still change the results.

    Running experiments, and stopped ones until the last subject's longest metric window has
    closed (a subject assigned just before the end still has events to come). After that an
    experiment is final and only refreshed when someone asks (a manual run or backfill).
    """
    if now < experiment.start_at:
        return False
    if experiment.end_at is None:
        return True
    longest = max(m.window_end_days for m in registry.metrics_of(experiment))
    return now < experiment.end_at + dt.timedelta(days=longest)


def experiments_to_refresh(registry: Registry, known_partitions: set[str], now: dt.datetime) -> list[str]:
    return [
        e.id for e in registry.experiments
        if e.id in known_partitions and analysis_window_open(e, registry, now)
    ]


@schedule(
    job=analyze_experiment_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every day at 06:00 UTC: one run, one pass, for every experiment whose analysis window is open.",
)
def daily_experiment_refresh(context: ScheduleEvaluationContext, registry: RegistryResource):
    now = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
    known = context.instance.get_dynamic_partitions(experiment_partitions.name)
    ids = experiments_to_refresh(registry.load(), set(known), now)
    if not ids:
        return SkipReason("no experiment has an open analysis window")
    tags, run_config = run_over(known, ids)
    return RunRequest(run_key=f"daily-{now.strftime('%Y-%m-%d')}", tags=tags, run_config=run_config)


# -- alerts ----------------------------------------------------------------------------------------

# Execution ids are handed out when a run is planned, not when its check is evaluated, so runs that
# interleave evaluate out of id order. The cursor is therefore the newest evaluation *time* seen,
# and each tick rereads a margin before it; the alerts table's alert_id drops what was seen already.
CURSOR_MARGIN_SECONDS = 15 * 60


def check_alert(record) -> alerts.Alert:
    """The alert of one failed check execution record."""
    evaluation = record.event.dagster_event.event_specific_data
    return alerts.Alert(
        alert_id=f"check-{record.id}",
        kind="asset_check",
        experiment_id=record.partition,
        source=f"{evaluation.asset_key.to_user_string()} / {evaluation.check_name}",
        severity=evaluation.severity.value,
        summary=evaluation.description or "check failed",
        run_id=record.run_id,
        run_url=alerts.run_url(record.run_id),
        created_at=dt.datetime.fromtimestamp(record.create_timestamp, dt.UTC),
        figures=alerts.key_figures(dict(evaluation.metadata)),
    )


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Reads asset check evaluations (a failed WARN check leaves its run green) and alerts once per "
        "failed evaluation; retries undelivered webhook alerts every tick."
    ),
)
def alert_on_failed_checks(context: SensorEvaluationContext, warehouse: Warehouse):
    newest_seen = float(context.cursor) if context.cursor else None
    since = None if newest_seen is None else newest_seen - CURSOR_MARGIN_SECONDS
    records = failed_check_executions(context.instance.event_log_storage, CHECK_KEYS, since)
    fresh = [r for r in records if newest_seen is None or r.event.timestamp > newest_seen]
    webhook_url = os.environ.get(alerts.WEBHOOK_ENV)
    if not fresh and not webhook_url:
        # Nothing new to record or retry: leave the DuckDB file to the runs.
        return SkipReason("no new failed check evaluations")
    with warehouse.session() as session:
        new = alerts.record_alerts(session, [check_alert(r) for r in records])
    for alert in new:
        context.log.warning(alert.log_line())
    delivered, pending = alerts.deliver_pending(warehouse, webhook_url)
    if records:
        context.update_cursor(str(max(newest_seen or 0.0, records[-1].event.timestamp)))
    return SkipReason(
        f"{len(records)} failed check evaluations read, {len(new)} new alerts, "
        f"{delivered} delivered, {pending} undelivered"
    )


@run_failure_sensor(
    default_status=DefaultSensorStatus.RUNNING,
    description="Alerts once per failed run (log, alerts table, webhook when configured).",
)
def alert_on_run_failure(context: RunFailureSensorContext, warehouse: Warehouse):
    run = context.dagster_run
    alert = alerts.Alert(
        alert_id=f"run-{run.run_id}",
        kind="run_failure",
        experiment_id=run.tags.get("dagster/partition"),
        source=f"job {run.job_name}",
        severity="ERROR",
        summary=(context.failure_event.message or "run failed")[:500],
        run_id=run.run_id,
        run_url=alerts.run_url(run.run_id),
        created_at=dt.datetime.now(dt.UTC),
    )
    # Logged first: if the warehouse cannot be written now, the alert is still in the sensor's log.
    context.log.error(alert.log_line())
    try:
        with warehouse.session() as session:
            alerts.record_alerts(session, [alert])
        alerts.deliver_pending(warehouse, os.environ.get(alerts.WEBHOOK_ENV))
    except Exception as exc:  # the run-status cursor moves on regardless: never crash silently
        context.log.error(f"alert {alert.alert_id} could not be stored or delivered: {type(exc).__name__}")
        raise


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _last_written(context: SensorEvaluationContext, asset: str, partition: str) -> dt.datetime | None:
    """When the partition of `asset` was last materialized, per the instance."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1, ascending=False
    ).records
    return dt.datetime.fromtimestamp(records[0].timestamp, dt.UTC) if records else None


@sensor(
    minimum_interval_seconds=600,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Alerts once per stale state when an experiment whose analysis window is open has results "
        f"older than {alerts.RESULTS_LATE_AFTER.total_seconds() / 3600:.0f} h (the daily refresh missed "
        "it). variant_metrics' freshness policy judges the asset as a whole (its newest partition)."
    ),
)
def alert_on_late_results(context: SensorEvaluationContext, registry: RegistryResource, warehouse: Warehouse):
    now = _now()
    reg = registry.load()
    known = set(context.instance.get_dynamic_partitions(experiment_partitions.name))
    late = [
        alert for experiment_id in experiments_to_refresh(reg, known, now)
        if (alert := alerts.late_results_alert(experiment_id, _last_written(context, METRICS, experiment_id), now))
        is not None
    ]
    if not late:
        return SkipReason("no experiment's results are late")
    with warehouse.session() as session:
        new = alerts.record_alerts(session, late)
    for alert in new:
        context.log.error(alert.log_line())
    delivered, pending = alerts.deliver_pending(warehouse, os.environ.get(alerts.WEBHOOK_ENV))
    return SkipReason(f"{len(late)} experiments late, {len(new)} new alerts, {delivered} delivered, {pending} undelivered")
