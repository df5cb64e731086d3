"""The one Definitions object: assets, checks, jobs, schedules, sensors and resources."""

from dagster import Definitions, in_process_executor

from exp_pipeline.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS
from exp_pipeline.checks import ASSET_CHECKS
from exp_pipeline.automation import (
    alert_on_failed_checks,
    alert_on_run_failure,
    analyze_experiment_job,
    daily_experiment_refresh,
    refresh_registry_job,
    register_new_experiments,
)
from exp_pipeline.resources import default_resources

defs = Definitions(
    assets=[*REGISTRY_ASSETS, *ANALYSIS_ASSETS],
    asset_checks=ASSET_CHECKS,
    jobs=[analyze_experiment_job, refresh_registry_job],
    schedules=[daily_experiment_refresh],
    sensors=[register_new_experiments, alert_on_failed_checks, alert_on_run_failure],
    resources=default_resources(),
    # Steps of one run share the DuckDB file one at a time anyway (pool warehouse_writer), so a
    # subprocess per step would only add seconds of start-up to every step.
    executor=in_process_executor,
)
