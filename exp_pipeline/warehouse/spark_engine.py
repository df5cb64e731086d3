"""The Spark engine: the same session interface as DuckDB's, over PySpark and Ibis's PySpark backend.

Tables are Parquet tables in the Spark catalog (database `database`, files under `location`),
partitioned by experiment_id. A partition write is a dynamic partition overwrite: Spark writes the
new files to a staging folder and swaps in that one experiment's folder when the job commits, so a
failed or killed job leaves the previous rows. Several tables are written one after the other
(Parquet tables have no multi-table transactions); writers put the table that records progress last.

Local mode (`local[2]`) keeps its catalog in memory, which a new process starts without: a manifest
file in `location` records each table's columns so the next session registers the tables again.
A cluster's metastore (Hive, Glue, Unity) keeps them itself.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import ibis
import ibis.expr.operations as ops
import ibis.expr.types as ir
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from exp_pipeline.registry import SAFE_ID_PATTERN, is_uri
from exp_pipeline.vocabulary import UTC_TIMESTAMP
from exp_pipeline.warehouse.interface import (
    SourceError,
    WarehouseSession,
    unreadable_file,
)

PARTITION_COLUMN = "experiment_id"
MANIFEST = "_exp_pipeline_tables"  # a folder: one CREATE statement per table (no shared file to race on)

def _quote(identifier: str) -> str:
    if not SAFE_ID_PATTERN.match(identifier):
        raise ValueError(f"unsafe identifier {identifier!r}")
    return f"`{identifier}`"


def _is_local(location: str) -> bool:
    return urlparse(location).scheme in ("", "file")


def _local_path(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.path if parsed.scheme in ("", "file") else uri


class SparkWarehouseSession(WarehouseSession):
    def __init__(self, spark, database: str, location: str | None):
        super().__init__()
        self.spark = spark
        self._views: list[str] = []
        self._checkpoints: list = []
        self.schema = database
        self.ibis = ibis.pyspark.connect(spark)
        # An overwrite replaces only the partitions it writes, staged and swapped in at commit.
        # (A DataFrameWriter option does not reach insertInto; the session setting does.)
        spark.conf.set("spark.sql.sources.partitionOverwriteMode", "dynamic")
        if location and "'" in location:
            raise ValueError(f"Spark table location {location!r} must not contain a quote")
        if location and _is_local(location):
            Path(_local_path(location)).mkdir(parents=True, exist_ok=True)
        where = f" LOCATION '{location}'" if location else ""
        spark.sql(f"CREATE DATABASE IF NOT EXISTS {_quote(database)}{where}")
        self.location = location or spark.sql(f"DESCRIBE DATABASE {_quote(database)}").filter(
            "info_name = 'Location'"
        ).collect()[0]["info_value"]
        self._register_known_tables()

    # -- the catalog ---------------------------------------------------------------------------

    def _manifest(self) -> Path | None:
        return Path(_local_path(self.location)) / MANIFEST if _is_local(self.location) else None

    def _record_in_manifest(self, name: str) -> None:
        folder = self._manifest()
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        statement = self.spark.sql(f"SHOW CREATE TABLE {self._qualified(name)}").collect()[0][0]
        temporary = folder / f".{name}.{uuid.uuid4().hex}.tmp"
        temporary.write_text(statement)
        os.replace(temporary, folder / f"{name}.sql")  # readers never see half a statement

    def _forget(self, name: str) -> None:
        folder = self._manifest()
        if folder is not None:
            (folder / f"{name}.sql").unlink(missing_ok=True)

    def _register_known_tables(self) -> None:
        folder = self._manifest()
        for path in sorted(folder.glob("*.sql")) if folder is not None else []:
            if not self.has_table(path.stem):
                self.spark.sql(path.read_text())
                self._recover_partitions(path.stem)

    def _recover_partitions(self, name: str) -> None:
        if PARTITION_COLUMN in self._partition_columns(name):
            self.spark.sql(f"ALTER TABLE {self._qualified(name)} RECOVER PARTITIONS")

    def _qualified(self, name: str) -> str:
        return f"{_quote(self.schema)}.{_quote(name)}"

    def _table_location(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def _columns(self, name: str) -> list:
        return self.spark.catalog.listColumns(f"{self.schema}.{name}")

    def _partition_columns(self, name: str) -> list[str]:
        return [c.name for c in self._columns(name) if c.isPartition]

    # -- reading -------------------------------------------------------------------------------

    def has_table(self, name: str) -> bool:
        return self.spark.catalog.tableExists(f"{self.schema}.{name}")

    def table(self, name: str) -> ir.Table:
        if not self.has_table(name):
            raise LookupError(
                f"table {self.schema}.{name} does not exist yet: materialize its asset first"
            )
        return self._utc(self.ibis.table(name, database=self.schema))

    @staticmethod
    def _utc(table: ir.Table) -> ir.Table:
        # Spark's TIMESTAMP is an instant shown in the session time zone (UTC here); Ibis reads it
        # as naive. Saying UTC makes the types the same as DuckDB's (a no-op cast in Spark).
        naive = [c for c, t in table.schema().items() if t.is_timestamp() and t.timezone is None]
        return table.mutate(**{c: table[c].cast(UTC_TIMESTAMP) for c in naive}) if naive else table

    def _catalog_table(self, qualified_name: str) -> ir.Table:
        database, _, table_name = qualified_name.rpartition(".")
        return self._utc(self.ibis.table(table_name, database=database or None))

    def _source_files(self, resolved_path: str, description: str) -> list[str]:
        # Spark lists object stores and HDFS itself (globs too); only local paths are checked here.
        if is_uri(resolved_path):
            return [resolved_path]
        return super()._source_files(_local_path(resolved_path), description)

    def _from_dataframe(self, frame, prefix: str) -> ir.Table:
        return self._utc(self.ibis.table(self._temp_view(frame, prefix)))

    def _temp_view(self, frame, prefix: str, name: str | None = None) -> str:
        """Name `frame` for this session's queries; dropped when the session closes."""
        name = name or f"{prefix}_{uuid.uuid4().hex}"
        frame.createOrReplaceTempView(name)
        self._views.append(name)
        return name

    def _checkpoint(self, frame):
        """`frame` computed now and kept (lineage cut) until the session closes."""
        kept = frame.localCheckpoint(eager=True)
        self._checkpoints.append(kept)
        return kept

    def close(self) -> None:
        """Release what the session kept: its views and checkpointed rows (executor memory/disk)."""
        for name in self._views:
            self.spark.catalog.dropTempView(name)
        for frame in self._checkpoints:
            frame.unpersist()
        self._views.clear()
        self._checkpoints.clear()

    def _with_source_file(self, frame):
        from pyspark.sql import functions as F

        # Spark names files as URL-encoded URIs (file:/...); DuckDB as paths: rows name the path
        # (it also orders duplicate rows, so both engines must see the same text).
        path = F.url_decode(F.col("_metadata.file_path"))
        return frame.withColumn("source_file", F.regexp_replace(path, r"^file:(//)?", ""))

    def _read_parquet(self, files: list[str], description: str, persist_as: str | None = None) -> ir.Table:
        from pyspark.sql import functions as F

        kinds: dict[str, set[bool]] = {}  # timestamp column -> {stored as nanoseconds?}
        for path in filter(_is_local, files):
            for field in self._probe_parquet(path, description):
                kinds.setdefault(field.name, set()).add(field.type.unit == "ns")
        mixed = sorted(c for c, k in kinds.items() if len(k) > 1)
        if mixed:
            raise SourceError(
                f"{description}: {', '.join(mixed)} is stored as nanoseconds in some files and not in "
                "others; Spark cannot read the two together. Rewrite the files with one unit "
                "(pyarrow: coerce_timestamps='us') or run on DuckDB"
            )
        nanos = sorted(c for c, k in kinds.items() if k == {True})
        # Spark has no nanosecond timestamps (pandas writes them by default): read them as
        # integers and keep microseconds, the pipeline's resolution. Once on, it stays on for the
        # session: a later source's read must not change how an earlier one's queries run. Files
        # on shared storage are not probed: write microseconds there.
        if nanos:
            self.spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
        frame = self.spark.read.option("mergeSchema", "true").parquet(*files)
        for column in nanos:
            quoted = column.replace("`", "``")
            frame = frame.withColumn(column, F.timestamp_micros(F.expr(f"`{quoted}` div 1000")))  # exact integers
        return self._from_dataframe(self._with_source_file(frame), "source")

    @staticmethod
    def _probe_parquet(path: str, description: str) -> list:
        """The file's timestamp fields; a SourceError naming the file if it is not Parquet."""
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow's error types vary by what is wrong
            raise unreadable_file(description, path, "parquet", str(exc).splitlines()[0]) from None
        return [field for field in schema if isinstance(field.type, pa.TimestampType)]

    def _read_csv(self, files: list[str], description: str, persist_as: str | None = None) -> ir.Table:
        from functools import reduce

        # Every column as text; a short last line is padded with nulls (PERMISSIVE), as on DuckDB.
        # One read per file, united by column name: Spark would take every file's columns from
        # the first file's header, by position.
        reader = self.spark.read.option("header", "true").option("mode", "PERMISSIVE").option("inferSchema", "false")
        frames = [self._with_source_file(reader.csv(path)) for path in files]
        frame = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
        return self._from_dataframe(frame, "source")

    def temp_table(self, name: str, expr: ir.Table) -> ir.Table:
        # Checkpointed (computed now, lineage cut): later queries, and an overwrite of a table
        # this was read from, see exactly these rows.
        frame = self._checkpoint(self._dataframe(expr))
        return self._utc(self.ibis.table(self._temp_view(frame, "temp", name)))

    def _dataframe(self, expr: ir.Table):
        view = f"expr_{uuid.uuid4().hex}"
        self.ibis.create_view(view, expr, overwrite=True)  # also registers in-memory tables
        self._views.append(view)
        return self.spark.table(view)

    # -- writing -------------------------------------------------------------------------------

    def _ensure_table(self, name: str, schema: ibis.Schema, partitioned: bool) -> None:
        from ibis.backends.pyspark.datatypes import PySparkType

        def ddl(column: str, dtype) -> str:
            return f"{_quote(column)} {PySparkType.from_ibis(dtype).simpleString()}"

        if not self.has_table(name):
            columns = [c for c in schema if not (partitioned and c == PARTITION_COLUMN)]
            if partitioned:
                columns.append(PARTITION_COLUMN)  # Spark keeps partition columns last
            partition = f" PARTITIONED BY ({_quote(PARTITION_COLUMN)})" if partitioned else ""
            if _is_local(self.location):
                Path(_local_path(self._table_location(name))).mkdir(parents=True, exist_ok=True)
            self.spark.sql(
                f"CREATE TABLE {self._qualified(name)} ({', '.join(ddl(c, schema[c]) for c in columns)}) "
                f"USING parquet{partition} LOCATION '{self._table_location(name)}'"
            )
            self._recover_partitions(name)  # files already there (a table dropped from the catalog)
            self._record_in_manifest(name)
            return
        self._refuse_retyping(name, schema)
        existing = {c.name for c in self._columns(name)}
        added = [c for c in schema if c not in existing]
        if added:
            # A newer pipeline version added a column: older partitions read it as null.
            self.spark.sql(
                f"ALTER TABLE {self._qualified(name)} ADD COLUMNS ({', '.join(ddl(c, schema[c]) for c in added)})"
            )
            self._record_in_manifest(name)

    def _schema_change_remedy(self, name: str, column: str, dtype) -> str:
        # A Parquet table's column type cannot be altered in Spark's catalog, and a dropped table
        # comes back from its files and the manifest: both must go for the next run to rebuild it.
        manifest = self._manifest()
        where = f" and its manifest entry {manifest / (name + '.sql')}" if manifest is not None else ""
        return (f"rewrite the table with {column} cast to {dtype}, or drop it (DROP TABLE {self._qualified(name)}) and "
                f"delete its folder {self._table_location(name)}{where} so that the next run rebuilds it from the logs")

    def _in_table_order(self, name: str, frame):
        from pyspark.sql import functions as F

        columns = [c.name for c in self._columns(name)]
        return frame.select(*[F.col(f"`{c}`") if c in frame.columns else F.lit(None).alias(c) for c in columns])

    @staticmethod
    def _reads_table(expr: ir.Table, name: str) -> bool:
        return any(op.name == name for op in expr.op().find(ops.DatabaseTable))

    def _write_partition(self, name: str, experiment_id: str, rows: ir.Table | pd.DataFrame) -> int:
        if not SAFE_ID_PATTERN.match(experiment_id):  # it is written into SQL below
            raise ValueError(f"unsafe experiment id {experiment_id!r}")
        expr = rows if isinstance(rows, ir.Table) else ibis.memtable(rows)
        self._ensure_table(name, expr.schema(), partitioned=True)
        frame = self._dataframe(expr.filter(expr[PARTITION_COLUMN] == experiment_id))
        # Spark refuses to overwrite a table the query reads; compute the rows first then.
        frame = self._checkpoint(frame) if self._reads_table(expr, name) else frame
        frame = self._in_table_order(name, frame)
        if frame.isEmpty():
            # A dynamic overwrite of no rows would keep the old partition; a static overwrite
            # clears it (no old+new mix to protect when the new content is empty).
            self.spark.sql(
                f"INSERT OVERWRITE {self._qualified(name)} PARTITION ({_quote(PARTITION_COLUMN)} = "
                f"'{experiment_id}') SELECT {', '.join(_quote(c) for c in frame.columns[:-1])} "
                f"FROM {self._temp_view(frame, 'rows')}"
            )
            return 0
        frame.write.insertInto(self._qualified(name), overwrite=True)
        return self._partition_rows(name, experiment_id)

    def _partition_rows(self, name: str, experiment_id: str) -> int:
        self.spark.catalog.refreshTable(f"{self.schema}.{name}")
        return self.spark.table(f"{self.schema}.{name}").filter(
            f"{PARTITION_COLUMN} = '{experiment_id}'"
        ).count()

    def replace_partitions(
        self, experiment_id: str, tables: dict[str, ir.Table | pd.DataFrame]
    ) -> dict[str, int]:
        return {name: self._write_partition(name, experiment_id, rows) for name, rows in tables.items()}

    def append(self, name: str, rows: ir.Table) -> None:
        self._ensure_table(name, rows.schema(), partitioned=False)
        self._in_table_order(name, self._dataframe(rows)).write.insertInto(self._qualified(name))

    def update_row(self, name: str, key_column: str, key: str, values: dict) -> None:
        # Only the small alert outbox is updated in place: rewritten whole.
        table = self.table(name)
        frame = self.to_pandas(table)
        matches = frame[key_column] == key
        for column, value in values.items():
            frame.loc[matches, column] = value
        self.replace_table(name, ibis.memtable(frame, schema=table.schema()))

    def replace_table(self, name: str, rows: ir.Table | pd.DataFrame) -> int:
        expr = rows if isinstance(rows, ir.Table) else ibis.memtable(rows)
        # Computed before anything is deleted: a failing query leaves the table as it was. (An
        # overwrite of an unpartitioned Parquet table still deletes before it writes.)
        frame = self._checkpoint(self._dataframe(expr))
        # A whole table replaced may change its columns and their types: it is created anew.
        if self.has_table(name) and (
            {c.name for c in self._columns(name)} != set(expr.columns) or self.retyped_columns(name, expr.schema())
        ):
            self.spark.sql(f"DROP TABLE {self._qualified(name)}")
            self._forget(name)
        self._ensure_table(name, expr.schema(), partitioned=False)
        self._in_table_order(name, frame).write.insertInto(self._qualified(name), overwrite=True)
        return self.count(self.table(name))

    def publish_view(self, name: str, expr: ir.Table) -> None:
        # The session's views die with it (and its sources are temporary views): the rows are
        # written as a table instead, replacing the per-experiment partitioned table of old.
        if self.has_table(name) and self._partition_columns(name):
            self.spark.sql(f"DROP TABLE {self._qualified(name)}")
            self._forget(name)
        self.replace_table(name, expr)


@contextmanager
def open_session(spark, database: str, location: str | None) -> Iterator[SparkWarehouseSession]:
    """A session on a Spark session (views and checkpoints released when it closes)."""
    session = SparkWarehouseSession(spark, database, location)
    try:
        yield session
    finally:
        session.close()
