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
    assert "<http://ui/runs/r|Open the run>" in json.dumps(payload["blocks"])


@pytest.mark.parametrize("metadata, expected", [({"n": 3, "share": 0.5, "nested": {"a": 1}}, {"n": 3, "share": 0.5})])
def test_key_figures_keep_scalars(metadata, expected):
    assert alerts.key_figures(metadata) == expected
