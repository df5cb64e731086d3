"""The one Definitions object: assets, jobs, sensors and resources."""

from dagster import Definitions

from exp_pipeline.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS
from exp_pipeline.automation import analyze_experiment_job, refresh_registry_job, register_new_experiments
from exp_pipeline.resources import default_resources

defs = Definitions(
    assets=[*REGISTRY_ASSETS, *ANALYSIS_ASSETS],
    jobs=[analyze_experiment_job, refresh_registry_job],
    sensors=[register_new_experiments],
    resources=default_resources(),
)
