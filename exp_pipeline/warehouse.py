"""The engine resource: DuckDB by default (through dagster-duckdb), Ibis tables out.

Everything engine-specific lives here and in spark_warehouse.py: opening the connection, reading
sources, and atomic writes. Transforms only ever see Ibis tables, so they run unchanged on both.
"""

from __future__ import annotations

import datetime as dt
import glob as globlib
import os
import time
from collections.abc import Iterator
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import ibis
import ibis.expr.types as ir
import pandas as pd
from ibis.backends import BaseBackend
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field

from exp_pipeline.registry import SAFE_ID_PATTERN, Source, is_uri


# CSV is read as text (types come from the column mapping, and unparsable values are rejected row by
# row); a short last line (a truncated file) is padded with nulls so its row is rejected, not lost.
CSV_OPTIONS = {"header": True, "all_varchar": True, "null_padding": True, "union_by_name": True}


LOCK_RETRY_SECONDS = 1.0


class SourceError(ValueError):
    """A source cannot be read at all; the message names the file and says how to fix it."""


def unreadable_file(description: str, path: str, file_format: str, reason: str) -> SourceError:
    return SourceError(
        f"{description}: {path} is not a readable {file_format} file ({reason}). Fix or remove "
        f"the file, or set 'format' for this source in the registry if it is not {file_format}."
    )


def _quote(identifier: str) -> str:
    # Only identifiers that passed SAFE_ID_PATTERN reach SQL text; values always go as parameters.
    if not SAFE_ID_PATTERN.match(identifier):
        raise ValueError(f"unsafe identifier {identifier!r}")
    return f'"{identifier}"'


@dataclass(frozen=True)
class PartitionRefresh:
    """An incremental update of one experiment's rows of a table.

    Deleted: rows whose `stale_from` column is at or after its value, and every row of the
    subjects in `stale_subjects` (a small table in the session with a subject_id column).
    Inserted: `rows`.
    """

    rows: ir.Table
    stale_from: tuple[str, dt.datetime]
    stale_subjects: ir.Table


@dataclass(frozen=True)
class RefreshCounts:
    deleted: int
    inserted: int
    rows: int  # in the partition after the refresh


class WarehouseSession(ABC):
    """One open connection to an engine: tables and sources as Ibis tables, atomic partition writes.

    The engine-neutral part lives here; DuckDBWarehouseSession and SparkWarehouseSession (in
    spark_warehouse.py) implement the rest. Assets and checks only use this interface.
    """

    ibis: BaseBackend
    schema: str

    def __init__(self) -> None:
        self.skipped_empty_files: list[str] = []

    # -- reading -------------------------------------------------------------------------------

    @abstractmethod
    def has_table(self, name: str) -> bool: ...

    @abstractmethod
    def table(self, name: str) -> ir.Table:
        """A pipeline table; LookupError (saying to materialize its asset) when it is missing."""

    def partition(self, name: str, experiment_id: str) -> ir.Table:
        table = self.table(name)
        return table.filter(table.experiment_id == experiment_id)

    def read_source(self, source: Source, resolved_path: str | None, description: str) -> ir.Table:
        """The source as an Ibis table, with a `source_file` column naming where each row came from."""
        if source.table is not None:
            try:
                table = self._catalog_table(source.table)
            except Exception as exc:  # the backend's own error type varies
                raise SourceError(
                    f"{description}: table {source.table!r} is not in the warehouse ({exc})"
                ) from None
            return table.mutate(source_file=ibis.literal(source.table))
        assert resolved_path is not None
        files = self._source_files(resolved_path, description)
        if source.file_format == "parquet":
            return self._read_parquet(files, description)
        return self._read_csv(files, description)

    def _source_files(self, resolved_path: str, description: str) -> list[str]:
        """The files a path or glob names, minus empty ones (recorded), each probed readable."""
        if is_uri(resolved_path):
            raise SourceError(
                f"{description}: {resolved_path!r} is not a local path; DuckDB reads local files "
                "(run on Spark, EXP_PIPELINE_ENGINE=spark, or copy the files)"
            )
        files = sorted(globlib.glob(resolved_path))
        if not files:
            raise SourceError(
                f"{description}: no file matches {resolved_path!r}; check 'path' in the registry "
                "(relative paths are relative to the registry file's folder)"
            )
        # A 0-byte file holds no rows (and no header or footer to read): skip it, say so.
        empty = [f for f in files if os.path.getsize(f) == 0]
        self.skipped_empty_files.extend(empty)
        files = [f for f in files if f not in empty]
        if not files:
            raise SourceError(
                f"{description}: every file matching {resolved_path!r} is empty (0 bytes): "
                f"{', '.join(empty)}"
            )
        return files

    @abstractmethod
    def _catalog_table(self, qualified_name: str) -> ir.Table: ...

    @abstractmethod
    def _read_parquet(self, files: list[str], description: str) -> ir.Table:
        """All files as one table (columns united by name), `source_file` naming each row's file."""

    @abstractmethod
    def _read_csv(self, files: list[str], description: str) -> ir.Table:
        """As _read_parquet, every column as text (see CSV_OPTIONS)."""

    def to_pandas(self, expr: ir.Table) -> pd.DataFrame:
        """Only for small results: sufficient statistics, counts, previews."""
        return self.ibis.to_pandas(expr)

    def count(self, expr: ir.Table) -> int:
        return int(self.ibis.execute(expr.count()))

    def scalar(self, expr: ir.Scalar):
        """One value computed by the engine (a max, a min)."""
        return self.ibis.execute(expr)

    @abstractmethod
    def temp_table(self, name: str, expr: ir.Table) -> ir.Table:
        """Compute `expr` once and keep it for this session, so later queries see the same rows."""

    # -- writing -------------------------------------------------------------------------------

    def replace_partition(self, name: str, experiment_id: str, rows: ir.Table | pd.DataFrame) -> int:
        """Replace one experiment's rows of `name`; returns the rows written.

        A failure (or a killed process) before the commit leaves the previous rows in place.
        """
        return self.replace_partitions(experiment_id, {name: rows})[name]

    @abstractmethod
    def replace_partitions(
        self, experiment_id: str, tables: dict[str, ir.Table | pd.DataFrame]
    ) -> dict[str, int]:
        """Replace one experiment's rows of several tables, in the given order; rows written per table."""

    @abstractmethod
    def refresh_partitions(
        self,
        experiment_id: str,
        refreshes: dict[str, PartitionRefresh],
        replace: dict[str, ir.Table | pd.DataFrame] | None = None,
    ) -> dict[str, RefreshCounts]:
        """Update part of one experiment's rows of several tables (see PartitionRefresh); `replace`
        tables are replaced whole-partition afterwards (a state row, say)."""

    @abstractmethod
    def append(self, name: str, rows: ir.Table) -> None:
        """Append rows, creating the table on first use."""

    @abstractmethod
    def update_row(self, name: str, key_column: str, key: str, values: dict) -> None:
        """Set `values` on the rows where key_column = key."""

    @abstractmethod
    def replace_table(self, name: str, rows: ir.Table | pd.DataFrame) -> int:
        """Replace a whole (unpartitioned) table; returns its rows."""


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

    def _read_parquet(self, files: list[str], description: str) -> ir.Table:
        for path in files:
            self._probe(path, "parquet", description)
        return self.ibis.read_parquet(files, filename=True, union_by_name=True).rename(source_file="filename")

    def _read_csv(self, files: list[str], description: str) -> ir.Table:
        for path in files:
            self._probe(path, "csv", description)
        return self.ibis.read_csv(files, filename=True, **CSV_OPTIONS).rename(source_file="filename")

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
            reason = str(exc).splitlines()[0]
            raise unreadable_file(description, path, file_format, reason) from None

    # -- writing -------------------------------------------------------------------------------

    def _ensure_table(self, name: str, schema: ibis.Schema) -> None:
        if not self.has_table(name):
            self.ibis.create_table(name, schema=schema, database=self.schema)
            return
        existing = self.ibis.table(name, database=self.schema).schema()
        for column, dtype in schema.items():
            if column not in existing:
                # A newer pipeline version added a column: older partitions read it as null.
                sql_type = self.ibis.compiler.type_mapper.to_string(dtype)
                self.raw.execute(
                    f"ALTER TABLE {_quote(self.schema)}.{_quote(name)} "
                    f"ADD COLUMN {_quote(column)} {sql_type}"
                )

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

    def _replace(self, name: str, experiment_id: str, rows: ir.Table | pd.DataFrame) -> int:
        expr = rows if isinstance(rows, ir.Table) else ibis.memtable(rows)
        self._ensure_table(name, expr.schema())
        self.raw.execute(
            f"DELETE FROM {_quote(self.schema)}.{_quote(name)} WHERE experiment_id = ?", [experiment_id]
        )
        self.ibis.insert(name, expr, database=self.schema)
        return self._partition_rows(name, experiment_id)

    def refresh_partitions(
        self,
        experiment_id: str,
        refreshes: dict[str, PartitionRefresh],
        replace: dict[str, ir.Table | pd.DataFrame] | None = None,
    ) -> dict[str, RefreshCounts]:
        """Update part of one experiment's rows of several tables in ONE transaction.

        Per table: delete the stale rows (see PartitionRefresh), insert the new ones. `replace`
        tables are replaced whole-partition in the same transaction (a state row, say).
        """
        counts = {}
        with self._transaction():
            for name, refresh in refreshes.items():
                self._ensure_table(name, refresh.rows.schema())
                table = f"{_quote(self.schema)}.{_quote(name)}"
                column, since = refresh.stale_from
                stale = ".".join(map(_quote, refresh.stale_subjects.get_name().split(".")))
                # A probe of a few stale subjects; an anti-join of every row against all the kept
                # subjects cost 9x as much (200 M events: 0.85 s against 0.09 s on one table).
                deleted = self.raw.execute(
                    f"DELETE FROM {table} AS t WHERE t.experiment_id = ? AND (t.{_quote(column)} >= ? "
                    f"OR t.subject_id IN (SELECT subject_id FROM {stale}))",
                    [experiment_id, since],
                ).fetchone()[0]
                before = self._partition_rows(name, experiment_id)
                self.ibis.insert(name, refresh.rows, database=self.schema)
                after = self._partition_rows(name, experiment_id)
                counts[name] = RefreshCounts(deleted=int(deleted), inserted=after - before, rows=after)
            for name, rows in (replace or {}).items():
                self._replace(name, experiment_id, rows)
        return counts

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


class WarehouseBusy(RuntimeError):
    """Another process held the DuckDB file for longer than the configured wait."""


class Warehouse(ConfigurableResource):
    """The analytics warehouse: an engine behind one session interface, opened only when used.

    DuckDBWarehouse (the default) and spark_warehouse.SparkWarehouse; resources.py picks one.
    """

    @contextmanager
    def session(self) -> Iterator[WarehouseSession]:
        raise NotImplementedError("use DuckDBWarehouse or SparkWarehouse")
        yield

    def describe(self) -> str:
        """Where the tables are, for people."""
        raise NotImplementedError


class DuckDBWarehouse(Warehouse):
    """A DuckDB file (through dagster-duckdb)."""

    duckdb: DuckDBResource
    schema_name: str = Field(default="exp", description="schema holding the pipeline's tables")
    memory_limit: str = Field(
        default="2.5GB",
        description=(
            "DuckDB's memory limit for the pipeline's queries; bigger joins spill to a temporary "
            "folder next to the database file instead of growing the process (DuckDB's own default "
            "is 80% of the machine). Set it in connection_config to override per deployment."
        ),
    )
    lock_timeout_seconds: float = Field(
        default=1800,
        description=(
            "how long to wait for another process's write lock on the DuckDB file before failing; "
            "runs under `dagster dev` queue on the warehouse_writer pool and rarely wait here"
        ),
    )

    def describe(self) -> str:
        return f"DuckDB {self.duckdb.database} (schema {self.schema_name})"

    @contextmanager
    def session(self) -> Iterator[DuckDBWarehouseSession]:
        database = self.duckdb.database
        if database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_seconds
        # Connected here rather than through DuckDBResource.get_connection(): its fixed backoff
        # (about 100 s) would stack on top of, and override, the configured wait.
        config = {
            "custom_user_agent": "dagster",
            "memory_limit": self.memory_limit,
            # No query relies on insertion order; without it, large inserts stream with less memory.
            "preserve_insertion_order": False,
            **self.duckdb.connection_config,
        }
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
                        f"{self.lock_timeout_seconds:.0f}s; is a run or a DuckDB shell holding it?"
                    ) from None
                time.sleep(LOCK_RETRY_SECONDS)
        try:
            yield DuckDBWarehouseSession(raw, self.schema_name)
        finally:
            raw.close()
