"""Pandera validation in the engine: failures are reported, and only a bounded sample comes back."""

import duckdb
import ibis
import ibis.expr.types as ir
import pandas as pd
import pandera.ibis as pa
import pytest

from exp_pipeline import schemas
from exp_pipeline.warehouse import DuckDBWarehouseSession
from exp_pipeline_tests.conftest import ENGINES, spark_warehouse_at


@pytest.fixture(params=ENGINES)
def session(request, tmp_path):
    if request.param == "duckdb":
        yield DuckDBWarehouseSession(duckdb.connect(), "exp")
    else:
        with spark_warehouse_at(tmp_path).session() as spark_session:
            yield spark_session


def test_a_failing_check_is_reported_from_a_bounded_sample(session, monkeypatch):
    failing = 20 * schemas.MAX_FAILURE_ROWS
    frame = pd.DataFrame({"x": [-1] * failing + [1] * 50, "y": [1.0] * (failing + 50)})
    table = session.temp_table("many_failures", ibis.memtable(frame))
    fetched = []

    def counting(original):
        def fetch(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            fetched.append(len(result) if hasattr(result, "__len__") else 1)
            return result
        return fetch

    # Everything pandera reads back goes through these (tables, and columns or scalars).
    monkeypatch.setattr(ir.Table, "to_pandas", counting(ir.Table.to_pandas))
    monkeypatch.setattr(ir.Value, "to_pandas", counting(ir.Value.to_pandas))
    schema = pa.DataFrameSchema({
        "x": pa.Column(ibis.dtype("int64"), pa.Check.ge(0)), "y": pa.Column(ibis.dtype("float64"), pa.Check.ge(0)),
    })
    outcome = schemas.validate(schema, table)
    assert not outcome.passed
    assert outcome.failed_checks == ["x: greater_than_or_equal_to(0)"]
    assert fetched, "nothing was fetched: the spy saw no failure report"
    assert max(fetched) <= schemas.MAX_FAILURE_ROWS < failing
