"""The dimension tables from the bundled registry: one row per experiment (and variant), exactly
the columns and types of their schemas."""

import datetime as dt

import duckdb
import pytest

from exp_pipeline import dimensions, schemas, validation
from exp_pipeline.registry import load_registry
from exp_pipeline.settings import DEFAULT_REGISTRY
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession


@pytest.fixture()
def registry():
    return load_registry(DEFAULT_REGISTRY)


def _passes(frame, schema) -> validation.ValidationOutcome:
    """Validated as the warehouse stores it: the frame's own types, not cast to the schema's."""
    session = DuckDBWarehouseSession(duckdb.connect(), "exp")
    session.replace_table(schema.name, frame)
    return validation.validate(schema, session.table(schema.name))


def test_dim_experiments_keeps_its_contract(registry):
    frame = dimensions.dim_experiments_frame(registry, dt.datetime(2026, 10, 20, tzinfo=dt.UTC))
    assert list(frame.columns) == list(schemas.dim_experiments_schema().columns)
    assert sorted(frame.experiment_id) == sorted(e.id for e in registry.experiments)
    outcome = _passes(frame, schemas.dim_experiments_schema())
    assert outcome.failures == [] and outcome.passed


def test_dim_variants_has_one_control_per_experiment(registry):
    frame = dimensions.dim_variants_frame(registry)
    assert list(frame.columns) == list(schemas.dim_variants_schema().columns)
    assert frame.groupby("experiment_id").is_control.sum().eq(1).all()
    assert len(frame) == sum(len(e.variants) for e in registry.experiments)
    outcome = _passes(frame, schemas.dim_variants_schema())
    assert outcome.failures == [] and outcome.passed
