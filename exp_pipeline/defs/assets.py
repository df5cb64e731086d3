"""Thin assets: read from the warehouse, call the library, write one partition, report metadata."""

import datetime as dt
import json

import ibis
import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableColumnConstraints,
    TableSchema,
    asset,
    multi_asset,
)
from pydantic import Field

from exp_pipeline import dimensions, refresh, report_html, results, schemas
from exp_pipeline.defs.check_history import latest_check_results
from exp_pipeline.defs.partitions import WRITER_POOL, experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.refresh import SUBJECT_VALUES, SUBJECT_VALUES_STATE, WINDOW_EVENTS_STATE
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.reports import results_markdown
from exp_pipeline.transforms import fixed_point, ingestion, subject_values, temporal_join
from exp_pipeline.transforms.assignments import (
    analysable_assignments,
    apply_assignment_history,
    assignment_counts,
    exposure_row_counts,
    first_exposures,
)
from exp_pipeline.warehouse.interface import PartitionRefresh, WarehouseSession
from exp_pipeline.warehouse.resources import Warehouse

GROUP = "experiment_analysis"
OWNERS = ["team:experimentation"]
PREVIEW_ROWS = 5


def _columns(table: str) -> dict:
    """Static asset metadata: the column schema the UI shows, from the table's Pandera schema."""
    columns = [
        TableColumn(name, kind, text, constraints=TableColumnConstraints(nullable=nullable))
        for name, kind, nullable, text in schemas.TABLES[table].columns()
    ]
    return {"dagster/column_schema": TableSchema(columns=columns)}


def _written(session: WarehouseSession, table: str, experiment_id: str, rows: int) -> dict:
    """Row count and a small preview of what was written (a few rows only)."""
    # Any few rows: ordering them would sort the whole partition (millions of events) for a preview.
    preview = session.to_pandas(session.partition(table, experiment_id).limit(PREVIEW_ROWS))
    return {
        "dagster/row_count": rows,
        "preview": MetadataValue.md(preview.to_markdown(index=False) if len(preview) else "(no rows)"),
    }


def _experiment_asset(description: str, deps=(), kinds=("duckdb", "pandera"), columns: str | None = None):
    """The decorator of a per-experiment asset: one dynamic partition per experiment, one writer pool."""
    return asset(
        group_name=GROUP, owners=OWNERS, kinds=set(kinds), pool=WRITER_POOL,
        partitions_def=experiment_partitions, deps=list(deps),
        metadata=_columns(columns) if columns else None, description=description,
    )


def _experiment(context: AssetExecutionContext, registry: Registry) -> Experiment:
    try:
        return registry.experiment(context.partition_key)
    except KeyError:
        raise ValueError(
            f"partition {context.partition_key!r} is not an experiment in the registry; "
            "remove the partition or add the experiment to the registry"
        ) from None


def _read_source(session: WarehouseSession, registry: Registry, kind: str):
    source = getattr(registry.sources, kind)
    path = registry.resolve_path(source.path) if source.path else None
    return session.read_source(source, path, f"{kind} source")


def _usable_events(session: WarehouseSession, registry: Registry, experiment: Experiment):
    """The experiment's metric events, without the rows source_audit rejects."""
    events = ingestion.canonical_events(_read_source(session, registry, "events"), registry.sources.events)
    event_names = sorted({m.event_name for m in registry.metrics_of(experiment)})
    return ingestion.usable_events(events, event_names)


def _registry_asset(table: str, description: str):
    """The decorator of an asset built from the registry alone (one table, no partition)."""
    return asset(
        name=table, group_name=GROUP, owners=OWNERS, kinds={"duckdb"}, pool=WRITER_POOL,
        description=description, metadata=_columns(table),
    )


def _replace_dimension(warehouse: Warehouse, table: str, frame: pd.DataFrame) -> MaterializeResult:
    with warehouse.session() as session:
        rows = session.replace_table(table, frame)
    return MaterializeResult(
        metadata={"dagster/row_count": rows, "preview": MetadataValue.md(frame.to_markdown(index=False))}
    )


@_registry_asset("dim_experiments", "Experiments from the registry: dates, status and analysis settings.")
def dim_experiments(registry: RegistryResource, warehouse: Warehouse) -> MaterializeResult:
    frame = dimensions.dim_experiments_frame(registry.load(), dt.datetime.now(dt.UTC))
    return _replace_dimension(warehouse, "dim_experiments", frame)


@_registry_asset("dim_variants", "Variants per experiment: expected traffic share and which one is the control.")
def dim_variants(registry: RegistryResource, warehouse: Warehouse) -> MaterializeResult:
    return _replace_dimension(warehouse, "dim_variants", dimensions.dim_variants_frame(registry.load()))


@asset(
    group_name=GROUP, owners=OWNERS, kinds={"duckdb"}, pool=WRITER_POOL,
    description=(
        "Row accounting of both logs as a whole: exposure rows of no known experiment and event rows "
        "that cannot be used (missing ids or timestamps, unparsable timestamps, non-numeric values, "
        "exact duplicates) are kept in rejected_source_rows with their reason and file."
    ),
    metadata=_columns("rejected_source_rows"),
)
def source_audit(registry: RegistryResource, warehouse: Warehouse) -> MaterializeResult:
    reg = registry.load()
    with warehouse.session() as session:
        exposures = ingestion.canonical_assignments(
            _read_source(session, reg, "assignments"), reg.sources.assignments, None
        )
        unassignable = ingestion.unassignable_rows(exposures, [e.id for e in reg.experiments])
        events = ingestion.classify_events(
            ingestion.canonical_events(_read_source(session, reg, "events"), reg.sources.events)
        )
        exposure_counts = session.to_pandas(ingestion.rejection_counts(unassignable))
        event_counts = session.to_pandas(ingestion.rejection_counts(events))
        rejected = ibis.union(
            ingestion.rejected(unassignable, "assignments", None),
            ingestion.rejected(events, "events", None),
            distinct=False,
        )
        written = session.replace_table("rejected_source_rows", rejected)
    exposures, events = ingestion.RowAccounting.of(exposure_counts), ingestion.RowAccounting.of(event_counts)
    if written != exposures.rejected + events.rejected:
        raise RuntimeError(
            f"row accounting broke: {exposures.rejected} + {events.rejected} rows rejected, {written} written"
        )
    return MaterializeResult(
        metadata={
            "dagster/row_count": written,
            "assignment_rows_read": exposures.read,
            "assignment_rows_of_no_known_experiment": exposures.rejected,
            "assignment_rejected_by_reason": exposures.rejected_by_reason,
            "event_rows_read": events.read,
            "event_rows_usable": events.ingested,
            "event_rows_rejected": events.rejected,
            "event_rejected_share": events.rejected_share,
            "event_rejected_by_reason": events.rejected_by_reason,
        }
    )


@_experiment_asset(
    "The experiment's exposure log as ingested, many rows per subject, canonical names.",
    columns="raw_assignments",
)
def raw_assignments(
    context: AssetExecutionContext, registry: RegistryResource, warehouse: Warehouse
) -> MaterializeResult:
    reg = registry.load()
    experiment = _experiment(context, reg)
    source = reg.sources.assignments
    with warehouse.session() as session:
        rows = ingestion.canonical_assignments(_read_source(session, reg, "assignments"), source, experiment.id)
        classified = ingestion.classify_assignments(rows, experiment, source.properties)
        # Materialized once so that the counts and both writes see exactly the same rows.
        classified = session.temp_table("_classified_assignments", classified)
        counts = session.to_pandas(ingestion.rejection_counts(classified))
        written = session.replace_partitions(
            experiment.id,
            {
                "raw_assignments": ingestion.ingested(classified),
                "rejected_rows": ingestion.rejected(classified, "assignments", experiment.id),
            },
        )
        metadata = _written(session, "raw_assignments", experiment.id, written["raw_assignments"])
        skipped = list(session.skipped_empty_files)
    accounting = ingestion.RowAccounting.of(counts)
    # Every row read is either ingested or kept aside with its reason.
    if (written["raw_assignments"], written["rejected_rows"]) != (accounting.ingested, accounting.rejected):
        raise RuntimeError(
            f"row accounting broke for {experiment.id}: read {accounting.read}, wrote {written} (expected "
            f"{accounting.ingested} ingested and {accounting.rejected} rejected)"
        )
    return MaterializeResult(
        metadata={
            **metadata,
            "rows_read": accounting.read,
            "rows_ingested": accounting.ingested,
            "rows_rejected": accounting.rejected,
            "rejected_share": accounting.rejected_share,
            "rejected_by_reason": accounting.rejected_by_reason,
            "empty_files_skipped": skipped,
        }
    )


@_experiment_asset(
    (
        "One row per (experiment, subject) among active rows: first exposure wins, properties frozen "
        "at it, subjects exposed to several variants kept but excluded, corrections keep history."
    ),
    deps=[raw_assignments], columns="deduped_assignments",
)
def deduped_assignments(
    context: AssetExecutionContext, registry: RegistryResource, warehouse: Warehouse
) -> MaterializeResult:
    reg = registry.load()
    experiment = _experiment(context, reg)
    properties = reg.sources.assignments.properties
    with warehouse.session() as session:
        raw = session.partition("raw_assignments", experiment.id)
        current = first_exposures(raw, experiment, properties)
        previous = (
            session.partition("deduped_assignments", experiment.id)
            if session.has_table("deduped_assignments")
            else None
        )
        if previous is not None:
            # Materialize the previous state first: the write below replaces it.
            previous = session.temp_table("_previous_deduped", previous)
        recorded_at = dt.datetime.now(dt.UTC)
        new_state = apply_assignment_history(current, previous, recorded_at)
        written = session.replace_partition("deduped_assignments", experiment.id, new_state)
        row_counts = session.to_pandas(exposure_row_counts(raw, experiment))
        analysable = analysable_assignments(session.partition("deduped_assignments", experiment.id))
        counts = session.to_pandas(assignment_counts(analysable, []))
        written_metadata = _written(session, "deduped_assignments", experiment.id, written)
        excluded = session.count(
            session.partition("deduped_assignments", experiment.id).filter(
                lambda t: t.is_active & t.exclusion_reason.notnull()
            )
        )
    observed = dict(zip(counts["variant_id"], counts["n"].astype(int), strict=True))
    total_subjects = sum(observed.values()) + excluded
    reasons = dict(zip(row_counts["reason"], row_counts["rows"].astype(int), strict=True))
    per_variant = pd.DataFrame(
        [
            {
                "variant": v.id,
                "subjects": observed.get(v.id, 0),
                "observed_share": observed.get(v.id, 0) / max(sum(observed.values()), 1),
                "expected_share": v.weight,
            }
            for v in experiment.variants
        ]
    )
    return MaterializeResult(
        metadata={
            **written_metadata,
            "analysable_subjects": sum(observed.values()),
            "multi_variant_subjects": excluded,
            "multi_variant_share": excluded / total_subjects if total_subjects else 0.0,
            "exposure_rows_by_reason": reasons,
            "subjects_per_variant": MetadataValue.md(per_variant.to_markdown(index=False, floatfmt=".4f")),
        }
    )


class WindowEventsConfig(Config):
    full_refresh: bool = Field(
        default=False,
        description=(
            "recompute the experiment's window events from the whole event log instead of refreshing "
            "the days since the last run (use after backfilling events older than the late-arrival "
            "lookback)"
        ),
    )


post_assignment_events = AssetKey("post_assignment_events")
pre_assignment_events = AssetKey("pre_assignment_events")


@multi_asset(
    specs=[
        AssetSpec(
            post_assignment_events, group_name=GROUP, owners=OWNERS, kinds={"duckdb", "pandera"},
            deps=[deduped_assignments], metadata=_columns("post_assignment_events"),
            description=(
                "Events of analysable subjects at or after their assignment (event_at >= assigned_at) "
                "and inside the widest window of a metric on that event."
            ),
        ),
        AssetSpec(
            pre_assignment_events, group_name=GROUP, owners=OWNERS, kinds={"duckdb", "pandera"},
            deps=[deduped_assignments], metadata=_columns("pre_assignment_events"),
            description="Events of analysable subjects in the pre-assignment window (the CUPED covariate period).",
        ),
    ],
    name="window_events",
    partitions_def=experiment_partitions,
    pool=WRITER_POOL,
    description=(
        "One temporal join for both tables. Incremental: after the first run only events from the "
        "newest one seen minus sources.events.late_arrival_days are recomputed, plus the whole window "
        "of subjects assigned or changed since; a changed registry definition recomputes everything."
    ),
)
def window_events(
    context: AssetExecutionContext, config: WindowEventsConfig, registry: RegistryResource, warehouse: Warehouse
):
    reg = registry.load()
    experiment = _experiment(context, reg)
    metrics = reg.metrics_of(experiment)
    pre_window = experiment.cuped_pre_window_days
    fingerprint = reg.window_events_fingerprint(experiment)
    now = dt.datetime.now(dt.UTC)
    with warehouse.session() as session:
        deduped = session.partition("deduped_assignments", experiment.id)
        assignments_as_of = refresh.engine_timestamp(session.scalar(deduped.valid_from.max()))
        state = None if config.full_refresh else refresh.window_events_state(session, experiment.id, fingerprint)
        if state is not None and not refresh.history_reaches(
            refresh.engine_timestamp(session.scalar(deduped.valid_from.min())), state["assignments_as_of"]
        ):
            state = None
        analysable = analysable_assignments(deduped)
        analysable = analysable.mutate(
            is_new=ibis.literal(True) if state is None else analysable.valid_from > state["assignments_as_of"]
        )
        # Small (one row per subject); materialized so every query below sees the same subjects.
        analysable = session.temp_table("tmp_analysable", analysable)
        events = temporal_join.experiment_events(_usable_events(session, reg, experiment), experiment, metrics, pre_window)
        incremental = state is not None
        if incremental:
            earliest_new = session.scalar(analysable.filter(analysable.is_new).assigned_at.min())
            cutoff, scan_from = refresh.refresh_lower_bound(
                state["events_through"], reg.sources.events.late_arrival_days, refresh.engine_timestamp(earliest_new), pre_window
            )
            rows = refresh.refreshed_window_events(analysable, events, metrics, pre_window, cutoff, scan_from)
        else:
            rows = temporal_join.join_window_events(analysable, events, metrics, pre_window)
        rows = session.temp_table("tmp_window_events", rows)
        events_through = refresh.next_events_through(
            refresh.engine_timestamp(session.scalar(rows.event_at.max())), state and state["events_through"], now
        )
        new_state = refresh.state_frame({
            "experiment_id": experiment.id,
            "fingerprint": fingerprint,
            "events_through": events_through,
            "assignments_as_of": assignments_as_of,
            "refreshed_at": now,
            "mode": "incremental" if incremental else "full",
            # What variant_metrics needs to reuse per-subject values: the rows this refresh
            # rewrote are those at or after refreshed_from, on top of the refresh before it.
            "refreshed_from": cutoff if incremental else None,
            "previous_refreshed_at": state["refreshed_at"] if incremental else None,
        })
        tables = {
            "post_assignment_events": temporal_join.post_assignment_rows(rows),
            "pre_assignment_events": temporal_join.pre_assignment_rows(rows),
        }
        if incremental:
            stale = session.temp_table(
                "tmp_stale_subjects", refresh.assignments_changed_since(deduped, state["assignments_as_of"])
            )
            refreshed = session.refresh_partitions(
                experiment.id,
                {
                    name: PartitionRefresh(rows=expr, stale_from=("event_at", cutoff), stale_subjects=stale)
                    for name, expr in tables.items()
                },
                replace={WINDOW_EVENTS_STATE: new_state},
            )
            written = {name: counts.rows for name, counts in refreshed.items()}
        else:
            written = session.replace_partitions(experiment.id, {**tables, WINDOW_EVENTS_STATE: new_state})
        results = []
        for name in tables:
            metadata = _written(session, name, experiment.id, written[name])
            metadata["refresh_mode"] = "incremental" if incremental else "full"
            if incremental:
                metadata["refreshed_from"] = MetadataValue.timestamp(cutoff)
                metadata["rows_deleted"] = refreshed[name].deleted
                metadata["rows_inserted"] = refreshed[name].inserted
            results.append(MaterializeResult(asset_key=AssetKey(name), metadata=metadata))
    yield from results


def _bounds(session: WarehouseSession, table: ibis.Table, by: str) -> dict[str, fixed_point.SumBound]:
    return fixed_point.read_bounds(session.to_pandas(fixed_point.value_bounds(table, by)), by)


@_experiment_asset(
    (
        "Per (experiment, variant, metric): sufficient statistics, lift vs control with its interval "
        "and p-value, CUPED-adjusted lift, Holm-adjusted p-values and the SRM verdict. The "
        "per-subject values behind them are kept (subject_metric_values): a daily refresh "
        "recomputes only the subjects whose events or assignment can have changed."
    ),
    deps=[deduped_assignments, post_assignment_events, pre_assignment_events],
    kinds=("duckdb", "pandas", "pandera"),
    columns="variant_metrics",
)
def variant_metrics(
    context: AssetExecutionContext, registry: RegistryResource, warehouse: Warehouse
) -> MaterializeResult:
    reg = registry.load()
    experiment = _experiment(context, reg)
    metrics = reg.metrics_of(experiment)
    properties = reg.sources.assignments.properties
    periods = ["post", "pre"] if experiment.cuped_pre_window_days > 0 else ["post"]
    fingerprint = reg.subject_values_fingerprint(experiment)
    now = dt.datetime.now(dt.UTC)
    with warehouse.session() as session:
        deduped = session.partition("deduped_assignments", experiment.id)
        assignments_as_of = refresh.engine_timestamp(session.scalar(deduped.valid_from.max()))
        assignments = session.temp_table(
            "tmp_metric_assignments",
            analysable_assignments(deduped).select(
                "experiment_id", "subject_id", "variant_id", "assigned_at", "valid_from", *properties
            ),
        )
        event_bounds = {
            p: _bounds(session, session.partition(refresh.PERIOD_EVENTS[p], experiment.id), "event_name") for p in periods
        }
        scales = {p: subject_values.subject_value_scales(event_bounds[p], metrics) for p in periods}
        events_state = refresh.one_state_row(session, WINDOW_EVENTS_STATE, experiment.id)
        reuse = refresh.subject_values_reuse(
            refresh.stored_values_state(session, experiment.id), events_state, fingerprint, scales,
            max(m.window_end_days for m in metrics),
        )
        values, recomputed = {}, {}
        for period in periods:
            values[period], recomputed[period] = refresh.period_values(
                session, assignments, period, experiment.id, metrics, event_bounds[period], reuse
            )
        # Caps are quantiles over the (materialized) values: cheap enough to compute in each query.
        capped = {p: subject_values.cap_subject_values(v.drop("period"), metrics) for p, v in values.items()}
        post, pre = capped["post"], capped.get("pre")
        x_bounds = _bounds(session, pre, "metric") if pre is not None else None
        # Only these small tables leave the engine.
        sufficient = session.to_pandas(
            subject_values.sufficient_statistics(post, pre, _bounds(session, post, "metric"), x_bounds)
        )
        counts = session.to_pandas(assignment_counts(assignments, properties))
        srm, causes = results.srm_of(counts, experiment)
        frame = results.variant_metric_rows(sufficient, experiment, metrics, srm)
        values_state = refresh.state_frame({
            "experiment_id": experiment.id,
            "fingerprint": fingerprint,
            "scales": json.dumps(scales, sort_keys=True),
            "events_refreshed_at": events_state["refreshed_at"] if events_state else None,
            "events_assignments_as_of": events_state["assignments_as_of"] if events_state else None,
            "assignments_as_of": assignments_as_of,
            "computed_at": now,
            "mode": "full" if reuse is None else "incremental",
        })
        all_values = ibis.union(*values.values(), distinct=False)
        written = session.replace_partitions(
            experiment.id,
            {"variant_metrics": frame, SUBJECT_VALUES: all_values, SUBJECT_VALUES_STATE: values_state},
        )["variant_metrics"]
        subjects = int(counts.query("property == ''").n.sum())
    plot = report_html.forest_plot_svg(frame, title=f"{experiment.name}: relative lift vs control (95% CI)")
    metadata = {
        "dagster/row_count": written,
        "srm_p_value": float(srm.p_value),
        "srm_flagged": srm.flagged,
        "results": MetadataValue.md(results_markdown(frame)),
        "forest_plot": MetadataValue.md(f"![forest plot of relative lifts]({report_html.svg_data_uri(plot)})"),
        "subject_values": "full" if reuse is None else "incremental",
        "analysable_subjects": subjects,
        **{f"subjects_recomputed_{p}": n for p, n in recomputed.items()},
    }
    if causes:
        top = causes[0]
        metadata["srm_likely_cause"] = f"{top.property} = {top.value} (p = {top.p_value_bonferroni:.2e})"
    return MaterializeResult(metadata=metadata)


def _check_keys(context: AssetExecutionContext):
    """Every check defined beside this asset (its job's asset graph): the report lists their latest
    results without this module importing the checks, which import it."""
    return context.job_def.asset_layer.asset_graph.asset_check_keys


@_experiment_asset(
    (
        "A self-contained HTML report per experiment (results table, forest plot, SRM verdict, check "
        "results) written under the data root's reports/ folder, for attaching to a decision."
    ),
    deps=[variant_metrics], kinds=("html",),
)
def experiment_report(
    context: AssetExecutionContext, registry: RegistryResource, warehouse: Warehouse
) -> MaterializeResult:
    reg = registry.load()
    experiment = _experiment(context, reg)
    with warehouse.session() as session:
        metrics = session.partition("variant_metrics", experiment.id)
        frame = session.to_pandas(metrics.order_by("metric", "variant_id"))
        assignments = analysable_assignments(session.partition("deduped_assignments", experiment.id))
        counts = session.to_pandas(assignment_counts(assignments, reg.sources.assignments.properties))
    srm, causes = results.srm_of(counts, experiment)
    html_text = report_html.experiment_report_html(
        experiment_id=experiment.id,
        name=experiment.name,
        frame=frame,
        checks=latest_check_results(context.instance, _check_keys(context), experiment.id),
        srm={
            "verdict": srm.verdict,
            "p_value": float(srm.p_value),
            "observed": srm.observed,
            "expected": srm.expected,
            "likely_cause": f"{causes[0].property} = {causes[0].value}" if causes else None,
        },
        generated_at=dt.datetime.now(dt.UTC),
    )
    path = report_html.write_report(reg.data_root / "reports" / f"{experiment.id}.html", html_text)
    return MaterializeResult(
        metadata={"report_path": MetadataValue.path(str(path)), "report_url": MetadataValue.url(path.as_uri())}
    )


ANALYSIS_ASSETS = [raw_assignments, deduped_assignments, window_events, variant_metrics, experiment_report]
REGISTRY_ASSETS = [dim_experiments, dim_variants, source_audit]
