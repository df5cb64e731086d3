"""Benchmark worker (c): the same sufficient statistics in plain pandas, at a size pandas can hold.

What an analyst would write without the pipeline: read every Parquet file into DataFrames, then
merge, filter and group by, with the pipeline's rules (the same as reference.sql). Vectorized
throughout; Python loops only over the registry's configuration (distinct cap percentiles).

Started by run_benchmark.py: `bench_pandas.py --config CONFIG --scratch DIR --result FILE`.
"""

from __future__ import annotations

import glob
import time
from contextlib import contextmanager

import measure

started = time.perf_counter()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started
WHITESPACE = " \t\n\r\v\f"  # trimmed around ids, as the pipeline does (vocabulary.trim_whitespace)
KEY = ["experiment_id", "subject_id"]


def read_parquet_files(pattern: str, columns: list[str]) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(path, columns=columns) for path in sorted(glob.glob(pattern))], ignore_index=True
    )


def blank(column: pd.Series) -> pd.Series:
    return column.isna() | (column.astype("string").str.strip(WHITESPACE) == "")


def epoch_us(column: pd.Series) -> pd.Series:
    """Timestamps as integer microseconds since the epoch (UTC), like the reference."""
    return pd.to_datetime(column, utc=True).astype("datetime64[us, UTC]").astype("int64")


def config_frames(config: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The registry as three small frames: experiments, known variants, metrics per experiment."""
    experiments = pd.DataFrame(
        [
            {"experiment_id": e["id"], "start_us": e["start_us"], "end_us": e["end_us"],
             "pre_window_us": e["pre_window_us"]}
            for e in config["experiments"]
        ]
    )
    variants = pd.DataFrame(
        [{"experiment_id": e["id"], "variant_id": v} for e in config["experiments"] for v in e["variants"]]
    )
    metrics = pd.DataFrame(
        [
            {"experiment_id": e["id"], "metric": m["id"], "event_name": m["event_name"],
             "aggregation": m["aggregation"], "metric_start_us": m["start_us"],
             "metric_end_us": m["end_us"], "cap_percentile": m["cap_percentile"]}
            for e in config["experiments"]
            for m in e["metrics"]
        ]
    )
    metrics["cap_percentile"] = metrics["cap_percentile"].astype("float64")
    return experiments, variants, metrics


def analysable_subjects(raw: pd.DataFrame, experiments: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """One row per analysable subject: variant and first exposure (assigned_us)."""
    rows = pd.DataFrame({
        "experiment_id": raw["experiment_key"].astype("string").str.strip(WHITESPACE),
        "subject_id": raw["user_id"],
        "variant_id": raw["variation"],
        "exposed_at": raw["exposed_at"],
    })
    rows = rows[~blank(rows["subject_id"]) & rows["exposed_at"].notna()]
    rows = rows.assign(at_us=epoch_us(rows["exposed_at"])).drop(columns="exposed_at")
    # Unknown experiments and variants drop out of the inner merge.
    rows = rows.merge(variants, on=["experiment_id", "variant_id"]).merge(experiments, on="experiment_id")
    inside = (rows["at_us"] >= rows["start_us"]) & (rows["end_us"].isna() | (rows["at_us"] < rows["end_us"]))
    per_subject = rows[inside].groupby(KEY, sort=False).agg(
        variant_id=("variant_id", "first"),
        n_variants=("variant_id", "nunique"),
        assigned_us=("at_us", "min"),
    )
    # With a single variant seen, the first exposure's variant is that variant.
    return per_subject[per_subject["n_variants"] == 1].drop(columns="n_variants").reset_index()


def matched_events(
    events: pd.DataFrame, subjects: pd.DataFrame, experiments: pd.DataFrame, metrics: pd.DataFrame
) -> pd.DataFrame:
    """Each subject's events from its CUPED pre-period to its widest metric window, duplicates once."""
    events = events.rename(columns={"user_id": "subject_id", "event_type": "event_name"})
    value = pd.to_numeric(events["amount"], errors="coerce")
    usable = (
        ~blank(events["subject_id"]) & ~blank(events["event_name"]) & events["event_ts"].notna()
        & ~(events["amount"].notna() & value.isna())  # a value that is not a number is rejected
    )
    events = pd.DataFrame({
        "subject_id": events["subject_id"][usable],
        "at_us": epoch_us(events["event_ts"][usable]),
        "event_name": events["event_name"][usable],
        "value": value[usable],
    })
    spans = metrics.groupby(["experiment_id", "event_name"], as_index=False).agg(span_end_us=("metric_end_us", "max"))
    joined = (
        subjects.merge(experiments[["experiment_id", "pre_window_us"]], on="experiment_id")
        .merge(events, on="subject_id")
        .merge(spans, on=["experiment_id", "event_name"])
    )
    inside = (joined["at_us"] >= joined["assigned_us"] - joined["pre_window_us"]) & (
        joined["at_us"] < joined["assigned_us"] + joined["span_end_us"]
    )
    joined = joined.loc[inside, [*KEY, "assigned_us", "at_us", "event_name", "value"]]
    return joined.drop_duplicates()


def subject_values(matched: pd.DataFrame, subjects: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per analysable subject and metric: y (post, metric window) and x (pre-period), zeros included."""
    per_metric = matched.merge(metrics, on=["experiment_id", "event_name"])
    offset = per_metric["at_us"] - per_metric["assigned_us"]
    post = (offset >= per_metric["metric_start_us"]) & (offset < per_metric["metric_end_us"])
    pre = offset < 0
    amount = per_metric["value"].fillna(0.0)
    per_metric = per_metric.assign(
        post_events=post.astype("int64"), post_sum=amount.where(post, 0.0),
        pre_events=pre.astype("int64"), pre_sum=amount.where(pre, 0.0),
    )
    sums = per_metric.groupby([*KEY, "metric"], as_index=False, sort=False)[
        ["post_events", "post_sum", "pre_events", "pre_sum"]
    ].sum()
    grid = subjects.merge(metrics[["experiment_id", "metric", "aggregation", "cap_percentile"]], on="experiment_id")
    grid = grid.merge(sums, on=[*KEY, "metric"], how="left")
    grid[["post_events", "post_sum", "pre_events", "pre_sum"]] = grid[
        ["post_events", "post_sum", "pre_events", "pre_sum"]
    ].fillna(0)

    def value(events: pd.Series, total: pd.Series) -> np.ndarray:
        return np.select(
            [grid["aggregation"] == "sum", grid["aggregation"] == "count"],
            [total, events.astype("float64")],
            (events > 0).astype("float64"),
        )

    grid["y"] = value(grid["post_events"], grid["post_sum"])
    grid["x"] = value(grid["pre_events"], grid["pre_sum"])
    return grid[[*KEY, "variant_id", "metric", "cap_percentile", "y", "x"]]


def cap(values: pd.DataFrame, column: str) -> pd.Series:
    """Winsorize `column` at each capped metric's percentile of its non-zero values (per experiment)."""
    capped = values[column].copy()
    for percentile in values["cap_percentile"].dropna().unique():
        of_metric = values[(values["cap_percentile"] == percentile) & (values[column] != 0)]
        caps = of_metric.groupby(["experiment_id", "metric"])[column].quantile(percentile).rename("cap")
        limit = values[["experiment_id", "metric"]].join(caps, on=["experiment_id", "metric"])["cap"]
        capped = capped.where(~(capped > limit), limit)
    return capped


def sufficient_statistics(values: pd.DataFrame) -> pd.DataFrame:
    y, x = cap(values, "y"), cap(values, "x")
    terms = pd.DataFrame({
        "experiment_id": values["experiment_id"], "variant_id": values["variant_id"], "metric": values["metric"],
        "sum_y": y, "sum_y2": y * y, "sum_x": x, "sum_x2": x * x, "sum_xy": x * y,
    })
    grouped = terms.groupby(["experiment_id", "variant_id", "metric"])
    return grouped.sum().assign(n=grouped.size()).reset_index()


@contextmanager
def phase(phases: list[dict], name: str):
    t0 = time.perf_counter()
    yield
    phases.append({"step": name, "seconds": time.perf_counter() - t0, "peak_rss_kib": measure.hwm_rss_kib()})


def main() -> None:
    args, config = measure.worker_args()
    rss_after_imports = measure.current_rss_kib()

    phases: list[dict] = []
    t0 = time.perf_counter()
    experiments, variants, metrics = config_frames(config)
    with phase(phases, "read Parquet"):
        raw = read_parquet_files(
            config["assignments_path"], ["user_id", "experiment_key", "variation", "exposed_at"]
        )
        events = read_parquet_files(config["events_path"], ["user_id", "event_ts", "event_type", "amount"])
    with phase(phases, "analysable subjects"):
        subjects = analysable_subjects(raw, experiments, variants)
    with phase(phases, "temporal join"):
        matched = matched_events(events, subjects, experiments, metrics)
    with phase(phases, "subject values"):
        values = subject_values(matched, subjects, metrics)
    with phase(phases, "caps and sums"):
        sufficient = sufficient_statistics(values)
    wall = time.perf_counter() - t0

    columns = ["experiment_id", "variant_id", "metric", "n", "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy"]
    measure.write_result(args.result, {
        "implementation": "pandas",
        "import_seconds": IMPORT_SECONDS,
        "wall_seconds": wall,
        "rss_after_imports_kib": rss_after_imports,
        "success": True,
        "steps": phases,
        # astype(object): plain Python ints and floats, which JSON keeps exactly.
        "sufficient": sufficient[columns].astype(object).to_dict("records"),
    })


if __name__ == "__main__":
    main()
