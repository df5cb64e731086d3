"""Benchmark worker (c): the daily refresh (one new day) against a full recomputation of the same data.

The logs are cut at a day: the first DAYS days since the running experiment's start are processed
(a run, not timed as the refresh), then the files of the next day are added, and

  refresh   the daily schedule's run the morning after, on that warehouse: one run over every
            experiment whose analysis window is open then
  full      the same run on a fresh warehouse with the same files: everything computed from nothing

are each timed as one Dagster run. Both must give the same variant_metrics, bit for bit.

Started by run_benchmark.py: `bench_incremental.py --config CONFIG --scratch DIR --result FILE`.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import time
from pathlib import Path

import measure

started = time.perf_counter()
from bench_pipeline import read_sufficient, stage_seconds, timed_run, warehouse_for  # noqa: E402
from dagster import DagsterInstance  # noqa: E402

from exp_pipeline.defs.automation import experiments_to_refresh  # noqa: E402
from exp_pipeline.defs.partitions import experiment_partitions  # noqa: E402
from exp_pipeline.defs.resources import RegistryResource  # noqa: E402
from exp_pipeline.registry import load_registry  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started
EXPERIMENT_START = dt.date(2026, 10, 1)  # of aa_homepage, the sample's running experiment (no end date)
DAYS = 28  # already processed when the refresh runs; it refreshes day DAYS + 1


def link_logs_until(source_root: Path, target_root: Path, last_day: dt.date) -> None:
    """Link the generated daily files up to `last_day` into target_root/sample/{kind}/.

    Hard links: a symlink would resolve outside the scratch registry's data root, which the
    pipeline refuses to read (a copy where the two are on different file systems).
    """
    for kind in ("assignments", "events"):
        folder = target_root / "sample" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((source_root / "sample" / kind).glob("*.parquet")):
            day = dt.date.fromisoformat(path.stem.rsplit("_", 1)[-1])
            link = folder / path.name
            if day <= last_day and not link.exists():
                try:
                    link.hardlink_to(path)
                except OSError:
                    shutil.copyfile(path, link)


def run(instance, root: Path, known: list[str], experiment_ids: list[str]) -> dict:
    """One Dagster run of these experiments on the registry and warehouse in `root`."""
    resources = {
        "registry": RegistryResource(path=str(root / "registry.yaml")),
        "warehouse": warehouse_for("duckdb", str(root)),
    }
    result, seconds = timed_run(instance, resources, known, experiment_ids)
    return {"seconds": seconds, "success": result.success, "steps": stage_seconds(result), "modes": refresh_modes(result)}


def refresh_modes(result) -> dict[str, str]:
    """Per experiment: how the run computed it ("incremental" or "full"), from its metadata."""
    return {
        event.partition: event.materialization.metadata["refresh"].value
        for event in result.get_asset_materialization_events()
        if event.asset_key.path[-1] == "post_assignment_events" and "refresh" in event.materialization.metadata
    }


def max_relative_difference(a: list[dict], b: list[dict]) -> float:
    """Largest relative difference of any statistic; inf when the rows or counts differ."""
    key = ("experiment_id", "variant_id", "metric")
    left, right = ({tuple(r[k] for k in key): r for r in rows} for rows in (a, b))
    if left.keys() != right.keys():
        return math.inf
    worst = 0.0
    for k, row in left.items():
        other = right[k]
        if row["n"] != other["n"]:
            return math.inf
        for column in ("sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy"):
            x, y = float(row[column]), float(other[column])
            if x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def main() -> None:
    args, config = measure.worker_args()
    data_root = Path(config["registry_path"]).parent
    scratch = Path(args.scratch)
    refreshed_day = EXPERIMENT_START + dt.timedelta(days=DAYS)

    incremental_root, full_root = scratch / "incremental", scratch / "full"
    for root in (incremental_root, full_root):
        root.mkdir(parents=True)
        (root / "registry.yaml").write_text((data_root / "registry.yaml").read_text())
    link_logs_until(data_root, incremental_root, refreshed_day - dt.timedelta(days=1))

    registry = load_registry(data_root / "registry.yaml")
    known = [e.id for e in registry.experiments]
    morning = dt.datetime.combine(refreshed_day + dt.timedelta(days=1), dt.time(6), dt.UTC)
    due = experiments_to_refresh(registry, set(known), morning)
    (scratch / "dagster").mkdir()
    with DagsterInstance.local_temp(str(scratch / "dagster")) as instance:
        instance.add_dynamic_partitions(experiment_partitions.name, known)
        initial = run(instance, incremental_root, known, due)
        link_logs_until(data_root, incremental_root, refreshed_day)
        refresh = run(instance, incremental_root, known, due)
        link_logs_until(data_root, full_root, refreshed_day)
        full = run(instance, full_root, known, due)

    refreshed = read_sufficient(warehouse_for("duckdb", str(incremental_root)))
    recomputed = read_sufficient(warehouse_for("duckdb", str(full_root)))
    measure.write_result(args.result, {
        "implementation": "incremental",
        "import_seconds": IMPORT_SECONDS,
        "experiments": due,
        "days_processed": DAYS,
        "refreshed_day": refreshed_day.isoformat(),
        "initial": initial,
        "refresh": refresh,
        "full": full,
        "wall_seconds": refresh["seconds"],
        "rss_after_imports_kib": None,
        "success": initial["success"] and refresh["success"] and full["success"],
        "identical_variant_metrics": refreshed == recomputed,
        "max_relative_difference": max_relative_difference(refreshed, recomputed),
        "steps": [],
    })


if __name__ == "__main__":
    main()
