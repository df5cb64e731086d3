"""The registry: experiments, variants, metrics and sources as typed configuration.

Loaded from one YAML file (``data/registry.yaml`` by default). A user points the pipeline at their
own logs by editing that file, never code. Anything invalid fails at load time with a message that
names the experiment (or metric, or source) and the field.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Ids become partition keys, table filters and file names: keep them boring.
SAFE_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

ASSIGNMENT_COLUMNS = ("subject_id", "experiment_id", "variant_id", "assigned_at")
EVENT_COLUMNS = ("subject_id", "event_at", "event_name", "value")
# The registry has to name these; `value` may be absent for count-only event logs.
REQUIRED_EVENT_COLUMNS = ("subject_id", "event_at", "event_name")

WEIGHT_TOLERANCE = 1e-6
# Columns the pipeline adds to the assignment and event tables: a property of the same name would
# overwrite one (test_schemas checks this list against the tables' schemas).
RESERVED_COLUMN_NAMES = frozenset({
    "source_file", "n_exposures", "n_variants_seen", "exclusion_reason", "is_active", "valid_from",
    "valid_to", "event_at", "event_name", "value", "metric", "period", "rejection_reason",
})


class RegistryError(ValueError):
    """The registry cannot be used; the message says where and how to fix it."""


def _safe_id(value: str) -> str:
    if not SAFE_ID_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not a valid id: use lowercase letters, digits and '_', "
            "starting with a letter, at most 64 characters"
        )
    return value


SafeId = Annotated[str, AfterValidator(_safe_id)]


def _utc(value: dt.datetime) -> dt.datetime:
    # Naive timestamps in the registry mean UTC, like naive timestamps in the logs.
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


UtcDatetime = Annotated[dt.datetime, AfterValidator(_utc)]

PRE_PERIOD = "pre_period"  # the CUPED++ covariate that is the metric itself before assignment
SUBJECT = "subject"  # a metric's entity when its events are keyed by the subject itself


class _Strict(BaseModel):
    # No infinite or NaN numbers anywhere: `window_end_days: .inf` is a typo, not a window.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Variant(_Strict):
    id: SafeId
    weight: float = Field(gt=0, le=1, description="expected share of traffic")
    control: bool = False


class SrmSettings(_Strict):
    p_threshold: float = Field(default=0.001, gt=0, lt=1)
    min_subjects: int = Field(default=100, ge=1, description="no verdict below this many subjects")
    blocks_metrics: bool = Field(
        default=False, description="a flagged SRM also blocks variant_metrics (else it warns)"
    )


class PrePeriodBiasSettings(_Strict):
    """The pre-experiment bias check: each metric's pre-period mean compared across arms."""

    p_threshold: float = Field(default=0.001, gt=0, lt=1, description="WARN below this Welch p-value")


class SegmentSettings(_Strict):
    """Results per assignment property value (segment_metrics, segment_heterogeneity)."""

    min_subjects: int = Field(default=100, ge=2, description="segments with an arm below this get no lifts")


class MultiVariantSettings(_Strict):
    """Bounds on the share of subjects excluded for being exposed to several variants."""

    warn_share: float = Field(default=0.01, ge=0, le=1)
    error_share: float = Field(default=0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> MultiVariantSettings:
        if self.error_share < self.warn_share:
            raise ValueError("error_share must be >= warn_share")
        return self


class Metric(_Strict):
    id: SafeId
    event_name: str = Field(min_length=1)
    aggregation: Literal["sum", "count", "conversion"]
    window_start_days: float = Field(default=0, ge=0)
    window_end_days: float = Field(default=14, gt=0)
    cap_percentile: float | None = Field(
        default=None, gt=0, lt=1, description="winsorize per-subject values above this percentile"
    )
    cap_lower_percentile: float | None = Field(
        default=None, gt=0, lt=1, description="and below this one (metrics that can be negative)"
    )
    cap_ignore_zeros: bool = Field(
        default=True,
        description="percentiles of the non-zero values only, zeros left as they are (false: of every subject)",
    )
    entity: SafeId = Field(
        default=SUBJECT,
        description=(
            "whose events the metric counts: 'subject' (the events are keyed by the subject), or a secondary id "
            "of the assignments source (the events are keyed by it, e.g. user_id; see subject_id_map)"
        ),
    )
    description: str = ""

    @model_validator(mode="after")
    def _window_ordered(self) -> Metric:
        if self.window_end_days <= self.window_start_days:
            raise ValueError("window_end_days must be greater than window_start_days")
        return self

    @model_validator(mode="after")
    def _caps_ordered(self) -> Metric:
        low, high = self.cap_lower_percentile, self.cap_percentile
        if low is not None and high is not None and low >= high:
            raise ValueError(f"cap_lower_percentile ({low}) must be below cap_percentile ({high})")
        return self

    @property
    def capped(self) -> bool:
        return self.cap_percentile is not None or self.cap_lower_percentile is not None


class Experiment(_Strict):
    id: SafeId
    name: str = Field(min_length=1)
    description: str = ""
    start_at: UtcDatetime
    end_at: UtcDatetime | None = None
    variants: list[Variant] = Field(min_length=2)
    metrics: list[SafeId] = Field(min_length=1)
    srm: SrmSettings = SrmSettings()
    multi_variant: MultiVariantSettings = MultiVariantSettings()
    pre_period_bias: PrePeriodBiasSettings = PrePeriodBiasSettings()
    segments: SegmentSettings = SegmentSettings()
    covariates: list[str] | None = Field(
        default=None,
        description="CUPED++ covariates: 'pre_period' and assignment properties (default: all of them)",
    )
    cuped_pre_window_days: float = Field(default=14, ge=0, description="0 turns CUPED off")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="1 - confidence level")

    @field_validator("variants")
    @classmethod
    def _variants_valid(cls, variants: list[Variant]) -> list[Variant]:
        ids = [v.id for v in variants]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"variant ids must be unique, repeated: {duplicated}")
        controls = [v.id for v in variants if v.control]
        if len(controls) != 1:
            raise ValueError(
                f"exactly one variant must have control: true, found {len(controls)} {controls}"
            )
        total = sum(v.weight for v in variants)
        if not math.isclose(total, 1.0, abs_tol=WEIGHT_TOLERANCE):
            raise ValueError(f"variant weights must sum to 1, they sum to {total:g}")
        return variants

    @field_validator("metrics")
    @classmethod
    def _metrics_unique(cls, metrics: list[str]) -> list[str]:
        if len(set(metrics)) != len(metrics):
            raise ValueError("metric ids must not repeat")
        return metrics

    @model_validator(mode="after")
    def _dates_ordered(self) -> Experiment:
        if self.end_at is not None and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        return self

    @property
    def control(self) -> Variant:
        return next(v for v in self.variants if v.control)

    @property
    def weights(self) -> dict[str, float]:
        return {v.id: v.weight for v in self.variants}

    def status(self, now: dt.datetime) -> Literal["scheduled", "running", "stopped"]:
        if now < self.start_at:
            return "scheduled"
        if self.end_at is not None and self.end_at <= now:
            return "stopped"
        return "running"


class Source(_Strict):
    """Where a log lives and how its columns map onto the canonical names."""

    path: str | None = Field(default=None, description="Parquet or CSV file or glob")
    table: str | None = Field(default=None, description="a table already in the warehouse")
    format: Literal["parquet", "csv"] | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> source column")
    properties: list[str] = Field(default_factory=list, description="assignment properties to keep")
    secondary_ids: dict[SafeId, str] = Field(
        default_factory=dict,
        description=(
            "assignments: other ids of the subject logged with its exposures (nullable, e.g. the user_id "
            "of an anonymous visitor once logged in), id name -> source column; each experiment maps "
            "every value to the first subject seen with it (subject_id_map)"
        ),
    )
    max_conflicting_id_share: float = Field(
        default=0.05, ge=0, le=1,
        description="assignments: WARN when more than this share of a secondary id's values were seen with several subjects",
    )
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = Field(
        default="auto",
        description="unit of integer (epoch) timestamps; auto: from each value's magnitude (see docs)",
    )
    max_rejected_share: float = Field(
        default=0.01, ge=0, le=1, description="share of rejected rows above which ingestion is an ERROR"
    )
    max_unmatched_share: float = Field(
        default=0.9, ge=0, le=1,
        description=(
            "events: WARN when more than this share of the metrics' events since an experiment's start "
            "belong to none of its subjects (ids that do not line up); raise it for experiments on a "
            "small share of traffic"
        ),
    )
    max_row_drop_share: float = Field(
        default=0.5, ge=0, le=1,
        description="WARN when a run reads this share fewer rows than the run before (files missing?)",
    )
    late_arrival_days: float = Field(
        default=2, ge=0,
        description=(
            "events: how late (by event time) rows may still arrive; each run joins again the events "
            "this many days back from the newest one it sees (later arrivals make it recompute in full)"
        ),
    )

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        if (self.path is None) == (self.table is None):
            raise ValueError("give exactly one of 'path' or 'table'")
        return self

    @property
    def file_format(self) -> Literal["parquet", "csv"]:
        if self.format is not None:
            return self.format
        suffix = Path(self.path or "").suffix.lower()
        if suffix in (".parquet", ".pq"):
            return "parquet"
        if suffix in (".csv", ".tsv"):
            return "csv"
        raise ValueError(
            f"cannot tell the format of {self.path!r} from its extension: set format: parquet or csv"
        )

    def source_column(self, canonical: str) -> str:
        if canonical in self.secondary_ids:
            return self.secondary_ids[canonical]
        return self.columns.get(canonical, canonical)

    @property
    def kept_columns(self) -> list[str]:
        """Columns kept beside the canonical ones: the properties, then the secondary ids."""
        return [*self.properties, *self.secondary_ids]


class Sources(_Strict):
    assignments: Source
    events: Source

    @model_validator(mode="after")
    def _mappings_valid(self) -> Sources:
        for kind, source, allowed in (
            ("assignments", self.assignments, ASSIGNMENT_COLUMNS),
            ("events", self.events, EVENT_COLUMNS),
        ):
            unknown = sorted(set(source.columns) - set(allowed))
            if unknown:
                raise ValueError(
                    f"{kind}.columns maps unknown canonical names {unknown}; allowed: {list(allowed)}"
                )
        clash = sorted(set(self.assignments.properties) & set(ASSIGNMENT_COLUMNS))
        if clash:
            raise ValueError(f"assignments.properties must not repeat canonical columns: {clash}")
        if PRE_PERIOD in self.assignments.properties:
            raise ValueError(
                f"assignments.properties: '{PRE_PERIOD}' names the CUPED++ pre-period covariate; rename the "
                "column in the log or leave it out of properties"
            )
        reserved = sorted(set(self.assignments.properties) & RESERVED_COLUMN_NAMES)
        if reserved:
            raise ValueError(
                f"assignments.properties {reserved} are names of columns the pipeline adds; rename "
                "the column in the log or leave it out of properties"
            )
        repeated = sorted({p for p in self.assignments.properties if self.assignments.properties.count(p) > 1})
        if repeated:
            raise ValueError(f"assignments.properties repeats {repeated}")
        if self.events.secondary_ids:
            raise ValueError("events.secondary_ids: secondary ids are mapped on the assignments source, which links them to subjects")
        ids = set(self.assignments.secondary_ids)
        taken = sorted(ids & (set(ASSIGNMENT_COLUMNS) | RESERVED_COLUMN_NAMES | set(self.assignments.properties) | {PRE_PERIOD, SUBJECT}))
        if taken:
            raise ValueError(
                f"assignments.secondary_ids {taken} are names already used (canonical columns, properties or "
                "columns the pipeline adds); name the ids differently"
            )
        return self


class Registry(_Strict):
    data_root: Path
    allow_paths_outside_data_root: bool = False
    sources: Sources
    metrics: dict[str, Metric]
    experiments: list[Experiment] = Field(min_length=1)

    def experiment(self, experiment_id: str) -> Experiment:
        for experiment in self.experiments:
            if experiment.id == experiment_id:
                return experiment
        raise KeyError(f"experiment {experiment_id!r} is not in the registry")

    def metrics_of(self, experiment: Experiment) -> list[Metric]:
        return [self.metrics[m] for m in experiment.metrics]

    def covariates_of(self, experiment: Experiment) -> list[str]:
        """The experiment's CUPED++ covariates: as configured, or the pre-period (when CUPED is on)
        and every assignment property."""
        if experiment.covariates is not None:
            return list(dict.fromkeys(experiment.covariates))
        pre = [PRE_PERIOD] if experiment.cuped_pre_window_days > 0 else []
        return pre + list(self.sources.assignments.properties)

    def resolve_path(self, path: str) -> str:
        """Absolute path (or glob) of a source, kept inside the data root unless allowed.

        A URI of shared storage (s3a://, abfss://, hdfs://, ...) is kept as it is: the engine reads
        it (Spark does; DuckDB refuses it, naming the source).
        """
        if is_uri(path):
            return path
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.data_root / candidate).resolve()
        root = self.data_root.resolve()
        if not self.allow_paths_outside_data_root and not resolved.is_relative_to(root):
            raise RegistryError(
                f"source path {path!r} resolves outside the data root {root}; move the files under "
                "it or set allow_paths_outside_data_root: true in the registry"
            )
        return str(resolved)


def is_uri(path: str) -> bool:
    """A storage URI other than a local file (a one-letter scheme would be a Windows drive)."""
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"


def _location(loc: tuple, raw: dict) -> str:
    """Human name of the place a pydantic error points at, e.g. experiment 'x', field 'variants'."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "experiments" and isinstance(parts[1], int):
        experiments = raw.get("experiments") or []
        index = parts[1]
        exp_id = experiments[index].get("id") if index < len(experiments) and isinstance(
            experiments[index], dict
        ) else None
        where = f"experiment {exp_id!r}" if exp_id else f"experiments[{index}]"
        rest = parts[2:]
    elif len(parts) >= 2 and parts[0] == "metrics":
        where, rest = f"metric {parts[1]!r}", parts[2:]
    elif parts and parts[0] == "sources":
        where, rest = "sources", parts[1:]
    else:
        where, rest = "registry", parts
    field = ".".join(str(p) for p in rest)
    return f"{where}, field {field!r}" if field else where


def _format_validation_error(path: Path, error: ValidationError, raw: dict) -> str:
    lines = [f"invalid registry {path}:"]
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  - {_location(item['loc'], raw)}: {message}")
    return "\n".join(lines)


def _cross_check(registry: Registry, path: Path) -> None:
    problems = []
    seen: set[str] = set()
    for experiment in registry.experiments:
        if experiment.id in seen:
            problems.append(f"experiment {experiment.id!r}, field 'id': defined twice")
        seen.add(experiment.id)
        properties = registry.sources.assignments.properties
        if experiment.covariates is not None:
            allowed = ([PRE_PERIOD] if experiment.cuped_pre_window_days > 0 else []) + list(properties)
            wrong = [c for c in experiment.covariates if c not in allowed]
            if wrong:
                problems.append(
                    f"experiment {experiment.id!r}, field 'covariates': {wrong} are not covariates of this "
                    f"experiment; allowed: {allowed} ('{PRE_PERIOD}' needs cuped_pre_window_days > 0)"
                )
        unknown = [m for m in experiment.metrics if m not in registry.metrics]
        if unknown:
            problems.append(
                f"experiment {experiment.id!r}, field 'metrics': unknown metrics {unknown}; "
                f"defined: {sorted(registry.metrics)}"
            )
        ids = registry.sources.assignments.secondary_ids
        for metric_id in experiment.metrics:
            metric = registry.metrics.get(metric_id)
            if metric is not None and metric.entity != SUBJECT and metric.entity not in ids:
                problems.append(
                    f"experiment {experiment.id!r}, metric {metric_id!r}, field 'entity': {metric.entity!r} is "
                    f"not a secondary id of the experiment's assignments source (its secondary_ids: {sorted(ids)}); "
                    f"map the column under sources.assignments.secondary_ids or use '{SUBJECT}'"
                )
    for metric_id, metric in registry.metrics.items():
        if metric.id != metric_id:
            problems.append(f"metric {metric_id!r}, field 'id': does not match its key {metric_id!r}")
    for kind in ("assignments", "events"):
        source: Source = getattr(registry.sources, kind)
        if source.path is not None:
            try:
                source.file_format  # noqa: B018 - validates the extension early
                registry.resolve_path(source.path)
            except (ValueError, RegistryError) as exc:
                problems.append(f"sources, field '{kind}.path': {exc}")
    if problems:
        raise RegistryError(f"invalid registry {path}:\n" + "\n".join(f"  - {p}" for p in problems))


def parse_registry(raw: dict, path: Path) -> Registry:
    """Validate the parsed YAML of a registry file."""
    if not isinstance(raw, dict):
        raise RegistryError(f"invalid registry {path}: expected a mapping at the top level")
    metrics = raw.get("metrics")
    if isinstance(metrics, dict):
        # Metrics are keyed by id in YAML; the id is also kept on the object.
        raw = {**raw, "metrics": {k: {"id": k, **(v or {})} for k, v in metrics.items()}}
    try:
        # The registry file's folder is the data root that relative source paths live under.
        registry = Registry.model_validate({**raw, "data_root": path.parent})
    except ValidationError as exc:
        raise RegistryError(_format_validation_error(path, exc, raw)) from None
    _cross_check(registry, path)
    return registry


def load_registry(path: str | Path) -> Registry:
    """The registry as the file says now (read on every call, so an edit applies at once)."""
    path = Path(path)
    hint = "set EXP_PIPELINE_REGISTRY to your registry file"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"registry file {path} does not exist; {hint}") from None
    except IsADirectoryError:
        raise RegistryError(f"registry path {path} is a directory, not a YAML file; {hint}") from None
    except UnicodeDecodeError as exc:
        raise RegistryError(
            f"registry file {path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise RegistryError(f"registry file {path} cannot be read ({exc.strerror}); {hint}") from None
    return _parsed_registry(path, text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (YAML keeps the last silently:
    a second `experiments:` block would drop the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base loader reports it
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice ({where})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


@functools.lru_cache(maxsize=8)
def _parsed_registry(path: Path, text: str) -> Registry:
    # Every step of a run loads the registry: the same text is parsed and validated once (the
    # models are frozen, so callers can share one). Errors are not cached: they raise again.
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RegistryError(f"registry file {path} is not valid YAML: {exc}") from None
    return parse_registry(raw, path)
