"""The two logs named in the registry, as Ibis tables read through a warehouse session."""

from __future__ import annotations

import ibis.expr.types as ir

from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.transforms import ingestion
from exp_pipeline.warehouse.interface import WarehouseSession


def read_source(session: WarehouseSession, registry: Registry, kind: str) -> ir.Table:
    """The `assignments` or `events` source as logged, with `source_file`."""
    source = getattr(registry.sources, kind)
    path = registry.resolve_path(source.path) if source.path else None
    root = None if registry.allow_paths_outside_data_root else registry.data_root.resolve()
    return session.read_source(source, path, f"{kind} source", root)


def usable_events(session: WarehouseSession, registry: Registry, experiment: Experiment) -> ir.Table:
    """The experiment's metric events, without the rows source_audit rejects."""
    events = ingestion.canonical_events(read_source(session, registry, "events"), registry.sources.events)
    event_names = sorted({m.event_name for m in registry.metrics_of(experiment)})
    return ingestion.usable_events(events, event_names)
