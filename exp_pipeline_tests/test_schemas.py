"""Each table's contract is declared once: the docs page, the Dagster column schemas and the
variant_metrics column list are derived from the Pandera schemas."""

from pathlib import Path

import pandas as pd
import pytest

from exp_pipeline import schemas
from exp_pipeline.defs import assets
from exp_pipeline.results import variant_metric_rows
from exp_pipeline.stats import srm_test
from exp_pipeline_tests.tables import experiment, metric

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tables.md"


def test_the_tables_page_is_generated_from_the_schemas():
    # Regenerate with: .venv/bin/python -m exp_pipeline.schemas > docs/tables.md
    assert DOCS.read_text() == schemas.tables_markdown()


@pytest.mark.parametrize("name", sorted(schemas.TABLES))
def test_every_column_is_typed_and_described(name):
    schema = schemas.TABLES[name].documented_schema()
    assert schema.name == name
    assert schema.columns and all(c.description for c in schema.columns.values())
    kinds = {kind for _, kind, _, _ in schemas.TABLES[name].columns()}
    # decimal(38, 0): the fixed-point sums the incremental refresh stores (exact integers).
    assert kinds <= {"string", "boolean", "int64", "float64", "timestamp UTC", "decimal(38, 0)"}


def test_variant_metrics_columns_keep_their_order():
    # Existing warehouses hold these columns in this order; a new column goes at the end.
    assert schemas.VARIANT_METRICS_COLUMNS == (
        "experiment_id", "variant_id", "metric", "is_control", "aggregation",
        "n", "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy",
        "mean", "std",
        "abs_lift", "abs_lift_ci_low", "abs_lift_ci_high",
        "rel_lift", "ci_low", "ci_high", "df", "p_value", "p_value_holm",
        "cuped_theta", "cuped_rel_lift", "cuped_ci_low", "cuped_ci_high", "cuped_p_value",
        "cuped_p_value_holm", "cuped_variance_reduction",
        "expected_share", "srm_p_value", "srm_flagged", "srm_verdict",
        "cuped_abs_lift", "cuped_abs_lift_ci_low", "cuped_abs_lift_ci_high",
        "cuped_pp_covariates", "cuped_pp_abs_lift", "cuped_pp_rel_lift", "cuped_pp_ci_low", "cuped_pp_ci_high",
        "cuped_pp_p_value", "cuped_pp_variance_reduction",
    )


def test_the_dagster_column_schemas_are_the_tables_columns():
    shown = {
        "dim_experiments": assets.dim_experiments, "dim_variants": assets.dim_variants,
        "rejected_source_rows": assets.source_audit,
    }
    specs = {spec.key.path[-1]: spec for spec in assets.experiment_analysis.specs}
    for table in ("raw_assignments", "deduped_assignments", "post_assignment_events", "pre_assignment_events",
                  "variant_metrics"):
        shown[table] = specs[table]
    for table, asset in shown.items():
        spec = asset if not hasattr(asset, "specs") else next(iter(asset.specs))
        columns = spec.metadata["dagster/column_schema"].columns
        declared = schemas.TABLES[table].documented_schema().columns
        assert [c.name for c in columns] == list(declared), table
        assert [c.constraints.nullable for c in columns] == [c.nullable for c in declared.values()], table
        assert "mixed" not in {c.type for c in columns}


def test_variant_metrics_rows_have_exactly_the_schemas_columns_and_types():
    exp = experiment(metrics=["revenue"])
    srm = srm_test({"control": 10, "treatment": 10}, exp.weights, min_total=100)
    frame = variant_metric_rows(pd.DataFrame(columns=["variant_id", "metric"]), exp, [metric()], srm)
    assert tuple(frame.columns) == schemas.VARIANT_METRICS_COLUMNS
    assert set(frame["srm_verdict"]) == {"not judged"}  # 20 subjects, fewer than min_subjects
    schema = schemas.variant_metrics_schema(exp, ["revenue"])
    numeric = {n for n, c in schema.columns.items() if str(c.dtype) in ("float64", "int64")}
    assert all(str(frame[n].dtype) == str(schema.columns[n].dtype) for n in numeric)


def test_a_schema_without_an_experiment_keeps_the_checks_that_hold_for_every_one():
    exp = experiment()
    with_experiment = schemas.deduped_assignments_schema(exp, ["device_type"])
    without = schemas.deduped_assignments_schema(None)
    assert "device_type" in with_experiment.columns and "device_type" not in without.columns
    checks = {name: [c.name for c in col.checks] for name, col in without.columns.items()}
    assert checks["variant_id"] == [] and checks["n_exposures"] == ["greater_than_or_equal_to"]
    assert [c.name for c in with_experiment.columns["assigned_at"].checks] == ["inside_experiment_window"]


@pytest.mark.parametrize(
    "name", ["raw_assignments", "deduped_assignments", "post_assignment_events", "pre_assignment_events"],
)
def test_a_property_cannot_take_the_name_of_a_column_the_pipeline_adds(name):
    from exp_pipeline.registry import ASSIGNMENT_COLUMNS, RESERVED_COLUMN_NAMES

    added = {column for column, *_ in schemas.TABLES[name].columns()} - set(ASSIGNMENT_COLUMNS)
    assert added <= RESERVED_COLUMN_NAMES
