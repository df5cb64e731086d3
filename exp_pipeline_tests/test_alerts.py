"""Alerts reach a real HTTP endpoint on 127.0.0.1: once per failed evaluation, never repeated,
none for passing checks, and not lost while the endpoint is down."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from dagster import build_run_status_sensor_context, build_sensor_context, DagsterEventType

from exp_pipeline import alerts
from exp_pipeline.automation import alert_on_failed_checks, alert_on_run_failure

from .conftest import write_tiny_workspace
from .test_checks import run


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


def test_slack_payload_carries_the_key_figures():
    import datetime as dt

    alert = alerts.Alert(
        alert_id="check-1", kind="asset_check", experiment_id="e", source="deduped_assignments / x",
        severity="ERROR", summary="3 subjects duplicated", run_id="r", run_url="http://ui/runs/r",
        created_at=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc), figures={"duplicated_subjects": 3},
    )
    payload = alerts.slack_payload(alert)
    assert payload["text"].startswith(":rotating_light: ERROR")
    assert "duplicated_subjects: 3" in json.dumps(payload["blocks"])
    assert "<http://ui/runs/r|Open the run>" in json.dumps(payload["blocks"])


@pytest.mark.parametrize("metadata, expected", [({"n": 3, "share": 0.5, "nested": {"a": 1}}, {"n": 3, "share": 0.5})])
def test_key_figures_keep_scalars(metadata, expected):
    assert alerts.key_figures(metadata) == expected
