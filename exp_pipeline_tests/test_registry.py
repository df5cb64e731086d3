"""Registry loading: the bundled registry is valid; invalid content names experiment and field."""

import copy
import datetime as dt
from pathlib import Path

import pytest
import yaml

from exp_pipeline.registry import RegistryError, load_registry, parse_registry
from exp_pipeline.settings import DEFAULT_REGISTRY

BASE = yaml.safe_load(DEFAULT_REGISTRY.read_text())


def parse(mutate, tmp_path: Path):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    return parse_registry(raw, tmp_path / "registry.yaml")


def test_bundled_registry_loads():
    registry = load_registry(DEFAULT_REGISTRY)
    ids = [e.id for e in registry.experiments]
    assert ids == ["checkout_redesign", "aa_homepage", "pricing_three_arm", "onboarding_srm"]
    pricing = registry.experiment("pricing_three_arm")
    assert pricing.control.id == "control"
    assert pricing.weights == {"control": 0.5, "price_low": 0.25, "price_high": 0.25}
    assert registry.metrics["purchases"].cap_percentile == 0.99
    # The documented default: percentiles of the non-zero values, no lower cap.
    assert registry.metrics["purchases"].cap_ignore_zeros is True
    assert registry.metrics["purchases"].cap_lower_percentile is None
    assert registry.experiment("aa_homepage").end_at is None
    assert registry.experiment("checkout_redesign").start_at.tzinfo is not None


def test_status_follows_the_dates():
    exp = load_registry(DEFAULT_REGISTRY).experiment("checkout_redesign")
    utc = dt.UTC
    assert exp.status(dt.datetime(2026, 9, 1, tzinfo=utc)) == "scheduled"
    assert exp.status(dt.datetime(2026, 10, 10, tzinfo=utc)) == "running"
    assert exp.status(dt.datetime(2026, 10, 29, tzinfo=utc)) == "stopped"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["experiments"][2]["variants"][1].update(control=True),
         r"experiment 'pricing_three_arm', field 'variants': exactly one variant must have control: true, found 2"),
        (lambda r: r["experiments"][0]["variants"][1].update(weight=0.6),
         r"experiment 'checkout_redesign', field 'variants': variant weights must sum to 1, they sum to 1.1"),
        (lambda r: r["experiments"][1].pop("start_at"),
         r"experiment 'aa_homepage', field 'start_at': Field required"),
        (lambda r: r["experiments"][0].update(end_at="2026-09-01T00:00:00Z"),
         r"experiment 'checkout_redesign': end_at must be after start_at"),
        (lambda r: r["experiments"][0].update(id="x'; DROP TABLE exp.alerts; --"),
         r"field 'id': .* is not a valid id"),
        (lambda r: r["experiments"][0].update(id="../../etc"),
         r"field 'id': '../../etc' is not a valid id"),
        (lambda r: r["experiments"][0].update(id="Bad-ID"),
         r"experiment 'Bad-ID', field 'id': 'Bad-ID' is not a valid id: use lowercase"),
        (lambda r: r["experiments"][3]["metrics"].append("nope"),
         r"experiment 'onboarding_srm', field 'metrics': unknown metrics \['nope'\]"),
        (lambda r: r["metrics"]["sessions"].update(entity="user_id"),
         r"experiment 'checkout_redesign', metric 'sessions', field 'entity': 'user_id' is not a secondary id of "
         r"the experiment's assignments source \(its secondary_ids: \[\]\)"),
        (lambda r: r["sources"]["assignments"].update(secondary_ids={"subject": "login"}),
         r"sources: assignments.secondary_ids \['subject'\] are names already used"),
        (lambda r: r["experiments"][0]["variants"][0].update(id="treatment"),
         r"experiment 'checkout_redesign', field 'variants': variant ids must be unique"),
        (lambda r: r["experiments"][0].update(srm={"p_threshold": 2}),
         r"experiment 'checkout_redesign', field 'srm.p_threshold'"),
        (lambda r: r["experiments"][0].update(colour="blue"),
         r"experiment 'checkout_redesign', field 'colour': Extra inputs are not permitted"),
        (lambda r: r["metrics"]["revenue"].update(aggregation="median"),
         r"metric 'revenue', field 'aggregation'"),
        (lambda r: r["metrics"]["revenue"].update(window_end_days=0),
         r"metric 'revenue', field 'window_end_days'"),
        (lambda r: r["metrics"]["purchases"].update(cap_lower_percentile=0.99),
         r"metric 'purchases': cap_lower_percentile \(0.99\) must be below cap_percentile \(0.99\)"),
        (lambda r: r["experiments"][0].update(covariates=["pre_period", "browser"]),
         r"experiment 'checkout_redesign', field 'covariates': \['browser'\] are not covariates of this experiment"),
        (lambda r: r["experiments"][0].update(covariates=["pre_period"], cuped_pre_window_days=0),
         r"'pre_period' needs cuped_pre_window_days > 0"),
        (lambda r: r["metrics"]["purchases"].update(cap_ignore_zeros="sometimes"),
         r"metric 'purchases', field 'cap_ignore_zeros'"),
        (lambda r: r["sources"]["events"]["columns"].update(colour="x"),
         r"sources: events.columns maps unknown canonical names \['colour'\]"),
        (lambda r: r["sources"]["events"].update(path="../../etc/*.parquet"),
         r"sources, field 'events.path'.*outside the data root"),
        (lambda r: r["sources"]["assignments"].update(path="logs/exposures.json"),
         r"sources, field 'assignments.path'.*cannot tell the format"),
        (lambda r: r["experiments"].append(copy.deepcopy(r["experiments"][0])),
         r"experiment 'checkout_redesign', field 'id': defined twice"),
        (lambda r: r.update(experiments=[]),
         r"registry, field 'experiments': List should have at least 1 item"),
        (lambda r: r["metrics"]["revenue"].update(window_end_days=float("inf")),
         r"metric 'revenue', field 'window_end_days': Input should be a finite number"),
        (lambda r: r["experiments"][0].update(cuped_pre_window_days=float("nan")),
         r"experiment 'checkout_redesign', field 'cuped_pre_window_days': Input should be a finite number"),
        (lambda r: r["sources"]["assignments"]["properties"].append("pre_period"),
         r"sources: assignments.properties: 'pre_period' names the CUPED\+\+ pre-period covariate"),
        (lambda r: r["sources"]["assignments"]["properties"].append("source_file"),
         r"sources: assignments.properties \['source_file'\] are names of columns the pipeline adds"),
        (lambda r: r["sources"]["assignments"]["properties"].append(r["sources"]["assignments"]["properties"][0]),
         r"sources: assignments.properties repeats"),
        (lambda r: r["sources"]["assignments"].update(secondary_ids={"device_type": "login"}),
         r"sources: assignments.secondary_ids \['device_type'\] are names already used"),
        (lambda r: r["sources"]["assignments"].update(secondary_ids={"variant_id": "login"}),
         r"sources: assignments.secondary_ids \['variant_id'\] are names already used"),
        (lambda r: r["sources"]["assignments"].update(secondary_ids={"User ID": "login"}),
         r"sources, field 'assignments.secondary_ids.User ID.\[key\]': 'User ID' is not a valid id"),
        (lambda r: r["sources"]["events"].update(secondary_ids={"user_id": "login"}),
         r"sources: events.secondary_ids: secondary ids are mapped on the assignments source"),
    ],
)
def test_invalid_registry_names_experiment_and_field(tmp_path, mutate, message):
    with pytest.raises(RegistryError, match=message):
        parse(mutate, tmp_path)


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "registry.yaml"
    bad.write_text("experiments: [\n")
    with pytest.raises(RegistryError, match=f"registry file {bad} is not valid YAML"):
        load_registry(bad)
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "missing.yaml")


def test_a_registry_that_cannot_be_read_is_one_message(tmp_path):
    with pytest.raises(RegistryError, match=f"registry path {tmp_path} is a directory, not a YAML file"):
        load_registry(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(DEFAULT_REGISTRY.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RegistryError, match=f"registry file {latin} is not UTF-8 text .*save it as UTF-8"):
        load_registry(latin)


def test_a_key_repeated_in_the_registry_is_refused_with_both_lines(tmp_path):
    text = DEFAULT_REGISTRY.read_text()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("experiments:")) + 1
    twice = tmp_path / "registry.yaml"
    twice.write_text(text + "\nexperiments: []\n")
    last = len(twice.read_text().splitlines())
    with pytest.raises(RegistryError, match=f"key 'experiments' appears twice \\(lines {first} and {last}\\)"):
        load_registry(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("    aggregation: sum\n", "    aggregation: sum\n    aggregation: count\n", 1))
    with pytest.raises(RegistryError, match="key 'aggregation' appears twice"):
        load_registry(nested)
    one_line = tmp_path / "one_line.yaml"
    one_line.write_text(text.replace("aggregation: sum", "aggregation: sum", 1) + "\nextra: {a: 1, a: 2}\n")
    with pytest.raises(RegistryError, match=r"key 'a' appears twice \(line \d+\)"):
        load_registry(one_line)


def test_paths_outside_the_data_root_can_be_allowed_explicitly(tmp_path):
    def outside(raw):
        raw["sources"]["events"]["path"] = "/somewhere/else/*.parquet"
        raw["allow_paths_outside_data_root"] = True

    registry = parse(outside, tmp_path)
    assert registry.resolve_path(registry.sources.events.path) == "/somewhere/else/*.parquet"


def test_storage_uris_are_kept_for_the_engine_to_read(tmp_path):
    def on_s3(raw):
        raw["sources"]["events"]["path"] = "s3a://logs/events/*.parquet"

    registry = parse(on_s3, tmp_path)
    assert registry.resolve_path(registry.sources.events.path) == "s3a://logs/events/*.parquet"


def test_an_edit_to_the_registry_file_applies_at_the_next_load(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text(DEFAULT_REGISTRY.read_text())
    first = load_registry(path)
    assert load_registry(path) is first  # the same text is parsed once
    edited = copy.deepcopy(BASE)
    edited["experiments"][0]["name"] = "Renamed"
    path.write_text(yaml.safe_dump(edited))
    assert load_registry(path).experiments[0].name == "Renamed"
    path.write_text("experiments: [")
    for _ in range(2):  # an error is raised on every load, not remembered as a registry
        with pytest.raises(RegistryError, match="not valid YAML"):
            load_registry(path)
