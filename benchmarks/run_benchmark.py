"""Benchmark the pipeline against a hand-written DuckDB reference and a plain pandas implementation.

    .venv/bin/python benchmarks/run_benchmark.py --size 50M [--runs 3] [--out FILE.md] [--skip-pandas]
    .venv/bin/python benchmarks/run_benchmark.py --users N [--activity-scale A] ...

Generates the sample data for N users with the project's generator (once: it is reused from the
work folder), then, --runs times, runs each implementation in a fresh process of its own so that the
process's peak memory is the implementation's:

  pipeline   every experiment materialized through Dagster in process (bench_pipeline.py)
  pipeline_spark  the same on the Spark engine in local mode (--engine spark; only with --spark)
  one_pass   the hand-written one-pass DuckDB script, one_pass.sql: the headline reference
             (bench_reference.py --mode one_pass)
  one_pass_keep_duplicates  the same script without its DISTINCT over the event log: the cost of
             the exact-duplicate rule (correct only on logs without repeated rows, as the sample)
  table_design  reference.sql, writing the old table design's event tables (--mode table_design)
  pandas     the same in plain pandas (bench_pandas.py), skipped above --pandas-max-events

It checks that every other implementation gives the pipeline's sufficient statistics (n exactly, sums
to 1e-9 relative), prints per-asset times, rows and memory, medians over the runs and the ratios as
markdown, and writes the same to --out. See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

DEFAULT_SEED = 20261123
# pandas holds the temporal join in memory: about 0.75 GB per million events (1.96 GB peak at 2.65
# million). Above this it would not fit the 24 GB machine.
DEFAULT_PANDAS_MAX_EVENTS = 15_000_000
WORKER_TIMEOUT_SECONDS = 3600
IMPLEMENTATIONS = ("pipeline", "pipeline_spark", "one_pass", "one_pass_keep_duplicates", "table_design", "pandas")
# Implementation -> worker script and its extra arguments.
WORKERS = {
    "pipeline": ("bench_pipeline.py", []),
    "pipeline_spark": ("bench_pipeline.py", ["--engine", "spark"]),
    "one_pass": ("bench_reference.py", ["--mode", "one_pass"]),
    "one_pass_keep_duplicates": ("bench_reference.py", ["--mode", "one_pass_keep_duplicates"]),
    "table_design": ("bench_reference.py", ["--mode", "table_design"]),
    "pandas": ("bench_pandas.py", []),
    "incremental": ("bench_incremental.py", []),
}
SUFFICIENT = ("n", "sum_y", "sum_y2", "sum_x", "sum_x2", "sum_xy")
KEY = ("experiment_id", "variant_id", "metric")
REL_TOLERANCE = 1e-9
MAX_MISMATCH_LINES = 20  # per implementation and run: enough to see the pattern
# Named sizes (users, activity scale) over the five experiments of prepare.py: 2 million exposure
# rows, and about 50 or 200 million events.
SIZES = {"50M": (205_000, 9.2), "200M": (205_000, 36.8)}
VERSIONED_PACKAGES = ("duckdb", "ibis-framework", "dagster", "pandas", "pyarrow", "numpy")


# -- data and configuration --------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """The environment of the processes started here: the checkout being benchmarked comes first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}


def prepare(users: int, activity_scale: float, seed: int, work_root: Path, experiments: int) -> tuple[Path, dict]:
    """Run prepare.py (data generated once, configuration from the registry); its folder and data.json."""
    completed = subprocess.run(
        [sys.executable, str(BENCH_DIR / "prepare.py"), "--users", str(users), "--activity-scale",
         str(activity_scale), "--seed", str(seed), "--work-dir", str(work_root), "--experiments", str(experiments)],
        cwd=PROJECT_ROOT, env=worker_env(), check=True, stdout=subprocess.PIPE, text=True,
    )
    lines = completed.stdout.splitlines()
    for line in lines[:-1]:
        print(line, file=sys.stderr)
    data_dir = Path(lines[-1])
    return data_dir, json.loads((data_dir / "data.json").read_text())


# -- running the workers -----------------------------------------------------------------------


def run_worker(name: str, config_path: Path, work_dir: Path, run: int) -> dict:
    """Run one implementation in a fresh process; its result file, or a failure with the log's tail."""
    scratch = work_dir / "scratch" / f"{name}-run{run}"
    log = work_dir / "logs" / f"{name}-run{run}.log"
    result_path = work_dir / "logs" / f"{name}-run{run}.json"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    script, extra = WORKERS[name]
    command = [
        sys.executable, str(BENCH_DIR / script), *extra,
        "--config", str(config_path), "--scratch", str(scratch), "--result", str(result_path),
    ]
    t0 = time.perf_counter()
    with log.open("w") as out:
        completed = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=worker_env(),
            timeout=WORKER_TIMEOUT_SECONDS, check=False,
        )
    process_seconds = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)  # warehouse files and Dagster state: not needed after
    if completed.returncode != 0 or not result_path.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        return {"implementation": name, "success": False, "error": f"exit {completed.returncode}; {log}:\n{tail}"}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = process_seconds
    return result


# -- comparing ---------------------------------------------------------------------------------


def _close(a: float, b: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REL_TOLERANCE * max(abs(a), abs(b))


def compare(expected: Sequence[dict], actual: Sequence[dict]) -> list[str]:
    """Differences of `actual` from the pipeline's sufficient statistics (`expected`).

    A row missing on one side counts as n = 0 and zero sums (the pipeline writes such rows for an
    empty arm; a GROUP BY has none).
    """
    empty = {c: 0 for c in SUFFICIENT}
    want = {tuple(r[k] for k in KEY): r for r in expected}
    got = {tuple(r[k] for k in KEY): r for r in actual}
    problems = []
    for key in sorted(set(want) | set(got)):
        w, g = want.get(key, empty), got.get(key, empty)
        if int(w["n"]) != int(g["n"]):
            problems.append(f"{'/'.join(key)}: n {g['n']} != pipeline {w['n']}")
        for column in SUFFICIENT[1:]:
            if not _close(float(w[column]), float(g[column])):
                problems.append(f"{'/'.join(key)}: {column} {g[column]!r} != pipeline {w[column]!r}")
    return problems


# -- summarizing -------------------------------------------------------------------------------


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def rate(rows: int | None, seconds: float | None) -> str:
    return "-" if not rows or not seconds else f"{rows / seconds:,.0f}"


def median_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table; `align` has one character per column: l or r."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": total_kib / 1024 / 1024,
        "os": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def render(report: dict) -> str:
    """The whole report as markdown (also what is printed)."""
    results: dict[str, list[dict]] = report["results"]
    data = report["data"]
    source_rows = data["assignment_rows"] + data["event_rows"]
    out = [
        f"# exp_pipeline benchmark: {data['users']:,} users, {report['runs']} run(s)",
        "",
        f"{report['date']}. Command: `{report['command']}`",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {report['machine']['cpu']}, {report['machine']['cores']} cores; memory "
        f"{report['machine']['memory_gib']:.1f} GiB; {report['machine']['os']}",
        "- load average before the benchmark started (1 / 5 / 15 min): "
        + " / ".join(f"{x:.2f}" for x in report["load"])
        + " (other work on the machine; well above 0 means shared cores and pessimistic times)",
        "- " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "## Data",
        "",
        f"`exp_pipeline.sample_data.generate(n_users={data['users']}, activity_scale={data.get('activity_scale', 1.0):g}, seed={data['seed']})` in `{data['dir']}`"
        + (f" (generated in {data['generate_seconds']:.1f} s)" if data["generate_seconds"] else " (reused)")
        + ":",
        f"{data['assignment_rows']:,} exposure rows in {data['assignment_files']} files, "
        f"{data['event_rows']:,} event rows in {data['event_files']} files, "
        f"{len(data['experiments'])} experiments ({', '.join(data['experiments'])}).",
        "",
    ]

    succeeded = {name: [r for r in runs if r.get("success")] for name, runs in results.items()}
    totals = {name: median_of([r["wall_seconds"] for r in runs]) for name, runs in succeeded.items()}
    out += ["## Summary (medians over the runs)", ""]
    summary_rows = []
    for name, runs in results.items():
        ok = succeeded[name]
        summary_rows.append([
            name,
            num(totals[name]),
            num(median_of([r["process_seconds"] for r in ok])),
            ", ".join(num(r["wall_seconds"]) if r.get("success") else "FAILED" for r in runs),
            count(source_rows),
            rate(source_rows, totals[name]),
            mib(median_of([r["peak_rss_kib"] for r in ok])),
            mib(median_of([r["vm_hwm_kib"] for r in ok])),
            mib(median_of([r["rss_after_imports_kib"] for r in ok])),
            num(median_of([r["import_seconds"] for r in ok])),
            report["verdicts"].get(name, "-"),
        ])
    out.append(table(
        ["implementation", "wall s", "process s", "per run s", "rows in", "rows/s", "peak RSS MiB",
         "VmHWM MiB", "RSS after imports MiB", "imports s", "sufficient statistics"],
        summary_rows, "lrrrrrrrrrl",
    ))
    # (numerator, denominator, what the comparison means): a line for each pair that ran.
    ratios = [
        ("pipeline", "one_pass", "one_pass: the hand-written one-pass script, the headline reference"),
        ("pipeline", "one_pass_keep_duplicates",
         "the same script without the exact-duplicate rule's DISTINCT over the event log"),
        ("pipeline", "table_design",
         "table_design: reference.sql, which writes every matched event to post/pre tables as the "
         "pipeline's old design did"),
        ("pipeline_spark", "pipeline",
         "the same pipeline on Spark in local mode, local[2] on this machine: Spark's per-query and "
         "JVM overheads with none of a cluster's parallelism; memory is Python driver + JVM"),
        ("pandas", "pipeline", None),
    ]
    ratio_lines = [
        f"- {top} / {bottom}: **{totals[top] / totals[bottom]:.2f}x** wall time" + (f" ({why})" if why else "")
        for top, bottom, why in ratios
        if totals.get(top) and totals.get(bottom)
    ]
    peaks = {name: median_of([r["peak_rss_kib"] for r in runs]) for name, runs in succeeded.items()}
    if peaks.get("pipeline") and peaks.get("one_pass"):
        ratio_lines.append(f"- peak memory pipeline / one_pass: **{peaks['pipeline'] / peaks['one_pass']:.2f}x**")
    ratio_lines.append(
        f"- peak RSS is ru_maxrss (self and children) of the worker process; the process that started "
        f"the workers peaked at {mib(report['launcher_peak_kib'])} MiB, a floor under every ru_maxrss "
        "(Linux carries it over exec). VmHWM, the worker image's own high-water mark, cross-checks it."
    )
    out += ["", *ratio_lines, ""]

    pipeline_runs = succeeded.get("pipeline", [])
    if pipeline_runs:
        out += pipeline_sections(pipeline_runs, source_rows, totals["pipeline"], peaks["pipeline"])
    pandas_runs = succeeded.get("pandas", [])
    if pandas_runs:
        out += ["## pandas: where its time goes (median seconds)", ""]
        phases = [s["step"] for s in pandas_runs[0]["steps"]]
        out.append(table(
            ["phase", "s", "peak RSS so far MiB"],
            [[p, num(median_of([next(s["seconds"] for s in r["steps"] if s["step"] == p) for r in pandas_runs])),
              mib(median_of([next(s["peak_rss_kib"] for s in r["steps"] if s["step"] == p) for r in pandas_runs]))]
             for p in phases],
            "lrr",
        ))
        out.append("")

    refreshes = [r for r in report.get("incremental", []) if r.get("success")]
    if refreshes:
        out += incremental_section(refreshes)

    out += ["## Correctness", ""]
    out += [f"- {line}" for line in report["correctness"]] or ["- nothing compared"]
    out.append("")
    return "\n".join(out)


def incremental_section(runs: list[dict]) -> list[str]:
    first = runs[0]
    out = [
        f"## Daily refresh ({first['days_processed']} days processed, then {first['refreshed_day']} added; "
        f"{len(first['experiments'])} experiments due: {', '.join(first['experiments'])})",
        "",
        "One Dagster run each, as the daily schedule runs it: the refresh on the warehouse that holds "
        "the first days, the full computation on a fresh one with the same files.",
        "",
    ]
    refresh = median_of([r["refresh"]["seconds"] for r in runs])
    full = median_of([r["full"]["seconds"] for r in runs])
    rows = [["whole run", num(refresh), num(full), f"**{refresh / full:.2f}**" if refresh and full else "-",
             ", ".join(num(r["refresh"]["seconds"]) for r in runs), ", ".join(num(r["full"]["seconds"]) for r in runs)]]
    for stage in first["refresh"]["steps"]:
        r = median_of([x["refresh"]["steps"].get(stage) for x in runs])
        f = median_of([x["full"]["steps"].get(stage) for x in runs])
        rows.append([stage, num(r), num(f), f"{r / f:.2f}" if r and f else "-", "", ""])
    out.append(table(["what", "refresh s", "full s", "refresh / full", "refresh per run", "full per run"],
                     rows, "lrrrll"))
    modes = sorted({f"{e}: {m}" for r in runs for e, m in r["refresh"].get("modes", {}).items()})
    out += ["", "- how the refresh computed each experiment: " + (", ".join(modes) or "not recorded")]
    identical = all(r["identical_variant_metrics"] for r in runs)
    worst = max(r["max_relative_difference"] for r in runs)
    out += [
        "",
        "- variant_metrics of the refresh and of the full computation: "
        + ("bit-identical in every run" if identical else
           f"same rows and n; sums differ by at most {worst:.1e} relative"),
        "",
    ]
    return out


def pipeline_sections(runs: list[dict], source_rows: int, total: float, peak: float) -> list[str]:
    """Where the pipeline's run goes: the pass's stages, Dagster's step and run around them."""
    out = [f"## Pipeline: one run, one pass, {runs[0]['experiments']} experiments (medians over the runs)", ""]
    stages = list(runs[0]["stages"])
    rows = []
    for stage in stages:
        seconds = median_of([r["stages"].get(stage) for r in runs])
        rows.append([stage, num(seconds), f"{100 * seconds / total:.0f}%"])
    in_stages = median_of([sum(r["stages"].values()) for r in runs])
    step = median_of([sum(r["step_seconds"].values()) for r in runs])
    rows.append(["the step outside the pass (Dagster events, metadata, reports)", num(step - in_stages),
                 f"{100 * (step - in_stages) / total:.0f}%"])
    rows.append(["the run outside the step (run setup, event log)", num(total - step), f"{100 * (total - step) / total:.0f}%"])
    rows.append(["**total**", f"**{num(total)}**", "100%"])
    out.append(table(["stage", "wall s", "share"], rows, "lrr"))
    out += ["", f"- rows in: {count(source_rows)} ({rate(source_rows, total)} rows/s); process peak RSS "
            f"{mib(peak)} MiB", ""]
    return out


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run_benchmark.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), help="a named size: " + "; ".join(
        f"{name} = --users {u} --activity-scale {a:g}" for name, (u, a) in SIZES.items()))
    parser.add_argument("--users", type=int, help="population size of the generated sample")
    parser.add_argument("--activity-scale", type=float, default=1.0,
                        help="multiplies every user's event rate (events per assignment row)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each implementation (medians are reported)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--skip", action="append", default=[], choices=["one_pass_keep_duplicates", "table_design", "pandas", "incremental"],
                        help="do not run this part (repeatable)")
    parser.add_argument("--pandas-max-events", type=int, default=DEFAULT_PANDAS_MAX_EVENTS,
                        help="skip pandas above this many events (default %(default)s)")
    parser.add_argument("--spark", action="store_true",
                        help="also run the pipeline on Spark in local mode (local[2], this machine): slow, off by default")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    parser.add_argument("--experiments", type=int, default=5,
                        help="experiments sharing the same traffic: 5 (the sample's four and a fifth) or more, "
                             "copies of the five's shapes, each enrolling 5/N of the five's share")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "exp_pipeline_benchmark",
                        help="where the data is generated and kept between invocations (default %(default)s)")
    args = parser.parse_args(argv)
    if args.size:
        args.users, args.activity_scale = SIZES[args.size]
    if args.users is None:
        parser.error("give --size or --users")
    if args.users < 1 or args.runs < 1 or args.activity_scale <= 0 or args.experiments < 1:
        parser.error("--users, --runs, --activity-scale and --experiments must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()  # before anything of ours runs: other work on the machine
    data_dir, data = prepare(args.users, args.activity_scale, args.seed, args.work_dir, args.experiments)
    config_path = data_dir / "bench_config.json"

    implementations = [name for name in IMPLEMENTATIONS if name not in args.skip]
    if not args.spark:
        implementations.remove("pipeline_spark")
    skipped_pandas = "pandas" in args.skip or data["event_rows"] > args.pandas_max_events
    if skipped_pandas and "pandas" in implementations:
        implementations.remove("pandas")
    incremental_runs: list[dict] = []
    results: dict[str, list[dict]] = {name: [] for name in implementations}
    correctness: list[str] = []
    mismatched: set[str] = set()
    compared: set[str] = set()
    for run in range(1, args.runs + 1):
        for name in implementations:
            result = run_worker(name, config_path, data_dir, run)
            results[name].append(result)
            if not result.get("success"):
                print(f"FAILED: {name} run {run}: {result.get('error', 'a step failed')}", file=sys.stderr)
                correctness.append(f"FAILED: {name} run {run}")
                continue
            print(f"run {run}/{args.runs}: {name:9} {result['wall_seconds']:7.2f} s, "
                  f"peak RSS {mib(result['peak_rss_kib'])} MiB", file=sys.stderr, flush=True)
        baseline = results["pipeline"][-1]
        for name in implementations[1:]:
            other = results[name][-1]
            if not (baseline.get("success") and other.get("success")):
                continue
            problems = compare(baseline["sufficient"], other["sufficient"])
            compared.add(name)
            if problems:
                mismatched.add(name)
                lines = [f"MISMATCH {name} vs pipeline (run {run}): {p}" for p in problems[:MAX_MISMATCH_LINES]]
                if len(problems) > MAX_MISMATCH_LINES:
                    lines.append(f"MISMATCH {name} vs pipeline (run {run}): ... and "
                                 f"{len(problems) - MAX_MISMATCH_LINES} more differences")
                print("\n".join(lines), file=sys.stderr)
                correctness += lines
        if "incremental" not in args.skip:
            incremental_runs.append(run_worker("incremental", config_path, data_dir, run))
            refresh = incremental_runs[-1]
            if not refresh.get("success"):
                print(f"FAILED: incremental run {run}: {refresh.get('error', 'a step failed')}", file=sys.stderr)
                correctness.append(f"FAILED: incremental run {run}")
            else:
                print(f"run {run}/{args.runs}: refresh {refresh['refresh']['seconds']:.2f} s, full "
                      f"{refresh['full']['seconds']:.2f} s", file=sys.stderr, flush=True)
    for name in implementations[1:]:
        if name in compared and name not in mismatched:
            rows = max(len(r["sufficient"]) for r in results["pipeline"] if r.get("success"))
            correctness.append(
                f"{name} = pipeline: all {rows} (experiment, variant, metric) rows, n exactly and every sum "
                f"within {REL_TOLERANCE:g} relative, in every run compared"
            )
    if skipped_pandas:
        correctness.append("pandas skipped (--skip pandas or more events than --pandas-max-events)")

    verdicts = {
        name: "MISMATCH" if name in mismatched else "match" if name in compared else "not compared"
        for name in implementations[1:]
    }
    verdicts["pipeline"] = "baseline"
    launcher_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([".venv/bin/python", "benchmarks/run_benchmark.py", *(argv or sys.argv[1:])]),
        "runs": args.runs,
        "machine": machine(),
        "load": load_before,
        "versions": versions(),
        "data": data,
        "results": results,
        "incremental": incremental_runs,
        "verdicts": verdicts,
        "correctness": correctness,
        "launcher_peak_kib": launcher_peak_kib,
    }
    text = render(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}", file=sys.stderr)
    failed = any(not r.get("success") for runs in [*results.values(), incremental_runs] for r in runs)
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
