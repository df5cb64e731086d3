"""The engine interface: one open connection as Ibis tables in, atomic partition writes out.

DuckDB (duckdb_engine.py) and Spark (spark_engine.py) implement it; assets, checks and the alert
outbox only use this interface, and transforms only ever see Ibis tables.
"""

from __future__ import annotations

import csv
import glob as globlib
import gzip
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir
import pandas as pd
from ibis.backends import BaseBackend

from exp_pipeline.registry import Source, is_uri


class SourceError(ValueError):
    """A source cannot be read at all; the message names the file and says how to fix it."""


def unreadable_file(description: str, path: str, file_format: str, reason: str) -> SourceError:
    return SourceError(
        f"{description}: {path} is not a readable {file_format} file ({reason}). Fix or remove "
        f"the file, or set 'format' for this source in the registry if it is not {file_format}."
    )


class SchemaChangeError(ValueError):
    """A stored column would change its type: the table cannot evolve in place."""


def _comparable(dtype: dt.DataType) -> dt.DataType | str:
    # Nullability is the writer's business (ALTER ADD is nullable), and a timestamp's precision the
    # engine's (DuckDB stores microseconds whatever Ibis asked for); the kind itself must agree.
    if dtype.is_timestamp():
        return "timestamp with time zone" if dtype.timezone else "timestamp"
    return dtype.copy(nullable=True)


def retyped_columns(stored: ibis.Schema, written: ibis.Schema) -> list[tuple[str, dt.DataType, dt.DataType]]:
    """(column, stored type, written type) of the columns both schemas have, with different types."""
    return [
        (column, stored[column], dtype) for column, dtype in written.items()
        # A column of nulls (no rows to type it, e.g. an empty frame) fits any type.
        if column in stored and not dtype.is_null() and _comparable(stored[column]) != _comparable(dtype)
    ]


class WarehouseSession(ABC):
    """One open connection to an engine: tables and sources as Ibis tables, atomic partition writes.

    The engine-neutral part lives here; DuckDBWarehouseSession and SparkWarehouseSession (in
    spark_engine.py) implement the rest. Assets and checks only use this interface.
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

    def read_source(
        self, source: Source, resolved_path: str | None, description: str, root: Path | None = None,
        persist_as: str | None = None,
    ) -> ir.Table:
        """The source as an Ibis table, with a `source_file` column naming where each row came from.

        With a `root`, every file must resolve inside it (a symlink matched by a glob included).
        With `persist_as`, the files are read through a view of that name kept in the warehouse
        (where the engine has views), so that views built on it (`publish_view`) outlive the session.
        """
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
        if root is not None:
            _refuse_files_outside(files, root, description)
        if source.file_format == "parquet":
            return self._read_parquet(files, description, persist_as)
        for path in files:
            if not is_uri(path):
                _refuse_repeated_header_names(path, description)
        return self._read_csv(files, description, persist_as)

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
    def _read_parquet(self, files: list[str], description: str, persist_as: str | None = None) -> ir.Table:
        """All files as one table (columns united by name), `source_file` naming each row's file."""

    @abstractmethod
    def _read_csv(self, files: list[str], description: str, persist_as: str | None = None) -> ir.Table:
        """As _read_parquet, every column as text (see CSV_OPTIONS)."""

    def to_pandas(self, expr: ir.Table) -> pd.DataFrame:
        """Only for small results: sufficient statistics, counts, previews."""
        return self.ibis.to_pandas(expr)

    def count(self, expr: ir.Table) -> int:
        return int(self.ibis.execute(expr.count()))

    @abstractmethod
    def temp_table(self, name: str, expr: ir.Table) -> ir.Table:
        """Compute `expr` once and keep it for this session, so later queries see the same rows."""

    # -- writing -------------------------------------------------------------------------------

    def retyped_columns(self, name: str, written: ibis.Schema) -> list[tuple[str, dt.DataType, dt.DataType]]:
        """The stored columns of `name` that rows of schema `written` would give another type."""
        return retyped_columns(self.table(name).schema(), written) if self.has_table(name) else []

    def schema_change_error(self, name: str, changes: Sequence[tuple[str, dt.DataType, dt.DataType]]) -> SchemaChangeError:
        """What to say when rows would change the type of a stored column of `name` (nothing is written)."""
        listed = "; ".join(f"column {c!r} is stored as {a} but this run writes {b}" for c, a, b in changes)
        return SchemaChangeError(
            f"table {self.schema}.{name} cannot take this run's rows: {listed}. A stored column's type cannot "
            f"change in place, so the run stopped before writing. Either {self._schema_change_remedy(name, changes[0][0], changes[0][2])} "
            f"(deduped_assignments would lose its correction history), or point the pipeline at a new warehouse"
        )

    @abstractmethod
    def _schema_change_remedy(self, name: str, column: str, dtype: dt.DataType) -> str:
        """How to cast a stored column to `dtype`, or to remove the table so that the next run
        rebuilds it from the logs, on this engine, as advice."""

    def _refuse_retyping(self, name: str, written: ibis.Schema) -> None:
        changes = self.retyped_columns(name, written)
        if changes:
            raise self.schema_change_error(name, changes)

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

    def replace_experiments(
        self, experiment_ids: Sequence[str], tables: dict[str, ir.Table]
    ) -> dict[str, dict[str, int]]:
        """Replace the rows of several experiments in several tables (`tables`' rows hold every
        experiment's, by experiment_id); rows written per table and experiment. This default
        writes one experiment at a time (`replace_partitions`, which engines with partitioned
        tables do best); an engine may write them all at once."""
        written: dict[str, dict[str, int]] = {name: {} for name in tables}
        for experiment_id in experiment_ids:
            counts = self.replace_partitions(
                experiment_id, {name: rows.filter(rows.experiment_id == experiment_id) for name, rows in tables.items()}
            )
            for name, count in counts.items():
                written[name][experiment_id] = count
        return written

    @abstractmethod
    def append(self, name: str, rows: ir.Table) -> None:
        """Append rows, creating the table on first use."""

    def delete_rows(self, name: str, keys: ir.Table) -> None:
        """Delete the rows of `name` that match a row of `keys` on every column of `keys`. This
        default rewrites the table (computed before it is replaced)."""
        table = self.table(name)
        self.replace_table(name, table.anti_join(keys, list(keys.columns)))

    @abstractmethod
    def update_row(self, name: str, key_column: str, key: str, values: dict) -> None:
        """Set `values` on the rows where key_column = key."""

    @abstractmethod
    def replace_table(self, name: str, rows: ir.Table | pd.DataFrame) -> int:
        """Replace a whole (unpartitioned) table; returns its rows."""

    @abstractmethod
    def publish_view(self, name: str, expr: ir.Table) -> None:
        """Make `name` the query `expr` for whoever reads the warehouse: a view where the engine
        keeps views (it may only read tables and views of the warehouse and sources read with
        `persist_as`), else the rows as a table. Replaces a table of that name."""




def _refuse_files_outside(files: list[str], root: Path, description: str) -> None:
    """A glob inside the data root can still match a symlink (or a file under a symlinked folder)
    that points elsewhere: each file must really be under the root."""
    for path in files:
        if is_uri(path):
            continue
        real = Path(path).resolve()
        if not real.is_relative_to(root):
            raise SourceError(
                f"{description}: {path} resolves to {real}, outside the data root {root}; move the "
                "file under it or set allow_paths_outside_data_root: true in the registry"
            )


def csv_header(path: str) -> list[str] | None:
    """The column names of a CSV file's header (its first line only), None when it cannot be read."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            header = handle.readline()
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    try:
        dialect = csv.Sniffer().sniff(header, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    return list(next(csv.reader([header], dialect), []))


def _refuse_repeated_header_names(path: str, description: str) -> None:
    """A CSV header naming a column twice: readers keep one copy (or rename the other) without a word."""
    header = csv_header(path)
    if header is None:
        return  # the engine's probe reports an unreadable file with its reason
    # Engines match column names without regard to case (DuckDB renames `User_ID` after `user_id`).
    names = [name.strip().casefold() for name in header]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(
            f"{description}: the header of {path} names {', '.join(map(repr, repeated))} more than once "
            "(ignoring case); rename the repeated columns in the file"
        )
