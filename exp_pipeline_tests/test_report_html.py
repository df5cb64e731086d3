"""The HTML experiment report and its SVG forest plot, on small hand-built variant_metrics frames."""

import base64
import math
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser

import pandas as pd
import pytest

from exp_pipeline.report_html import experiment_report_html, forest_plot_svg, svg_data_uri, write_report
from exp_pipeline.schemas import VARIANT_METRICS_COLUMNS

SVG = "{http://www.w3.org/2000/svg}"
NAN = math.nan
INJECTED = "<script>alert(1)</script>"
GENERATED_AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
# Elements HTML never closes; everything else must be closed in order.
VOID_ELEMENTS = {"meta", "link", "br", "hr", "img", "input"}


def control(experiment, metric):
    return dict(experiment_id=experiment, variant_id="control", metric=metric, is_control=True, n=1000, mean=1.0)


def treatment(experiment, variant, metric, lift, low, high, p, cuped=None):
    """A treatment row; cuped = (lift, low, high, p) or None when CUPED is not computed."""
    cuped_lift, cuped_low, cuped_high, cuped_p = cuped or (NAN, NAN, NAN, NAN)
    return dict(
        experiment_id=experiment, variant_id=variant, metric=metric, is_control=False, n=1000,
        mean=1.0 + (lift if lift == lift else 0.0),
        rel_lift=lift, ci_low=low, ci_high=high, p_value=p, p_value_holm=min(1.0, 2 * p) if p == p else NAN,
        cuped_rel_lift=cuped_lift, cuped_ci_low=cuped_low, cuped_ci_high=cuped_high,
        cuped_p_value=cuped_p, cuped_p_value_holm=cuped_p,
    )


def frame_of(rows):
    frame = pd.DataFrame(rows).reindex(columns=list(VARIANT_METRICS_COLUMNS))
    frame["is_control"] = frame["is_control"].astype(bool)
    frame["srm_flagged"] = False
    frame["srm_p_value"] = 0.5
    return frame


@pytest.fixture
def two_arm():
    """Positive significant revenue (with CUPED), a straddling metric, an escaped name, a NaN CI."""
    e = "checkout"
    return frame_of([
        control(e, "revenue"),
        treatment(e, "treatment", "revenue", 0.12, 0.08, 0.16, 1e-6, cuped=(0.11, 0.08, 0.14, 1e-8)),
        control(e, "conversion"),
        treatment(e, "treatment", "conversion", -0.01, -0.04, 0.02, 0.5, cuped=(-0.01, -0.03, 0.01, 0.4)),
        control(e, "rev<&>"),
        treatment(e, "treatment", "rev<&>", -0.06, -0.09, -0.03, 0.001),
        control(e, "empty"),
        treatment(e, "treatment", "empty", NAN, NAN, NAN, NAN),
    ])


@pytest.fixture
def three_arm():
    e = "pricing"
    return frame_of([
        control(e, "revenue"),
        treatment(e, "low", "revenue", 0.13, 0.07, 0.19, 1e-5),
        treatment(e, "high", "revenue", -0.02, -0.07, 0.03, 0.42),
        control(e, "purchases"),
        treatment(e, "low", "purchases", 0.04, 0.001, 0.08, 0.045),
        treatment(e, "high", "purchases", 0.01, -0.02, 0.05, 0.44),
    ])


def parse_svg(svg):
    return ET.fromstring(svg)


def rows_of(root):
    return {
        (g.get("data-metric"), g.get("data-variant")): g
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "row"
    }


def interval(row, kind="raw"):
    line = next(el for el in row.iter(f"{SVG}line") if el.get("class") == f"ci {kind}")
    return float(line.get("x1")), float(line.get("x2"))


def point(row, kind="raw"):
    return next(el for el in row.iter(f"{SVG}circle") if f"point {kind}" in el.get("class"))


def zero_x(root):
    line = next(el for el in root.iter(f"{SVG}line") if el.get("class") == "zero")
    assert line.get("x1") == line.get("x2")
    return float(line.get("x1"))


def test_forest_plot_has_one_labelled_row_per_comparison(two_arm, three_arm):
    root = parse_svg(forest_plot_svg(two_arm, title="Checkout <redesign>"))
    rows = rows_of(root)
    assert set(rows) == {("revenue", "treatment"), ("conversion", "treatment"), ("rev<&>", "treatment"),
                         ("empty", "treatment")}
    labels = [el.text for el in root.iter(f"{SVG}text") if el.get("class") == "label"]
    assert labels == ["revenue · treatment", "conversion · treatment", "rev<&> · treatment", "empty · treatment"]
    assert any(el.text == "Checkout <redesign>" for el in root.iter(f"{SVG}text"))

    three = parse_svg(forest_plot_svg(three_arm))
    labels = [el.text for el in three.iter(f"{SVG}text") if el.get("class") == "label"]
    # Grouped by metric, variants in frame order.
    assert labels == ["revenue · low", "revenue · high", "purchases · low", "purchases · high"]


def test_zero_line_lies_between_negative_and_positive_interval_ends(two_arm):
    root = parse_svg(forest_plot_svg(two_arm))
    rows, zero = rows_of(root), zero_x(root)
    negative_end, positive_end = interval(rows[("conversion", "treatment")])
    assert negative_end < zero < positive_end
    assert zero < interval(rows[("revenue", "treatment")])[0]  # wholly positive: right of 0
    assert interval(rows[("rev<&>", "treatment")])[1] < zero  # wholly negative: left of 0
    # The point sits inside its interval, and every interval fits in the drawing.
    low, high = interval(rows[("revenue", "treatment")])
    assert low < float(point(rows[("revenue", "treatment")]).get("cx")) < high
    ends = [
        float(line.get(end))
        for line in root.iter(f"{SVG}line") if line.get("class", "").startswith("ci ")
        for end in ("x1", "x2")
    ]
    assert 0 < min(ends) and max(ends) < float(root.get("width"))


def test_x_axis_includes_zero_when_all_lifts_are_positive():
    frame = frame_of([control("e", "m"), treatment("e", "t", "m", 0.3, 0.2, 0.4, 1e-4)])
    root = parse_svg(forest_plot_svg(frame))
    low, _ = interval(rows_of(root)[("m", "t")])
    assert zero_x(root) < low
    ticks = [el.text for el in root.iter(f"{SVG}text") if el.get("class") == "tick"]
    assert "0%" in ticks and all(t.endswith("%") for t in ticks)


def test_significant_points_are_filled_and_others_hollow(two_arm):
    rows = rows_of(parse_svg(forest_plot_svg(two_arm)))
    significant = point(rows[("revenue", "treatment")])
    not_significant = point(rows[("conversion", "treatment")])
    assert "significant" in significant.get("class").split()
    assert "not-significant" in not_significant.get("class").split()
    assert significant.get("fill") == significant.get("stroke")
    assert not_significant.get("fill") == "#ffffff" != not_significant.get("stroke")


def test_cuped_drawn_below_raw_in_another_colour_when_present(two_arm):
    rows = rows_of(parse_svg(forest_plot_svg(two_arm)))
    raw, cuped = point(rows[("revenue", "treatment")]), point(rows[("revenue", "treatment")], "cuped")
    assert float(cuped.get("cy")) > float(raw.get("cy"))
    assert cuped.get("stroke") != raw.get("stroke")


def test_nan_interval_is_labelled_na_without_a_bar(two_arm):
    row = rows_of(parse_svg(forest_plot_svg(two_arm)))[("empty", "treatment")]
    assert [el.text for el in row.iter(f"{SVG}text") if "na" in el.get("class").split()] == ["n/a"]
    assert not [el for el in row.iter(f"{SVG}line") if el.get("class", "").startswith("ci")]
    assert not list(row.iter(f"{SVG}circle"))


def test_missing_cuped_interval_is_labelled_na_next_to_the_raw_one(two_arm):
    row = rows_of(parse_svg(forest_plot_svg(two_arm)))[("rev<&>", "treatment")]
    assert interval(row)  # the raw interval is drawn
    assert [el.get("class") for el in row.iter(f"{SVG}text") if el.text == "n/a"] == ["na cuped"]


def test_forest_plot_refuses_several_experiments(two_arm, three_arm):
    with pytest.raises(ValueError, match="one experiment"):
        forest_plot_svg(pd.concat([two_arm, three_arm]))


def test_data_uri_decodes_back_to_the_svg(two_arm):
    svg = forest_plot_svg(two_arm)
    prefix = "data:image/svg+xml;base64,"
    uri = svg_data_uri(svg)
    assert uri.startswith(prefix)
    assert base64.b64decode(uri[len(prefix):]).decode("utf-8") == svg


class StrictParser(HTMLParser):
    """Collects ids and text, and fails on tags closed out of order or left open."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.text = [], {}, []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids[attributes["id"]] = tag
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids[attributes["id"]] = tag

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text):
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed tags: {parser.stack}"
    return parser


def srm(verdict, cause=None):
    return dict(verdict=verdict, p_value=1e-9 if verdict == "SRM" else 0.4,
                observed={"control": 1000, "treatment": 800}, expected={"control": 900.0, "treatment": 900.0},
                likely_cause=cause)


CHECKS = [
    dict(asset="deduped_assignments", check="no_sample_ratio_mismatch", passed=True, severity="ERROR",
         description="no sample ratio mismatch (p = 0.4)"),
    dict(asset="post_assignment_events", check="no_events_before_assignment", passed=False, severity="ERROR",
         description=INJECTED),
    dict(asset="variant_metrics", check="matches_schema", passed=False, severity="WARN", description=None),
]


def report(frame, verdict="ok", cause=None, name="Checkout redesign", checks=CHECKS):
    return experiment_report_html("checkout", name, frame, checks, srm(verdict, cause), GENERATED_AT)


def test_report_is_well_formed_with_results_checks_and_plot(two_arm):
    page = report(two_arm)
    parser = parse_html(page)
    assert parser.ids["results"] == "table"
    assert parser.ids["checks"] == "table"
    assert "forest-plot" in parser.ids
    assert '<meta charset="utf-8">' in page
    assert "Checkout redesign" in page and "checkout" in page and "2026-11-02 09:30 UTC" in page
    # Self-contained: nothing fetched from elsewhere.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<script" not in page and "<link" not in page


def test_results_table_has_one_row_per_comparison_without_experiment_column(two_arm):
    page = report(two_arm)
    results = page[page.index('<table id="results">'):]
    results = results[: results.index("</table>")]
    assert results.count("<tr") == 1 + 4  # header + comparisons
    assert "<th>experiment</th>" not in results and "<th>variant</th>" in results
    assert "rev&lt;&amp;&gt;" in results


def test_checks_show_pass_and_fail_with_failures_first(two_arm):
    page = report(two_arm)
    checks = page[page.index('<table id="checks">'):]
    checks = checks[: checks.index("</table>")]
    assert checks.index("fail-error") < checks.index("fail-warn") < checks.index('"status pass"')
    assert "1 of 3 checks passed; 2 failed (1 ERROR, 1 WARN)." in page


def test_srm_warning_only_when_srm_fires(two_arm):
    flagged = report(two_arm, verdict="SRM", cause="device_type = android")
    assert "srm-warning" in parse_html(flagged).ids
    assert "Do not trust the lifts" in flagged and "device_type = android" in flagged
    for verdict in ("ok", "not judged"):
        page = report(two_arm, verdict=verdict)
        assert "srm-warning" not in parse_html(page).ids
        assert "Do not trust the lifts" not in page
    with pytest.raises(ValueError, match="verdict"):
        report(two_arm, verdict="maybe")


def test_injected_text_is_escaped(two_arm):
    page = report(two_arm, verdict="SRM", cause=INJECTED, name=f"Name {INJECTED}")
    assert INJECTED not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    text = "".join(parse_html(page).text)
    assert text.count(INJECTED) == 4  # title, heading, likely cause, check description


def test_report_refuses_rows_of_another_experiment(two_arm, three_arm):
    with pytest.raises(ValueError, match="other experiments"):
        report(pd.concat([two_arm, three_arm]))


def test_naive_generation_time_is_taken_as_utc_and_aware_converted(two_arm):
    naive = experiment_report_html("checkout", "C", two_arm, [], srm("ok"), datetime(2026, 11, 2, 9, 30))
    assert "2026-11-02 09:30 UTC" in naive
    paris = datetime(2026, 11, 2, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    assert "2026-11-02 09:30 UTC" in experiment_report_html("checkout", "C", two_arm, [], srm("ok"), paris)


def test_write_report_is_atomic_and_creates_the_folder(tmp_path, two_arm):
    target = tmp_path / "reports" / "checkout" / "report.html"
    page = report(two_arm)
    assert write_report(target, page) == target
    assert target.read_text(encoding="utf-8") == page
    assert write_report(target, "replaced") == target
    assert target.read_text(encoding="utf-8") == "replaced"
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]
