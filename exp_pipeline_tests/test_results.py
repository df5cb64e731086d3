"""Assembly of variant_metrics rows from sufficient statistics, and the SRM verdict."""

import math

import pandas as pd

from exp_pipeline import stats
from exp_pipeline.registry import Experiment, Metric
from exp_pipeline.results import srm_of, variant_metric_rows
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
