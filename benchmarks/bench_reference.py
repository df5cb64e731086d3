"""Benchmark worker (b): the hand-written DuckDB scripts the pipeline is measured against.

Python only loads the registry's configuration (a few rows: experiments, variants, metrics) into
small tables and variables; the script does all the work on the data. Two modes:

  one_pass      one_pass.sql, the headline reference: what a team would write by hand instead of
                the pipeline; straight from the logs to the statistics, nothing written, in memory
  one_pass_keep_duplicates  the same without the exact-duplicate rule (no DISTINCT over the log):
                what that one rule costs; correct only on a log without repeated rows
  table_design  reference.sql writing the analysable subjects and the post- and pre-assignment
                events as tables to a DuckDB file in --scratch (the pipeline's old table design)

Started by run_benchmark.py: `bench_reference.py --mode MODE --config CONFIG --scratch DIR --result FILE`.
"""

from __future__ import annotations

import time
from pathlib import Path

import measure

started = time.perf_counter()
import duckdb  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started
HERE = Path(__file__).parent
# mode -> (script, what its placeholders become, database)
MODES = {
    "one_pass": (HERE / "one_pass.sql", {"{{distinct}}": "DISTINCT"}, False),
    "one_pass_keep_duplicates": (HERE / "one_pass.sql", {"{{distinct}}": ""}, False),
    "table_design": (HERE / "reference.sql", {"{{table}}": "TABLE", "{{temp}}": "TEMP TABLE"}, True),
}

CONFIG_TABLES = """
CREATE TEMP TABLE bench_experiments (experiment_id VARCHAR, start_us BIGINT, end_us BIGINT, pre_window_us BIGINT);
CREATE TEMP TABLE bench_variants (experiment_id VARCHAR, variant_id VARCHAR);
CREATE TEMP TABLE bench_metrics (
    experiment_id VARCHAR, metric VARCHAR, event_name VARCHAR, aggregation VARCHAR,
    start_us BIGINT, end_us BIGINT, cap_percentile DOUBLE
);
"""


def load_configuration(con: duckdb.DuckDBPyConnection, config: dict) -> None:
    """The registry as the script's small config tables and variables (values bound as parameters)."""
    con.execute(CONFIG_TABLES)
    experiments = config["experiments"]
    con.executemany(
        "INSERT INTO bench_experiments VALUES (?, ?, ?, ?)",
        [[e["id"], e["start_us"], e["end_us"], e["pre_window_us"]] for e in experiments],
    )
    con.executemany(
        "INSERT INTO bench_variants VALUES (?, ?)",
        [[e["id"], v] for e in experiments for v in e["variants"]],
    )
    con.executemany(
        "INSERT INTO bench_metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            [e["id"], m["id"], m["event_name"], m["aggregation"], m["start_us"], m["end_us"], m["cap_percentile"]]
            for e in experiments
            for m in e["metrics"]
        ],
    )
    percentiles = sorted({m["cap_percentile"] for e in experiments for m in e["metrics"]} - {None})
    con.execute("SET VARIABLE assignments_path = ?", [config["assignments_path"]])
    con.execute("SET VARIABLE events_path = ?", [config["events_path"]])
    # An empty list does not bind in quantile_cont; with no capped metric the value is never used.
    con.execute("SET VARIABLE cap_percentiles = ?::DOUBLE[]", [percentiles or [0.5]])


def main() -> None:
    args, config = measure.worker_args(
        lambda parser: parser.add_argument("--mode", choices=sorted(MODES), default="one_pass")
    )
    path, placeholders, writes_tables = MODES[args.mode]
    script = path.read_text()
    for placeholder, sql in placeholders.items():
        script = script.replace(placeholder, sql)
    rss_after_imports = measure.current_rss_kib()

    database = f"{args.scratch}/reference.duckdb" if writes_tables else ":memory:"
    t0 = time.perf_counter()
    with duckdb.connect(database) as con:
        load_configuration(con, config)
        cursor = con.execute(script)
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    wall = time.perf_counter() - t0

    measure.write_result(args.result, {
        "implementation": args.mode,
        "import_seconds": IMPORT_SECONDS,
        "wall_seconds": wall,
        "rss_after_imports_kib": rss_after_imports,
        "success": True,
        "steps": [],
        "sufficient": rows,
    })


if __name__ == "__main__":
    main()
