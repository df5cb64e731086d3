"""The two logs named in the registry, as Ibis tables read through a warehouse session."""

from __future__ import annotations

import ibis.expr.types as ir

from exp_pipeline.registry import Registry
from exp_pipeline.warehouse.interface import WarehouseSession


def read_source(session: WarehouseSession, registry: Registry, kind: str, persist: bool = False) -> ir.Table:
    """The `assignments` or `events` source as logged, with `source_file`. `persist`: read through
    the warehouse view `<kind>_log` (the files of this run), which stored views can build on."""
    source = getattr(registry.sources, kind)
    path = registry.resolve_path(source.path) if source.path else None
    root = None if registry.allow_paths_outside_data_root else registry.data_root.resolve()
    return session.read_source(source, path, f"{kind} source", root, persist_as=f"{kind}_log" if persist else None)
