"""The new-experiment sensor against a real (temporary) Dagster instance."""

import copy
import datetime as dt

import pytest
import yaml
from dagster import SensorResult, build_sensor_context

from exp_pipeline.defs.automation import register_new_experiments
from exp_pipeline.defs.partitions import experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.settings import DEFAULT_REGISTRY


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
    assert [r.partition_key for r in first.run_requests] == [None, *expected]
    assert [r.job_name for r in first.run_requests] == ["refresh_registry"] + ["analyze_experiment"] * 4
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
    assert [r.partition_key for r in third.run_requests] == [None, "search_ranking"]


def schedule_requests(instance, when: str):
    from dagster import build_schedule_context

    from exp_pipeline.defs.automation import daily_experiment_refresh

    with build_schedule_context(
        instance=instance,
        scheduled_execution_time=dt.datetime.fromisoformat(when),
        resources={"registry": RegistryResource(path=str(DEFAULT_REGISTRY))},
    ) as context:
        return daily_experiment_refresh(context)


ALL = ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        # Before any experiment starts: nothing to refresh.
        ("2026-09-20T06:00:00+00:00", []),
        # Early October: pricing (starts 10-05) has not started yet.
        ("2026-10-03T06:00:00+00:00", ["checkout_redesign", "aa_homepage", "onboarding_srm"]),
        ("2026-10-10T06:00:00+00:00", ALL),
        # Checkout and onboarding ended 10-29 but their last subjects' 14-day windows are open.
        ("2026-11-05T06:00:00+00:00", ALL),
        # After 11-12 checkout/onboarding are final; pricing (ended 11-02) stays open until 11-16.
        ("2026-11-13T06:00:00+00:00", ["aa_homepage", "pricing_three_arm"]),
        # Months later only the running A/A test is refreshed.
        ("2027-02-01T06:00:00+00:00", ["aa_homepage"]),
    ],
)
def test_daily_schedule_refreshes_experiments_with_open_windows(instance, when, expected):
    instance.add_dynamic_partitions(experiment_partitions.name, ALL)
    result = schedule_requests(instance, when)
    requests = result if isinstance(result, list) else []
    assert [r.partition_key for r in requests] == expected
    day = when[:10]
    assert [r.run_key for r in requests] == [f"daily-{day}-{e}" for e in expected]


def test_schedule_skips_experiments_without_a_partition_yet(instance):
    instance.add_dynamic_partitions(experiment_partitions.name, ["aa_homepage"])
    requests = schedule_requests(instance, "2026-10-10T06:00:00+00:00")
    assert [r.partition_key for r in requests] == ["aa_homepage"]


def test_partitions_added_meanwhile_by_someone_else_do_not_fail_the_main_command(instance, monkeypatch):
    import sqlalchemy

    from exp_pipeline.defs.instance import add_partitions
    from exp_pipeline.defs.partitions import experiment_partitions

    original = instance.add_dynamic_partitions
    calls = []

    def racing(name, keys):
        calls.append(list(keys))
        if len(calls) == 1:
            # The sensor inserted exp_a between our read and our insert: UNIQUE fails ours.
            original(name, ["exp_a"])
            raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
        return original(name, keys)

    monkeypatch.setattr(instance, "add_dynamic_partitions", racing)
    add_partitions(instance, ["exp_a", "exp_b"])
    assert sorted(instance.get_dynamic_partitions(experiment_partitions.name)) == ["exp_a", "exp_b"]
    assert calls == [["exp_a", "exp_b"], ["exp_b"]]
