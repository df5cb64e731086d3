"""Small tables for tests of the transforms: experiments, metrics, assignment and event rows."""

import datetime as dt

import pandas as pd

from exp_pipeline.registry import Experiment, Metric
from exp_pipeline.transforms.subject_values import metric_bucket_sums, subject_metric_values
from exp_pipeline.transforms.temporal_join import (
    metric_windows_frame,
    numbered_subjects,
    post_assignment_rows,
    segment_rows,
    segment_sums,
    subject_spans,
    window_rows,
    window_segments,
)

UTC = dt.UTC
START = dt.datetime(2026, 10, 1, tzinfo=UTC)
END = dt.datetime(2026, 10, 29, tzinfo=UTC)


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")



def experiment(**overrides) -> Experiment:
    fields = dict(
        id="exp",
        name="Exp",
        start_at=START,
        end_at=END,
        variants=[{"id": "control", "weight": 0.5, "control": True}, {"id": "treatment", "weight": 0.5}],
        metrics=["revenue"],
    )
    fields.update(overrides)
    return Experiment.model_validate(fields)


def raw_rows(con, rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "variant_id", "assigned_at", "device_type"])
    frame["assigned_at"] = pd.to_datetime(frame["assigned_at"], utc=True, format="ISO8601")
    frame.insert(0, "experiment_id", "exp")
    frame["source_file"] = "f.parquet"
    return con.create_table("raw", frame, overwrite=True)


def metric(**overrides) -> Metric:
    fields = dict(id="revenue", event_name="purchase", aggregation="sum", window_start_days=0, window_end_days=14)
    fields.update(overrides)
    return Metric.model_validate(fields)


def assignments_table(con, rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "variant_id", "assigned_at"])
    frame["assigned_at"] = pd.to_datetime(frame["assigned_at"], utc=True)
    frame.insert(0, "experiment_id", "exp")
    return con.create_table("assignments", frame, overwrite=True)


def events_table(con, rows):
    frame = pd.DataFrame(rows, columns=["subject_id", "event_at", "event_name", "value"])
    frame["event_at"] = pd.to_datetime(frame["event_at"], utc=True, format="ISO8601")
    frame["value"] = frame["value"].astype("float64")
    return con.create_table("events", frame, overwrite=True)


def windows_frame(metrics, pre_window_days: float = 0):
    exp = experiment(metrics=[m.id for m in metrics], cuped_pre_window_days=pre_window_days)
    return metric_windows_frame([(exp, metrics)])


def windows_table(con, metrics, pre_window_days: float = 0):
    """The metric_windows table of experiment `exp` with these metrics."""
    return con.create_table("windows", windows_frame(metrics, pre_window_days), overwrite=True)


def window(con, assignments, events, metrics, pre_window_days: float = 0):
    """The temporal join of experiment `exp` (both periods)."""
    return window_rows(assignments, events, windows_table(con, metrics, pre_window_days))


def post_rows(con, assignments, events, metrics):
    """post_assignment_events as the pipeline builds it: the window join, post-assignment half."""
    return post_assignment_rows(window(con, assignments, events, metrics))


def values_of(con, assignments, events, metrics, pre_window_days: float = 0, id_map=None):
    """Per-subject values of experiment `exp`, both periods, as the pass computes them (`id_map`:
    subject_id_map, for metrics keyed by a secondary id)."""
    spans, _, coverage = window_segments(windows_frame(metrics, pre_window_days))
    subjects = con.create_table("subjects", numbered_subjects(assignments), overwrite=True)
    sides = con.create_table("sides", subject_spans(subjects, con.create_table("spans", spans), id_map))
    segments = segment_sums(segment_rows(sides, events))
    sums = con.create_table("bucket_sums", metric_bucket_sums(segments, con.create_table("coverage", coverage)))
    return subject_metric_values(subjects, sums, windows_table(con, metrics, pre_window_days))
