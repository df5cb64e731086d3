"""The alert message: a Slack-compatible payload with the check's key figures."""

import datetime as dt
import json

import pytest

from exp_pipeline import alerts


def test_slack_payload_carries_the_key_figures():
    alert = alerts.Alert(
        alert_id="check-1", kind="asset_check", experiment_id="e", source="deduped_assignments / x",
        severity="ERROR", summary="3 subjects duplicated", run_id="r", run_url="http://ui/runs/r",
        created_at=dt.datetime(2026, 11, 1, tzinfo=dt.UTC), figures={"duplicated_subjects": 3},
    )
    payload = alerts.slack_payload(alert)
    assert payload["text"].startswith(":rotating_light: ERROR")
    assert "duplicated_subjects: 3" in json.dumps(payload["blocks"])
    assert "<http://ui/runs/r|Open in Dagster>" in json.dumps(payload["blocks"])


@pytest.mark.parametrize("metadata, expected", [({"n": 3, "share": 0.5, "nested": {"a": 1}}, {"n": 3, "share": 0.5})])
def test_key_figures_keep_scalars(metadata, expected):
    assert alerts.key_figures(metadata) == expected


class TricklingEndpoint:
    """An HTTP endpoint on 127.0.0.1 that answers one byte every `interval` seconds, forever."""

    def __init__(self, interval: float = 0.2):
        import socket
        import threading

        self.interval = interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with client:
                client.recv(65536)
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
                for byte in answer:
                    if self.stopped.wait(self.interval):
                        return
                    try:
                        client.sendall(bytes([byte]))
                    except OSError:
                        break

    def close(self):
        self.stopped.set()
        self.listener.close()


def test_a_trickling_webhook_is_abandoned_at_the_deadline():
    import time

    endpoint = TricklingEndpoint(interval=0.2)  # every read gets a byte well inside the timeout
    try:
        started = time.monotonic()
        with pytest.raises(alerts.DeliveryError, match="did not answer within 1 s"):
            alerts.post_webhook(endpoint.url, {"text": "x"}, timeout=1.0)
        assert time.monotonic() - started < 2.0
    finally:
        endpoint.close()


def test_an_answer_within_the_deadline_is_delivered_and_an_error_status_is_not():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    statuses = iter([204, 500])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(next(statuses))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook?token=1"
    try:
        alerts.post_webhook(url, {"text": "x"}, timeout=5.0)
        with pytest.raises(alerts.DeliveryError, match="HTTP 500"):
            alerts.post_webhook(url, {"text": "x"}, timeout=5.0)
    finally:
        server.shutdown()
        server.server_close()


def test_an_accepted_alert_whose_answer_body_trickles_counts_as_delivered():
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        client, _ = listener.accept()
        with client:
            client.recv(65536)
            client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.2):
                try:
                    client.sendall(b"x")
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    try:
        started = time.monotonic()
        alerts.post_webhook(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", {"text": "x"}, timeout=1.0)
        assert time.monotonic() - started < 2.0  # abandoned at the deadline, but it was accepted
    finally:
        stop.set()
        listener.close()


def test_the_environment_proxy_carries_the_post(monkeypatch):
    """Deployments reach the internet through an egress proxy: the POST goes to it, with the full URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Proxy(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        alerts.post_webhook("http://hooks.example.invalid/services/T1?x=1", {"text": "x"}, timeout=5.0)
        assert seen == ["http://hooks.example.invalid/services/T1?x=1"]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_results_are_late_after_the_window_and_the_alert_links_to_the_experiments_results(monkeypatch):
    monkeypatch.setenv(alerts.UI_URL_ENV, "http://127.0.0.1:3917")
    written = dt.datetime(2026, 11, 20, 6, 5, tzinfo=dt.UTC)
    assert alerts.late_results_alert("e", written, written + alerts.RESULTS_LATE_AFTER) is None
    late = alerts.late_results_alert("e", written, written + dt.timedelta(hours=31))
    assert (late.kind, late.severity, late.experiment_id, late.run_id) == ("late_results", "ERROR", "e", "")
    assert late.run_url == "http://127.0.0.1:3917/assets/variant_metrics?partition=e"
    assert late.summary.startswith("the results were last written 31 h ago, on 2026-11-20 06:05 UTC (late after 30 h)")
    assert late.figures == {"hours_since_results": 31.0, "late_after_hours": 30.0}
    # Later ticks of the same stale state are the same alert (its id); new results start a new one.
    assert alerts.late_results_alert("e", written, written + dt.timedelta(hours=50)).alert_id == late.alert_id
    # Never analysed (a new experiment, its first run still queued): not late.
    assert alerts.late_results_alert("e", None, written + dt.timedelta(days=30)) is None
