"""Before any run: the registry's sources and the warehouse's tables, checked cheaply and said once.

Every source path must match readable files and every mapped column must be in them (Parquet
footers and CSV header lines are read, never the data); every stored table must be able to take
the rows this registry writes (a column whose type would change stops everything before a write).
Each problem is one line naming the registry field or table, the file and what to do.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence

import pyarrow.parquet as pq

from exp_pipeline import schemas
from exp_pipeline.registry import ASSIGNMENT_COLUMNS, REQUIRED_EVENT_COLUMNS, Registry, RegistryError, Source, is_uri
from exp_pipeline.warehouse.interface import WarehouseSession, csv_header

# The tables whose columns follow the registry's assignment properties.
PROPERTY_TABLES = ("raw_assignments", "deduped_assignments")


class PreflightError(ValueError):
    """The run cannot start; `problems` are the lines to show, each complete on its own."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def source_problems(registry: Registry, registry_path: str) -> list[str]:
    """Files and column mappings of both sources (file sources; a warehouse table or a URI is
    checked by `table_source_problems` or when the engine reads it)."""
    problems = []
    for kind, required in _required_columns(registry).items():
        source: Source = getattr(registry.sources, kind)
        if source.path is None or is_uri(source.path):
            continue
        where = f"{registry_path}: sources.{kind}"
        try:
            pattern = registry.resolve_path(source.path)
        except RegistryError as exc:
            problems.append(f"{where}.path: {exc}")
            continue
        # Empty files are skipped by the engines too; a directory is read (and refused) like a file.
        files = [f for f in sorted(globlib.glob(pattern)) if not (os.path.isfile(f) and os.path.getsize(f) == 0)]
        if not files:
            problems.append(
                f"{where}.path: no non-empty file matches {source.path!r} (resolved to {pattern}); relative "
                "paths are relative to the registry file's folder"
            )
            continue
        columns: dict[str, None] = {}  # every file's columns, united by name as the engines read them
        for path in files:
            names, reason = _file_columns(path, source.file_format)
            if names is None:
                problems.append(f"{where}.path: {path} is not a readable {source.file_format} file ({reason})")
                continue
            columns.update(dict.fromkeys(names))
        if columns:
            problems += _mapping_problems(where, source, required, list(columns), files)
    return problems


def _required_columns(registry: Registry) -> dict[str, tuple[str, ...]]:
    """The canonical columns (and properties) each source must have. A value column is needed
    when the registry maps one, or when a metric in use sums values."""
    events = registry.sources.events
    summed = any(m.aggregation == "sum" for e in registry.experiments for m in registry.metrics_of(e))
    needs_value = "value" in events.columns or summed
    return {
        "assignments": (*ASSIGNMENT_COLUMNS, *registry.sources.assignments.kept_columns),
        "events": (*REQUIRED_EVENT_COLUMNS, "value") if needs_value else REQUIRED_EVENT_COLUMNS,
    }


def _file_columns(path: str, file_format: str) -> tuple[list[str] | None, str]:
    """A file's column names from its footer (Parquet) or header line (CSV), or None and why not."""
    if file_format == "parquet":
        try:
            return list(pq.read_schema(path).names), ""
        except Exception as exc:  # pyarrow's error types vary by what is wrong with the file
            return None, str(exc).splitlines()[0]
    header = csv_header(path)
    return (header, "") if header else (None, "no header line")


def _mapping_problems(where: str, source: Source, required: Sequence[str], columns: list[str], files: list[str]) -> list[str]:
    """One line per canonical column or property the source does not have."""
    # Exactly as the run looks them up (ingestion's column mapping): names are case-sensitive.
    present = set(columns)
    shown = ", ".join(c for c in columns if c != "source_file")
    named = files[0] if len(files) == 1 else f"{len(files)} files matching the path (e.g. {files[0]})"
    problems = []
    for name in required:
        column = source.source_column(name)
        if column in present:
            continue
        if name in source.properties:
            field = f"{where}.properties"
        elif name in source.secondary_ids:
            field = f"{where}.secondary_ids.{name}"
        elif name in source.columns:
            field = f"{where}.columns.{name}"
        else:
            field = f"{where}.columns (no mapping for {name!r}, so a column named {name!r} is expected)"
        problems.append(f"{field}: column {column!r} is not in {named}; its columns are: {shown}")
    return problems


def table_source_problems(session: WarehouseSession, registry: Registry, registry_path: str) -> list[str]:
    """The column mappings of sources that are warehouse tables (their schemas, no data)."""
    problems = []
    for kind, required in _required_columns(registry).items():
        source: Source = getattr(registry.sources, kind)
        if source.table is None:
            continue
        where = f"{registry_path}: sources.{kind}"
        try:
            columns = list(session._catalog_table(source.table).columns)
        except Exception as exc:  # the backend's own error type varies
            problems.append(f"{where}.table: {source.table!r} is not in the warehouse ({str(exc).splitlines()[0]})")
            continue
        problems += _mapping_problems(where, source, required, columns, [f"table {source.table}"])
    return problems


def warehouse_problems(session: WarehouseSession, registry: Registry) -> list[str]:
    """Stored tables whose columns this registry's rows would give another type. Only tables that
    keep their columns across runs: views and tables written whole are created anew each time
    (and a view over files that are gone is the next run's to replace, not a reason to stop)."""
    properties = registry.sources.assignments.properties
    problems = []
    for name, table in schemas.TABLES.items():
        if not table.keeps_its_columns:
            continue
        schema = table.schema(None, properties) if name in PROPERTY_TABLES else table.documented_schema()
        changes = session.retyped_columns(name, schemas.ibis_schema(schema))
        if changes:
            problems.append(str(session.schema_change_error(name, changes)))
    return problems


def preflight(session: WarehouseSession, registry: Registry, registry_path: str) -> list[str]:
    """Every problem that would stop a run, before one starts: sources first, then the warehouse."""
    return [
        *source_problems(registry, registry_path),
        *table_source_problems(session, registry, registry_path),
        *warehouse_problems(session, registry),
    ]


def require_ready(session: WarehouseSession, registry: Registry, registry_path: str) -> None:
    """Raise PreflightError with every problem found."""
    problems = preflight(session, registry, registry_path)
    if problems:
        raise PreflightError(problems)
