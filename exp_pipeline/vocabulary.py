"""The words every layer shares: column types, labels written into tables, rejection reasons.

The bottom of the house: engines, schemas and transforms import it, it imports only Ibis.
"""

from __future__ import annotations

import ibis.expr.datatypes as dtypes
import ibis.expr.types as ir

# Every timestamp the pipeline stores: UTC, microseconds (normalized once, at ingestion).
UTC_TIMESTAMP = dtypes.Timestamp(timezone="UTC", scale=6)
SECONDS_PER_DAY = 86_400

# deduped_assignments.exclusion_reason of a subject exposed to more than one variant.
MULTIPLE_VARIANTS = "multiple_variants"
# Why an ingested exposure row does not count for its subject's assignment.
OUTSIDE_WINDOW = "outside_window"
# The reason label of rows that were not set aside, in row accounting.
INGESTED = "ingested"
USED = "used"

# Why a source row cannot be ingested at all. Such rows go to rejected_rows (exposures of one
# experiment) or rejected_source_rows (the logs as a whole), never silently away.
MISSING_SUBJECT_ID = "missing_subject_id"
MISSING_VARIANT_ID = "missing_variant_id"
MISSING_EVENT_NAME = "missing_event_name"
MISSING_TIMESTAMP = "missing_timestamp"
UNPARSABLE_TIMESTAMP = "unparsable_timestamp"
UNKNOWN_VARIANT = "unknown_variant"
NON_NUMERIC_VALUE = "non_numeric_value"
DUPLICATE_ROW = "duplicate_row"
MISSING_EXPERIMENT_ID = "missing_experiment_id"
UNKNOWN_EXPERIMENT = "unknown_experiment"

ASSIGNMENT_REJECTIONS = (
    MISSING_SUBJECT_ID, MISSING_VARIANT_ID, MISSING_TIMESTAMP, UNPARSABLE_TIMESTAMP, UNKNOWN_VARIANT,
    DUPLICATE_ROW,
)
EVENT_REJECTIONS = (
    MISSING_SUBJECT_ID, MISSING_EVENT_NAME, MISSING_TIMESTAMP, UNPARSABLE_TIMESTAMP, NON_NUMERIC_VALUE,
    DUPLICATE_ROW,
)
# Exposure rows that name no experiment of the registry (kept in rejected_source_rows).
SOURCE_REJECTIONS = (MISSING_EXPERIMENT_ID, UNKNOWN_EXPERIMENT)
# Exact duplicates are kept aside and counted, but at-least-once logging makes them harmless and
# common: they do not count against a rejected-share bound.
HARMLESS_REJECTIONS = (DUPLICATE_ROW,)


def trim_whitespace(column: ir.StringValue) -> ir.StringValue:
    """The text without leading and trailing whitespace.

    Not Ibis's strip(): on Spark it becomes TRIM(' \\t\\n\\r\\v\\f' FROM ...), and Spark reads '\\v' and
    '\\f' as the letters v and f, so a subject named "v" would come out blank.
    """
    return column.re_replace(r"^\s+|\s+$", "")


def whole_seconds(days: float) -> int:
    # Whole seconds, as the registry's day windows are turned into intervals everywhere.
    return int(round(days * SECONDS_PER_DAY))
