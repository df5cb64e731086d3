"""Pandera validation in the engine: failures are reported, and only a bounded sample comes back."""

import duckdb
import ibis
import ibis.expr.types as ir
import pandas as pd
import pandera.ibis as pa
import pytest

from exp_pipeline import validation
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession
from exp_pipeline_tests.conftest import ENGINES, spark_warehouse_at


@pytest.fixture(params=ENGINES)
def session(request, tmp_path):
    if request.param == "duckdb":
        yield DuckDBWarehouseSession(duckdb.connect(), "exp")
    else:
        with spark_warehouse_at(tmp_path).session() as spark_session:
            yield spark_session


def test_a_failing_check_is_reported_from_a_bounded_sample(session, monkeypatch):
    failing = 20 * validation.MAX_FAILURE_ROWS
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
    outcome = validation.validate(schema, table)
    assert not outcome.passed
    assert outcome.failed_checks == ["x: greater_than_or_equal_to(0)"]
    assert fetched, "nothing was fetched: the spy saw no failure report"
    assert max(fetched) <= validation.MAX_FAILURE_ROWS < failing


def _one_query_schema() -> pa.DataFrameSchema:
    """Every kind of check the pipeline's schemas use: built-in and custom column checks, nullable
    and nullable float columns, a table-level check, strictness and a uniqueness constraint."""
    return pa.DataFrameSchema(
        {
            "key": pa.Column(ibis.dtype("string"), pa.Check.isin(["a", "b", "c", "d"]), nullable=False),
            "n": pa.Column(ibis.dtype("int64"), [pa.Check.ge(0), pa.Check.in_range(0, 10)], nullable=False),
            "x": pa.Column(ibis.dtype("float64"), nullable=False),
            "label": pa.Column(ibis.dtype("string"), pa.Check(lambda d: d.table[d.key].length() > 1, name="long"), nullable=True),
            "start": pa.Column(ibis.dtype("int64"), nullable=True),
        },
        checks=[pa.Check(lambda d: d.table.n >= d.table.start, name="n_not_before_start")],
        unique=["key"],
        strict=True,
    )


TYPES = ibis.schema({"key": "string", "n": "int64", "x": "float64", "label": "string", "start": "int64"})


def _table(session, name: str, columns: dict, types: ibis.Schema = TYPES) -> ir.Table:
    frame = pd.DataFrame(columns).astype({c: "Int64" for c, t in types.items() if t.is_integer() and c in columns})
    return session.temp_table(name, ibis.memtable(frame, schema={c: t for c, t in types.items() if c in columns}))


GOOD = {"key": ["a", "b", "c"], "n": [1, 5, 9], "x": [0.5, 1.0, 2.0], "label": ["xx", None, "yy"], "start": [0, 5, 9]}
BROKEN = {
    "null in a non-nullable column": {"key": ["a", None, "c"]},
    "NaN in a non-nullable float column": {"x": [0.5, float("nan"), 2.0]},
    "a value outside a built-in check": {"n": [1, 5, 11]},
    "a value failing a second built-in check": {"n": [1, -5, 9], "start": [0, -5, -9]},
    "a value failing a custom check": {"label": ["xx", "y", "yy"]},
    "a row failing the table-level check": {"start": [0, 5, 10]},
    "a duplicated key": {"key": ["a", "a", "c"]},
    "a value the isin check does not allow": {"key": ["a", "b", "z"]},
}


def test_a_clean_table_passes_in_one_query_as_pandera_passes_it(session):
    table = _table(session, "good", GOOD)
    schema = _one_query_schema()
    assert validation.passes_in_one_query(schema, table)
    assert validation._pandera_outcome(schema, table).passed


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_table_does_not_pass_in_one_query_and_pandera_reports_it(session, broken):
    table = _table(session, "broken", {**GOOD, **BROKEN[broken]})
    schema = _one_query_schema()
    assert not validation.passes_in_one_query(schema, table)
    outcome = validation.validate(schema, table)
    assert not outcome.passed and outcome.failures
    assert outcome == validation._pandera_outcome(schema, table)


def test_schema_level_failures_are_left_to_pandera(session):
    wrong_type = _table(session, "wrong_type", {**GOOD, "n": [1.0, 5.0, 9.0]}, ibis.schema({**TYPES, "n": "float64"}))
    extra = _table(session, "extra", {**GOOD, "extra": [1, 2, 3]}, ibis.schema({**TYPES, "extra": "int64"}))
    missing = _table(session, "missing", {c: v for c, v in GOOD.items() if c != "label"})
    for table in (wrong_type, extra, missing):
        assert not validation.passes_in_one_query(_one_query_schema(), table)
        assert not validation.validate(_one_query_schema(), table).passed


def test_an_empty_table_passes(session):
    table = _table(session, "good", GOOD)
    empty = table.filter(table.n > 100)
    if isinstance(session, DuckDBWarehouseSession):
        # pandera.ibis alone reads DuckDB's all() over no rows (NULL) as failed: "contains nulls".
        assert not validation._pandera_outcome(_one_query_schema(), empty).passed
    assert validation.validate(_one_query_schema(), empty).passed


def test_a_check_that_cannot_be_batched_is_left_to_pandera(session):
    table = _table(session, "good", GOOD)
    element_wise = pa.DataFrameSchema({"n": pa.Column(ibis.dtype("int64"), pa.Check(lambda v: v >= 0, element_wise=True))})
    assert not validation.passes_in_one_query(element_wise, table.select("n"))


def test_a_column_check_reading_another_column_is_left_to_pandera(session):
    # pandera hands a column check its column alone, where this check cannot run (a failure).
    table = _table(session, "good", GOOD)
    schema = pa.DataFrameSchema({
        "n": pa.Column(ibis.dtype("int64"), pa.Check(lambda d: d.table.n >= d.table.start, name="other")),
        "start": pa.Column(ibis.dtype("int64")),
    })
    narrowed = table.select("n", "start")
    assert not validation.passes_in_one_query(schema, narrowed)
    assert validation.validate(schema, narrowed) == validation._pandera_outcome(schema, narrowed)


def test_a_check_that_raises_is_reported_as_pandera_reports_it(session):
    table = _table(session, "good", GOOD).select("n")

    def broken(data):
        raise RuntimeError("no such thing")

    schema = pa.DataFrameSchema({"n": pa.Column(ibis.dtype("int64"), pa.Check(broken, name="broken"))})
    outcome = validation.validate(schema, table)
    assert not outcome.passed and outcome == validation._pandera_outcome(schema, table)


def _join_schema(variants: list[str]) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "experiment_id": pa.Column(ibis.dtype("string")),
            "variant_id": pa.Column(ibis.dtype("string"), pa.Check.isin(variants)),
            "event_at": pa.Column(ibis.dtype("int64")),
            "assigned_at": pa.Column(ibis.dtype("int64")),
        },
        checks=[pa.Check(lambda d: d.table.event_at >= d.table.assigned_at, name="after")],
        strict=True,
    )


@pytest.mark.parametrize(("bad_variant", "early_event", "passes"), [(False, False, True), (True, False, False), (False, True, False)])
def test_a_join_is_validated_from_its_subjects_and_shared_row_verdicts(session, bad_variant, early_event, passes):
    subjects = pd.DataFrame({"experiment_id": ["a", "b"], "variant_id": ["x", "purple" if bad_variant else "y"], "assigned_at": [10, 10]})
    frame = subjects.merge(pd.DataFrame({"experiment_id": ["a", "b", "b"], "event_at": [11, 12, 5 if early_event else 13]}))
    rows = session.temp_table("join_rows", ibis.memtable(frame))
    schemas = {"a": _join_schema(["x"]), "b": _join_schema(["y"])}
    check = validation.JoinValidation(schemas, {"experiment_id", "variant_id", "assigned_at"}, "v_")
    verdicts = check.row_verdicts(rows)
    # The variants' isin reads subject columns only: checked on the subjects. The row verdicts
    # (event_at not null, event_at >= assigned_at) are the same for both schemas: computed once.
    assert list(verdicts) == check.row_verdict_names and len(verdicts) == 2
    with_verdicts = rows.mutate(**verdicts)
    per_experiment = session.to_pandas(with_verdicts.group_by("experiment_id").aggregate(
        rows=with_verdicts.count(), **{n: with_verdicts[n].all() for n in verdicts}
    ))
    subject_rows = session.temp_table("join_subjects", ibis.memtable(subjects.assign(event_at=0)))
    subject_results = subject_rows.aggregate(**check.subject_verdicts(subject_rows)).to_pyarrow().to_pylist()[0]
    got = {r["experiment_id"]: check.passed(r["experiment_id"], r["rows"], r, subject_results) for r in per_experiment.to_dict("records")}
    assert got == {"a": True, "b": passes}
    # pandera, on the rows themselves, agrees.
    assert validation.validate(schemas["b"], rows.filter(rows.experiment_id == "b")).passed is passes
