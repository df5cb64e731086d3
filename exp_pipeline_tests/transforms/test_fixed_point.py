"""Fixed-point sums: exact, order-independent, each metric on its own scale."""

import math

import pandas as pd
import pytest

from exp_pipeline.transforms.fixed_point import SumBound
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession


def test_sums_do_not_depend_on_the_order_rows_are_stored_in(con):
    # A float sum of these gives 1 in this order (1e16 + 1 rounds back to 1e16) and 2 in others.
    values = [1e16, 1.0, -1e16, 1.0]
    orders = [[0, 1, 2, 3], [1, 3, 0, 2], [3, 2, 1, 0]]
    got = []
    for i, order in enumerate(orders):
        frame = pd.DataFrame({
            "experiment_id": "exp", "subject_id": [f"s{j}" for j in order], "variant_id": "control",
            "metric": "revenue", "period": "post", "value": [values[j] for j in order],
        })
        t = con.create_table(f"stored_{i}", frame)
        out = con.statistics(t)
        got.append(out[["n", "sum_y", "sum_y2"]].iloc[0].tolist())
    assert got == [[4, 2.0, 2e32 + 2.0]] * len(orders)


def _sums(con, name: str, values: dict[str, list[float]]) -> pd.DataFrame:
    """sum_y and sum_y2 per metric of the given values (one subject each, one variant)."""
    frame = pd.DataFrame(
        [{"metric": metric, "value": v} for metric, vs in values.items() for v in vs]
    ).assign(experiment_id="exp", variant_id="control", period="post")
    frame["subject_id"] = [f"s{i}" for i in range(len(frame))]
    t = con.create_table(name, frame)
    out = con.statistics(t)
    return out.set_index("metric")


@pytest.mark.parametrize("values", [
    [3e-300, 4e-300, 5e-310],   # tiny (the scale is beyond what one float can hold)
    [1e150, 1e150, -3e149],     # huge
    [-2.5, 1e-9, 7.25, 0.1],    # mixed signs and sizes
    [0.0, 0.0],                 # all zero: the bound is 0
])
def test_fixed_point_sums_are_the_correctly_rounded_sums(con, values):
    got = _sums(con, "values", {"m": values}).loc["m"]
    # Spark turns a double into a decimal through its shortest text (17 digits): each term is
    # rounded there at float precision, so its sums are within an ulp, not correctly rounded.
    rel = 0 if isinstance(con.session, DuckDBWarehouseSession) else 4e-16
    assert got["sum_y"] == pytest.approx(math.fsum(values), rel=rel, abs=0)
    assert got["sum_y2"] == pytest.approx(math.fsum(v * v for v in values), rel=rel, abs=0)


def test_each_metric_is_summed_on_its_own_scale(con):
    # A metric of small values beside one with a huge value: one shared scale would round the
    # small squares to nothing (sum_y2 off by 22% in a review's example); each its own keeps them.
    small = [0.001] * 1000
    got = _sums(con, "scales", {"small": small, "big": [1e13]})
    assert got.loc["small", "sum_y2"] == pytest.approx(math.fsum(v * v for v in small), rel=1e-15, abs=0)
    assert got.loc["small", "sum_y"] == pytest.approx(math.fsum(small), rel=1e-15, abs=0)
    assert got.loc["big", "sum_y2"] == 1e26


def test_a_term_beyond_float_range_is_summed_as_floats(con):
    # y * y overflows: that metric's sums are the engine's float sums (infinite), the others exact.
    got = _sums(con, "overflow", {"wild": [1e200, 1.0], "m": [0.1, 0.2, 0.3]})
    assert got.loc["wild", "sum_y2"] == math.inf and got.loc["wild", "sum_y"] == 1e200
    assert got.loc["m", "sum_y"] == math.fsum([0.1, 0.2, 0.3])


def test_bounds_of_values(con):
    t = con.create_table("bounded", pd.DataFrame({"metric": ["a", "a", "b"], "value": [-7.5, 2.0, 3.0]}))
    assert con.bounds(t, ["metric"]) == {("a",): SumBound(2, 7.5), ("b",): SumBound(1, 3.0)}
    assert con.bounds(t.filter(t.value > 100), ["metric"]) == {}
