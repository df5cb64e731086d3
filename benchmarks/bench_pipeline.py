"""Benchmark worker (a): the pipeline, every experiment materialized through Dagster in process.

One run per experiment, as the `analyze_experiment` job runs it: ANALYSIS_ASSETS and the
experiment's checks, partition = experiment, on a fresh warehouse and a fresh temporary Dagster
instance. Per step it records the wall time Dagster reports (STEP_SUCCESS duration), the row counts
from the materialization metadata and the highest RSS sampled while the step ran.

Started by run_benchmark.py: `bench_pipeline.py [--engine spark] --config CONFIG --scratch DIR --result FILE`.
On Spark (local mode, exp_pipeline.settings.LOCAL_SPARK_CONFIG) the JVM is a child process: memory
is then the sampled RSS of the whole process tree, Python driver and JVM together.
"""

from __future__ import annotations

import time
from pathlib import Path

import measure

started = time.perf_counter()
from dagster import DagsterEventType, DagsterInstance, materialize  # noqa: E402
from dagster_duckdb import DuckDBResource  # noqa: E402

from exp_pipeline.defs.assets import ANALYSIS_ASSETS  # noqa: E402
from exp_pipeline.defs.checks import EXPERIMENT_CHECKS  # noqa: E402
from exp_pipeline.defs.partitions import experiment_partitions  # noqa: E402
from exp_pipeline.defs.resources import RegistryResource  # noqa: E402
from exp_pipeline.warehouse.resources import DuckDBWarehouse  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started

# Dagster's DEBUG console log per event would be part of what is timed; warnings still show.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

# The step (op) that writes each asset: window_events writes post_ and pre_assignment_events.
OP_OF_ASSET = {key.path[-1]: a.op.name for a in ANALYSIS_ASSETS for key in a.keys}
# Step (op) name -> (the op it belongs to, "asset" or "check", the table it reads or writes).
STEP_OWNERS = {
    **{a.op.name: (a.op.name, "asset", a.op.name) for a in ANALYSIS_ASSETS},
    **{
        c.node_def.name: (OP_OF_ASSET[key.path[-1]], "check", key.path[-1])
        for c in EXPERIMENT_CHECKS
        for key in [next(iter(c.check_keys)).asset_key]
    },
}


def step_records(instance: DagsterInstance, run_id: str) -> list[dict]:
    """Start time, end time and duration of every step of a run, from its event log."""
    steps: dict[str, dict] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        record = steps.setdefault(event.step_key, {"step": event.step_key})
        if event.event_type == DagsterEventType.STEP_START:
            record["start"] = entry.timestamp
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            record["end"] = entry.timestamp
            record["seconds"] = event.event_specific_data.duration_ms / 1000
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            record["end"] = entry.timestamp
            record["failed"] = True
    return list(steps.values())


def materialized_metadata(result) -> dict[str, dict]:
    """Asset name -> its materialization metadata (plain values)."""
    return {
        event.asset_key.path[-1]: {k: v.value for k, v in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }


def rows_of(metadata: dict[str, dict], events_rows: int) -> dict[str, tuple[int | None, int | None]]:
    """Asset -> (rows in, rows out). Rows in are the rows the asset reads (see README.md)."""
    out = {asset: meta.get("dagster/row_count") for asset, meta in metadata.items()}
    raw_read = metadata.get("raw_assignments", {}).get("rows_read")

    def total(*assets: str) -> int | None:
        values = [out.get(a) for a in assets]
        return None if any(v is None for v in values) else sum(values)

    rows_in = {
        "raw_assignments": raw_read,
        "deduped_assignments": out.get("raw_assignments"),
        # Each experiment's join scans the event log (less what its time span prunes).
        "window_events": events_rows,
        "variant_metrics": total("deduped_assignments", "post_assignment_events", "pre_assignment_events"),
        "experiment_report": out.get("variant_metrics"),
    }
    out["window_events"] = total("post_assignment_events", "pre_assignment_events")
    tables = {
        **{asset: (rows_in[asset], out.get(asset)) for asset in rows_in},
        # What the checks of each table read.
        **{name: (None, out.get(name)) for name in ("post_assignment_events", "pre_assignment_events")},
    }
    return tables


SUFFICIENT_COLUMNS = ["experiment_id", "variant_id", "metric", "n", "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy"]


def read_sufficient(warehouse) -> list[dict]:
    with warehouse.session() as session:
        frame = session.to_pandas(session.table("variant_metrics").select(*SUFFICIENT_COLUMNS))
    frame = frame.sort_values(SUFFICIENT_COLUMNS[:3])
    return [
        {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def warehouse_for(engine: str, scratch: str):
    if engine == "spark":
        from dagster_pyspark import LazyPySparkResource

        from exp_pipeline.settings import spark_config
        from exp_pipeline.warehouse.resources import SparkWarehouse

        return SparkWarehouse(
            pyspark=LazyPySparkResource(spark_config=spark_config()), location=f"{scratch}/spark/exp.db"
        )
    return DuckDBWarehouse(duckdb=DuckDBResource(database=f"{scratch}/warehouse.duckdb"))


def main() -> None:
    args, config = measure.worker_args(
        lambda parser: parser.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb")
    )
    experiments = [e["id"] for e in config["experiments"]]
    warehouse = warehouse_for(args.engine, args.scratch)
    resources = {"registry": RegistryResource(path=config["registry_path"]), "warehouse": warehouse}
    Path(args.scratch, "dagster").mkdir(parents=True, exist_ok=True)
    rss_after_imports = measure.current_rss_kib()
    runs, steps = [], []
    with measure.RssSampler(whole_tree=args.engine == "spark") as sampler, DagsterInstance.local_temp(f"{args.scratch}/dagster") as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, experiments)
        for experiment_id in experiments:
            t0 = time.perf_counter()
            result = materialize(
                [*ANALYSIS_ASSETS, *EXPERIMENT_CHECKS],
                partition_key=experiment_id,
                instance=instance,
                resources=resources,
                run_config=QUIET_LOGS,
                raise_on_error=False,
            )
            seconds = time.perf_counter() - t0
            runs.append({"experiment": experiment_id, "seconds": seconds, "success": result.success})
            rows = rows_of(materialized_metadata(result), config["events_rows"])
            for record in step_records(instance, result.run_id):
                asset, kind, table = STEP_OWNERS.get(record["step"], (record["step"], "other", None))
                rows_in, rows_out = rows.get(table, (None, None))
                steps.append({
                    "experiment": experiment_id,
                    "step": record["step"],
                    "asset": asset,
                    "kind": kind,
                    "seconds": record.get("seconds"),
                    "failed": record.get("failed", False),
                    # A check reads its asset's table: its rows in are the asset's rows out.
                    "rows_in": rows_out if kind == "check" else rows_in,
                    "rows_out": None if kind == "check" else rows_out,
                    "peak_rss_kib": sampler.peak_between(record.get("start", 0), record.get("end", 0)),
                })
    wall = sum(r["seconds"] for r in runs)
    tree_peak = {"sampled_tree_peak_kib": sampler.peak()} if args.engine == "spark" else {}
    measure.write_result(args.result, {
        "implementation": "pipeline" if args.engine == "duckdb" else f"pipeline_{args.engine}",
        **tree_peak,
        "import_seconds": IMPORT_SECONDS,
        "wall_seconds": wall,
        "rss_after_imports_kib": rss_after_imports,
        "runs": runs,
        "steps": steps,
        "asset_order": [a.op.name for a in ANALYSIS_ASSETS],
        "success": all(r["success"] for r in runs),
        # Read after the clock stopped: only for the comparison.
        "sufficient": read_sufficient(warehouse),
    })


if __name__ == "__main__":
    main()
