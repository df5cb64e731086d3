"""A self-contained HTML report of one experiment, with an SVG forest plot of its relative lifts.

Everything is rendered as text (no plotting library, no external fonts, scripts or styles), so the
page can be attached to a decision and opened anywhere, and the SVG can be embedded in Dagster
markdown metadata as a data URI. Every value taken from data is escaped.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path

import pandas as pd

from exp_pipeline.reports import HETEROGENEITY_NOTE, heterogeneity_table, is_finite, p_value_text, percent, results_rows

ALPHA = 0.05  # the marker threshold used by the markdown table too (unadjusted p)

# -- forest plot geometry (px) ------------------------------------------------------------------
SVG_WIDTH = 760
LABEL_WIDTH = 230  # left column holding "metric · variant"
PLOT_RIGHT_PAD = 28
TITLE_HEIGHT = 28
LEGEND_HEIGHT = 34
ROW_HEIGHT = 30  # room for the raw interval and the CUPED one just below it
CUPED_OFFSET = 9  # vertical distance from the raw interval to the CUPED one
GROUP_GAP = 8  # extra space between metrics so groups read as blocks
AXIS_HEIGHT = 50  # tick labels + axis caption
POINT_RADIUS = 4
CAP_HALF_HEIGHT = 3  # whisker end caps
LABEL_MAX_CHARS = 30  # longer labels are cut (full text in the tooltip) so they stay in the column
LEGEND_CHAR_WIDTH = 6.4  # rough width of one 12 px character, to space legend entries
TARGET_TICKS = 6
X_MARGIN = 0.06  # share of the data span kept free on each side of the intervals
EMPTY_HALF_SPAN = 0.05  # axis of ±5 % when there is nothing to draw
NICE_STEPS = (1.0, 2.0, 2.5, 5.0, 10.0)

FONT_FAMILY = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
RAW_COLOUR = "#1f5f99"
CUPED_COLOUR = "#d9731a"
ZERO_COLOUR = "#444444"
GRID_COLOUR = "#e3e6ea"
BAND_COLOUR = "#f4f6f8"
TEXT_COLOUR = "#222222"
MUTED_COLOUR = "#666666"

# -- HTML -----------------------------------------------------------------------------------------
SRM_CLASSES = {"ok": "srm-ok", "SRM": "srm-bad", "not judged": "srm-unjudged"}
SRM_HEADLINES = {
    "ok": "Sample ratio: ok",
    "SRM": "Sample ratio mismatch (SRM) detected",
    "not judged": "Sample ratio: not judged",
}
SRM_EXPLANATIONS = {  # an SRM gets SRM_WARNING instead
    "ok": "The observed traffic split matches the configured one.",
    "not judged": "Too few subjects to test the traffic split yet: treat the results as preliminary.",
}
SRM_WARNING = (
    "Do not trust the lifts on this page. The variants did not receive the configured traffic "
    "split, so the groups are not comparable and every lift, interval and p-value below may be "
    "biased. Find and fix the cause, then rerun the experiment or the analysis."
)

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
       color: #222; margin: 0; background: #fff; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 28px 0 10px; }
.meta { color: #666; margin: 0 0 20px; }
code { background: #f1f3f5; padding: 1px 4px; border-radius: 3px; }
.srm { border: 1px solid; border-left-width: 6px; border-radius: 4px; padding: 12px 16px; }
.srm h2 { margin: 0 0 6px; font-size: 1.1em; }
.srm p { margin: 6px 0; }
.srm-ok { background: #edf7ee; border-color: #2e7d32; }
.srm-bad { background: #fdecea; border-color: #c62828; }
.srm-unjudged { background: #fff8e1; border-color: #f9a825; }
#srm-warning { font-weight: 600; color: #8e1b1b; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { padding: 5px 7px; border-bottom: 1px solid #e3e6ea; text-align: left; vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; }
#results td, .srm td { white-space: nowrap; font-variant-numeric: tabular-nums; }
#results tr.significant td { background: #e8f1fb; }
#checks td.status { font-weight: 700; white-space: nowrap; }
td.pass { color: #2e7d32; }
td.fail-error { color: #fff; background: #c62828; }
td.fail-warn { color: #5c4300; background: #ffe08a; }
.note { color: #666; font-size: 0.9em; }
#forest-plot { margin: 0; }
#forest-plot svg, .segment-plot svg { max-width: 100%; height: auto; }
.how-to-read { background: #f8f9fa; border-radius: 4px; padding: 10px 16px; }
.how-to-read li { margin: 4px 0; }
"""


# -- forest plot ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Estimate:
    lift: float
    low: float
    high: float
    p_value: float

    @property
    def drawable(self) -> bool:
        return all(is_finite(v) for v in (self.lift, self.low, self.high))

    @property
    def significant(self) -> bool:
        return is_finite(self.p_value) and self.p_value < ALPHA


@dataclass(frozen=True)
class _Comparison:
    metric: str
    variant: str
    raw: _Estimate
    cuped: _Estimate

    @property
    def label(self) -> str:
        return f"{self.metric} · {self.variant}"


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _comparisons(frame: pd.DataFrame) -> list[_Comparison]:
    """Treatment rows grouped by metric (metrics in first-seen order, variants in frame order)."""
    treatments = frame[~frame["is_control"].astype(bool)]
    metric_order = {m: i for i, m in enumerate(dict.fromkeys(treatments["metric"]))}
    rows = sorted(
        (row for _, row in treatments.iterrows()), key=lambda row: metric_order[row["metric"]]
    )
    return [
        _Comparison(
            metric=str(row["metric"]),
            variant=str(row["variant_id"]),
            raw=_Estimate(row["rel_lift"], row["ci_low"], row["ci_high"], row["p_value"]),
            cuped=_Estimate(
                row["cuped_rel_lift"], row["cuped_ci_low"], row["cuped_ci_high"], row["cuped_p_value"]
            ),
        )
        for row in rows
    ]


def _nice_step(span: float) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about TARGET_TICKS ticks."""
    rough = span / TARGET_TICKS
    magnitude = 10 ** math.floor(math.log10(rough))
    return next(m * magnitude for m in NICE_STEPS if m * magnitude >= rough)


def _axis(values: list[float]) -> tuple[float, float, list[float]]:
    """Domain and ticks covering every value and 0, with a margin, ending on whole ticks."""
    low, high = min([0.0, *values]), max([0.0, *values])
    span = high - low
    if span == 0:
        low, high, span = -EMPTY_HALF_SPAN, EMPTY_HALF_SPAN, 2 * EMPTY_HALF_SPAN
    low, high = low - X_MARGIN * span, high + X_MARGIN * span
    step = _nice_step(high - low)
    # Integer tick indices avoid accumulating float error (0 is then exactly a tick).
    first, last = math.floor(low / step), math.ceil(high / step)
    ticks = [i * step for i in range(first, last + 1)]
    return ticks[0], ticks[-1], ticks


def _tick_label(value: float) -> str:
    percent = round(value * 100, 6)  # drops float noise such as 7.500000000001
    return "0%" if percent == 0 else f"{percent:+g}%"


def _truncate(text: str) -> str:
    return text if len(text) <= LABEL_MAX_CHARS else text[: LABEL_MAX_CHARS - 1] + "…"


def _na_svg(kind: str, y: float, colour: str, x_of) -> str:
    return (
        f'<text class="na {kind}" x="{x_of(0.0) + 6:.1f}" y="{y:.1f}" dy="0.35em" '
        f'fill="{colour}" font-size="11" font-style="italic">n/a</text>'
    )


def _estimate_svg(estimate: _Estimate, kind: str, y: float, colour: str, x_of) -> list[str]:
    """One interval: whiskered CI line and the point, filled when significant; "n/a" without CI."""
    if not estimate.drawable:
        return [_na_svg(kind, y, colour, x_of)]
    x1, x2, xp = x_of(estimate.low), x_of(estimate.high), x_of(estimate.lift)
    significance = "significant" if estimate.significant else "not-significant"
    fill = colour if estimate.significant else "#ffffff"
    return [
        f'<line class="ci {kind}" x1="{x1:.1f}" y1="{y:.1f}" x2="{x2:.1f}" y2="{y:.1f}" '
        f'stroke="{colour}" stroke-width="2"/>',
        *(
            f'<line class="cap {kind}" x1="{x:.1f}" y1="{y - CAP_HALF_HEIGHT:.1f}" x2="{x:.1f}" '
            f'y2="{y + CAP_HALF_HEIGHT:.1f}" stroke="{colour}" stroke-width="1.5"/>'
            for x in (x1, x2)
        ),
        f'<circle class="point {kind} {significance}" cx="{xp:.1f}" cy="{y:.1f}" r="{POINT_RADIUS}" '
        f'fill="{fill}" stroke="{colour}" stroke-width="1.5"/>',
    ]


def _tooltip(comparison: _Comparison, with_cuped: bool) -> str:
    parts = [
        f"{comparison.label}: raw {percent(comparison.raw.lift)} "
        f"[{percent(comparison.raw.low)}, {percent(comparison.raw.high)}], p = {p_value_text(comparison.raw.p_value)}"
    ]
    if with_cuped:
        parts.append(
            f"CUPED {percent(comparison.cuped.lift)} [{percent(comparison.cuped.low)}, "
            f"{percent(comparison.cuped.high)}], p = {p_value_text(comparison.cuped.p_value)}"
        )
    return "; ".join(parts)


def _legend_svg(with_cuped: bool, y: float) -> list[str]:
    entries = [("line", RAW_COLOUR, "raw lift, 95% CI")]
    if with_cuped:
        entries.append(("line", CUPED_COLOUR, "CUPED-adjusted"))
    entries += [("filled", MUTED_COLOUR, f"p < {ALPHA:g}"), ("hollow", MUTED_COLOUR, f"p ≥ {ALPHA:g}")]
    parts, x = [], LABEL_WIDTH
    for shape, colour, text in entries:
        if shape == "line":
            parts.append(
                f'<line x1="{x:.1f}" y1="{y}" x2="{x + 22:.1f}" y2="{y}" stroke="{colour}" stroke-width="2"/>'
            )
        fill = "#ffffff" if shape == "hollow" else colour
        parts.append(
            f'<circle cx="{x + 11:.1f}" cy="{y}" r="{POINT_RADIUS}" fill="{fill}" stroke="{colour}" '
            f'stroke-width="1.5"/>'
        )
        parts.append(f'<text x="{x + 28:.1f}" y="{y}" dy="0.35em" font-size="12">{_esc(text)}</text>')
        x += 28 + len(text) * LEGEND_CHAR_WIDTH + 18
    return parts


def _row_tops(comparisons: list[_Comparison], plot_top: float) -> list[float]:
    """Top y of each row, with a gap wherever the metric changes."""
    tops, y = [], plot_top + GROUP_GAP
    for index, comparison in enumerate(comparisons):
        if index and comparison.metric != comparisons[index - 1].metric:
            y += GROUP_GAP
        tops.append(y)
        y += ROW_HEIGHT
    return tops


def forest_plot_svg(frame: pd.DataFrame, title: str = "") -> str:
    """SVG forest plot of one experiment's relative lifts (raw and CUPED, 95% CIs) per comparison."""
    experiments = frame["experiment_id"].unique()
    if len(experiments) > 1:
        raise ValueError(f"forest_plot_svg draws one experiment, got {sorted(map(str, experiments))}")
    comparisons = _comparisons(frame)
    with_cuped = any(c.cuped.drawable for c in comparisons)
    estimates = [e for c in comparisons for e in ((c.raw, c.cuped) if with_cuped else (c.raw,))]
    values = [v for e in estimates if e.drawable for v in (e.low, e.high, e.lift)]
    domain_low, domain_high, ticks = _axis(values)
    plot_left, plot_right = LABEL_WIDTH, SVG_WIDTH - PLOT_RIGHT_PAD

    def x_of(value: float) -> float:
        return plot_left + (value - domain_low) / (domain_high - domain_low) * (plot_right - plot_left)

    plot_top = (TITLE_HEIGHT if title else 0) + LEGEND_HEIGHT
    tops = _row_tops(comparisons, plot_top)
    plot_bottom = (tops[-1] if tops else plot_top + GROUP_GAP) + ROW_HEIGHT + GROUP_GAP
    height = plot_bottom + AXIS_HEIGHT
    accessible_title = title or "Relative lift vs control, 95% confidence intervals"

    # Every other metric gets a light band so the rows of one metric read as a block.
    bands = []
    for index, (_, group) in enumerate(groupby(zip(comparisons, tops, strict=True), key=lambda pair: pair[0].metric)):
        group_tops = [top for _, top in group]
        if index % 2 == 0:
            bands.append(
                f'<rect class="band" x="0" y="{group_tops[0] - GROUP_GAP / 2:.1f}" width="{SVG_WIDTH}" '
                f'height="{group_tops[-1] - group_tops[0] + ROW_HEIGHT + GROUP_GAP:.1f}" fill="{BAND_COLOUR}"/>'
            )
    body = []
    for comparison, top in zip(comparisons, tops, strict=True):
        centre = top + ROW_HEIGHT / 2
        raw_y = centre - CUPED_OFFSET / 2 if with_cuped else centre
        row = [
            f'<g class="row" data-metric="{_esc(comparison.metric)}" data-variant="{_esc(comparison.variant)}">',
            f"<title>{_esc(_tooltip(comparison, with_cuped))}</title>",
            f'<text class="label" x="{plot_left - 12}" y="{centre:.1f}" dy="0.35em" text-anchor="end" '
            f'font-size="12">{_esc(_truncate(comparison.label))}</text>',
        ]
        lines = [("raw", comparison.raw, raw_y, RAW_COLOUR)]
        if with_cuped:
            lines.append(("cuped", comparison.cuped, raw_y + CUPED_OFFSET, CUPED_COLOUR))
        if any(estimate.drawable for _, estimate, _, _ in lines):
            for kind, estimate, y, colour in lines:
                row += _estimate_svg(estimate, kind, y, colour, x_of)
        else:
            row.append(_na_svg("raw", centre, MUTED_COLOUR, x_of))  # one mark when the row has nothing to draw
        body.append("\n".join([*row, "</g>"]))

    grid = [
        f'<line class="grid" x1="{x_of(t):.1f}" y1="{plot_top}" x2="{x_of(t):.1f}" y2="{plot_bottom}" '
        f'stroke="{GRID_COLOUR}" stroke-width="1"/>'
        for t in ticks
    ]
    axis = [
        f'<line class="axis" x1="{plot_left}" y1="{plot_bottom}" x2="{plot_right}" y2="{plot_bottom}" '
        f'stroke="{MUTED_COLOUR}" stroke-width="1"/>',
        *(
            f'<text class="tick" x="{x_of(t):.1f}" y="{plot_bottom + 16}" text-anchor="middle" '
            f'font-size="11" fill="{MUTED_COLOUR}">{_esc(_tick_label(t))}</text>'
            for t in ticks
        ),
        f'<text class="axis-caption" x="{(plot_left + plot_right) / 2:.1f}" y="{plot_bottom + 38}" '
        f'text-anchor="middle" font-size="12" fill="{MUTED_COLOUR}">relative lift vs control '
        f"(treatment mean / control mean − 1)</text>",
    ]
    zero = (
        f'<line class="zero" x1="{x_of(0.0):.1f}" y1="{plot_top}" x2="{x_of(0.0):.1f}" y2="{plot_bottom}" '
        f'stroke="{ZERO_COLOUR}" stroke-width="1.2" stroke-dasharray="4 3"/>'
    )
    header = _legend_svg(with_cuped, plot_top - LEGEND_HEIGHT / 2)
    if title:
        header.insert(
            0, f'<text class="title" x="12" y="22" font-size="15" font-weight="600">{_esc(title)}</text>'
        )
    if not comparisons:
        body.append(
            f'<text x="{(plot_left + plot_right) / 2:.1f}" y="{plot_top + 20}" text-anchor="middle" '
            f'font-size="12" fill="{MUTED_COLOUR}">no comparisons to show</text>'
        )

    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {SVG_WIDTH} {height:.0f}" role="img" font-family="{_esc(FONT_FAMILY)}" '
            f'fill="{TEXT_COLOUR}">',
            f"<title>{_esc(accessible_title)}</title>",
            f'<rect x="0" y="0" width="{SVG_WIDTH}" height="{height:.0f}" fill="#ffffff"/>',
            *bands,
            *grid,
            *header,
            *axis,
            zero,
            *body,
            "</svg>",
        ]
    )


def segment_forest_plot_svg(segments: pd.DataFrame, prop: str, title: str = "") -> str:
    """The forest plot of one property's segments (segment_metrics rows): per metric and treatment,
    the raw relative lift of each value; too-small segments show as n/a."""
    rows = segments[(segments["property"] == prop) & ~segments["is_control"].astype(bool)]
    several = rows["variant_id"].nunique() > 1
    frame = pd.DataFrame({
        "experiment_id": rows["experiment_id"],
        "is_control": False,
        # Grouped (banded) by metric and treatment; each row is one value of the property.
        "metric": [f"{m} · {v}" if several else m for m, v in zip(rows["metric"], rows["variant_id"], strict=True)],
        "variant_id": rows["value"],
        "rel_lift": rows["rel_lift"], "ci_low": rows["ci_low"], "ci_high": rows["ci_high"], "p_value": rows["p_value"],
        "cuped_rel_lift": math.nan, "cuped_ci_low": math.nan, "cuped_ci_high": math.nan, "cuped_p_value": math.nan,
    })
    return forest_plot_svg(frame, title=title or f"Relative lift by {prop} (95% CI)")


def svg_data_uri(svg: str) -> str:
    """The SVG as a base64 data URI, e.g. for an <img> in Dagster markdown metadata."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


# -- HTML page --------------------------------------------------------------------------------------


def _cell(text: object, css_class: str = "") -> str:
    attribute = f' class="{_esc(css_class)}"' if css_class else ""
    return f"<td{attribute}>{_esc(text)}</td>"


def _table(table_id: str, header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """An HTML table; rows are (row css class, cells already rendered by _cell)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "\n".join(
        (f'<tr class="{_esc(css)}">' if css else "<tr>") + "".join(cells) + "</tr>" for css, cells in rows
    )
    id_attribute = f' id="{_esc(table_id)}"' if table_id else ""
    return f"<table{id_attribute}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _utc(moment: datetime) -> datetime:
    # A naive timestamp is taken as UTC (what the pipeline stores), not as the machine's local time.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _srm_section(srm: dict) -> str:
    verdict = srm["verdict"]
    if verdict not in SRM_CLASSES:
        raise ValueError(f"unknown SRM verdict {verdict!r}; expected one of {sorted(SRM_CLASSES)}")
    observed, expected = srm.get("observed") or {}, srm.get("expected") or {}
    headline = SRM_HEADLINES[verdict]
    if is_finite(srm.get("p_value")):
        headline += f" (p = {p_value_text(srm['p_value'])})"
    parts = [f"<h2>{_esc(headline)}</h2>"]
    if verdict == "SRM":
        parts.append(f'<p id="srm-warning">{_esc(SRM_WARNING)}</p>')
        cause = srm.get("likely_cause")
        parts.append(
            f"<p>Likely cause: <strong>{_esc(cause)}</strong></p>"
            if cause
            else "<p>Likely cause: not identified.</p>"
        )
    else:
        parts.append(f"<p>{_esc(SRM_EXPLANATIONS[verdict])}</p>")
    total = sum(observed.values())
    rows = []
    for variant in dict.fromkeys([*observed, *expected]):
        n, e = observed.get(variant), expected.get(variant)
        rows.append(
            (
                "",
                [
                    _cell(variant),
                    _cell(f"{n:,}" if n is not None else "n/a"),
                    _cell(f"{n / total:.2%}" if n is not None and total else "n/a"),
                    _cell(f"{e:,.0f}" if is_finite(e) else "n/a"),
                    _cell(percent(n / e - 1) if n is not None and is_finite(e) and e else "n/a"),
                ],
            )
        )
    if rows:
        header = ["variant", "observed", "observed share", "expected", "observed vs expected"]
        parts.append(_table("", header, rows))
    return f'<section id="srm" class="srm {SRM_CLASSES[verdict]}">\n' + "\n".join(parts) + "\n</section>"


def _results_section(frame: pd.DataFrame) -> str:
    # The SRM verdict is stated once in the box above; repeating it per row would only widen the table.
    table = results_rows(frame).drop(columns=["experiment", "SRM"])
    # results_rows keeps the treatment rows' index, so the raw p-values line up with the display rows.
    significant = frame.loc[table.index, "p_value"].lt(ALPHA).tolist()
    rows = [
        ("significant" if sig else "", [_cell(v) for v in values])
        for sig, values in zip(significant, table.itertuples(index=False), strict=True)
    ]
    return (
        '<section>\n<h2>Results</h2>\n<div class="scroll">\n'
        + _table("results", list(table.columns), rows)
        + f'\n</div>\n<p class="note">* and highlighted rows: p &lt; {ALPHA:g} (unadjusted). '
        "Intervals are 95% CIs of the relative lift.</p>\n</section>"
    )


def _segments_section(segments: pd.DataFrame | None, heterogeneity: pd.DataFrame | None) -> str:
    """Per assignment property: does a lift differ across its values (Cochran's Q), and the
    segments' lifts as a forest plot."""
    if segments is None or heterogeneity is None or not len(heterogeneity):
        return ""
    parts = ['<section id="segments">', "<h2>By segment</h2>"]
    for prop, tests in heterogeneity.groupby("property", sort=False):
        differs = tests[tests["differs"].astype(bool)]
        verdict = (
            "The lift differs by " + _esc(prop) + " for " + ", ".join(_esc(f"{r.metric} · {r.variant_id}") for r in differs.itertuples())
            if len(differs) else f"No evidence that a lift differs by {_esc(prop)}"
        )
        table = heterogeneity_table(tests)
        rows = [
            ("significant" if d else "", [_cell(v) for v in values])
            for d, values in zip(tests["differs"].astype(bool), table.itertuples(index=False), strict=True)
        ]
        parts += [
            f"<h3>{_esc(prop)}</h3>", f"<p>{verdict} (Cochran's Q, Holm-adjusted, alpha as the experiment's).</p>",
            '<div class="scroll">', _table("", list(table.columns), rows), "</div>",
            f'<p class="note">{_esc(HETEROGENEITY_NOTE)}</p>',
            '<figure class="segment-plot">', segment_forest_plot_svg(segments, str(prop)), "</figure>",
        ]
    parts.append("</section>")
    return "\n".join(parts)


def _check_status(check: dict) -> tuple[str, str]:
    if check["passed"]:
        return "✓ pass", "status pass"
    return "✗ fail", "status fail-error" if check["severity"] == "ERROR" else "status fail-warn"


def _checks_section(checks: list[dict]) -> str:
    # Failures first so a reader cannot miss them; the sort is stable within each group.
    ordered = sorted(checks, key=lambda c: bool(c["passed"]))
    failed = [c for c in checks if not c["passed"]]
    errors = sum(c["severity"] == "ERROR" for c in failed)
    summary = (
        f"{len(checks) - len(failed)} of {len(checks)} checks passed"
        + (f"; {len(failed)} failed ({errors} ERROR, {len(failed) - errors} WARN)." if failed else ".")
        if checks
        else "No check results were recorded for this experiment."
    )
    rows = []
    for check in ordered:
        status, css = _check_status(check)
        rows.append(
            (
                "",
                [
                    _cell(status, css),
                    _cell(check["asset"]),
                    _cell(check["check"]),
                    _cell(check["severity"]),
                    _cell(check.get("description") or "—"),
                ],
            )
        )
    return (
        f"<section>\n<h2>Data checks</h2>\n<p>{_esc(summary)}</p>\n<div class=\"scroll\">\n"
        + _table("checks", ["status", "asset", "check", "severity", "description"], rows)
        + "\n</div>\n</section>"
    )


HOW_TO_READ = f"""<section class="how-to-read">
<h2>How to read this</h2>
<ul>
<li><strong>Relative lift</strong> = treatment mean / control mean − 1, per metric and treatment
(+5.00% means the treatment's mean is 5% above the control's).</li>
<li><strong>95% CI</strong>: the interval of lifts compatible with the data; when it excludes 0 the
difference is significant at the 5% level (p &lt; {ALPHA:g}).</li>
<li><strong>p (Holm)</strong>: the p-value adjusted (Holm) across all of this experiment's treatment ×
metric comparisons, so that looking at many comparisons does not inflate false positives. Prefer it
when deciding.</li>
<li><strong>CUPED</strong> uses each subject's behaviour in the pre-assignment period to remove
variance unrelated to the treatment: same expected lift, usually a narrower interval.</li>
<li><strong>By segment</strong>: the lift per value of each assignment property. Read the
heterogeneity test first: "differs" means the lift is not the same across the values (Cochran's Q,
Holm-adjusted); without it, a segment whose interval excludes 0 is most likely chance.</li>
<li>In the forest plot, each comparison shows the raw lift (blue) and the CUPED lift (orange) with
their 95% CIs; filled points are significant (p &lt; {ALPHA:g}, unadjusted), the dashed line is no
effect.</li>
</ul>
</section>"""


def experiment_report_html(
    experiment_id: str,
    name: str,
    frame: pd.DataFrame,
    checks: list[dict],
    srm: dict,
    generated_at: datetime,
    segments: pd.DataFrame | None = None,
    heterogeneity: pd.DataFrame | None = None,
) -> str:
    """A self-contained HTML page of one experiment's results, SRM verdict, forest plot, results by
    segment (`segments`: its segment_metrics rows, `heterogeneity`: its segment_heterogeneity rows)
    and checks.

    `frame` holds the experiment's variant_metrics rows; `srm` has verdict ("ok", "SRM" or
    "not judged"), p_value, observed and expected counts per variant and likely_cause; each check
    has asset, check, passed, severity and description.
    """
    others = set(map(str, frame["experiment_id"].unique())) - {experiment_id}
    if others:
        raise ValueError(f"frame has rows of other experiments than {experiment_id!r}: {sorted(others)}")
    stamp = _utc(generated_at).strftime("%Y-%m-%d %H:%M UTC")
    page_title = f"{name} ({experiment_id}): experiment report"
    plot = forest_plot_svg(frame)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(page_title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            "<main>",
            f"<h1>{_esc(name)}</h1>",
            f'<p class="meta">Experiment <code>{_esc(experiment_id)}</code> · generated {_esc(stamp)}</p>',
            _srm_section(srm),
            _results_section(frame),
            '<section>\n<h2>Relative lift vs control (95% CI)</h2>\n<figure id="forest-plot">',
            plot,
            "</figure>\n</section>",
            _segments_section(segments, heterogeneity),
            _checks_section(checks),
            HOW_TO_READ,
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(path: Path, html_text: str) -> Path:
    """Write the page atomically: a reader never sees a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(html_text)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    return path
