"""Shared fixtures: a generated sample with its registry, warehouse and Dagster instance in tmp."""

import shutil
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster_duckdb import DuckDBResource

from exp_pipeline.resources import DEFAULT_REGISTRY, RegistryResource
from exp_pipeline.sample_data import generate
from exp_pipeline.warehouse import Warehouse

# Big enough that a 12% revenue lift is clearly detectable (same size as the README's run).
E2E_USERS = 100_000


class Workspace:
    def __init__(self, root: Path, users: int):
        self.root = root
        self.registry_path = root / "registry.yaml"
        shutil.copy(DEFAULT_REGISTRY, self.registry_path)
        self.truth = generate(root / "sample", n_users=users)
        self.database = root / "warehouse" / "warehouse.duckdb"

    def resources(self) -> dict:
        return {
            "registry": RegistryResource(path=str(self.registry_path)),
            "warehouse": Warehouse(duckdb=DuckDBResource(database=str(self.database))),
        }

    def warehouse(self) -> Warehouse:
        return self.resources()["warehouse"]


@pytest.fixture(scope="session")
def sample_workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("sample"), E2E_USERS)


@pytest.fixture()
def instance(tmp_path):
    with DagsterInstance.local_temp(str(tmp_path)) as dagster_instance:
        yield dagster_instance
