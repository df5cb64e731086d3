"""The temporal join: window edges, both periods in one join, the span an experiment can use."""



from exp_pipeline.registry import Experiment
from exp_pipeline.transforms.temporal_join import (
    experiment_events,
    join_window_events,
    post_assignment_rows,
    pre_assignment_rows,
)
from exp_pipeline_tests.tables import assignments_table, events_table, metric, post_rows


def test_temporal_join_edges(con):
    a = assignments_table(con, [("s", "control", "2026-10-02T12:00:00Z")])
    e = events_table(con, [
        ("s", "2026-10-02T12:00:00Z", "purchase", 1.0),          # exactly at assignment: in
        ("s", "2026-10-02T11:59:59.999999Z", "purchase", 2.0),   # just before: out
        ("s", "2026-10-16T11:59:59.999999Z", "purchase", 4.0),   # just before window end: in
        ("s", "2026-10-16T12:00:00Z", "purchase", 8.0),          # at window end (exclusive): out
        ("other", "2026-10-03T00:00:00Z", "purchase", 16.0),     # not assigned: out
    ])
    out = con.to_pandas(post_rows(a, e, [metric()]))
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
    out = con.to_pandas(pre_assignment_rows(join_window_events(a, e, [], 14)))
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
    window = join_window_events(a, e, metrics, 14)
    assert sorted(con.to_pandas(post_assignment_rows(window))["value"]) == [4.0, 16.0]
    assert sorted(con.to_pandas(pre_assignment_rows(window))["value"]) == [1.0, 2.0]


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
    kept = con.to_pandas(experiment_events(e, experiment, [metric()], 14))
    assert sorted(kept["value"]) == [4.0, 8.0]
