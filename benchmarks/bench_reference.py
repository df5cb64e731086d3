"""Benchmark worker (b): the hand-written DuckDB reference, reference.sql.

Python only loads the registry's configuration (a few rows: experiments, variants, metrics) into
small tables and variables; reference.sql does all the work on the data. Two modes (see the
script's header): `tables` writes the analysable subjects and the post- and pre-assignment events
to a DuckDB file in --scratch, as the pipeline does; `statistics` computes only the sufficient
statistics, in one query, in memory.

Started by run_benchmark.py: `bench_reference.py --mode MODE --config CONFIG --scratch DIR --result FILE`.
"""

from __future__ import annotations

import time
from pathlib import Path

import measure

started = time.perf_counter()
import duckdb  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started
SCRIPT = Path(__file__).with_name("reference.sql")
# What the script's placeholders become in each mode.
TABLES = {"{{table}}": "TABLE", "{{temp}}": "TEMP TABLE"}
MODES = {
    "tables": TABLES,
    # The same, run once per experiment (a connection and a schema each), as the pipeline's
    # per-experiment runs do: the cost of analysing experiments independently, without Dagster.
    "tables_per_experiment": TABLES,
    "statistics": {"{{table}}": "TEMP VIEW", "{{temp}}": "TEMP VIEW"},
}
IMPLEMENTATION = {
    "tables": "reference",
    "tables_per_experiment": "reference_per_experiment",
    "statistics": "reference_stats",
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
        lambda parser: parser.add_argument("--mode", choices=sorted(MODES), default="tables")
    )
    script = SCRIPT.read_text()
    for placeholder, sql in MODES[args.mode].items():
        script = script.replace(placeholder, sql)
    rss_after_imports = measure.current_rss_kib()

    database = ":memory:" if args.mode == "statistics" else f"{args.scratch}/reference.duckdb"
    if args.mode == "tables_per_experiment":
        batches = [(f"experiment_{i}", {**config, "experiments": [e]}) for i, e in enumerate(config["experiments"])]
    else:
        batches = [("main", config)]
    t0 = time.perf_counter()
    rows = []
    for schema, batch in batches:
        with duckdb.connect(database) as con:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}; SET schema = '{schema}'")
            load_configuration(con, batch)
            cursor = con.execute(script)
            columns = [d[0] for d in cursor.description]
            rows += [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    wall = time.perf_counter() - t0

    measure.write_result(args.result, {
        "implementation": IMPLEMENTATION[args.mode],
        "import_seconds": IMPORT_SECONDS,
        "wall_seconds": wall,
        "rss_after_imports_kib": rss_after_imports,
        "success": True,
        "steps": [],
        "sufficient": rows,
    })


if __name__ == "__main__":
    main()
