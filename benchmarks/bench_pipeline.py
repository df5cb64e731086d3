"""Benchmark worker (a): the pipeline, every experiment materialized through Dagster in process.

ONE run over every experiment's partition, as the daily schedule and the main command run it: the
analysis pass (one step), on a fresh warehouse and a fresh temporary Dagster instance. It records
the run's wall time, the step's (Dagster's STEP_SUCCESS duration), the pass's own stage times (the
`pass_stage_seconds` metadata) and the highest RSS sampled.

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
from exp_pipeline.defs.partitions import experiment_partitions, run_over  # noqa: E402
from exp_pipeline.defs.resources import RegistryResource  # noqa: E402
from exp_pipeline.warehouse.resources import DuckDBWarehouse  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started

# Dagster's DEBUG console log per event would be part of what is timed; warnings still show.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def step_seconds(instance: DagsterInstance, run_id: str) -> dict[str, float]:
    """Duration of every step of a run, from its event log."""
    return {
        entry.dagster_event.step_key: entry.dagster_event.event_specific_data.duration_ms / 1000
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None and entry.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
    }


def timed_run(instance, resources: dict, known: list[str], experiment_ids: list[str]):
    """ONE Dagster run of the analysis over these experiments (of the `known` partitions, in
    order), as the schedule launches it; (its result, wall seconds)."""
    tags, run_config = run_over(known, experiment_ids)
    t0 = time.perf_counter()
    result = materialize(
        ANALYSIS_ASSETS, instance=instance, resources=resources, tags=tags,
        run_config={**QUIET_LOGS, **run_config}, raise_on_error=False,
    )
    return result, time.perf_counter() - t0


def stage_seconds(result) -> dict[str, float]:
    """The pass's stages (the same on every experiment's variant_metrics)."""
    for event in result.get_asset_materialization_events():
        if event.asset_key.path[-1] == "variant_metrics":
            return dict(event.materialization.metadata["pass_stage_seconds"].value)
    return {}


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
    with measure.RssSampler(whole_tree=args.engine == "spark") as sampler, DagsterInstance.local_temp(f"{args.scratch}/dagster") as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, experiments)
        result, wall = timed_run(instance, resources, experiments, experiments)
        steps = step_seconds(instance, result.run_id)
    tree_peak = {"sampled_tree_peak_kib": sampler.peak()} if args.engine == "spark" else {}
    measure.write_result(args.result, {
        "implementation": "pipeline" if args.engine == "duckdb" else f"pipeline_{args.engine}",
        **tree_peak,
        "import_seconds": IMPORT_SECONDS,
        "wall_seconds": wall,
        "rss_after_imports_kib": rss_after_imports,
        "experiments": len(experiments),
        "step_seconds": steps,
        "stages": stage_seconds(result),
        "steps": [],
        "success": result.success,
        # Read after the clock stopped: only for the comparison.
        "sufficient": read_sufficient(warehouse),
    })


if __name__ == "__main__":
    main()
