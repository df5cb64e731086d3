"""Thin assets: read from the warehouse, call the library, write, report metadata (per experiment
partition for the analysis pass)."""

import datetime as dt
import glob

import ibis
import pandas as pd
from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetSpec,
    BackfillPolicy,
    Config,
    FreshnessPolicy,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableColumnConstraints,
    TableSchema,
    asset,
    multi_asset,
    with_source_code_references,
)
from pydantic import Field

from exp_pipeline import alerts, dimensions, preflight, report_html, schemas, settings, sources
from exp_pipeline.analysis import PASS_ASSETS, ExperimentResult, analyse_experiments
from exp_pipeline.checks import DEDUPED, EXPERIMENT_CHECKS, METRICS, POST, PRE, RAW
from exp_pipeline.defs.check_history import latest_check_results
from exp_pipeline.defs.checks import EXPERIMENT_CHECK_SPECS, check_evaluation, source_audit_rejected_share
from exp_pipeline.defs.partitions import WRITER_POOL, experiment_partitions
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.registry import Experiment, Registry
from exp_pipeline.reports import heterogeneity_markdown, report_markdown, results_markdown
from exp_pipeline.transforms import ingestion
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


# The inputs, as external assets: the lineage starts at the logs and the registry file. Their
# paths and row counts are observed by source_audit, which reads both logs whole.
# In the pipeline's group: the UI draws one group's graph expanded, with its inputs at the left.
EXPOSURE_LOG, EVENT_LOG, REGISTRY_FILE = "exposure_log", "event_log", "experiment_registry"
exposure_log = AssetSpec(
    EXPOSURE_LOG, group_name=GROUP, owners=OWNERS,
    description="The feature-flag system's exposure log (registry: sources.assignments), read as it is.",
)
event_log = AssetSpec(
    EVENT_LOG, group_name=GROUP, owners=OWNERS,
    description="The product's event log (registry: sources.events), read as it is.",
)
experiment_registry = AssetSpec(
    REGISTRY_FILE, group_name=GROUP, owners=OWNERS, kinds={"yaml"},
    description="The experiment registry: experiments, variants, metrics and where the logs are.",
    metadata={"path": MetadataValue.path(settings.registry_path())},
)


def _observe_registry(context: AssetExecutionContext, registry_path: str, reg: Registry) -> None:
    context.log_event(AssetObservation(asset_key=REGISTRY_FILE, metadata={
        "path": MetadataValue.path(registry_path),
        "experiments": len(reg.experiments),
        "metrics": len(reg.metrics),
    }))


def _registry_asset(table: str, description: str):
    """The decorator of an asset built from the registry alone (one table, no partition)."""
    return asset(
        name=table, group_name=GROUP, owners=OWNERS, kinds={"duckdb"}, pool=WRITER_POOL,
        description=description, metadata=_columns(table), deps=[REGISTRY_FILE],
    )


def _replace_dimension(warehouse: Warehouse, table: str, frame: pd.DataFrame) -> MaterializeResult:
    with warehouse.session() as session:
        rows = session.replace_table(table, frame)
    return MaterializeResult(
        metadata={"dagster/row_count": rows, "preview": MetadataValue.md(frame.to_markdown(index=False))}
    )


@_registry_asset("dim_experiments", "Experiments from the registry: dates, status and analysis settings.")
def dim_experiments(context: AssetExecutionContext, registry: RegistryResource, warehouse: Warehouse) -> MaterializeResult:
    reg = registry.load()
    _observe_registry(context, registry.path, reg)
    frame = dimensions.dim_experiments_frame(reg, dt.datetime.now(dt.UTC))
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
    deps=[EXPOSURE_LOG, EVENT_LOG, REGISTRY_FILE],
)
def source_audit(context: AssetExecutionContext, registry: RegistryResource, warehouse: Warehouse) -> MaterializeResult:
    reg = registry.load()
    with warehouse.session() as session:
        preflight.require_ready(session, reg, registry.path)
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
        rejected = ibis.union(
            ingestion.rejected(unassignable, "assignments", None),
            ingestion.rejected(events, "events", None),
            distinct=False,
        )
        # One scan of each log: the rows kept aside are written, their reasons counted from the
        # written table, and every other row read is usable (read = ingested + rejected).
        written = session.replace_table("rejected_source_rows", rejected)
        stored = session.table("rejected_source_rows")
        by_reason = session.to_pandas(stored.group_by("source", "reason").aggregate(rows=stored.count()))
        read = {"assignments": session.count(exposure_log), "events": session.count(event_log)}
    for kind, key in (("assignments", EXPOSURE_LOG), ("events", EVENT_LOG)):
        source = getattr(reg.sources, kind)
        where = source.table or reg.resolve_path(source.path)
        # The files the path matches (a listing, not a scan); a warehouse table has none.
        files = {} if source.table else {"files": len(glob.glob(where))}
        context.log_event(AssetObservation(asset_key=key, metadata={
            "path": MetadataValue.path(where), "dagster/row_count": read[kind], **files,
        }))
    exposures, events = (
        ingestion.RowAccounting.of_rejected(by_reason[by_reason.source == kind], read[kind])
        for kind in ("assignments", "events")
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


class AnalysisConfig(Config):
    accept_empty_source: bool = Field(
        default=False,
        description=(
            "replace an experiment's stored rows even when a source now has none (by default an "
            "empty source keeps the previous rows and results and fails the rows_read_not_dropped check)"
        ),
    )
    experiment_ids: list[str] = Field(
        default_factory=list,
        description=(
            "analyse only these experiments of the run's partitions (a run covers a range of "
            "partitions; empty: all of them)"
        ),
    )


def _spec(table: str, description: str, kinds=("duckdb", "pandera"), deps=(), freshness_policy=None) -> AssetSpec:
    return AssetSpec(
        table, group_name=GROUP, owners=OWNERS, kinds=set(kinds), deps=list(deps), skippable=True,
        metadata=_columns(table) if table in schemas.TABLES else None, description=description,
        freshness_policy=freshness_policy,
    )


REPORT = "experiment_report"


def _analysis_specs() -> list[AssetSpec]:
    # Built by a function: load_from_defs_folder would take module-level specs for assets of their own.
    return [
        _spec(RAW, "The experiment's exposure log as ingested, many rows per subject, canonical names.",
              deps=[EXPOSURE_LOG, REGISTRY_FILE]),
        _spec(DEDUPED, (
            "One row per (experiment, subject) among active rows: first exposure wins, properties frozen "
            "at it, subjects exposed to several variants kept but excluded, corrections keep history."
        ), deps=[RAW]),
        _spec(POST, (
            "A view: events of analysable subjects at or after their assignment (event_at >= assigned_at) "
            "and inside the widest window of a metric on that event, joined at query time."
        ), deps=[DEDUPED, EVENT_LOG]),
        _spec(PRE, "A view: events of analysable subjects in the pre-assignment window (the CUPED covariate period).",
              deps=[DEDUPED, EVENT_LOG]),
        _spec(METRICS, (
            "Per (experiment, variant, metric): sufficient statistics, lift vs control with its interval "
            "and p-value, CUPED-adjusted lift, Holm-adjusted p-values and the SRM verdict."
        ), kinds=("duckdb", "pandas", "pandera"), deps=[DEDUPED, POST, PRE, REGISTRY_FILE],
            # Late in the UI when the daily refresh missed a day (alert_on_late_results alerts per experiment).
            freshness_policy=FreshnessPolicy.time_window(
                fail_window=alerts.RESULTS_LATE_AFTER, warn_window=alerts.RESULTS_WARN_AFTER
            )),
        _spec(REPORT, (
            "A self-contained HTML report per experiment (results table, forest plot, SRM verdict, check "
            "results) written under the data root's reports/ folder, for attaching to a decision."
        ), kinds=("html",), deps=[METRICS, "source_audit"]),
    ]


def _materialization(asset: str, partition: str, result: ExperimentResult) -> AssetMaterialization:
    metadata = dict(result.metadata[asset])
    metadata.update({name: MetadataValue.md(text) for name, text in result.markdown.get(asset, {}).items()})
    return AssetMaterialization(asset_key=asset, partition=partition, metadata=metadata)


def _results_markdown(experiment: Experiment, result: ExperimentResult) -> dict[str, str]:
    """The results table, the forest plot and (when any) the results by segment, as markdown."""
    plot = report_html.forest_plot_svg(result.frame, title=f"{experiment.name}: relative lift vs control (95% CI)")
    sections = {
        "results": results_markdown(result.frame),
        "forest_plot": f"![forest plot of relative lifts]({report_html.svg_data_uri(plot)})",
    }
    if result.heterogeneity is not None and len(result.heterogeneity):
        plots = [
            f"![relative lift by {prop}]({report_html.svg_data_uri(report_html.segment_forest_plot_svg(result.segments, prop))})"
            for prop in dict.fromkeys(result.heterogeneity["property"])
        ]
        sections["by_segment"] = heterogeneity_markdown(result.heterogeneity) + "\n\n" + "\n\n".join(plots)
    return sections


def _report(
    registry: Registry, experiment: Experiment, result: ExperimentResult, audit_rows: list[dict], sections: dict[str, str]
) -> dict:
    """Write the experiment's HTML report from what the pass computed (and `audit_rows`, the latest
    source-audit check results, and `sections`, its results as markdown); its metadata."""
    srm, causes = result.srm, result.causes
    order = [(c.asset, c.check) for c in EXPERIMENT_CHECKS]
    check_rows = [
        {"asset": c.asset, "check": c.check, "passed": c.outcome.passed, "severity": c.outcome.severity,
         "description": c.outcome.description}
        for c in sorted(result.checks, key=lambda c: order.index((c.asset, c.check)))
    ] + audit_rows
    srm_figures = {
        "verdict": srm.verdict,
        "p_value": float(srm.p_value),
        "observed": srm.observed,
        "expected": srm.expected,
        "likely_cause": f"{causes[0].property} = {causes[0].value}" if causes else None,
    }
    html_text = report_html.experiment_report_html(
        experiment_id=experiment.id,
        name=experiment.name,
        frame=result.frame.sort_values(["metric", "variant_id"]),
        checks=check_rows,
        srm=srm_figures,
        generated_at=dt.datetime.now(dt.UTC),
        segments=result.segments,
        heterogeneity=result.heterogeneity,
    )
    path = report_html.write_report(registry.data_root / "reports" / f"{experiment.id}.html", html_text)
    # The report itself, one click away in the UI (a browser opens no file:// link from a web page).
    report = report_markdown(
        experiment.name, experiment.id, srm_figures, sections["results"], sections["forest_plot"],
        sections.get("by_segment"), check_rows,
    )
    return {"report": MetadataValue.md(report), "report_path": MetadataValue.path(str(path))}


def _log_failures(context: AssetExecutionContext, experiment_id: str, result: ExperimentResult) -> None:
    """Failed checks also go to the run log, where a person reading the run sees them first."""
    for record in result.checks:
        if not record.outcome.passed:
            log = context.log.error if record.outcome.severity == "ERROR" else context.log.warning
            log(f"check {record.name} failed for {experiment_id}: {record.outcome.description}")
    if result.stopped_by:
        context.log.error(
            f"{experiment_id}: stopped by its blocking check {result.stopped_by}; its earlier results stay"
        )


@multi_asset(
    specs=_analysis_specs(),
    check_specs=EXPERIMENT_CHECK_SPECS,
    name="experiment_analysis",
    partitions_def=experiment_partitions,
    backfill_policy=BackfillPolicy.single_run(),
    can_subset=True,
    pool=WRITER_POOL,
    description=(
        "Every experiment of the run in one pass: the exposure log read once, one temporal join of "
        "the event log for all of them straight into per-subject values and statistics, the checks "
        "of each experiment evaluated in the pass. A blocking check that fails stops that "
        "experiment only (its previous results stay)."
    ),
)
def experiment_analysis(
    context: AssetExecutionContext, config: AnalysisConfig, registry: RegistryResource, warehouse: Warehouse
):
    reg = registry.load()
    wanted = [k for k in context.partition_keys if not config.experiment_ids or k in config.experiment_ids]
    experiments = []
    for key in wanted:
        try:
            experiments.append(reg.experiment(key))
        except KeyError:
            raise ValueError(
                f"partition {key!r} is not an experiment in the registry; "
                "remove the partition or add the experiment to the registry"
            ) from None
    with warehouse.session() as session:
        preflight.require_ready(session, reg, registry.path)
        analysed = analyse_experiments(session, reg, experiments, dt.datetime.now(dt.UTC), config.accept_empty_source)
    results_by_id = analysed.experiments
    context.log.info("pass stages (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in analysed.seconds.items()))
    selected = {key.to_user_string() for key in context.selected_asset_keys}
    selected_checks = context.selected_asset_check_keys
    # Read from the instance once for every report of the run.
    audit_rows = latest_check_results(context.instance, source_audit_rejected_share.check_keys, None) if REPORT in selected else []
    for experiment in experiments:
        result = results_by_id[experiment.id]
        _log_failures(context, experiment.id, result)
        sections = _results_markdown(experiment, result) if result.frame is not None else {}
        if result.frame is not None:
            result.metadata[METRICS] = {
                **result.metadata[METRICS],
                **{name: MetadataValue.md(text) for name, text in sections.items()},
                # The whole run's, the same on every experiment it analysed: where its time went.
                "pass_stage_seconds": {k: round(v, 3) for k, v in analysed.seconds.items()},
                "experiments_in_pass": len(experiments),
            }
        for table in PASS_ASSETS:
            if table in result.metadata and table in selected:
                yield _materialization(table, experiment.id, result)
        for record in result.checks:
            if AssetCheckKey(AssetKey(record.asset), record.check) in selected_checks:
                yield check_evaluation(record, experiment.id)
        if result.frame is not None and REPORT in selected:
            yield AssetMaterialization(
                asset_key=REPORT, partition=experiment.id, metadata=_report(reg, experiment, result, audit_rows, sections)
            )


# The UI links each asset to the file and line of its body (rebound: the loader takes these names).
dim_experiments, dim_variants, source_audit, experiment_analysis = with_source_code_references(
    [dim_experiments, dim_variants, source_audit, experiment_analysis]
)
ANALYSIS_ASSETS = [experiment_analysis]
REGISTRY_ASSETS = [dim_experiments, dim_variants, source_audit]
