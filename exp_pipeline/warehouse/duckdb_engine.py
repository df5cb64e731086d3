"""The DuckDB engine: one DuckDB file, every write one transaction."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import ibis
import ibis.expr.types as ir
import pandas as pd

from exp_pipeline.registry import SAFE_ID_PATTERN
from exp_pipeline.warehouse.interface import WarehouseSession, unreadable_file

# CSV is read as text (types come from the column mapping, and unparsable values are rejected row by
# row); a short last line (a truncated file) is padded with nulls so its row is rejected, not lost.
CSV_OPTIONS = {"header": True, "all_varchar": True, "null_padding": True, "union_by_name": True}


LOCK_RETRY_SECONDS = 1.0
# DuckDB's column naming each row's file; not `filename`, which a log may have of its own.
FILE_COLUMN = "_exp_pipeline_source_file"


def _with_source_file(rows: ir.Table) -> ir.Table:
    # A log column that happens to be called source_file is not one the pipeline reads.
    rows = rows.drop("source_file") if "source_file" in rows.columns else rows
    return rows.rename(source_file=FILE_COLUMN)


def _quote(identifier: str) -> str:
    # Only identifiers that passed SAFE_ID_PATTERN reach SQL text; values always go as parameters.
    if not SAFE_ID_PATTERN.match(identifier):
        raise ValueError(f"unsafe identifier {identifier!r}")
    return f'"{identifier}"'


class DuckDBWarehouseSession(WarehouseSession):
    """A DuckDB connection; every write is one transaction."""

    def __init__(self, raw_connection, schema: str):
        super().__init__()
        self.raw = raw_connection
        self.schema = schema
        self.ibis = ibis.duckdb.from_connection(raw_connection)
        self.raw.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")

    # -- reading -------------------------------------------------------------------------------

    def has_table(self, name: str) -> bool:
        # Not ibis' list_tables: with DuckDB 2.0 it calls a removed fetch_arrow_table().
        found = self.raw.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [self.schema, name],
        ).fetchone()[0]
        return found > 0

    def table(self, name: str) -> ir.Table:
        if not self.has_table(name):
            raise LookupError(
                f"table {self.schema}.{name} does not exist yet: materialize its asset first"
            )
        return self.ibis.table(name, database=self.schema)

    def _catalog_table(self, qualified_name: str) -> ir.Table:
        database, _, table_name = qualified_name.rpartition(".")
        return self.ibis.table(table_name, database=database or None)

    def _read_parquet(self, files: list[str], description: str, persist_as: str | None = None) -> ir.Table:
        for path in files:
            self._probe(path, "parquet", description)
        if persist_as:
            return _with_source_file(self._files_view(persist_as, "read_parquet", files, {"union_by_name": True}))
        return _with_source_file(self.ibis.read_parquet(files, filename=FILE_COLUMN, union_by_name=True))

    def _read_csv(self, files: list[str], description: str, persist_as: str | None = None) -> ir.Table:
        for path in files:
            self._probe(path, "csv", description)
        if persist_as:
            return _with_source_file(self._files_view(persist_as, "read_csv", files, CSV_OPTIONS))
        return _with_source_file(self.ibis.read_csv(files, filename=FILE_COLUMN, **CSV_OPTIONS))

    def _files_view(self, name: str, reader: str, files: list[str], options: dict) -> ir.Table:
        """A view in the warehouse schema reading exactly these files (what ibis' read_* would
        register as a temporary view, which a stored view could not refer to)."""
        paths = ", ".join("'" + path.replace("'", "''") + "'" for path in files)
        settings = ", ".join(f"{key} = {str(value).lower()}" for key, value in options.items())
        self.raw.execute(
            f"CREATE OR REPLACE VIEW {_quote(self.schema)}.{_quote(name)} AS SELECT * FROM "
            f"{reader}([{paths}], {settings}, filename = '{FILE_COLUMN}')"
        )
        return self.ibis.table(name, database=self.schema)

    def temp_table(self, name: str, expr: ir.Table) -> ir.Table:
        return self.ibis.create_table(name, expr, temp=True, overwrite=True)

    def _probe(self, path: str, file_format: str, description: str) -> None:
        """Fail on a file that is not what the registry says, naming the file and the fix."""
        try:
            if file_format == "parquet":
                self.raw.execute("SELECT * FROM parquet_schema(?)", [path]).fetchall()
            else:
                self.raw.execute(
                    "SELECT count(*) FROM read_csv(?, header = true, all_varchar = true, null_padding = true)",
                    [path],
                ).fetchall()
        except duckdb.Error as exc:
            lines = str(exc).splitlines()
            reason = lines[0]
            # DuckDB says what is wrong with a CSV a few lines down ("... not utf-8 encoded.").
            detail = next((line for line in lines[1:4] if "encoded" in line or "Invalid unicode" in line), None)
            if detail:
                reason = f"{reason.removeprefix('Invalid Input Error: ')}: {detail.strip()} Re-export it as UTF-8"
            raise unreadable_file(description, path, file_format, reason) from None

    # -- writing -------------------------------------------------------------------------------

    def _ensure_table(self, name: str, schema: ibis.Schema) -> None:
        if not self.has_table(name):
            self.ibis.create_table(name, schema=schema, database=self.schema)
            return
        self._refuse_retyping(name, schema)
        existing = self.ibis.table(name, database=self.schema).schema()
        for column, dtype in schema.items():
            if column not in existing:
                # A newer pipeline version added a column: older partitions read it as null.
                sql_type = self.ibis.compiler.type_mapper.to_string(dtype)
                self.raw.execute(
                    f"ALTER TABLE {_quote(self.schema)}.{_quote(name)} "
                    f"ADD COLUMN {_quote(column)} {sql_type}"
                )

    def _schema_change_remedy(self, name: str, column: str, dtype) -> str:
        sql_type = self.ibis.compiler.type_mapper.to_string(dtype)
        table = f"{self.schema}.{name}"
        return (f"cast the stored column (ALTER TABLE {table} ALTER COLUMN {column} TYPE {sql_type}), or drop the "
                f"table (DROP TABLE {table}) so that the next run rebuilds it from the logs")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.raw.begin()
        try:
            yield
        except BaseException:
            self.raw.rollback()
            raise
        self.raw.commit()

    def replace_partitions(
        self, experiment_id: str, tables: dict[str, ir.Table | pd.DataFrame]
    ) -> dict[str, int]:
        """Replace one experiment's rows of several tables in ONE transaction (all or nothing)."""
        with self._transaction():
            return {name: self._replace(name, experiment_id, rows) for name, rows in tables.items()}

    def replace_experiments(
        self, experiment_ids: Sequence[str], tables: dict[str, ir.Table]
    ) -> dict[str, dict[str, int]]:
        """Every experiment's rows of every table in ONE transaction: a delete and an insert per
        table, whatever the number of experiments."""
        ids = list(experiment_ids)
        if not ids:
            return {name: {} for name in tables}
        marks = ", ".join("?" for _ in ids)
        written = {}
        with self._transaction():
            for name, rows in tables.items():
                self._ensure_table(name, rows.schema())
                table = f"{_quote(self.schema)}.{_quote(name)}"
                self.raw.execute(f"DELETE FROM {table} WHERE experiment_id IN ({marks})", ids)
                self.ibis.insert(name, rows.filter(rows.experiment_id.isin(ids)), database=self.schema)
                counts = self.raw.execute(
                    f"SELECT experiment_id, count(*) FROM {table} WHERE experiment_id IN ({marks}) GROUP BY 1", ids
                ).fetchall()
                found = dict(counts)
                written[name] = {i: int(found.get(i, 0)) for i in ids}
        return written

    def _replace(self, name: str, experiment_id: str, rows: ir.Table | pd.DataFrame) -> int:
        expr = rows if isinstance(rows, ir.Table) else ibis.memtable(rows)
        self._ensure_table(name, expr.schema())
        self.raw.execute(
            f"DELETE FROM {_quote(self.schema)}.{_quote(name)} WHERE experiment_id = ?", [experiment_id]
        )
        self.ibis.insert(name, expr, database=self.schema)
        return self._partition_rows(name, experiment_id)

    def _partition_rows(self, name: str, experiment_id: str) -> int:
        return int(
            self.raw.execute(
                f"SELECT count(*) FROM {_quote(self.schema)}.{_quote(name)} WHERE experiment_id = ?",
                [experiment_id],
            ).fetchone()[0]
        )

    def append(self, name: str, rows: ir.Table) -> None:
        """Append rows (creating the table on first use) in one transaction."""
        with self._transaction():
            self._ensure_table(name, rows.schema())
            self.ibis.insert(name, rows, database=self.schema)

    def delete_rows(self, name: str, keys: ir.Table) -> None:
        """One DELETE joined with the keys (computed first, as a temp table)."""
        self.temp_table("_delete_keys", keys)
        match = " AND ".join(f"t.{_quote(c)} = k.{_quote(c)}" for c in keys.columns)
        with self._transaction():
            self.raw.execute(f"DELETE FROM {_quote(self.schema)}.{_quote(name)} AS t USING _delete_keys AS k WHERE {match}")

    def update_row(self, name: str, key_column: str, key: str, values: dict) -> None:
        """Set `values` on the rows where key_column = key (values bound as parameters)."""
        assignments = ", ".join(f"{_quote(column)} = ?" for column in values)
        self.raw.execute(
            f"UPDATE {_quote(self.schema)}.{_quote(name)} SET {assignments} WHERE {_quote(key_column)} = ?",
            [*values.values(), key],
        )

    def replace_table(self, name: str, rows: ir.Table | pd.DataFrame) -> int:
        """Replace a whole (unpartitioned) table in one transaction."""
        expr = rows if isinstance(rows, ir.Table) else ibis.memtable(rows)
        with self._transaction():
            if self.has_table(name):
                self.raw.execute(f"DROP TABLE {_quote(self.schema)}.{_quote(name)}")
            self.ibis.create_table(name, expr, database=self.schema)
        return self.count(self.table(name))


    def publish_view(self, name: str, expr: ir.Table) -> None:
        """CREATE OR REPLACE VIEW, in one transaction with dropping a table of that name (the
        event tables of warehouses written before they became views)."""
        sql = self.ibis.compile(expr)
        qualified = f"{_quote(self.schema)}.{_quote(name)}"
        kind = self.raw.execute(
            "SELECT table_type FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [self.schema, name],
        ).fetchone()
        with self._transaction():
            if kind is not None and kind[0] != "VIEW":
                self.raw.execute(f"DROP TABLE {qualified}")
            self.raw.execute(f"CREATE OR REPLACE VIEW {qualified} AS {sql}")


class WarehouseBusy(RuntimeError):
    """Another process held the DuckDB file for longer than the configured wait."""




@contextmanager
def open_session(
    database: str, schema: str, config: dict, lock_timeout_seconds: float
) -> Iterator[DuckDBWarehouseSession]:
    """A session on the DuckDB file, waiting up to `lock_timeout_seconds` for another writer."""
    if database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_timeout_seconds
    while True:
        try:
            raw = duckdb.connect(database, read_only=False, config=config)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                raise WarehouseBusy(
                    f"the warehouse {database} stayed locked by another process for "
                    f"{lock_timeout_seconds:.0f}s; is a run or a DuckDB shell holding it?"
                ) from None
            time.sleep(LOCK_RETRY_SECONDS)
    try:
        yield DuckDBWarehouseSession(raw, schema)
    finally:
        raw.close()
