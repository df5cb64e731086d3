"""Assembly of variant_metrics rows from sufficient statistics, and the SRM verdict."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from exp_pipeline import stats
from exp_pipeline.registry import Experiment, Metric
from exp_pipeline.results import (
    covariate_moments,
    heterogeneity_rows,
    segment_metric_rows,
    srm_of,
    variant_metric_rows,
)
from exp_pipeline.schemas import VARIANT_METRICS_COLUMNS

EXPERIMENT = Experiment.model_validate(
    dict(
        id="pricing", name="Pricing", start_at="2026-10-01T00:00:00Z",
        variants=[
            {"id": "control", "weight": 0.5, "control": True},
            {"id": "low", "weight": 0.25},
            {"id": "high", "weight": 0.25},
        ],
        metrics=["revenue", "conversion"],
    )
)
METRICS = [
    Metric(id="revenue", event_name="purchase", aggregation="sum"),
    Metric(id="conversion", event_name="purchase", aggregation="conversion"),
]


def stats_row(variant, metric, n, mean, sd, rho=0.5):
    # Sufficient statistics of a sample with the given mean/sd and a covariate x = y (scaled by rho).
    sum_y = n * mean
    sum_y2 = (n - 1) * sd**2 + n * mean**2
    return dict(variant_id=variant, metric=metric, n=n, sum_y=sum_y, sum_y2=sum_y2,
                sum_x=rho * sum_y, sum_x2=rho**2 * sum_y2 * 1.2, sum_xy=rho * sum_y2)


def test_rows_for_every_variant_and_metric_with_holm_across_the_family():
    sufficient = pd.DataFrame([
        stats_row("control", "revenue", 1000, 10.0, 5.0),
        stats_row("low", "revenue", 500, 11.0, 5.0),
        stats_row("high", "revenue", 500, 10.1, 5.0),
        stats_row("control", "conversion", 1000, 0.3, 0.46),
        stats_row("low", "conversion", 500, 0.31, 0.46),
        # 'high' has no conversion row at all: it must still appear, with n = 0.
    ])
    srm = stats.srm_test({"control": 1000, "low": 500, "high": 500}, EXPERIMENT.weights)
    frame = variant_metric_rows(sufficient, EXPERIMENT, METRICS, srm)
    assert list(frame.columns) == list(VARIANT_METRICS_COLUMNS)
    assert len(frame) == 6
    rows = frame.set_index(["variant_id", "metric"])
    assert rows.loc[("high", "conversion"), "n"] == 0
    assert math.isnan(rows.loc[("high", "conversion"), "p_value"])
    control = rows.loc[("control", "revenue")]
    assert bool(control["is_control"]) and math.isnan(control["p_value"])

    expected = stats.compare(
        stats.SufficientStats(**{k: v for k, v in stats_row("low", "revenue", 500, 11.0, 5.0).items()
                                 if k not in ("variant_id", "metric")}),
        stats.SufficientStats(**{k: v for k, v in stats_row("control", "revenue", 1000, 10.0, 5.0).items()
                                 if k not in ("variant_id", "metric")}),
    )
    low = rows.loc[("low", "revenue")]
    assert low["rel_lift"] == expected.rel_lift and low["ci_low"] == expected.ci_low
    treatments = frame[~frame["is_control"]]
    pd.testing.assert_series_equal(
        treatments["p_value_holm"],
        pd.Series(stats.holm(treatments["p_value"].tolist()), index=treatments.index, name="p_value_holm"),
    )
    assert not frame["srm_flagged"].any()


def test_srm_of_names_the_segment_that_lost_exposures():
    rows = [("", "", "control", 5000), ("", "", "treatment", 4200)]
    for device, control, treatment in (("ios", 2250, 2250), ("android", 2000, 1200), ("web", 750, 750)):
        rows += [("device_type", device, "control", control), ("device_type", device, "treatment", treatment)]
    counts = pd.DataFrame(rows, columns=["property", "value", "variant_id", "n"])
    experiment = EXPERIMENT.model_copy(update={"variants": [
        EXPERIMENT.variants[0].model_copy(update={"weight": 0.5}),
        EXPERIMENT.variants[1].model_copy(update={"id": "treatment", "weight": 0.5}),
    ]})
    result, causes = srm_of(counts, experiment)
    assert result.flagged
    assert [(c.property, c.value) for c in causes] == [("device_type", "android")]

    # The same overall shortfall spread over every device has no single cause.
    rows = [("", "", "control", 5000), ("", "", "treatment", 4200)]
    for device, control, treatment in (("ios", 2250, 1890), ("android", 2000, 1680), ("web", 750, 630)):
        rows += [("device_type", device, "control", control), ("device_type", device, "treatment", treatment)]
    result, causes = srm_of(pd.DataFrame(rows, columns=counts.columns), experiment)
    assert result.flagged and causes == []


def segment_stats(rows: list[tuple]) -> pd.DataFrame:
    """(property, value, variant, n, mean, sd) of revenue -> complete_statistics rows by segment."""
    return pd.DataFrame([
        {"experiment_id": "pricing", "property": p, "value": v, **stats_row(variant, "revenue", n, mean, sd)}
        for p, v, variant, n, mean, sd in rows
    ])


SEGMENTS = segment_stats([
    ("device_type", "ios", "control", 800, 10.0, 6.0), ("device_type", "ios", "low", 400, 13.0, 6.0),
    ("device_type", "ios", "high", 420, 10.2, 6.0),
    ("device_type", "web", "control", 700, 10.0, 6.0), ("device_type", "web", "low", 350, 10.1, 6.0),
    ("device_type", "web", "high", 330, 9.9, 6.0),
    ("device_type", "tv", "control", 90, 10.0, 6.0), ("device_type", "tv", "low", 40, 30.0, 6.0),
    ("device_type", "tv", "high", 45, 9.0, 6.0),
])


def test_a_segments_rows_are_the_variant_rows_of_its_subjects_alone():
    rows = segment_metric_rows(SEGMENTS, EXPERIMENT, METRICS[:1]).set_index(["value", "variant_id"])
    srm = stats.srm_test({"control": 800, "low": 400, "high": 420}, EXPERIMENT.weights)
    ios = variant_metric_rows(SEGMENTS[SEGMENTS.value == "ios"], EXPERIMENT, METRICS[:1], srm).set_index("variant_id")
    for variant in ("control", "low", "high"):
        for column in ("n", "sum_y", "mean", "std", "abs_lift", "abs_lift_ci_low", "rel_lift", "ci_low", "ci_high", "df", "p_value"):
            want, got = ios.loc[variant, column], rows.loc[("ios", variant), column]
            assert (math.isnan(want) and math.isnan(got)) or want == got, (variant, column)
    assert not rows.loc[("ios", "low"), "too_small"]


def test_a_segment_with_an_arm_below_the_minimum_is_too_small_not_a_result():
    rows = segment_metric_rows(SEGMENTS, EXPERIMENT, METRICS[:1]).set_index(["value", "variant_id"])
    tv = rows.loc["tv"]
    assert tv["too_small"].all() and tv["rel_lift"].isna().all() and tv["p_value"].isna().all()
    assert tv.loc["low", "n"] == 40 and tv.loc["low", "mean"] == 30.0  # the sums stay visible
    smaller = EXPERIMENT.model_copy(update={"segments": EXPERIMENT.segments.model_copy(update={"min_subjects": 40})})
    assert not segment_metric_rows(SEGMENTS, smaller, METRICS[:1]).set_index("value").loc["tv", "too_small"].any()


def test_heterogeneity_is_cochrans_q_on_the_segments_relative_lifts():
    from statsmodels.stats.meta_analysis import combine_effects

    het = heterogeneity_rows(SEGMENTS, EXPERIMENT, METRICS[:1]).set_index("variant_id")
    for variant in ("low", "high"):
        lifts = [stats.compare(
            stats.SufficientStats(**{k: stats_row(variant, "revenue", n, m, 6.0)[k] for k in ("n", "sum_y", "sum_y2")}),
            stats.SufficientStats(**{k: stats_row("control", "revenue", 800 if d == "ios" else 700, 10.0, 6.0)[k]
                                     for k in ("n", "sum_y", "sum_y2")}),
        ) for d, n, m in ({"low": [("ios", 400, 13.0), ("web", 350, 10.1)], "high": [("ios", 420, 10.2), ("web", 330, 9.9)]}[variant])]
        ref = combine_effects(np.array([r.rel_lift for r in lifts]), np.array([r.rel_se for r in lifts]) ** 2)
        row = het.loc[variant]
        assert row["segments"] == 2 and row["segments_too_small"] == 1 and row["df"] == 1  # tv left out
        assert row["q"] == pytest.approx(ref.q, rel=1e-12)
        assert row["pooled_rel_lift"] == pytest.approx(ref.mean_effect_fe, rel=1e-12)
        assert row["i_squared"] == pytest.approx(max(0.0, ref.i2), rel=1e-12, abs=1e-15)
        assert row["p_value"] == pytest.approx(sps.chi2.sf(ref.q, 1), rel=1e-12)
    # ios +30% against web +1%: the effect differs; the high arm's lifts agree.
    assert het.loc["low", "differs"] and not het.loc["high", "differs"]
    assert het["p_value_holm"].tolist() == pytest.approx(stats.holm(het["p_value"].tolist()))


@pytest.mark.parametrize("case", ["as_listed", "pre_period_after_a_property_pairs_reversed", "a_level_missing"])
def test_cuped_pp_moments_from_segment_sums_equal_those_of_the_subjects(case):
    """The cross products CUPED++ needs, assembled from the engine's small tables (overall and
    segment sums, subjects per pair of property values), equal the per-subject design's."""
    rng = np.random.default_rng(8)
    n = 2000
    # A level of the experiment this arm never saw ("web"): its indicator is zero throughout.
    device = rng.choice(["android", "ios"] if case == "a_level_missing" else ["android", "ios", "web"], n)
    country = rng.choice(["DE", "US"], n)
    x = rng.gamma(2, 5, n) * (rng.random(n) < 0.7)
    y = 0.5 * x + rng.gamma(2, 3, n)
    overall = stats.SufficientStats(n, y.sum(), y @ y, x.sum(), x @ x, x @ y)
    segments = {}
    for prop, values in (("device_type", device), ("country", country)):
        for v in np.unique(values):
            m = values == v
            segments[(prop, str(v))] = stats.SufficientStats(int(m.sum()), y[m].sum(), y[m] @ y[m], x[m].sum(), x[m] @ x[m], x[m] @ y[m])
    pairs = {("device_type", d, "country", c): int(((device == d) & (country == c)).sum()) for d in np.unique(device) for c in np.unique(country)}
    columns = [("pre_period", None), ("device_type", "ios"), ("device_type", "web"), ("country", "US")]
    design = {"pre_period": x, "device_type": {v: device == v for v in ("ios", "web")}, "country": {"US": country == "US"}}
    if case == "pre_period_after_a_property_pairs_reversed":
        columns = [("country", "US"), ("device_type", "web"), ("pre_period", None), ("device_type", "ios")]
        pairs = {(b, vb, a, va): count for (a, va, b, vb), count in pairs.items()}
    got = covariate_moments(overall, segments, pairs, columns)
    z = np.column_stack([design[p] if p == "pre_period" else design[p][v] for p, v in columns]).astype(float)
    w = np.column_stack([y, z])
    np.testing.assert_allclose(got.sums, w.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got.cross, w.T @ w, rtol=1e-12)
    assert got.n == n
