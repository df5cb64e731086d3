"""Thin assets: read from the warehouse, call the library, write one partition, report metadata."""

import datetime as dt

import ibis
import pandas as pd
from dagster import (
    AssetCheckSpec,
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

from exp_pipeline import checks, dimensions, refresh, report_html, results, schemas, sources
from exp_pipeline.analysis import analyse_experiment
from exp_pipeline.defs.check_history import latest_check_results
from exp_pipeline.defs.checks import CHECK_KEYS, ROWS_READ_CHECK, check_result
from exp_pipeline.defs.partitions import WRITER_POOL, experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.reports import results_markdown
from exp_pipeline.transforms import ingestion
from exp_pipeline.transforms.assignments import (
    analysable_assignments,
    apply_assignment_history,
    assignment_counts,
    exposure_row_counts,
    first_exposures,
)
from exp_pipeline.warehouse.interface import WarehouseSession
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


def _experiment_asset(
    description: str, deps=(), kinds=("duckdb", "pandera"), columns: str | None = None, check_specs=()
):
    """The decorator of a per-experiment asset: one dynamic partition per experiment, one writer pool."""
    return asset(
        group_name=GROUP, owners=OWNERS, kinds=set(kinds), pool=WRITER_POOL,
        partitions_def=experiment_partitions, deps=list(deps), check_specs=list(check_specs),
        metadata=_columns(columns) if columns else None, description=description,
    )


def _rows_read_spec(asset_key: str, source: str) -> AssetCheckSpec:
    """The check an asset evaluates as it reads its source: nothing replaced by an empty export,
    no large unexplained drop."""
    return AssetCheckSpec(
        ROWS_READ_CHECK, asset=asset_key, blocking=True, partitions_def=experiment_partitions,
        description=(
            f"The {source} source is not empty where the warehouse holds rows from the last run (ERROR: "
            f"they are kept, not reset to nothing, and downstream stops) and read at most "
            f"sources.{source}.max_row_drop_share fewer rows than the run before (WARN)."
        ),
    )


def _stored_rows(session: WarehouseSession, table: str, experiment_id: str) -> int:
    return session.count(session.partition(table, experiment_id)) if session.has_table(table) else 0


def _kept_instead_of_empty(
    context: AssetExecutionContext, accept_empty_source: bool, what: str, rows_read: int, stored: int,
    table: str, rows_before: int | None, bound: float, asset_key: AssetKey | None = None,
) -> MaterializeResult | None:
    """When the source reads no rows where `table` holds the experiment's `stored` rows: nothing is
    written, and the result carries the failed (blocking) rows_read check. None: write as usual."""
    if rows_read or not stored or accept_empty_source:
        return None
    # An export that came out empty (a header-only file) must not reset the experiment.
    outcome = checks.evaluate_rows_read(what, 0, rows_before, bound, kept=f"{stored} rows of {table}")
    context.log.error(f"{context.partition_key}: {outcome.description}")
    return MaterializeResult(
        asset_key=asset_key, metadata={"rows_read": 0, "rows_kept": stored},
        check_results=[check_result(outcome, ROWS_READ_CHECK)],
    )


class SourceReadConfig(Config):
    accept_empty_source: bool = Field(
        default=False,
        description=(
            "replace the experiment's stored rows even when the source now has none (by default an "
            "empty source keeps the previous rows and fails the rows_read_not_dropped check)"
        ),
    )


def _experiment(context: AssetExecutionContext, registry: Registry) -> Experiment:
    try:
        return registry.experiment(context.partition_key)
    except KeyError:
        raise ValueError(
            f"partition {context.partition_key!r} is not an experiment in the registry; "
            "remove the partition or add the experiment to the registry"
        ) from None


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
        exposure_log = sources.read_source(session, reg, "assignments")
        event_log = sources.read_source(session, reg, "events")
        exposures = ingestion.canonical_assignments(exposure_log, reg.sources.assignments, None)
        unassignable = ingestion.unassignable_rows(exposures, [e.id for e in reg.experiments])
        events = ingestion.classify_events(ingestion.canonical_events(event_log, reg.sources.events))
        epoch_units = {}
        for kind, log, canonical in (("assignments", exposure_log, "assigned_at"), ("events", event_log, "event_at")):
            source = getattr(reg.sources, kind)
            counts = ingestion.epoch_unit_counts(log, source.source_column(canonical), source.timestamp_unit)
            if counts is not None:
                frame = session.to_pandas(counts)
                if len(frame):
                    epoch_units[f"{canonical}_epoch_units"] = dict(zip(frame["unit"], frame["rows"].astype(int), strict=True))
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
            # Timestamps logged as epoch numbers: the unit each was read in (declared or detected).
            **epoch_units,
        }
    )


@_experiment_asset(
    "The experiment's exposure log as ingested, many rows per subject, canonical names.",
    columns="raw_assignments", check_specs=[_rows_read_spec("raw_assignments", "assignments")],
)
def raw_assignments(
    context: AssetExecutionContext, config: SourceReadConfig, registry: RegistryResource, warehouse: Warehouse
) -> MaterializeResult:
    reg = registry.load()
    experiment = _experiment(context, reg)
    source = reg.sources.assignments
    what = f"the exposure log for {experiment.id}"
    with warehouse.session() as session:
        rows = ingestion.canonical_assignments(sources.read_source(session, reg, "assignments"), source, experiment.id)
        classified = ingestion.classify_assignments(rows, experiment, source.properties)
        # Materialized once so that the counts and both writes see exactly the same rows.
        classified = session.temp_table("_classified_assignments", classified)
        counts = session.to_pandas(ingestion.rejection_counts(classified))
        accounting = ingestion.RowAccounting.of(counts)
        stored = _stored_rows(session, "raw_assignments", experiment.id)
        kept = _kept_instead_of_empty(
            context, config.accept_empty_source, what, accounting.read, stored, "raw_assignments", stored,
            source.max_row_drop_share,
        )
        if kept is not None:
            return kept
        written = session.replace_partitions(
            experiment.id,
            {
                "raw_assignments": ingestion.ingested(classified),
                "rejected_rows": ingestion.rejected(classified, "assignments", experiment.id),
            },
        )
        metadata = _written(session, "raw_assignments", experiment.id, written["raw_assignments"])
        skipped = list(session.skipped_empty_files)
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
        },
        check_results=[
            check_result(
                checks.evaluate_rows_read(what, accounting.ingested, stored or None, source.max_row_drop_share),
                ROWS_READ_CHECK,
            )
        ],
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


class WindowEventsConfig(SourceReadConfig):
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
    check_specs=[_rows_read_spec("post_assignment_events", "events")],
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
    bound = reg.sources.events.max_row_drop_share
    what = "the event log"
    with warehouse.session() as session:
        rows_read = session.count(sources.read_source(session, reg, "events"))
        previous = refresh.one_state_row(session, refresh.WINDOW_EVENTS_STATE, experiment.id)
        rows_before = previous.get("event_rows_read") if previous else None
        rows_before = None if rows_before is None or pd.isna(rows_before) else int(rows_before)
        stored = _stored_rows(session, "post_assignment_events", experiment.id)
        kept = _kept_instead_of_empty(
            context, config.accept_empty_source, what, rows_read, stored, "post_assignment_events", rows_before,
            bound, asset_key=post_assignment_events,
        )
        if kept is not None:
            yield kept
            return
        written = refresh.write_window_events(
            session, reg, experiment, config.full_refresh, dt.datetime.now(dt.UTC), rows_read
        )
        results = []
        for name, rows in written.rows.items():
            metadata = {**_written(session, name, experiment.id, rows), "refresh_mode": written.mode}
            if written.refreshed_from is not None:
                metadata["refreshed_from"] = MetadataValue.timestamp(written.refreshed_from)
                metadata["rows_deleted"] = written.refreshed[name].deleted
                metadata["rows_inserted"] = written.refreshed[name].inserted
            checked = []
            if AssetKey(name) == post_assignment_events:
                metadata["event_log_rows_read"] = rows_read
                checked = [check_result(checks.evaluate_rows_read(what, rows_read, rows_before, bound), ROWS_READ_CHECK)]
            results.append(MaterializeResult(asset_key=AssetKey(name), metadata=metadata, check_results=checked))
    yield from results


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
    with warehouse.session() as session:
        analysis = analyse_experiment(session, reg, experiment, dt.datetime.now(dt.UTC))
    frame, srm = analysis.frame, analysis.srm
    plot = report_html.forest_plot_svg(frame, title=f"{experiment.name}: relative lift vs control (95% CI)")
    metadata = {
        "dagster/row_count": analysis.rows,
        "srm_p_value": float(srm.p_value),
        "srm_flagged": srm.flagged,
        "results": MetadataValue.md(results_markdown(frame)),
        "forest_plot": MetadataValue.md(f"![forest plot of relative lifts]({report_html.svg_data_uri(plot)})"),
        "subject_values": analysis.subject_values,
        "analysable_subjects": analysis.analysable_subjects,
        **{f"subjects_recomputed_{p}": n for p, n in analysis.subjects_recomputed.items()},
    }
    if analysis.causes:
        top = analysis.causes[0]
        metadata["srm_likely_cause"] = f"{top.property} = {top.value} (p = {top.p_value_bonferroni:.2e})"
    return MaterializeResult(metadata=metadata)


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
        checks=latest_check_results(context.instance, CHECK_KEYS, experiment.id),
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
