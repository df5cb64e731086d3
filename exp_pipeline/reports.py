"""Readable renderings of variant_metrics rows: a console table and a markdown table."""

from __future__ import annotations

import math

import pandas as pd


def is_finite(value: object) -> bool:
    """A number that is neither NaN nor infinite (None and text are not)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def percent(value: float) -> str:
    return f"{value:+.2%}" if is_finite(value) else "n/a"


def interval(low: float, high: float) -> str:
    return f"[{low:+.2%}, {high:+.2%}]" if is_finite(low) and is_finite(high) else "n/a"


def p_value_text(value: float) -> str:
    if not is_finite(value):
        return "n/a"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _marker(p_value: float, alpha: float = 0.05) -> str:
    return "*" if is_finite(p_value) and p_value < alpha else ""


def srm_text(verdict: str | None, p_value: float) -> str:
    """The stored SRM verdict with its p-value: 'ok (p=0.420)', 'SRM (p=1.5e-132)', 'not judged';
    'n/a' for a row written before the verdict was stored."""
    if not isinstance(verdict, str):
        return "n/a"
    return verdict if verdict == "not judged" else f"{verdict} (p={p_value_text(p_value)})"


def results_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One display row per treatment x metric: lift, interval, p-values, CUPED, SRM verdict."""
    treatments = frame[~frame["is_control"]].copy()
    controls = frame[frame["is_control"]].set_index(["experiment_id", "metric"])
    keys = list(zip(treatments["experiment_id"], treatments["metric"], strict=True))
    return pd.DataFrame(
        {
            "experiment": treatments["experiment_id"],
            "variant": treatments["variant_id"],
            "metric": treatments["metric"],
            "n (t/c)": [
                f"{int(n)}/{int(controls.loc[k, 'n'])}" for n, k in zip(treatments["n"], keys, strict=True)
            ],
            "mean (t/c)": [
                f"{t:.4g}/{controls.loc[k, 'mean']:.4g}" for t, k in zip(treatments["mean"], keys, strict=True)
            ],
            "lift": [percent(v) + _marker(p) for v, p in zip(treatments["rel_lift"], treatments["p_value"], strict=True)],
            "95% CI": [interval(lo, hi) for lo, hi in zip(treatments["ci_low"], treatments["ci_high"], strict=True)],
            "p": [p_value_text(v) for v in treatments["p_value"]],
            "p (Holm)": [p_value_text(v) for v in treatments["p_value_holm"]],
            "CUPED lift": [percent(v) for v in treatments["cuped_rel_lift"]],
            "CUPED 95% CI": [
                interval(lo, hi) for lo, hi in zip(treatments["cuped_ci_low"], treatments["cuped_ci_high"], strict=True)
            ],
            "CUPED p": [p_value_text(v) for v in treatments["cuped_p_value"]],
            "CUPED++ lift": [percent(v) for v in treatments["cuped_pp_rel_lift"]],
            "CUPED++ 95% CI": [
                interval(lo, hi) for lo, hi in zip(treatments["cuped_pp_ci_low"], treatments["cuped_pp_ci_high"], strict=True)
            ],
            "SRM": [srm_text(v, p) for v, p in zip(treatments["srm_verdict"], treatments["srm_p_value"], strict=True)],
        }
    )


def results_markdown(frame: pd.DataFrame) -> str:
    table = results_rows(frame).drop(columns=["experiment"])
    return table.to_markdown(index=False) + "\n\n`*` p < 0.05 (unadjusted); intervals are for the relative lift."


# The console table leaves out what the markdown and HTML tables add (the unadjusted p-values,
# CUPED++, the SRM column: the SRM verdict heads each experiment), so that it reads in 120 columns.
CONSOLE_DROPS = ["experiment", "SRM", "p", "CUPED p", "CUPED++ lift", "CUPED++ 95% CI"]


def results_text(frame: pd.DataFrame) -> str:
    """The console table: a heading per experiment with its SRM verdict, then its comparisons."""
    rows = results_rows(frame)
    blocks = []
    for experiment, block in rows.groupby("experiment", sort=False):
        blocks.append(f"{experiment} · sample ratio {block['SRM'].iloc[0]}\n" + block.drop(columns=CONSOLE_DROPS).to_string(index=False))
    return "\n\n".join(blocks) + "\n\n* p < 0.05 (unadjusted); intervals are for the relative lift; p (Holm) across the experiment's comparisons."


def set_aside_lines(by_reason: pd.DataFrame) -> list[str]:
    """One line per (where, source) of rows set aside: 'exp_a exposures: unknown_variant 3, ...'.

    `by_reason` has columns where (an experiment id, or '' for the logs as a whole), source,
    reason and rows.
    """
    lines = []
    for (where, source), group in by_reason.groupby(["where", "source"], sort=True):
        label = f"{where} {source}" if where else f"{source} log as a whole"
        reasons = ", ".join(f"{r.reason} {int(r.rows)}" for r in group.sort_values("reason").itertuples())
        lines.append(f"{label}: {reasons}")
    return lines


def differs_lines(heterogeneity: pd.DataFrame) -> list[str]:
    """One line per lift that differs across a property's values (segment_heterogeneity rows):
    'revenue · treatment differs by device_type (Cochran's Q p = 1.1e-06, Holm 8.6e-06)'."""
    return [
        f"{r.metric} · {r.variant_id} differs by {r.property} (Cochran's Q p = {p_value_text(r.p_value)}, "
        f"Holm {p_value_text(r.p_value_holm)}; I² = {r.i_squared:.0%})"
        for r in heterogeneity[heterogeneity["differs"].astype(bool)].itertuples()
    ]


def heterogeneity_table(heterogeneity: pd.DataFrame) -> pd.DataFrame:
    """segment_heterogeneity rows for display."""
    return pd.DataFrame({
        "property": heterogeneity["property"],
        "variant": heterogeneity["variant_id"],
        "metric": heterogeneity["metric"],
        "segments": [f"{int(k)} (+{int(s)} too small)" if s else str(int(k))
                     for k, s in zip(heterogeneity["segments"], heterogeneity["segments_too_small"], strict=True)],
        "pooled lift": [percent(v) for v in heterogeneity["pooled_rel_lift"]],
        "Q": [f"{q:.2f}" if is_finite(q) else "n/a" for q in heterogeneity["q"]],
        "p": [p_value_text(v) for v in heterogeneity["p_value"]],
        "p (Holm)": [p_value_text(v) for v in heterogeneity["p_value_holm"]],
        "differs": ["yes" if d else "no" for d in heterogeneity["differs"]],
    })


HETEROGENEITY_NOTE = (
    "Cochran's Q tests whether a lift is the same in every value of the property (segments with an arm "
    "below segments.min_subjects left out); Holm across the experiment's properties x treatments x metrics."
)


def heterogeneity_markdown(heterogeneity: pd.DataFrame) -> str:
    """segment_heterogeneity rows as a markdown table."""
    return heterogeneity_table(heterogeneity).to_markdown(index=False) + "\n\n" + HETEROGENEITY_NOTE


def report_markdown(
    name: str, experiment_id: str, srm: dict, results_md: str, plot_md: str, segments_md: str | None, checks: list[dict]
) -> str:
    """The experiment report as markdown (what the HTML report says, for the UI's metadata view):
    the SRM verdict with its counts, the results, the forest plot, the results by segment, the checks."""
    lines = [f"# {name} ({experiment_id})", "", f"**Sample ratio:** {srm_text(srm['verdict'], srm['p_value'])}; "
             f"observed {srm['observed']}, expected {srm['expected']}."]
    if srm["verdict"] == "SRM":
        cause = f" Likely cause: {srm['likely_cause']}." if srm.get("likely_cause") else ""
        lines += ["", f"**Do not trust the lifts below:** the variants' subject counts do not match their weights.{cause}"]
    lines += ["", "## Results", "", results_md, "", plot_md]
    if segments_md:
        lines += ["", "## By segment", "", segments_md]
    table = pd.DataFrame(
        [{"check": f"{c['asset']}.{c['check']}", "result": "passed" if c["passed"] else f"FAILED ({c['severity']})",
          "detail": c["description"] or ""} for c in checks]
    )
    lines += ["", "## Checks", "", table.to_markdown(index=False) if len(table) else "no checks evaluated"]
    return "\n".join(lines)
