"""`python -m exp_pipeline.cli run`: the main job on the bundled sample data, results printed.

It generates the sample data if missing, registers every experiment as a partition of the Dagster
instance (DAGSTER_HOME, so `dagster dev` shows the same runs), materializes the registry tables and
every experiment's partition in process, and prints one results table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from exp_pipeline.settings import PROJECT_ROOT, registry_path

SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"
DEFAULT_DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"


def _ensure_sample_data(users: int, seed: int) -> None:
    if (SAMPLE_DIR / "ground_truth.json").exists():
        return
    from exp_pipeline.sample_data import generate

    print(f"generating sample data for {users} users into {SAMPLE_DIR} ...", flush=True)
    generate(SAMPLE_DIR, n_users=users, seed=seed)


# Dagster's step-by-step DEBUG log drowns the results; warnings (failed checks) still show.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run(experiment_ids: list[str] | None, users: int, seed: int) -> int:
    os.environ.setdefault("DAGSTER_HOME", str(DEFAULT_DAGSTER_HOME))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    if registry_path() == str(PROJECT_ROOT / "data" / "registry.yaml"):
        _ensure_sample_data(users, seed)

    # Imported late so that DAGSTER_HOME is set before Dagster reads it.
    from dagster import DagsterInstance

    from exp_pipeline.definitions import defs
    from exp_pipeline.defs.partitions import experiment_partitions
    from exp_pipeline.registry import load_registry
    from exp_pipeline.reports import results_text
    from exp_pipeline.warehouse.resources import Warehouse

    registry = load_registry(registry_path())
    wanted = experiment_ids or [e.id for e in registry.experiments]
    for experiment_id in wanted:
        registry.experiment(experiment_id)  # fails early, naming an unknown experiment

    with DagsterInstance.get() as instance:
        known = set(instance.get_dynamic_partitions(experiment_partitions.name))
        new = [e for e in wanted if e not in known]
        if new:
            instance.add_dynamic_partitions(experiment_partitions.name, new)
        failed = []
        failed_checks = []
        if not defs.resolve_job_def("refresh_registry").execute_in_process(
            instance=instance, raise_on_error=False, run_config=QUIET_LOGS
        ).success:
            failed.append("refresh_registry")
        job = defs.resolve_job_def("analyze_experiment")
        for experiment_id in wanted:
            print(f"analysing {experiment_id} ...", flush=True)
            result = job.execute_in_process(
                partition_key=experiment_id, instance=instance, raise_on_error=False, run_config=QUIET_LOGS
            )
            if not result.success:
                failed.append(experiment_id)
            failed_checks += [
                (experiment_id, f"{e.asset_key.to_user_string()}.{e.check_name}", e.severity.value, e.description)
                for e in result.get_asset_check_evaluations()
                if not e.passed
            ]

    # Results of a failed (or blocked) run would be the previous run's: they are not shown as fresh.
    fresh = [e for e in wanted if e not in failed]
    warehouse: Warehouse = defs.resources["warehouse"]
    with warehouse.session() as session:
        table = session.table("variant_metrics") if session.has_table("variant_metrics") else None
        frame = None if table is None or not fresh else session.to_pandas(
            table.filter(table.experiment_id.isin(fresh)).order_by("experiment_id", "metric", "variant_id")
        )
    print()
    if frame is not None and len(frame):
        print(results_text(frame))
    stale = [e for e in wanted if e in failed]
    if stale:
        print(f"\nNo fresh results for {', '.join(stale)}: the run failed or a blocking check stopped it "
              "(earlier results, if any, stay in the warehouse).")
    if failed_checks:
        print("\nFailed checks:")
        for experiment_id, check_name, severity, description in failed_checks:
            print(f"  {severity:5} {experiment_id}: {check_name}: {description}")
    else:
        print("\nAll checks passed.")
    print(f"\nwarehouse: {warehouse.describe()}")
    if failed:
        print(f"FAILED: {', '.join(failed)}; see the run logs in the Dagster UI", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exp_pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="materialize the pipeline and print results")
    run_parser.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    run_parser.add_argument("--users", type=int, default=100_000, help="sample size if generating")
    run_parser.add_argument("--seed", type=int, default=20261123, help="sample seed if generating")
    args = parser.parse_args(argv)
    from exp_pipeline.registry import RegistryError

    try:
        return run(args.experiment, args.users, args.seed)
    except (RegistryError, KeyError) as exc:
        # A clear message, not a stack trace: what is wrong and where to fix it.
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
