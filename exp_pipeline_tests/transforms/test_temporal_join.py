"""The temporal join: window edges, both periods in one join, the span an experiment can use."""



import pandas as pd

from exp_pipeline.registry import Experiment
from exp_pipeline.transforms.temporal_join import (
    events_in_span,
    post_assignment_rows,
    pre_assignment_rows,
    window_rows,
)
from exp_pipeline_tests.tables import assignments_table, events_table, experiment, metric, post_rows, window


def test_temporal_join_edges(con):
    a = assignments_table(con, [("s", "control", "2026-10-02T12:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-02T12:00:00Z", "purchase", 1.0),          # exactly at assignment: in
        ("s", "2026-10-02T11:59:59.999999Z", "purchase", 2.0),   # just before: out
        ("s", "2026-10-16T11:59:59.999999Z", "purchase", 4.0),   # just before window end: in
        ("s", "2026-10-16T12:00:00Z", "purchase", 8.0),          # at window end (exclusive): out
        ("other", "2026-10-03T00:00:00Z", "purchase", 16.0),     # not assigned: out
    ])
    out = con.to_pandas(post_rows(con, a, e, [metric()]))
    assert sorted(out["value"]) == [1.0, 4.0]
    assert (out["event_at"] >= out["assigned_at"]).all()


def test_pre_assignment_window_edges(con):
    a = assignments_table(con, [("s", "control", "2026-10-15T00:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-01T00:00:00Z", "purchase", 1.0),          # exactly 14 days before: in
        ("s", "2026-09-30T23:59:59.999999Z", "purchase", 2.0),   # older: out
        ("s", "2026-10-14T23:59:59.999999Z", "purchase", 4.0),   # just before assignment: in
        ("s", "2026-10-15T00:00:00Z", "purchase", 8.0),          # at assignment: post, out
    ])
    out = con.to_pandas(pre_assignment_rows(window(con, a, e, [metric()], 14)))
    assert sorted(out["value"]) == [1.0, 4.0]


def test_one_window_join_splits_into_post_and_pre_with_each_event_names_window(con):
    a = assignments_table(con, [("s", "control", "2026-10-15T00:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-01T00:00:00Z", "session", 1.0),     # pre-period start (14 days): pre
        ("s", "2026-10-14T00:00:00Z", "purchase", 2.0),    # pre
        ("s", "2026-10-21T23:59:59Z", "session", 4.0),     # inside the 7-day session window: post
        ("s", "2026-10-22T00:00:00Z", "session", 8.0),     # day 7 on: no session metric reaches it
        ("s", "2026-10-28T00:00:00Z", "purchase", 16.0),   # inside the 14-day purchase window: post
        ("s", "2026-10-28T00:00:00Z", "purchase", 16.0),   # logged twice: counts once
    ])
    metrics = [metric(), metric(id="sessions", event_name="session", aggregation="count", window_end_days=7)]
    rows = window(con, a, e, metrics, 14)
    assert sorted(con.to_pandas(post_assignment_rows(rows))["value"]) == [4.0, 16.0]
    assert sorted(con.to_pandas(pre_assignment_rows(rows))["value"]) == [1.0, 2.0]


def test_experiment_events_keep_only_the_span_the_experiment_can_use(con):
    experiment = Experiment.model_validate({
        "id": "exp", "name": "Exp", "start_at": "2026-10-15T00:00:00Z", "end_at": "2026-10-20T00:00:00Z",
        "variants": [{"id": "control", "weight": 0.5, "control": True}, {"id": "treatment", "weight": 0.5}],
        "metrics": ["revenue"],
    })
    e = events_table(con, [
        ("s", "2026-09-30T23:59:59Z", "purchase", 1.0),    # before start minus the 15-day pre window
        ("s", "2026-09-30T00:00:00Z", "purchase", 2.0),    # also before it
        ("s", "2026-10-01T00:00:00Z", "purchase", 4.0),    # first usable instant (pre window)
        ("s", "2026-11-02T23:59:59Z", "purchase", 8.0),    # before end + 14 days
        ("s", "2026-11-03T00:00:00Z", "purchase", 16.0),   # end + 14 days: out
    ])
    kept = con.to_pandas(events_in_span(e, [(experiment.model_copy(update={"cuped_pre_window_days": 14}), [metric()])]))
    assert sorted(kept["value"]) == [4.0, 8.0]


def test_one_join_for_several_experiments_keeps_each_to_its_own_windows(con):
    # One subject in two experiments with other windows and pre-periods: one join, each its rows.
    a = assignments_table(con, [("s", "control", "2026-10-10T00:00:00Z")])
    a = con.create_table("two", pd.concat([
        con.to_pandas(a), con.to_pandas(a).assign(experiment_id="other", assigned_at=pd.Timestamp("2026-10-12", tz="UTC")),
    ]))
    e = events_table(con, [
        ("s", "2026-10-05T00:00:00Z", "purchase", 1.0),   # exp: pre (7 days); other: no pre-period
        ("s", "2026-10-11T00:00:00Z", "purchase", 2.0),   # exp: post; other: pre... none, before its assignment
        ("s", "2026-10-13T00:00:00Z", "purchase", 4.0),   # exp: post (14 days); other: post (2 days)
        ("s", "2026-10-15T00:00:00Z", "purchase", 8.0),   # exp: post; other: past its 2-day window
    ])
    frames = [
        (experiment(cuped_pre_window_days=7), [metric()]),
        (experiment(id="other", cuped_pre_window_days=0), [metric(window_end_days=2)]),
    ]
    from exp_pipeline.transforms.temporal_join import metric_windows_frame

    windows = con.create_table("windows2", metric_windows_frame(frames))
    out = con.to_pandas(window_rows(a, e, windows))
    got = {k: sorted(g["value"]) for k, g in out.groupby("experiment_id")}
    assert got == {"exp": [1.0, 2.0, 4.0, 8.0], "other": [4.0]}


def test_window_segments_cut_each_event_name_where_a_metric_window_begins_or_ends():
    from exp_pipeline.transforms.temporal_join import window_segments
    from exp_pipeline_tests.tables import windows_frame

    day = 86_400
    metrics = [
        metric(),                                                                 # purchase [0, 14)
        metric(id="late", aggregation="count", window_start_days=7, window_end_days=10),  # purchase [7, 10)
        metric(id="sessions", event_name="session", aggregation="count", window_end_days=7),
    ]
    spans, segments, coverage = window_segments(windows_frame(metrics, pre_window_days=2))
    purchase = spans.set_index("event_name").loc["purchase"]
    assert (purchase.pre_seconds, purchase.start_seconds, purchase.end_seconds) == (2 * day, 0, 14 * day)
    # purchase: [-2, 0) [0, 7) [7, 10) [10, 14) days; session: [-2, 0) [0, 7) (padded with its end).
    assert [purchase[f"bound_{k}"] for k in (1, 2, 3)] == [0, 7 * day, 10 * day]
    session = spans.set_index("event_name").loc["session"]
    assert [session[f"bound_{k}"] for k in (1, 2, 3)] == [0, 7 * day, 7 * day]
    span = int(purchase.span)
    assert segments[segments.span == span].period.tolist() == ["pre", "post", "post", "post"]
    covered = coverage[coverage.span == span].groupby(["metric", "period"]).segment.apply(list).to_dict()
    assert covered == {
        ("late", "post"): [2], ("late", "pre"): [0], ("revenue", "post"): [1, 2, 3], ("revenue", "pre"): [0],
    }


def test_the_aggregated_join_holds_the_views_rows_each_once(con):
    # segment_rows/segment_sums (the pass) and window_rows (the views) are two queries of one rule.
    from exp_pipeline.transforms.temporal_join import (
        metric_windows_frame,
        numbered_subjects,
        rows_of_period,
        segment_rows,
        segment_sums,
        subject_spans,
        window_segments,
    )

    a = con.to_pandas(assignments_table(con, [("s", "control", "2026-10-10T00:00:00Z"), ("t", "treatment", "2026-10-11T00:00:00Z")]))
    a = con.create_table("both", pd.concat([a, a.assign(experiment_id="other")]))
    e = events_table(con, [
        ("s", "2026-10-05T00:00:00Z", "purchase", 1.0),   # pre (7 days) in exp
        ("s", "2026-10-11T00:00:00Z", "purchase", 2.0),
        ("s", "2026-10-11T00:00:00Z", "purchase", 2.0),   # logged twice: once
        ("s", "2026-10-11T00:00:00Z", "purchase", 3.0),   # same time, other value: its own event
        ("t", "2026-10-12T00:00:00Z", "session", None),
        ("t", "2026-10-19T00:00:00Z", "session", None),   # past the 7-day session window: out
        ("t", "2026-10-20T00:00:00Z", "purchase", 4.0),   # exp: in; other: past its 2 days
    ])
    frames = [
        (experiment(cuped_pre_window_days=7), [metric(), metric(id="sessions", event_name="session", aggregation="count", window_end_days=7)]),
        (experiment(id="other"), [metric(window_end_days=2)]),  # the default 14-day pre-period
    ]
    frame = metric_windows_frame(frames)
    cut = window_segments(frame)
    subjects = con.create_table("subjects", numbered_subjects(a))
    rows = segment_rows(con.create_table("sides", subject_spans(subjects, con.create_table("spans", cut.spans))), e)
    segments = con.create_table("segments", cut.segments)
    view = window_rows(a, e, con.create_table("windows", frame))

    def ordered(table):
        return con.to_pandas(table).sort_values(["experiment_id", "subject_id", "event_at", "value"], ignore_index=True)

    for period, split in (("post", post_assignment_rows), ("pre", pre_assignment_rows)):
        assert ordered(rows_of_period(rows, segments, period)).equals(ordered(split(view)[rows_of_period(rows, segments, period).columns]))
    sums = con.to_pandas(segment_sums(rows)).merge(cut.segments).merge(cut.spans[["span", "experiment_id"]])
    counted = sums.groupby(["experiment_id", "period"]).n_events.sum().to_dict()
    assert counted == {("exp", "post"): 4, ("exp", "pre"): 1, ("other", "post"): 2, ("other", "pre"): 1}
    assert sums.groupby("period").n_before_assignment.sum().to_dict() == {"post": 0, "pre": 2}
