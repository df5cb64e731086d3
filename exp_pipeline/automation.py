"""Partitions, jobs and sensors: one dynamic partition per experiment in the registry."""


from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from exp_pipeline.assets import ANALYSIS_ASSETS, REGISTRY_ASSETS, experiment_partitions
from exp_pipeline.registry import Registry
from exp_pipeline.resources import RegistryResource

analyze_experiment_job = define_asset_job(
    "analyze_experiment",
    selection=AssetSelection.assets(*ANALYSIS_ASSETS),
    partitions_def=experiment_partitions,
    description="Ingest, dedupe, join and analyse one experiment (one partition).",
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
    job=analyze_experiment_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition for every experiment new to the registry and analyses it once.",
)
def register_new_experiments(
    context: SensorEvaluationContext, registry: RegistryResource
) -> SensorResult:
    known = set(context.instance.get_dynamic_partitions(experiment_partitions.name))
    new_ids = new_experiment_ids(registry.load(), known)
    if not new_ids:
        return SensorResult(skip_reason="no new experiments in the registry")
    context.log.info(f"registering new experiments: {new_ids}")
    return SensorResult(
        dynamic_partitions_requests=[experiment_partitions.build_add_request(new_ids)],
        run_requests=[RunRequest(partition_key=e, run_key=f"register-{e}") for e in new_ids],
    )
