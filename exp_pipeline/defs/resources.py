"""The resources every asset, check and sensor uses: the registry file and the warehouse engine.

Only paths and settings are resolved here (from the environment, see exp_pipeline.settings):
nothing opens the database or starts Spark when the definitions load.
"""

import dagster as dg

from exp_pipeline import settings
from exp_pipeline.registry import Registry, load_registry
from exp_pipeline.warehouse.resources import default_warehouse


class RegistryResource(dg.ConfigurableResource):
    """The experiment registry file; read fresh on every use so edits apply without a restart."""

    path: str

    def load(self) -> Registry:
        return load_registry(self.path)


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {"registry": RegistryResource(path=settings.registry_path()), "warehouse": default_warehouse()}


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
