"""Fixed-point sums: float sums that do not depend on the order the engine meets the rows in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import ibis
import ibis.expr.datatypes as dtypes
import ibis.expr.types as ir
import pandas as pd

# Float sums are accumulated as integers (fixed point, DECIMAL(38, 0)): an engine's float sum
# depends on the order it meets the rows in (storage order, threads), so the same rows could give
# results differing in the last bits from one run to the next, or between an incremental refresh
# and a full recomputation. Integer sums do not; 120 bits leave room under DECIMAL(38, 0)'s 126.
FIXED_POINT = dtypes.Decimal(38, 0)
# Every sum of a FIXED_POINT column is cast back to it: Ibis types the sum as decimal(38, 2), and
# a table materialized with that type multiplies by 100 on the way in (overflow room lost) and
# converts to float several times slower.
FIXED_POINT_BITS = 120
_SCALE_PARTS = ("up1", "up2", "down1", "down2")


class SumBound(NamedTuple):
    """What a fixed-point sum needs to know of its terms: how many, and how large at most."""

    rows: int
    max_abs: float

    def scale_columns(self, term: str) -> dict[str, float | None]:
        """The scale of a term's sum as four columns `{term}_up1/_up2/_down1/_down2`.

        up1 * up2 is the power of two that makes `rows` terms of at most `max_abs` fit
        FIXED_POINT_BITS (two factors: tiny values need up to 2**1194, beyond a float);
        down1 * down2 undoes it. All None when a term is beyond float range (|value| > 1e154
        squared): such a metric is summed as floats.
        """
        if not math.isfinite(self.max_abs):
            return {f"{term}_{part}": None for part in _SCALE_PARTS}
        exponent = 0  # all terms zero: any scale is exact
        if self.rows and self.max_abs:
            exponent = FIXED_POINT_BITS - math.ceil(math.log2(self.rows) + math.log2(self.max_abs))
        half = exponent // 2
        factors = (2.0**half, 2.0 ** (exponent - half), 2.0**-half, 2.0 ** (half - exponent))
        return {f"{term}_{part}": factor for part, factor in zip(_SCALE_PARTS, factors, strict=True)}


NO_TERMS = SumBound(0, 0.0)
# A subject's sum (few terms) is exact whatever its values: each term is held as an integer in
# its exponent bucket (BUCKET_BINADES powers of two wide), scaled so that its lowest bit lands at
# 2**18 or above (a float has 53 bits: the integer holds it exactly) and its value below 2**86
# (room for 2**40 terms in DECIMAL(38, 0)'s 126 bits). No rounding happens until the buckets of a
# subject are combined: a bucket below the subject's largest is rounded once, to 2**-70 of the
# largest bucket's floor; a subject whose terms share a bucket (almost always) gets the correctly
# rounded sum. No other subject's values enter it, and no window over the rows is needed.
BUCKET_BINADES = 16
BUCKET_BITS = 70


def _times_two_to(value: ir.FloatingValue, exponent: ir.IntegerValue) -> ir.FloatingValue:
    """value * 2**exponent, by two factors in turn: 2**exponent alone can leave float range."""
    half = (exponent / 2).floor().cast("int64")
    two = ibis.literal(2.0)
    return value * (two**half) * (two ** (exponent - half))


def exact_terms(table: ir.Table, term: ir.NumericColumn, name: str) -> ir.Table:
    """`table` with `{name}_bucket` and `{name}_fixed`, the term's exponent bucket and the term
    as an exact integer of it (0 for a zero or null term), for `exact_sums`."""
    magnitude = term.abs()
    nonzero = magnitude > 0  # null for a null term: the zero branches (no logarithm, no powers)
    bucket = ibis.ifelse(nonzero, (magnitude.log2().floor() / BUCKET_BINADES).floor(), 0).cast("int64")
    fixed = ibis.ifelse(
        nonzero, _times_two_to(term, BUCKET_BITS - BUCKET_BINADES * bucket).cast(FIXED_POINT), ibis.literal(0, FIXED_POINT)
    )
    return table.mutate(**{f"{name}_bucket": bucket, f"{name}_fixed": fixed})


def exact_sums(per_bucket: ir.Table, group_by: Sequence[str], name: str, counts: Sequence[str] = ()) -> ir.Table:
    """Per group of `group_by`: `{name}`, the sum of terms prepared by `exact_terms` (see
    BUCKET_BINADES) and summed per bucket: `per_bucket` has one row per group and `{name}_bucket`,
    with `{name}_fixed` (the bucket's exact integer sum) and the `counts` columns (summed)."""
    bucket, fixed = f"{name}_bucket", f"{name}_fixed"
    # Zero and null terms sit in bucket 0 with a zero sum: they must not decide the top bucket
    # (tiny terms would be rounded onto bucket 0's grid, to nothing).
    counted = per_bucket[fixed] != 0
    per_group = per_bucket.group_by(*group_by).aggregate(
        _top=per_bucket[bucket].max(where=counted).fill_null(0), _low=per_bucket[bucket].min(where=counted).fill_null(0),
        _total=per_bucket[fixed].sum().cast(FIXED_POINT),
        **{c: per_bucket[c].sum() for c in counts},
    )
    # Almost every group's terms share one bucket: their integer sum is exact as it is.
    single = per_group.filter(per_group._top == per_group._low)
    # The others: lower buckets onto the top bucket's grid, one rounding each (the cast), the same
    # in any run. Joined on the few groups that need it (a window over every group costs more).
    several = per_group.filter(per_group._top != per_group._low).select(*group_by, "_top", *counts)
    spread = per_bucket.select(*group_by, bucket, fixed).join(several, list(group_by))
    shifted = ibis.ifelse(
        spread[bucket] == spread._top,
        spread[fixed],
        _times_two_to(spread[fixed].cast("float64"), BUCKET_BINADES * (spread[bucket] - spread._top)).cast(FIXED_POINT),
    )
    spread = spread.mutate(_shifted=shifted)
    several = spread.group_by(*group_by).aggregate(
        _total=spread._shifted.sum().cast(FIXED_POINT), _top=spread._top.max(), **{c: spread[c].max() for c in counts},
    )
    summed = ibis.union(single.select(*group_by, "_total", "_top", *counts), several.select(*group_by, "_total", "_top", *counts))
    value = _times_two_to(summed._total.cast("float64"), BUCKET_BINADES * summed._top - BUCKET_BITS)
    return summed.mutate(**{name: value}).drop("_total", "_top")


def value_bounds(table: ir.Table, by: Sequence[str]) -> ir.Table:
    """Per group of the `by` columns: the rows and the largest |value| (null when no value)."""
    return table.group_by(*by).aggregate(rows=table.count(), max_abs=table.value.abs().max())


def read_bounds(frame: pd.DataFrame, by: Sequence[str]) -> dict[tuple, SumBound]:
    """`value_bounds` rows as {(key values...): SumBound}."""
    return {
        tuple(row[c] for c in by): SumBound(int(row["rows"]), 0.0 if pd.isna(row["max_abs"]) else float(row["max_abs"]))
        for _, row in frame.iterrows()
    }


def fixed_point_sum(table: ir.Table, term: ir.NumericColumn, name: str) -> ir.NumericScalar:
    """The sum of a float column, the same whatever order the rows come in.

    Every term is multiplied by its scale (the `{name}_up1/_up2` columns of `table`, exact powers of
    two), rounded to an integer and summed exactly; on DuckDB rounding costs at most 2**-120 of
    (rows x largest term) per term (Spark converts through text: float precision per term). Every
    row of a group must carry the same scale (one per experiment and metric: `scales_table`).
    """
    up1, up2, down1, down2 = (table[f"{name}_{part}"] for part in _SCALE_PARTS)
    fixed = up1.notnull()
    scaled = ibis.ifelse(fixed, term * up1 * up2, ibis.null("float64")).cast(FIXED_POINT)
    exact = scaled.sum().cast("float64") * down1.max() * down2.max()
    return ibis.ifelse(fixed.any(), exact, term.sum())


def scales_table(rows: Sequence[dict], terms: Sequence[str]) -> ir.Table:
    """Small in-engine table: per experiment and metric, the `scale_columns` of each term (nulls
    as nulls)."""
    schema = {
        "experiment_id": "string", "metric": "string",
        **{f"{term}_{part}": "float64" for term in terms for part in _SCALE_PARTS},
    }
    frame = pd.DataFrame(list(rows), columns=list(schema))
    return ibis.memtable(frame.astype(object).where(frame.notna(), None), schema=schema)

