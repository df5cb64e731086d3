"""Resources and where they point by default (environment variables override every default)."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource

from exp_pipeline.registry import Registry, load_registry
from exp_pipeline.warehouse import Warehouse

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = PROJECT_ROOT / "data" / "registry.yaml"
# The schema is `exp`; the file is not named after it (DuckDB 2.0 finds `exp.x` ambiguous then).
DEFAULT_DUCKDB = PROJECT_ROOT / "data" / "warehouse" / "warehouse.duckdb"


class RegistryResource(ConfigurableResource):
    """The experiment registry file; read fresh on every use so edits apply without a restart."""

    path: str

    def load(self) -> Registry:
        return load_registry(self.path)


def registry_path() -> str:
    return os.environ.get("EXP_PIPELINE_REGISTRY", str(DEFAULT_REGISTRY))


def duckdb_path() -> str:
    return os.environ.get("EXP_PIPELINE_DUCKDB", str(DEFAULT_DUCKDB))


def default_resources() -> dict[str, ConfigurableResource]:
    # Only paths are resolved here: nothing opens the database at import time.
    return {
        "registry": RegistryResource(path=registry_path()),
        "warehouse": Warehouse(duckdb=DuckDBResource(database=duckdb_path())),
    }
