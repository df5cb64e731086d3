"""The new-experiment sensor against a real (temporary) Dagster instance."""

import copy
import datetime as dt

import pytest
import yaml
from dagster import RunRequest, SensorResult, build_sensor_context

from exp_pipeline.defs.automation import register_new_experiments
from exp_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, experiment_partitions, run_over
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.settings import DEFAULT_REGISTRY


def evaluate(instance, registry_path) -> SensorResult:
    context = build_sensor_context(
        instance=instance, resources={"registry": RegistryResource(path=str(registry_path))}
    )
    return register_new_experiments(context)


def analysed(request, partitions_in_order: list[str]) -> list[str]:
    """The experiments one analysis run request covers: its partition range, less those its
    config leaves out."""
    first = partitions_in_order.index(request.tags[RANGE_START_TAG])
    last = partitions_in_order.index(request.tags[RANGE_END_TAG])
    covered = partitions_in_order[first:last + 1]
    only = request.run_config.get("ops", {}).get("experiment_analysis", {}).get("config", {}).get("experiment_ids")
    return [k for k in covered if not only or k in only]


def test_one_run_covers_a_subset_of_the_partitions_by_range_and_config():
    known = ["a", "b", "c", "d"]
    assert run_over(known, ["b", "c"]) == ({RANGE_START_TAG: "b", RANGE_END_TAG: "c"}, {})
    tags, config = run_over(known, ["d", "a"])
    assert tags == {RANGE_START_TAG: "a", RANGE_END_TAG: "d"}
    assert config == {"ops": {"experiment_analysis": {"config": {"experiment_ids": ["a", "d"]}}}}


def test_sensor_registers_new_experiments_once_and_analyses_them(instance, tmp_path):
    registry_path = tmp_path / "registry.yaml"
    raw = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    registry_path.write_text(yaml.safe_dump(raw))

    first = evaluate(instance, registry_path)
    [request] = first.dynamic_partitions_requests
    expected = ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]
    assert list(request.partition_keys) == expected
    # One run analyses every new experiment in one pass.
    assert [r.job_name for r in first.run_requests] == ["refresh_registry", "analyze_experiment"]
    assert analysed(first.run_requests[1], expected) == expected
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
    assert analysed(third.run_requests[1], [*expected, "search_ranking"]) == ["search_ranking"]


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
    if not expected:
        assert not isinstance(result, RunRequest)
        return
    # One run, one pass, for every experiment due.
    assert analysed(result, ALL) == expected
    assert result.run_key == f"daily-{when[:10]}"


def test_schedule_skips_experiments_without_a_partition_yet(instance):
    instance.add_dynamic_partitions(experiment_partitions.name, ["aa_homepage"])
    request = schedule_requests(instance, "2026-10-10T06:00:00+00:00")
    assert analysed(request, ["aa_homepage"]) == ["aa_homepage"]


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
