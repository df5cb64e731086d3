"""`python -m exp_pipeline.cli run`: the main job on the bundled sample data, results printed.

It generates the sample data if missing, registers every experiment as a partition of the Dagster
instance (DAGSTER_HOME, so `dagster dev` shows the same runs), materializes the registry tables and
every experiment's partition in process, and prints one results table.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from exp_pipeline.settings import PROJECT_ROOT, dagster_home, registry_path

SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"


def _ensure_sample_data(users: int, seed: int) -> None:
    if (SAMPLE_DIR / "ground_truth.json").exists():
        return
    from exp_pipeline.sample_data import generate

    print(f"generating sample data for {users} users into {SAMPLE_DIR} ...", flush=True)
    generate(SAMPLE_DIR, n_users=users, seed=seed)


# Dagster's console log would print every failure with its stack trace (a wrong column mapping
# four times over); the summary names each failed step, check and cause once, and the full log
# is in the Dagster UI.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class RunOutcome:
    """What one run of the main command did, for the summary."""

    name: str
    success: bool
    errors: list[str] = field(default_factory=list)  # "step: first line of the error"
    skipped: list[str] = field(default_factory=list)  # steps not run (a blocking check failed upstream)
    failed_checks: list[tuple[str, str, str]] = field(default_factory=list)  # (check, severity, description)


def _outcome(name: str, result) -> RunOutcome:
    """A run of one job (no partitions): its failed and skipped steps, its failed checks."""
    outcome = RunOutcome(name=name, success=result.success)
    for event in result.all_events:
        if event.is_step_failure:
            outcome.errors.append(f"{event.step_key}: {_root_cause(event.step_failure_data.error)}")
        elif event.is_step_skipped:
            outcome.skipped.append(event.step_key)
    outcome.failed_checks = [
        (f"{e.asset_key.to_user_string()}.{e.check_name}", e.severity.value, e.description)
        for e in result.get_asset_check_evaluations()
        if not e.passed
    ]
    return outcome


def _experiment_outcomes(result, experiment_ids: list[str]) -> list[RunOutcome]:
    """One analysis run over several experiments, per experiment: analysed when its variant_metrics
    were written; a blocking check of its own can stop one experiment and not the others."""
    from exp_pipeline.analysis import PASS_ASSETS
    from exp_pipeline.checks import METRICS

    run = _outcome("analysis", result)
    written: dict[str, set[str]] = {}
    if run.errors:
        # The step failed: every experiment of the run failed with it (one error, said once).
        return [run, *(RunOutcome(name=e, success=False) for e in experiment_ids)]
    for event in result.all_events:
        if event.is_step_materialization:
            materialization = event.event_specific_data.materialization
            written.setdefault(materialization.partition, set()).add(materialization.asset_key.to_user_string())
    outcomes = []
    for experiment_id in experiment_ids:
        done = written.get(experiment_id, set())
        outcome = RunOutcome(name=experiment_id, success=result.success and METRICS in done)
        if result.success and METRICS not in done:
            outcome.errors.append("stopped by its blocking check (see Failed checks); earlier results stay")
            outcome.skipped = [a for a in PASS_ASSETS if a not in done]
        outcome.failed_checks = [
            (f"{e.asset_key.to_user_string()}.{e.check_name}", e.severity.value, e.description)
            for e in result.get_asset_check_evaluations()
            if not e.passed and e.partition == experiment_id
        ]
        outcomes.append(outcome)
    return outcomes


# Our own errors already say what is wrong and where: their class name adds nothing.
_PLAIN_ERRORS = ("ValueError: ", "SourceError: ", "exp_pipeline.warehouse.interface.SchemaChangeError: ", "RegistryError: ", "WarehouseBusy: ", "LookupError: ")


def _root_cause(error) -> str:
    """The first line of the innermost cause: Dagster wraps the real error in its own."""
    while error.cause is not None:
        error = error.cause
    if error.cls_name == "DagsterAssetCheckFailedError":
        # An asset's own blocking check failed: the check (listed below) says why.
        return "stopped by its blocking check (see Failed checks)"
    lines = error.message.strip().splitlines() or [error.cls_name or "failed"]
    first = lines[0]
    for prefix in _PLAIN_ERRORS:
        first = first.removeprefix(prefix)
    return first


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def run(experiment_ids: list[str] | None, users: int, seed: int) -> int:
    # The registry's own instance unless DAGSTER_HOME names one (set before Dagster reads it).
    os.environ["DAGSTER_HOME"] = dagster_home()
    home = Path(os.environ["DAGSTER_HOME"])
    if registry_path() == str(PROJECT_ROOT / "data" / "registry.yaml"):
        _ensure_sample_data(users, seed)

    # Imported late so that DAGSTER_HOME is set before Dagster reads it.
    from dagster import DagsterInstance

    from exp_pipeline.definitions import defs
    from exp_pipeline.defs.instance import ensure_instance_config, instance_lock, prepare_instance, run_tags
    from exp_pipeline.defs.partitions import experiment_partitions, run_over
    from exp_pipeline.registry import load_registry
    from exp_pipeline.reports import results_text
    from exp_pipeline.warehouse.resources import Warehouse

    registry = load_registry(registry_path())
    wanted = _unique(experiment_ids or [e.id for e in registry.experiments])
    for experiment_id in wanted:
        registry.experiment(experiment_id)  # fails early, naming an unknown experiment
    warehouse: Warehouse = defs.resources["warehouse"]
    _open_or_explain(warehouse, registry)

    with instance_lock(home):
        ensure_instance_config(home)
        instance = DagsterInstance.get()
        released = prepare_instance(instance, wanted)
    for run_id in released:
        print(f"run {run_id} belonged to a process that died: marked failed, its pool slot freed", flush=True)
    tags = run_tags()
    outcomes: list[RunOutcome] = []
    with instance:
        result = defs.resolve_job_def("refresh_registry").execute_in_process(
            instance=instance, raise_on_error=False, run_config=QUIET_LOGS, tags=tags
        )
        outcomes.append(_outcome("refresh_registry", result))
        # Every experiment in one run: one pass over the logs for all of them.
        print(f"analysing {', '.join(wanted)} ...", flush=True)
        range_tags, run_config = run_over(instance.get_dynamic_partitions(experiment_partitions.name), wanted)
        result = defs.resolve_job_def("analyze_experiment").execute_in_process(
            instance=instance, raise_on_error=False, run_config={**QUIET_LOGS, **run_config},
            tags={**tags, **range_tags},
        )
        outcomes += _experiment_outcomes(result, wanted)

    failed = [o.name for o in outcomes if not o.success and o.name != "analysis"]
    # Results of a failed (or blocked) run would be the previous run's: they are not shown as fresh.
    fresh = [e for e in wanted if e not in failed]
    frame, differs, set_aside = _fresh_results(warehouse, fresh)
    print()
    if frame is not None and len(frame):
        print(results_text(frame))
    if differs:
        print("\nLifts that differ by segment (segment_heterogeneity, segment_metrics):")
        for line in differs:
            print(f"  {line}")
    if set_aside:
        print("\nRows set aside (kept with their reason in rejected_rows / rejected_source_rows):")
        for line in set_aside:
            print(f"  {line}")
    _print_summary(outcomes, wanted)
    print(f"\nwarehouse: {warehouse.describe()}")
    if failed:
        # The last line says why: the first root error (the others are listed above).
        errors = [error for o in outcomes for error in o.errors]
        cause = f": {errors[0]}" if errors else ""
        print(f"FAILED: {', '.join(failed)}{cause}; see the run logs in the Dagster UI", file=sys.stderr)
        return 1
    return 0


class WarehouseUnusable(RuntimeError):
    """The warehouse cannot be opened at all (a directory, a file that is not a database)."""


def _open_or_explain(warehouse, registry) -> None:
    """Before any run: open the warehouse (a path that is no database is one message, not a failed
    step per asset) and run the preflight (sources, column mappings, stored column types), so
    that a problem is said once and no run starts."""
    from exp_pipeline.preflight import PreflightError, preflight
    from exp_pipeline.warehouse.duckdb_engine import WarehouseBusy

    try:
        with warehouse.session() as session:
            problems = preflight(session, registry, registry_path())
    except WarehouseBusy:
        raise  # its own message says who holds it
    except Exception as exc:  # the engines' error types vary (duckdb.IOException, Spark's)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WarehouseUnusable(
            f"the warehouse {warehouse.describe()} cannot be opened ({reason}); point EXP_PIPELINE_DUCKDB "
            "at a DuckDB file (it is created if missing) or move the file that is in the way"
        ) from None
    if problems:
        raise PreflightError(problems)


def _fresh_results(warehouse, experiment_ids: list[str]) -> tuple:
    """The fresh experiments' results, the lifts that differ by segment, and the rows set aside
    (theirs and the logs' as a whole)."""
    import ibis

    from exp_pipeline.reports import differs_lines, set_aside_lines

    frame, parts, differs = None, [], []
    with warehouse.session() as session:
        if experiment_ids and session.has_table("variant_metrics"):
            table = session.table("variant_metrics")
            frame = session.to_pandas(
                table.filter(table.experiment_id.isin(experiment_ids)).order_by("experiment_id", "metric", "variant_id")
            )
        if experiment_ids and session.has_table("segment_heterogeneity"):
            tests = session.table("segment_heterogeneity")
            tests = session.to_pandas(tests.filter(tests.experiment_id.isin(experiment_ids)).order_by("experiment_id", "property"))
            differs = [f"{e}: {line}" for e, group in tests.groupby("experiment_id", sort=False) for line in differs_lines(group)]
        if experiment_ids and session.has_table("rejected_rows"):
            rejected = session.table("rejected_rows")
            rejected = rejected.filter(rejected.experiment_id.isin(experiment_ids))
            parts.append(rejected.group_by(where=rejected.experiment_id, source=rejected.source, reason=rejected.reason)
                         .aggregate(rows=rejected.count()))
        if session.has_table("rejected_source_rows"):
            whole = session.table("rejected_source_rows")
            parts.append(whole.group_by(where=ibis.literal(""), source=whole.source, reason=whole.reason)
                         .aggregate(rows=whole.count()))
        by_reason = session.to_pandas(ibis.union(*parts, distinct=False)) if parts else None
    return frame, differs, set_aside_lines(by_reason) if by_reason is not None and len(by_reason) else []


def _print_summary(outcomes: list[RunOutcome], wanted: list[str]) -> None:
    """The truth about the runs: failures and blocked steps first, then failed checks."""
    stale = [o.name for o in outcomes if not o.success and o.name in wanted]
    if stale:
        print(f"\nNo fresh results for {', '.join(stale)}: the run failed or a blocking check stopped it "
              "(earlier results, if any, stay in the warehouse).")
    errors = [(o.name, error) for o in outcomes for error in o.errors]
    if errors:
        print("\nFailed steps:")
        for name, error in errors:
            print(f"  {name}: {error}")
    blocked = [(o.name, o.skipped) for o in outcomes if o.skipped]
    if blocked:
        print("\nNot written (upstream failed or a blocking check failed):")
        for name, steps in blocked:
            print(f"  {name}: {', '.join(steps)}")
    failed_checks = [(o.name, *check) for o in outcomes for check in o.failed_checks]
    if failed_checks:
        print("\nFailed checks:")
        for name, check_name, severity, description in failed_checks:
            print(f"  {severity:5} {name}: {check_name}: {description}")
    elif all(o.success for o in outcomes):
        print("\nAll checks passed.")
    else:
        print("\nNo check failed, but not every run succeeded (above).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exp_pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="materialize the pipeline and print results")
    run_parser.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    run_parser.add_argument("--users", type=int, default=100_000, help="sample size if generating")
    run_parser.add_argument("--seed", type=int, default=20261123, help="sample seed if generating")
    args = parser.parse_args(argv)
    from exp_pipeline.preflight import PreflightError
    from exp_pipeline.registry import RegistryError
    from exp_pipeline.warehouse.duckdb_engine import WarehouseBusy

    try:
        return run(args.experiment, args.users, args.seed)
    except PreflightError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print("nothing was run; fix the registry (or the warehouse) and run again", file=sys.stderr)
        return 2
    except (RegistryError, KeyError, WarehouseUnusable, WarehouseBusy) as exc:
        # A clear message, not a stack trace: what is wrong and where to fix it.
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
