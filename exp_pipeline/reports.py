"""Readable renderings of variant_metrics rows: a console table and a markdown table."""

from __future__ import annotations

import math

import pandas as pd


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.2%}"


def _interval(low: float, high: float) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return "n/a"
    return f"[{low:+.2%}, {high:+.2%}]"


def _p(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _marker(p_value: float, alpha: float = 0.05) -> str:
    return "*" if p_value == p_value and p_value is not None and p_value < alpha else ""


def srm_verdict(flagged: bool, p_value: float) -> str:
    if p_value != p_value:
        return "not judged"
    return f"SRM (p={_p(p_value)})" if flagged else f"ok (p={_p(p_value)})"


def results_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One display row per treatment x metric: lift, interval, p-values, CUPED, SRM verdict."""
    treatments = frame[~frame["is_control"]].copy()
    controls = frame[frame["is_control"]].set_index(["experiment_id", "metric"])
    keys = list(zip(treatments["experiment_id"], treatments["metric"]))
    return pd.DataFrame(
        {
            "experiment": treatments["experiment_id"],
            "variant": treatments["variant_id"],
            "metric": treatments["metric"],
            "n (treat/ctrl)": [
                f"{int(n)}/{int(controls.loc[k, 'n'])}" for n, k in zip(treatments["n"], keys)
            ],
            "mean (treat/ctrl)": [
                f"{t:.4g}/{controls.loc[k, 'mean']:.4g}" for t, k in zip(treatments["mean"], keys)
            ],
            "lift": [_pct(v) + _marker(p) for v, p in zip(treatments["rel_lift"], treatments["p_value"])],
            "95% CI": [_interval(lo, hi) for lo, hi in zip(treatments["ci_low"], treatments["ci_high"])],
            "p": [_p(v) for v in treatments["p_value"]],
            "p (Holm)": [_p(v) for v in treatments["p_value_holm"]],
            "CUPED lift": [_pct(v) for v in treatments["cuped_rel_lift"]],
            "CUPED 95% CI": [
                _interval(lo, hi) for lo, hi in zip(treatments["cuped_ci_low"], treatments["cuped_ci_high"])
            ],
            "CUPED p": [_p(v) for v in treatments["cuped_p_value"]],
            "SRM": [srm_verdict(f, p) for f, p in zip(treatments["srm_flagged"], treatments["srm_p_value"])],
        }
    )


def results_markdown(frame: pd.DataFrame) -> str:
    table = results_rows(frame).drop(columns=["experiment"])
    return table.to_markdown(index=False) + "\n\n`*` p < 0.05 (unadjusted); intervals are for the relative lift."


def results_text(frame: pd.DataFrame) -> str:
    return results_rows(frame).to_string(index=False)
