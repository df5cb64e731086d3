"""Alerts reach a real HTTP endpoint on 127.0.0.1: once per failed evaluation, never repeated,
none for passing checks, and not lost while the endpoint is down."""

import datetime as dt
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from dagster import DagsterEventType, build_run_status_sensor_context, build_sensor_context

from exp_pipeline import alerts, schemas, validation
from exp_pipeline.defs.automation import alert_on_failed_checks, alert_on_run_failure
from exp_pipeline_tests.conftest import write_tiny_workspace
from exp_pipeline_tests.defs.test_checks import run

# Each test materializes experiments and ticks the sensors against a real endpoint.
pytestmark = pytest.mark.e2e


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records what it is sent."""

    def __init__(self, port: int = 0, status: int = 200):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srm_workspace(tmp_path):
    # exp_a: a 2:1 split against 50/50 weights -> the SRM check fails (WARN, run stays green).
    return write_tiny_workspace(
        tmp_path, arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}}
    )


def tick(instance, workspace, cursor=None):
    with build_sensor_context(
        instance=instance, cursor=cursor, resources={"warehouse": workspace.warehouse()}
    ) as context:
        result = alert_on_failed_checks(context)
        return context.cursor, result


def assert_alerts_keep_their_contract(workspace) -> None:
    with workspace.warehouse().session() as session:
        outcome = validation.validate(schemas.alerts_schema(), session.table(alerts.ALERTS_TABLE))
    assert outcome.failures == [] and outcome.passed


def alert_rows(workspace) -> pd.DataFrame:
    with workspace.warehouse().session() as session:
        return session.to_pandas(session.table(alerts.ALERTS_TABLE).order_by("alert_id"))


def test_one_alert_per_failed_evaluation_never_repeated(tmp_path, instance, monkeypatch):
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)
        workspace = srm_workspace(tmp_path)
        result = run(workspace, instance, "exp_a")
        assert result.success  # a failed WARN check leaves the run green ...
        assert run(workspace, instance, "exp_b").success  # ... and exp_b's checks all pass

        cursor, _ = tick(instance, workspace)
        assert len(receiver.received) == 1  # ... but it still reaches a person, once
        message = receiver.received[0]
        assert message["experiment_id"] == "exp_a"
        assert message["check"] == "deduped_assignments / no_sample_ratio_mismatch"
        assert message["severity"] == "WARN"
        assert message["figures"]["verdict"] == "SRM" and message["figures"]["p_value"] < 0.001
        assert message["run_url"].endswith(f"/runs/{result.run_id}")
        assert "sample ratio mismatch" in message["text"] and message["blocks"]

        _, _ = tick(instance, workspace, cursor)
        _, _ = tick(instance, workspace)  # even a lost cursor does not resend
        assert len(receiver.received) == 1

        rows = alert_rows(workspace)
        assert len(rows) == 1 and bool(rows.delivered.iloc[0]) and rows.attempts.iloc[0] == 1

        # A new failing evaluation (a rerun) is a new alert.
        assert run(workspace, instance, "exp_a").success
        tick(instance, workspace, cursor)
        assert len(receiver.received) == 2
    finally:
        receiver.close()


def test_an_alert_survives_a_down_webhook_and_arrives_once(tmp_path, instance, monkeypatch):
    port = free_port()
    monkeypatch.setenv(alerts.WEBHOOK_ENV, f"http://127.0.0.1:{port}/hook")
    workspace = srm_workspace(tmp_path)
    assert run(workspace, instance, "exp_a").success

    cursor, result = tick(instance, workspace)  # nothing listens on the port: the tick must not fail
    rows = alert_rows(workspace)
    assert len(rows) == 1 and not rows.delivered.iloc[0]
    assert rows.last_error.iloc[0].startswith("webhook unreachable")
    assert str(port) not in rows.last_error.iloc[0]  # the URL (a secret) is not stored
    assert "1 undelivered" in result.skip_message

    cursor, _ = tick(instance, workspace, cursor)  # still down: retried, still recorded
    assert alert_rows(workspace).attempts.iloc[0] == 2

    receiver = Receiver(port=port)
    try:
        tick(instance, workspace, cursor)
        tick(instance, workspace, cursor)
        assert len(receiver.received) == 1
        assert bool(alert_rows(workspace).delivered.iloc[0])
        assert_alerts_keep_their_contract(workspace)  # delivered_at set by the update
    finally:
        receiver.close()


def test_webhook_errors_are_retried_and_do_not_crash(tmp_path, instance, monkeypatch):
    receiver = Receiver(status=500)
    try:
        monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)
        workspace = srm_workspace(tmp_path)
        assert run(workspace, instance, "exp_a").success
        tick(instance, workspace)
        rows = alert_rows(workspace)
        assert not rows.delivered.iloc[0] and rows.last_error.iloc[0] == "webhook answered HTTP 500"
    finally:
        receiver.close()


def test_without_a_webhook_alerts_are_logged_and_stored(tmp_path, instance, monkeypatch):
    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    workspace = srm_workspace(tmp_path)
    assert run(workspace, instance, "exp_a").success
    tick(instance, workspace)
    rows = alert_rows(workspace)
    assert list(rows.source) == ["deduped_assignments / no_sample_ratio_mismatch"]
    assert not rows.delivered.iloc[0] and rows.attempts.iloc[0] == 0
    assert_alerts_keep_their_contract(workspace)


def test_no_alert_when_every_check_passes(tmp_path, instance, monkeypatch):
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)
        workspace = write_tiny_workspace(tmp_path)
        assert run(workspace, instance, "exp_a").success
        _, result = tick(instance, workspace)
        assert receiver.received == []
        assert "0 failed check evaluations read, 0 new alerts" in result.skip_message
        monkeypatch.delenv(alerts.WEBHOOK_ENV)
        _, result = tick(instance, workspace)
        assert result.skip_message == "no new failed check evaluations"
    finally:
        receiver.close()


def test_a_failed_run_alerts_once(tmp_path, instance, monkeypatch):
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)
        workspace = write_tiny_workspace(tmp_path)
        (tmp_path / "logs" / "events.parquet").unlink()  # post_assignment_events cannot read its source
        result = run(workspace, instance, "exp_a")
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE)
        for _ in range(2):
            with build_run_status_sensor_context(
                sensor_name="alert_on_run_failure",
                dagster_event=failure,
                dagster_instance=instance,
                dagster_run=result.dagster_run,
                resources={"warehouse": workspace.warehouse()},
            ) as context:
                alert_on_run_failure(context.for_run_failure())
        assert len(receiver.received) == 1
        message = receiver.received[0]
        assert message["experiment_id"] == "exp_a" and message["severity"] == "ERROR"
    finally:
        receiver.close()


INTERLEAVED_DEFS = '''
from dagster import Definitions, in_process_executor
from dagster_duckdb import DuckDBResource
from exp_pipeline.defs.assets import ANALYSIS_ASSETS
from exp_pipeline.defs.automation import analyze_experiment_job
from exp_pipeline.defs.resources import RegistryResource
from exp_pipeline.warehouse.resources import DuckDBWarehouse

defs = Definitions(
    assets=ANALYSIS_ASSETS, jobs=[analyze_experiment_job],
    resources={"registry": RegistryResource(path=REGISTRY), "warehouse": DuckDBWarehouse(duckdb=DuckDBResource(database=DATABASE))},
    executor=in_process_executor,
)


def job():
    return defs.resolve_job_def("analyze_experiment")
'''


def test_runs_that_evaluate_out_of_creation_order_each_alert(tmp_path, instance, monkeypatch):
    """The daily schedule creates several runs at once; the pool lets them run in any order."""
    import importlib
    import sys

    from dagster import reconstructable
    from dagster._core.execution.api import execute_run

    from exp_pipeline.defs.partitions import experiment_partitions

    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    workspace = write_tiny_workspace(
        tmp_path, arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 400, "treatment": 200}}
    )
    module_dir = tmp_path / "defs_module"
    module_dir.mkdir()
    (module_dir / "interleaved_defs.py").write_text(
        f"REGISTRY = {str(workspace.registry_path)!r}\nDATABASE = {str(workspace.database)!r}\n" + INTERLEAVED_DEFS
    )
    monkeypatch.syspath_prepend(str(module_dir))
    module = importlib.import_module("interleaved_defs")
    try:
        instance.add_dynamic_partitions(experiment_partitions.name, ["exp_a", "exp_b"])
        runs = {
            e: instance.create_run_for_job(job_def=module.job(), tags={"dagster/partition": e})
            for e in ("exp_a", "exp_b")
        }
        recon = reconstructable(module.job)
        execute_run(recon, runs["exp_b"], instance)  # created second, evaluated first
        cursor, _ = tick(instance, workspace)
        execute_run(recon, runs["exp_a"], instance)
        tick(instance, workspace, cursor)
        assert sorted(alert_rows(workspace).experiment_id) == ["exp_a", "exp_b"]
    finally:
        sys.modules.pop("interleaved_defs", None)


def test_a_malformed_webhook_url_is_reported_without_leaking_it(tmp_path, instance, monkeypatch):
    secret = "hooks.example.invalid/services/T0/B0/SECRETTOKEN"
    monkeypatch.setenv(alerts.WEBHOOK_ENV, secret)
    workspace = srm_workspace(tmp_path)
    assert run(workspace, instance, "exp_a").success
    _, result = tick(instance, workspace)  # must not raise
    rows = alert_rows(workspace)
    assert not rows.delivered.iloc[0]
    assert "not a valid http(s) URL" in rows.last_error.iloc[0]
    assert "SECRETTOKEN" not in rows.to_string() and "SECRETTOKEN" not in result.skip_message
    logged = " ".join(e.user_message for r in instance.get_runs() for e in instance.all_logs(r.run_id))
    assert "SECRETTOKEN" not in logged


def test_a_trickling_webhook_is_abandoned_at_the_deadline_and_the_alert_arrives_later(
    tmp_path, instance, monkeypatch
):
    import time

    from exp_pipeline_tests.test_alerts import TricklingEndpoint

    trickle = TricklingEndpoint(interval=1.0)  # one byte a second: no single read ever times out
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.WEBHOOK_ENV, trickle.url)
        workspace = srm_workspace(tmp_path)
        assert run(workspace, instance, "exp_a").success
        started = time.monotonic()
        cursor, result = tick(instance, workspace)
        assert time.monotonic() - started < alerts.WEBHOOK_TIMEOUT_SECONDS + 3
        rows = alert_rows(workspace)
        assert not rows.delivered.iloc[0]
        assert rows.last_error.iloc[0] == f"webhook did not answer within {alerts.WEBHOOK_TIMEOUT_SECONDS:g} s"
        monkeypatch.setenv(alerts.WEBHOOK_ENV, receiver.url)  # the endpoint recovered
        tick(instance, workspace, cursor)
        assert bool(alert_rows(workspace).delivered.iloc[0])
        assert {m["alert_id"] for m in receiver.received} == {rows.alert_id.iloc[0]}
    finally:
        trickle.close()
        receiver.close()


def test_an_experiment_whose_results_go_stale_alerts_once(tmp_path, instance, monkeypatch):
    from exp_pipeline.defs import automation
    from exp_pipeline.defs.resources import RegistryResource

    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    workspace = write_tiny_workspace(tmp_path)
    instance.add_dynamic_partitions("experiment", ["exp_b"])

    def late_tick(hours: float):
        now = dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)
        monkeypatch.setattr(automation, "_now", lambda: now)
        resources = {"warehouse": workspace.warehouse(), "registry": RegistryResource(path=str(workspace.registry_path))}
        with build_sensor_context(instance=instance, resources=resources) as context:
            return automation.alert_on_late_results(context)

    # Registered long after its start but not analysed yet: not late.
    assert late_tick(0).skip_message == "no experiment's results are late"
    assert run(workspace, instance, "exp_b").success  # exp_b has no end: its window stays open
    assert late_tick(0).skip_message == "no experiment's results are late"
    assert late_tick(31).skip_message.startswith("1 experiments late, 1 new alerts")
    assert late_tick(40).skip_message.startswith("1 experiments late, 0 new alerts")
    [row] = alert_rows(workspace).to_dict("records")
    assert (row["kind"], row["experiment_id"], row["source"]) == ("late_results", "exp_b", "variant_metrics / freshness")
    assert row["run_url"].endswith("/assets/variant_metrics?partition=exp_b")
    assert_alerts_keep_their_contract(workspace)
