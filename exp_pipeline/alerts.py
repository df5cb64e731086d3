"""Where alerts go: the log always, the warehouse's `alerts` table always, a webhook when configured.

An alert is recorded first (undelivered) and delivered after, so a webhook that is down or slow
loses nothing: every tick retries what is still undelivered. The webhook URL is a secret: it is read
from the environment when needed and never logged or stored.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import socket
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import ibis
import pandas as pd

from exp_pipeline.schemas import alerts_schema, ibis_schema
from exp_pipeline.warehouse.interface import WarehouseSession

WEBHOOK_ENV = "EXP_PIPELINE_ALERT_WEBHOOK_URL"
UI_URL_ENV = "EXP_PIPELINE_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:3000"
WEBHOOK_TIMEOUT_SECONDS = 5.0
ALERTS_TABLE = "alerts"
MAX_FIGURES = 12


@dataclass(frozen=True)
class Alert:
    alert_id: str  # stable per failed evaluation / failed run, so nothing is sent twice
    kind: str  # "asset_check", "run_failure" or "late_results"
    experiment_id: str | None
    source: str  # "deduped_assignments / no_sample_ratio_mismatch" or the job name
    severity: str  # "ERROR" or "WARN"
    summary: str
    run_id: str  # empty for late results (no run to point at)
    run_url: str  # the run in the UI, or the experiment's results for late results
    created_at: dt.datetime
    figures: dict = field(default_factory=dict)

    def log_line(self) -> str:
        where = f" [{self.experiment_id}]" if self.experiment_id else ""
        return f"ALERT {self.severity}{where} {self.source}: {self.summary} ({self.run_url})"


def ui_url() -> str:
    return os.environ.get(UI_URL_ENV, DEFAULT_UI_URL).rstrip("/")


def run_url(run_id: str) -> str:
    return f"{ui_url()}/runs/{run_id}"


def asset_url(asset: str, partition: str) -> str:
    return f"{ui_url()}/assets/{asset}?partition={partition}"


# The daily refresh runs at 06:00 UTC: results older than a day and a bit missed it. The freshness
# policy of variant_metrics (warn, fail) and the late-results alert (at fail) use these windows.
RESULTS_WARN_AFTER = dt.timedelta(hours=26)
RESULTS_LATE_AFTER = dt.timedelta(hours=30)


def late_results_alert(experiment_id: str, last_written: dt.datetime | None, now: dt.datetime) -> Alert | None:
    """An alert when an experiment whose analysis window is open has results older than
    RESULTS_LATE_AFTER; one per stale state (its id holds the time of the results it is about, so
    the next refresh that is late again alerts again). An experiment never analysed yet is not
    late: its first run is the new-experiment sensor's, and a failed run alerts on its own."""
    if last_written is None or now - last_written <= RESULTS_LATE_AFTER:
        return None
    hours = (now - last_written).total_seconds() / 3600
    late_after = RESULTS_LATE_AFTER.total_seconds() / 3600
    what = f"the results were last written {hours:.0f} h ago, on {last_written:%Y-%m-%d %H:%M} UTC"
    return Alert(
        alert_id=f"late-{experiment_id}-{last_written.isoformat()}", kind="late_results", experiment_id=experiment_id,
        source="variant_metrics / freshness", severity="ERROR",
        summary=f"{what} (late after {late_after:.0f} h): the daily refresh did not run or did not finish",
        run_id="", run_url=asset_url("variant_metrics", experiment_id), created_at=now,
        figures={"hours_since_results": round(hours, 1), "late_after_hours": late_after},
    )


def key_figures(metadata: dict) -> dict:
    """The scalar figures of a check's metadata (counts, shares, p-values), for the message."""
    figures = {}
    for name, value in metadata.items():
        raw = getattr(value, "value", value)
        if isinstance(raw, bool | int | float | str) and len(figures) < MAX_FIGURES:
            figures[name] = raw
    return figures


def slack_payload(alert: Alert) -> dict:
    """Slack-compatible message (incoming webhooks accept `text` and `blocks`)."""
    icon = ":rotating_light:" if alert.severity == "ERROR" else ":warning:"
    experiment = alert.experiment_id or "-"
    figures = "\n".join(f"• {k}: {v:.4g}" if isinstance(v, float) else f"• {k}: {v}" for k, v in alert.figures.items())
    title = f"{icon} {alert.severity}: {alert.source} failed for experiment {experiment}"
    return {
        "text": f"{title}. {alert.summary}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}*\n{alert.summary}"}},
            *([{"type": "section", "text": {"type": "mrkdwn", "text": figures}}] if figures else []),
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{alert.run_url}|Open in Dagster>"}]},
        ],
        # Delivery is at least once (a POST that times out after arriving is sent again): receivers
        # can drop repeats by this id.
        "alert_id": alert.alert_id,
        "experiment_id": alert.experiment_id,
        "check": alert.source,
        "severity": alert.severity,
        "figures": alert.figures,
        "run_url": alert.run_url,
    }


class DeliveryError(RuntimeError):
    """The webhook did not accept the alert (the message never contains the URL)."""


def post_webhook(url: str, payload: dict, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> None:
    """POST the payload; `timeout` is a deadline for the whole request, not per socket read.

    A socket timeout alone lets an endpoint that trickles one byte a second hold the caller (the
    alert sensor's tick) for as long as it likes: a watchdog shuts the socket at the deadline. The
    proxy of the environment (HTTP(S)_PROXY, NO_PROXY) is used as urllib would.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        # The message never quotes the URL: it is a secret.
        raise DeliveryError(f"webhook URL in {WEBHOOK_ENV} is not a valid http(s) URL")
    connection, target = _connection(parts, port, timeout)
    deadline = time.monotonic() + timeout
    watchdog = threading.Timer(timeout, _abort, [connection])
    watchdog.daemon = True
    watchdog.start()
    status = None
    try:
        body = json.dumps(payload, default=str).encode()
        connection.request("POST", target, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        status = response.status
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        if status is not None and 200 <= status < 300:
            return  # accepted; only the rest of its answer was slow or cut
        if time.monotonic() >= deadline - 0.05:
            raise DeliveryError(f"webhook did not answer within {timeout:g} s") from None
        raise DeliveryError(f"webhook unreachable: {type(exc).__name__}") from None
    finally:
        watchdog.cancel()
        connection.close()
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook answered HTTP {status}")


def _connection(parts, port: int | None, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """The connection to open (to the endpoint, or to the environment's proxy) and the request target."""
    https = parts.scheme == "https"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if https:
            connection = http.client.HTTPSConnection(via.hostname, via.port or 8080, timeout=timeout)
            connection.set_tunnel(parts.hostname, port or 443)
            return connection, path
        connection = http.client.HTTPConnection(via.hostname, via.port or 8080, timeout=timeout)
        return connection, f"http://{parts.netloc.rpartition('@')[2]}{path}"
    connection_type = http.client.HTTPSConnection if https else http.client.HTTPConnection
    return connection_type(parts.hostname, port, timeout=timeout), path


def _abort(connection: http.client.HTTPConnection) -> None:
    """Wake a blocked read or write of the connection: the request fails at once."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


# -- the alerts table ------------------------------------------------------------------------------

# The table's columns and types, from its schema.
_SCHEMA = ibis_schema(alerts_schema())
_COLUMNS = list(_SCHEMA)


def _frame(alerts: list[Alert]) -> pd.DataFrame:
    rows = []
    for alert in alerts:
        row = asdict(alert)
        row["figures"] = json.dumps(alert.figures, default=str)
        row.update(delivered=False, delivered_at=None, attempts=0, last_error=None)
        rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS)


def record_alerts(session: WarehouseSession, alerts: list[Alert]) -> list[Alert]:
    """Insert alerts not seen before (by alert_id); returns the new ones."""
    if not alerts:
        return []
    incoming = ibis.memtable(_frame(alerts), schema=_SCHEMA)
    if session.has_table(ALERTS_TABLE):
        known = set(session.to_pandas(session.table(ALERTS_TABLE).select("alert_id"))["alert_id"])
    else:
        known = set()
    new = [a for a in alerts if a.alert_id not in known]
    if new:
        fresh = incoming.filter(incoming.alert_id.isin([a.alert_id for a in new]))
        session.append(ALERTS_TABLE, fresh)
    return new


def undelivered(session: WarehouseSession) -> pd.DataFrame:
    if not session.has_table(ALERTS_TABLE):
        return pd.DataFrame(columns=_COLUMNS)
    table = session.table(ALERTS_TABLE)
    return session.to_pandas(table.filter(~table.delivered).order_by("created_at", "alert_id"))


def deliver_pending(warehouse, webhook_url: str | None) -> tuple[int, int]:
    """POST every undelivered alert; returns (delivered, still undelivered).

    The DuckDB file is not held while POSTing (a slow webhook must not keep runs waiting for the
    lock): pending alerts are read, the connection closed, and the outcomes written afterwards.
    """
    if not webhook_url:
        return 0, 0
    with warehouse.session() as session:
        pending = undelivered(session).to_dict("records")
    outcomes = []
    for row in pending:
        payload = slack_payload(
            Alert(
                alert_id=row["alert_id"], kind=row["kind"], experiment_id=row["experiment_id"],
                source=row["source"], severity=row["severity"], summary=row["summary"],
                run_id=row["run_id"], run_url=row["run_url"], created_at=row["created_at"],
                figures=json.loads(row["figures"] or "{}"),
            )
        )
        values = {"attempts": int(row["attempts"]) + 1}
        try:
            post_webhook(webhook_url, payload)
            values.update(delivered=True, delivered_at=dt.datetime.now(dt.UTC), last_error=None)
        except DeliveryError as exc:
            values.update(last_error=str(exc))
        outcomes.append((row["alert_id"], values))
    if outcomes:
        with warehouse.session() as session:
            for alert_id, values in outcomes:
                session.update_row(ALERTS_TABLE, "alert_id", alert_id, values)
    delivered = sum(1 for _, values in outcomes if values.get("delivered"))
    return delivered, len(outcomes) - delivered
