"""The new-experiment sensor against a real (temporary) Dagster instance."""

import copy

import yaml
from dagster import SensorResult, build_sensor_context

from exp_pipeline.assets import experiment_partitions
from exp_pipeline.automation import register_new_experiments
from exp_pipeline.resources import DEFAULT_REGISTRY, RegistryResource


def evaluate(instance, registry_path) -> SensorResult:
    context = build_sensor_context(
        instance=instance, resources={"registry": RegistryResource(path=str(registry_path))}
    )
    return register_new_experiments(context)


def test_sensor_registers_new_experiments_once_and_analyses_them(instance, tmp_path):
    registry_path = tmp_path / "registry.yaml"
    raw = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    registry_path.write_text(yaml.safe_dump(raw))

    first = evaluate(instance, registry_path)
    [request] = first.dynamic_partitions_requests
    expected = ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]
    assert list(request.partition_keys) == expected
    assert [r.partition_key for r in first.run_requests] == expected
    instance.add_dynamic_partitions(experiment_partitions.name, list(request.partition_keys))

    second = evaluate(instance, registry_path)
    assert not second.dynamic_partitions_requests and not second.run_requests

    # A new experiment in the registry appears without a code change.
    added = copy.deepcopy(raw["experiments"][0])
    added["id"] = "search_ranking"
    raw["experiments"].append(added)
    registry_path.write_text(yaml.safe_dump(raw))
    third = evaluate(instance, registry_path)
    assert list(third.dynamic_partitions_requests[0].partition_keys) == ["search_ranking"]
    assert [r.partition_key for r in third.run_requests] == ["search_ranking"]
