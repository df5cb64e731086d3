"""exp_pipeline.stats checked against independent computations on fixed inputs.

References are scipy/statsmodels run on the raw per-subject arrays, never on
the sufficient statistics the module itself consumes.
"""

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from exp_pipeline.stats import (
    Moments,
    SufficientStats,
    compare,
    compare_clustered,
    compare_cuped,
    compare_regression_adjusted,
    cuped_theta,
    holm,
    srm_by_property,
    srm_test,
    welch_df,
    welch_test,
)

# Every function must stay silent on degenerate input, so any warning fails.
pytestmark = pytest.mark.filterwarnings("error")


def suff(y, x=None):
    """Sufficient statistics as the database would compute them."""
    x = np.zeros_like(y) if x is None else x
    return SufficientStats(
        n=len(y), sum_y=y.sum(), sum_y2=y @ y, sum_x=x.sum(), sum_x2=x @ x, sum_xy=x @ y
    )


def revenue(rng, size, mu, sigma, p_zero):
    """Lognormal spend with a point mass of non-buyers at zero."""
    return rng.lognormal(mu, sigma, size) * (rng.random(size) >= p_zero)


@pytest.fixture(scope="module")
def ab():
    """Unequal sizes and variances: treatment spends more and more erratically."""
    rng = np.random.default_rng(20240601)
    return revenue(rng, 4200, 1.1, 1.2, 0.6), revenue(rng, 2600, 1.0, 0.9, 0.55)


@pytest.fixture(scope="module")
def ab_cuped():
    """Pre-period spend x strongly predicts in-experiment spend y; 4% true lift."""
    rng = np.random.default_rng(99)
    n_t, n_c = 3000, 2000
    x = revenue(rng, n_t + n_c, 1.0, 1.0, 0.3)
    y = 0.8 * x + rng.lognormal(0.5, 0.8, n_t + n_c)
    y[:n_t] *= 1.04
    return (y[:n_t], x[:n_t]), (y[n_t:], x[n_t:])


# --- sufficient statistics -------------------------------------------------


def test_sufficient_stats_moments_match_numpy(ab_cuped):
    (y, x), _ = ab_cuped
    s = suff(y, x)
    assert s.mean == pytest.approx(np.mean(y), rel=1e-12)
    assert s.variance == pytest.approx(np.var(y, ddof=1), rel=1e-10)
    assert s.mean_x == pytest.approx(np.mean(x), rel=1e-12)
    assert s.var_x == pytest.approx(np.var(x, ddof=1), rel=1e-10)
    assert s.cov_xy == pytest.approx(np.cov(x, y)[0, 1], rel=1e-10)


def test_variance_clamps_rounding_noise_and_needs_two_subjects():
    assert SufficientStats(n=2, sum_y=2.0, sum_y2=2.0 - 1e-15).variance == 0.0
    one = SufficientStats(n=1, sum_y=3.0, sum_y2=9.0)
    assert one.mean == 3.0
    assert math.isnan(one.variance) and math.isnan(one.cov_xy)
    assert math.isnan(SufficientStats(n=0, sum_y=0.0, sum_y2=0.0).mean)


# --- Welch -----------------------------------------------------------------


def test_welch_df_matches_textbook_formula(ab):
    y_t, y_c = ab
    v_t, v_c, n_t, n_c = np.var(y_t, ddof=1), np.var(y_c, ddof=1), len(y_t), len(y_c)
    se2_t, se2_c = v_t / n_t, v_c / n_c
    expected = (se2_t + se2_c) ** 2 / (se2_t**2 / (n_t - 1) + se2_c**2 / (n_c - 1))
    assert welch_df(v_t, n_t, v_c, n_c) == pytest.approx(expected, rel=1e-12)
    # With equal sizes and variances Welch reduces to the pooled 2n - 2.
    assert welch_df(2.0, 50, 2.0, 50) == pytest.approx(98.0)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_compare_absolute_lift_matches_scipy_welch(ab, alpha):
    y_t, y_c = ab
    res = compare(suff(y_t), suff(y_c), alpha=alpha)
    ref = sps.ttest_ind(y_t, y_c, equal_var=False)
    ref_ci = ref.confidence_interval(confidence_level=1 - alpha)

    assert res.treatment_mean == pytest.approx(y_t.mean(), rel=1e-12)
    assert res.control_mean == pytest.approx(y_c.mean(), rel=1e-12)
    assert res.abs_lift == pytest.approx(y_t.mean() - y_c.mean(), rel=1e-10)
    assert res.abs_lift / res.abs_se == pytest.approx(ref.statistic, rel=1e-9)
    assert res.df == pytest.approx(ref.df, rel=1e-9)
    assert res.abs_ci_low == pytest.approx(ref_ci.low, rel=1e-9)
    assert res.abs_ci_high == pytest.approx(ref_ci.high, rel=1e-9)


# --- delta method ----------------------------------------------------------


def test_rel_se_matches_numerical_delta_method(ab):
    y_t, y_c = ab
    res = compare(suff(y_t), suff(y_c))
    m = np.array([y_t.mean(), y_c.mean()])
    sigma = np.diag([np.var(y_t, ddof=1) / len(y_t), np.var(y_c, ddof=1) / len(y_c)])

    def f(v):
        return v[0] / v[1] - 1

    h = 1e-6 * m
    grad = np.array([(f(m + e) - f(m - e)) / (2 * e[i]) for i, e in enumerate(np.diag(h))])
    assert res.rel_lift == pytest.approx(f(m), rel=1e-10)
    assert res.rel_se == pytest.approx(math.sqrt(grad @ sigma @ grad), rel=1e-7)
    assert res.t_stat == pytest.approx(res.rel_lift / res.rel_se)


@pytest.fixture(scope="module")
def simulated_relative_results():
    """2000 A/B datasets with a true relative lift of exactly 10%."""
    rng = np.random.default_rng(314)
    reps, n_t, n_c, lift = 2000, 1500, 1000, 0.10
    # Same zero share and sigma, so scaling the lognormal scales the mean.
    y_t = revenue(rng, (reps, n_t), 1.0 + math.log1p(lift), 0.8, 0.5)
    y_c = revenue(rng, (reps, n_c), 1.0, 0.8, 0.5)
    sums = (y_t.sum(1), np.einsum("ij,ij->i", y_t, y_t), y_c.sum(1), np.einsum("ij,ij->i", y_c, y_c))
    results = [
        compare(SufficientStats(n_t, st, st2), SufficientStats(n_c, sc, sc2))
        for st, st2, sc, sc2 in zip(*sums, strict=True)
    ]
    return lift, results


def test_relative_ci_coverage_monte_carlo(simulated_relative_results):
    lift, results = simulated_relative_results
    coverage = np.mean([r.ci_low <= lift <= r.ci_high for r in results])
    assert 0.93 <= coverage <= 0.97


def test_p_value_consistent_with_relative_ci(simulated_relative_results, ab):
    _, results = simulated_relative_results
    significant = [r.p_value < 0.05 for r in results]
    # The check is only meaningful if both outcomes occur.
    assert 0 < sum(significant) < len(results)
    for r, sig in zip(results, significant, strict=True):
        assert sig == (not r.ci_low <= 0 <= r.ci_high)
    # At alpha = p the interval must touch zero.
    r = compare(suff(ab[0]), suff(ab[1]))
    at_p = compare(suff(ab[0]), suff(ab[1]), alpha=r.p_value)
    assert min(abs(at_p.ci_low), abs(at_p.ci_high)) == pytest.approx(0, abs=1e-9)


# --- CUPED -----------------------------------------------------------------


def test_cuped_theta_matches_np_cov_on_pooled_subjects(ab_cuped):
    (y_t, x_t), (y_c, x_c) = ab_cuped
    x, y = np.r_[x_t, x_c], np.r_[y_t, y_c]
    c = np.cov(x, y)
    theta = cuped_theta([suff(y_t, x_t), suff(y_c, x_c)])
    assert theta == pytest.approx(c[0, 1] / c[0, 0], rel=1e-9)


def test_cuped_theta_zero_without_covariate_variance(ab):
    assert cuped_theta([suff(ab[0]), suff(ab[1])]) == 0.0
    assert cuped_theta([]) == 0.0


def _pooled_theta(x, y):
    c = np.cov(x, y)
    return c[0, 1] / c[0, 0]


def test_compare_cuped_absolute_lift_is_welch_on_adjusted_subjects(ab_cuped):
    (y_t, x_t), (y_c, x_c) = ab_cuped
    theta = _pooled_theta(np.r_[x_t, x_c], np.r_[y_t, y_c])
    adj_t, adj_c = y_t - theta * x_t, y_c - theta * x_c
    ref = sps.ttest_ind(adj_t, adj_c, equal_var=False)
    ref_ci = ref.confidence_interval()

    res = compare_cuped(suff(y_t, x_t), suff(y_c, x_c))
    assert res.abs_lift == pytest.approx(adj_t.mean() - adj_c.mean(), rel=1e-12)
    assert res.abs_lift / res.abs_se == pytest.approx(ref.statistic, rel=1e-12)
    assert res.df == pytest.approx(ref.df, rel=1e-12)
    assert res.abs_ci_low == pytest.approx(ref_ci.low, rel=1e-12)
    assert res.abs_ci_high == pytest.approx(ref_ci.high, rel=1e-12)


def test_compare_cuped_relative_lift_on_growthbooks_convention(ab_cuped):
    """Adjusted difference over the unadjusted control mean; delta-method variance from the
    per-subject terms of each arm: (y_t - theta x_t) / m_c and (m_t / m_c^2) y_c - (theta / m_c) x_c."""
    (y_t, x_t), (y_c, x_c) = ab_cuped
    theta = _pooled_theta(np.r_[x_t, x_c], np.r_[y_t, y_c])
    m_t, m_c = y_t.mean(), y_c.mean()
    adj_t, adj_c = y_t - theta * x_t, y_c - theta * x_c
    rel = (adj_t.mean() - adj_c.mean()) / m_c
    var = np.var(adj_t / m_c, ddof=1) / len(y_t) + np.var(m_t / m_c**2 * y_c - theta / m_c * x_c, ddof=1) / len(y_c)
    df = sps.ttest_ind(adj_t, adj_c, equal_var=False).df
    q = sps.t.ppf(0.975, df)

    res = compare_cuped(suff(y_t, x_t), suff(y_c, x_c))
    assert res.rel_lift == pytest.approx(rel, rel=1e-12)
    assert res.rel_se == pytest.approx(np.sqrt(var), rel=1e-12)
    assert res.ci_low == pytest.approx(rel - q * np.sqrt(var), rel=1e-12)
    assert res.ci_high == pytest.approx(rel + q * np.sqrt(var), rel=1e-12)
    assert res.t_stat == pytest.approx(rel / np.sqrt(var), rel=1e-12)
    assert res.p_value == pytest.approx(2 * sps.t.sf(abs(rel) / np.sqrt(var), df), rel=1e-12)
    assert res.control_mean == pytest.approx(m_c, rel=1e-12)
    assert res.treatment_mean == pytest.approx(m_c + adj_t.mean() - adj_c.mean(), rel=1e-12)


def test_raw_and_cuped_relative_lifts_share_the_unadjusted_control_mean(ab_cuped):
    (y_t, x_t), (y_c, x_c) = ab_cuped
    t, c = suff(y_t, x_t), suff(y_c, x_c)
    raw, adjusted = compare(t, c), compare_cuped(t, c)
    assert adjusted.control_mean == raw.control_mean == c.mean
    assert adjusted.rel_lift == pytest.approx(adjusted.abs_lift / raw.control_mean, rel=1e-15)
    assert raw.rel_lift == pytest.approx(raw.abs_lift / raw.control_mean, rel=1e-15)
    # Dividing by the adjusted control mean (the convention this replaced) gives another number.
    pooled_mean_x = (x_t.sum() + x_c.sum()) / (len(x_t) + len(x_c))
    adjusted_control = c.mean - cuped_theta([t, c]) * (c.mean_x - pooled_mean_x)
    assert abs(adjusted.abs_lift / adjusted_control - adjusted.rel_lift) > 1e-4


def test_compare_cuped_with_theta_zero_is_compare(ab_cuped):
    (y_t, x_t), (y_c, x_c) = ab_cuped
    t, c = suff(y_t, x_t), suff(y_c, x_c)
    assert compare_cuped(t, c, theta=0.0) == compare(t, c)


def test_cuped_narrows_interval(ab_cuped):
    (y_t, x_t), (y_c, x_c) = ab_cuped
    t, c = suff(y_t, x_t), suff(y_c, x_c)
    plain, adjusted = compare(t, c), compare_cuped(t, c)
    # corr(x, y) is about 0.9 here, so the width should shrink by roughly half.
    assert adjusted.abs_ci_high - adjusted.abs_ci_low < 0.7 * (plain.abs_ci_high - plain.abs_ci_low)
    assert adjusted.ci_high - adjusted.ci_low < 0.7 * (plain.ci_high - plain.ci_low)


def test_cuped_lift_close_to_ancova_ols(ab_cuped):
    (y_t, x_t), (y_c, x_c) = ab_cuped
    treat = np.r_[np.ones(len(y_t)), np.zeros(len(y_c))]
    design = np.column_stack([np.ones_like(treat), treat, np.r_[x_t, x_c]])
    ols_lift = sm.OLS(np.r_[y_t, y_c], design).fit().params[1]
    res = compare_cuped(suff(y_t, x_t), suff(y_c, x_c))
    # Pooled-total and within-group slopes differ only by chance under
    # randomisation, so the estimates agree to a small fraction of the SE.
    assert res.abs_lift == pytest.approx(ols_lift, abs=0.02 * res.abs_se)


def test_welch_test_matches_scipy(ab):
    ref = sps.ttest_ind(ab[0], ab[1], equal_var=False)
    res = welch_test(suff(ab[0]), suff(ab[1]))
    assert res.difference == pytest.approx(ab[0].mean() - ab[1].mean(), rel=1e-12)
    assert res.t_stat == pytest.approx(ref.statistic, rel=1e-12)
    assert res.df == pytest.approx(ref.df, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_welch_test_is_undefined_without_variance_or_subjects():
    flat = SufficientStats(n=5, sum_y=10.0, sum_y2=20.0)
    assert math.isnan(welch_test(flat, flat).p_value)
    assert math.isnan(welch_test(SufficientStats(n=1, sum_y=1.0, sum_y2=1.0), flat).p_value)


# --- CUPED++ ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ab_covariates():
    """y depends on the pre-period x and on the device (one-hot, first level dropped); 5% lift."""
    rng = np.random.default_rng(2024)
    arms = []
    for n, lift in ((3000, 1.05), (2500, 1.0)):
        x = revenue(rng, n, 1.0, 1.0, 0.3)
        device = rng.choice(3, n, p=[0.5, 0.3, 0.2])
        country = rng.choice(2, n)
        y = (0.6 * x + np.array([0.0, 4.0, -1.5])[device] + 1.0 * country + rng.lognormal(0.8, 0.7, n)) * lift
        z = np.column_stack([x, device == 1, device == 2, country == 1]).astype(float)
        arms.append((y, z))
    return arms


def moments(y, z):
    w = np.column_stack([y, z])
    return Moments(n=len(y), sums=w.sum(axis=0), cross=w.T @ w)


def test_cuped_pp_is_ols_with_the_treatment_indicator_and_centred_covariates(ab_covariates):
    (y_t, z_t), (y_c, z_c) = ab_covariates
    y, z = np.r_[y_t, y_c], np.r_[z_t, z_c]
    treated = np.r_[np.ones(len(y_t)), np.zeros(len(y_c))]
    fit = sm.OLS(y, np.column_stack([np.ones_like(y), treated, z - z.mean(axis=0)])).fit()
    res = compare_regression_adjusted(moments(y_t, z_t), moments(y_c, z_c))
    assert res.abs_lift == pytest.approx(fit.params[1], rel=1e-9)
    # The variance: Welch on each subject's y - beta . z, beta the OLS covariate coefficients.
    beta = fit.params[2:]
    adj_t, adj_c = y_t - z_t @ beta, y_c - z_c @ beta
    welch = sps.ttest_ind(adj_t, adj_c, equal_var=False)
    assert res.abs_lift / res.abs_se == pytest.approx(welch.statistic, rel=1e-9)
    assert res.df == pytest.approx(welch.df, rel=1e-9)
    assert res.abs_ci_low == pytest.approx(welch.confidence_interval().low, rel=1e-9)
    # Relative: over the unadjusted control mean, the delta method on the per-subject terms.
    m_t, m_c = y_t.mean(), y_c.mean()
    var = np.var(adj_t, ddof=1) / len(y_t) / m_c**2 + np.var(m_t / m_c * y_c - z_c @ beta, ddof=1) / len(y_c) / m_c**2
    assert res.rel_lift == pytest.approx(fit.params[1] / m_c, rel=1e-9)
    assert res.rel_se == pytest.approx(np.sqrt(var), rel=1e-9)
    assert res.p_value == pytest.approx(2 * sps.t.sf(abs(res.rel_lift) / np.sqrt(var), welch.df), rel=1e-9)
    # And it is robust-SE OLS to first order (HC2 on the same regression).
    assert res.abs_se == pytest.approx(fit.get_robustcov_results("HC2").bse[1], rel=2e-3)


def test_cuped_pp_narrows_cuped_when_the_properties_explain_the_metric(ab_covariates):
    (y_t, z_t), (y_c, z_c) = ab_covariates
    cuped = compare_cuped(suff(y_t, z_t[:, 0]), suff(y_c, z_c[:, 0]))
    pp = compare_regression_adjusted(moments(y_t, z_t), moments(y_c, z_c))
    only_x = compare_regression_adjusted(moments(y_t, z_t[:, :1]), moments(y_c, z_c[:, :1]))
    assert pp.rel_se < 0.9 * cuped.rel_se
    # With the pre-period alone it is CUPED up to the slope (within-arm against pooled: chance-level).
    assert only_x.abs_lift == pytest.approx(cuped.abs_lift, abs=0.02 * cuped.abs_se)


def test_cuped_pp_without_covariate_variance_is_the_raw_comparison(ab):
    y_t, y_c = ab
    constant = np.ones((len(y_t), 1)), np.ones((len(y_c), 1))
    res = compare_regression_adjusted(moments(y_t, constant[0]), moments(y_c, constant[1]))
    raw = compare(suff(y_t), suff(y_c))
    assert res.abs_lift == pytest.approx(raw.abs_lift, rel=1e-12)
    assert res.rel_se == pytest.approx(raw.rel_se, rel=1e-9)


# --- degenerate inputs -----------------------------------------------------


def _assert_inference_nan(res):
    for name in ("abs_se", "abs_ci_low", "abs_ci_high", "rel_se", "ci_low", "ci_high", "df", "t_stat", "p_value"):
        assert math.isnan(getattr(res, name)), name


@pytest.mark.parametrize("fn", [compare, compare_cuped])
def test_too_few_subjects_gives_nan(fn):
    one = SufficientStats(n=1, sum_y=np.float64(2.0), sum_y2=np.float64(4.0))
    empty = SufficientStats(n=0, sum_y=np.float64(0.0), sum_y2=np.float64(0.0))
    ok = SufficientStats(n=10, sum_y=20.0, sum_y2=50.0)
    for t, c in [(one, ok), (ok, one), (empty, ok), (ok, empty), (empty, empty)]:
        _assert_inference_nan(fn(t, c))
    assert math.isnan(welch_df(1.0, 1, 1.0, 10))


@pytest.mark.parametrize("fn", [compare, compare_cuped])
def test_zero_control_mean_keeps_absolute_but_not_relative(fn):
    t = SufficientStats(n=10, sum_y=20.0, sum_y2=50.0)
    c = SufficientStats(n=10, sum_y=np.float64(0.0), sum_y2=np.float64(0.0))
    res = fn(t, c)
    assert res.abs_lift == pytest.approx(2.0)
    assert res.abs_ci_low < 2.0 < res.abs_ci_high
    for name in ("rel_lift", "rel_se", "ci_low", "ci_high", "t_stat", "p_value"):
        assert math.isnan(getattr(res, name)), name


@pytest.mark.parametrize("fn", [compare, compare_cuped])
def test_zero_variance_in_both_arms_gives_nan(fn):
    t = SufficientStats(n=5, sum_y=10.0, sum_y2=20.0)
    c = SufficientStats(n=7, sum_y=7.0, sum_y2=7.0)
    res = fn(t, c)
    assert res.rel_lift == pytest.approx(1.0)
    _assert_inference_nan(res)
    assert math.isnan(welch_df(0.0, 5, 0.0, 7))


def test_invalid_alpha_raises(ab):
    with pytest.raises(ValueError):
        compare(suff(ab[0]), suff(ab[1]), alpha=1.0)


# --- SRM -------------------------------------------------------------------


def test_srm_matches_scipy_chisquare_with_unequal_weights():
    observed = {"control": 5100, "a": 2400, "b": 2560}
    weights = {"control": 0.5, "a": 0.25, "b": 0.25}
    total = sum(observed.values())
    f_exp = [total * 0.5, total * 0.25, total * 0.25]
    ref = sps.chisquare(list(observed.values()), f_exp=f_exp)

    res = srm_test(observed, weights)
    assert res.chi2 == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.df == 2
    assert res.expected == pytest.approx(dict(zip(weights, f_exp, strict=True)))
    assert res.judged and res.flagged == (ref.pvalue < 0.001)


def test_srm_weights_are_normalised_and_missing_variant_counts_as_zero():
    res = srm_test({"a": 60, "b": 50}, {"a": 2, "b": 1, "c": 1})
    ref = sps.chisquare([60, 50, 0], f_exp=[55, 27.5, 27.5])
    assert res.observed == {"a": 60, "b": 50, "c": 0}
    assert res.chi2 == pytest.approx(ref.statistic)
    assert res.p_value == pytest.approx(ref.pvalue)
    assert res.flagged


def test_srm_flag_needs_judgement_and_small_p():
    balanced = srm_test({"a": 5030, "b": 4970}, {"a": 1, "b": 1})
    assert balanced.judged and not balanced.flagged
    # Badly skewed but too small to judge: p is still reported.
    small = srm_test({"a": 80, "b": 10}, {"a": 1, "b": 1}, min_total=100)
    assert small.p_value < 0.001
    assert not small.judged and not small.flagged
    empty = srm_test({}, {"a": 1, "b": 1})
    assert math.isnan(empty.p_value) and not empty.flagged


@pytest.mark.parametrize(
    "observed, weights",
    [
        ({"a": 10, "x": 3}, {"a": 1, "b": 1}),  # subjects in an unknown variant
        ({"a": 10}, {"a": 1}),  # nothing to compare against
        ({"a": 10, "b": 10}, {"a": 1, "b": 0}),  # zero weight
        ({"a": 10, "b": -1}, {"a": 1, "b": 1}),  # negative count
    ],
)
def test_srm_rejects_invalid_input(observed, weights):
    with pytest.raises(ValueError):
        srm_test(observed, weights)


def test_srm_by_property_ranks_imbalanced_segment_first():
    weights = {"control": 0.5, "treatment": 0.5}
    counts = {
        ("browser", "chrome"): {"control": 10_040, "treatment": 9_960},
        ("browser", "safari"): {"control": 2_400, "treatment": 2_100},  # the bug
        ("browser", "opera"): {"control": 40, "treatment": 10},  # too small to test
        ("country", "US"): {"control": 6_020, "treatment": 5_980},
        ("country", "DE"): {"control": 3_010, "treatment": 2_990},
    }
    causes = srm_by_property(counts, weights)

    assert [(c.property, c.value) for c in causes][0] == ("browser", "safari")
    assert ("browser", "opera") not in {(c.property, c.value) for c in causes}
    assert len(causes) == 4
    ps = [c.p_value for c in causes]
    assert ps == sorted(ps)
    for c in causes:
        ref = sps.chisquare(list(counts[c.property, c.value].values()))
        assert c.p_value == pytest.approx(ref.pvalue)
        assert c.p_value_bonferroni == pytest.approx(min(1.0, 4 * ref.pvalue))
    assert causes[0].p_value_bonferroni < 0.001
    assert all(c.p_value_bonferroni > 0.001 for c in causes[1:])


# --- Holm ------------------------------------------------------------------


def test_holm_matches_statsmodels():
    p = np.random.default_rng(5).uniform(0, 0.2, 25)
    p[[3, 7]] = p[11]  # ties
    p[0] = 0.9  # pushes some adjusted values to the cap
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist(), rel=1e-12)


def test_holm_keeps_nan_and_excludes_it_from_family():
    p = [0.01, math.nan, 0.04, 0.03, math.nan, 0.5]
    present = [i for i, v in enumerate(p) if not math.isnan(v)]
    ref = multipletests([p[i] for i in present], method="holm")[1]
    out = holm(p)
    assert math.isnan(out[1]) and math.isnan(out[4])
    assert [out[i] for i in present] == pytest.approx(ref.tolist())
    assert holm([]) == []
    assert math.isnan(holm([math.nan])[0])


def test_cuped_relative_ci_coverage_monte_carlo():
    """CUPED intervals keep their 95% coverage (pre-period covariate correlated with the metric)."""
    rng = np.random.default_rng(11)
    lift, covered, narrower = 0.10, [], []
    for _ in range(1500):
        n_t, n_c = 1500, 2000
        x_t, x_c = rng.gamma(2.0, 5.0, n_t), rng.gamma(2.0, 5.0, n_c)
        y_c = 0.8 * x_c + rng.gamma(2.0, 3.0, n_c)
        y_t = (0.8 * x_t + rng.gamma(2.0, 3.0, n_t)) * (1 + lift)
        adjusted = compare_cuped(suff(y_t, x_t), suff(y_c, x_c))
        raw = compare(suff(y_t), suff(y_c))
        covered.append(adjusted.ci_low <= lift <= adjusted.ci_high)
        narrower.append(adjusted.ci_high - adjusted.ci_low < raw.ci_high - raw.ci_low)
    assert 0.93 <= np.mean(covered) <= 0.97
    assert all(narrower)


# --- clustered experiments ----------------------------------------------------


def companies(rng, n_companies, lift, size_spread=1.2):
    """Per-user rows of companies of different sizes (1 to 400 users, lognormal of sigma
    size_spread), a strong company effect shared by its users, and a pre-period value that
    predicts the metric: (company, y, x) arrays."""
    sizes = np.minimum(1 + rng.lognormal(1.5, size_spread, n_companies).astype(int), 400)
    company = np.repeat(np.arange(n_companies), sizes)
    effect = rng.normal(0.0, 3.0, n_companies)[company]
    x = rng.gamma(2.0, 2.0, len(company)) + effect
    y = 10.0 + 0.7 * x + effect + rng.normal(0.0, 2.0, len(company)) + lift
    return company, y, x


def cluster_moments(company, y, x=None):
    """Moments over clusters of (Y, N[, X]) as the engine would aggregate them."""
    columns = [np.bincount(company, weights=y), np.bincount(company).astype(float)]
    if x is not None:
        columns.append(np.bincount(company, weights=x))
    w = np.column_stack(columns)
    return Moments(n=len(w), sums=w.sum(axis=0), cross=w.T @ w)


@pytest.fixture(scope="module")
def clustered_ab():
    rng = np.random.default_rng(1907)
    return companies(rng, 140, 0.6), companies(rng, 110, 0.0)


def _per_arm_cr0(company, outcome):
    """statsmodels' cluster-robust variance of a mean, without its small-sample correction."""
    fit = sm.OLS(outcome, np.ones_like(outcome)).fit(
        cov_type="cluster", cov_kwds={"groups": company, "use_correction": False}
    )
    return float(fit.bse[0] ** 2)


def _clustered_ols(arms, outcomes):
    """OLS of the per-user outcome on an intercept and the treatment, cluster-robust (CR0)."""
    (c_t, _, _), (c_c, _, _) = arms
    outcome = np.r_[outcomes[0], outcomes[1]]
    treated = np.r_[np.ones(len(c_t)), np.zeros(len(c_c))]
    groups = np.r_[c_t, c_c + c_t.max() + 1]
    return sm.OLS(outcome, np.column_stack([np.ones_like(outcome), treated])).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}
    )


def test_clustered_lift_is_ols_with_cluster_robust_errors(clustered_ab):
    (c_t, y_t, _), (c_c, y_c, _) = clustered_ab
    res = compare_clustered(cluster_moments(c_t, y_t), cluster_moments(c_c, y_c))
    fit = _clustered_ols(clustered_ab, (y_t, y_c))
    g_t, g_c = c_t.max() + 1, c_c.max() + 1
    v_t, v_c = _per_arm_cr0(c_t, y_t), _per_arm_cr0(c_c, y_c)
    assert res.abs_lift == pytest.approx(fit.params[1], rel=1e-9)
    assert res.control_mean == pytest.approx(y_c.mean(), rel=1e-12)
    # The regression's CR0 variance is the two arms' CR0 variances of their means ...
    assert fit.bse[1] ** 2 == pytest.approx(v_t + v_c, rel=1e-9)
    # ... and the delta method is each arm's with its own G / (G - 1), the ddof=1 of gbstats.
    assert res.abs_se**2 == pytest.approx(v_t * g_t / (g_t - 1) + v_c * g_c / (g_c - 1), rel=1e-9)
    assert res.df == pytest.approx(welch_df(v_t * g_t**2 / (g_t - 1), g_t, v_c * g_c**2 / (g_c - 1), g_c), rel=1e-9)
    # Relative: the delta method on the two ratios' per-cluster linearisations.
    m_t, m_c = y_t.mean(), y_c.mean()
    rel_var = (v_t * g_t / (g_t - 1) + (m_t / m_c) ** 2 * v_c * g_c / (g_c - 1)) / m_c**2
    assert res.rel_lift == pytest.approx(m_t / m_c - 1, rel=1e-9)
    assert res.rel_se == pytest.approx(np.sqrt(rel_var), rel=1e-9)


def test_clustered_variance_is_wider_than_the_naive_per_user_one(clustered_ab):
    (c_t, y_t, _), (c_c, y_c, _) = clustered_ab
    clustered = compare_clustered(cluster_moments(c_t, y_t), cluster_moments(c_c, y_c))
    naive = compare(suff(y_t), suff(y_c))
    assert clustered.abs_lift == pytest.approx(naive.abs_lift, rel=1e-12)
    assert clustered.abs_se > 2 * naive.abs_se


def _linearised(company, y, x):
    """Each cluster's linearised terms of the per-member ratios of y and x, from per-user rows."""
    totals_y, totals_x, size = (np.bincount(company, weights=v) for v in (y, x, np.ones_like(y)))
    mean_n = size.mean()
    return (totals_y - y.sum() / size.sum() * size) / mean_n, (totals_x - x.sum() / size.sum() * size) / mean_n


def test_clustered_cuped_is_clustered_ols_on_the_adjusted_outcome(clustered_ab):
    (c_t, y_t, x_t), (c_c, y_c, x_c) = clustered_ab
    res = compare_clustered(cluster_moments(c_t, y_t, x_t), cluster_moments(c_c, y_c, x_c), cuped=True)
    # theta: gbstats' rule from the clusters' linearised ratios, summed over the arms.
    (ly_t, lx_t), (ly_c, lx_c) = _linearised(c_t, y_t, x_t), _linearised(c_c, y_c, x_c)
    theta = (np.cov(ly_t, lx_t)[0, 1] + np.cov(ly_c, lx_c)[0, 1]) / (np.var(lx_t, ddof=1) + np.var(lx_c, ddof=1))
    assert theta > 0.3  # the pre-period explains the metric
    adj_t, adj_c = y_t - theta * x_t, y_c - theta * x_c
    fit = _clustered_ols(clustered_ab, (adj_t, adj_c))
    g_t, g_c = c_t.max() + 1, c_c.max() + 1
    v_t, v_c = _per_arm_cr0(c_t, adj_t), _per_arm_cr0(c_c, adj_c)
    assert res.abs_lift == pytest.approx(fit.params[1], rel=1e-9)
    assert res.abs_se**2 == pytest.approx(v_t * g_t / (g_t - 1) + v_c * g_c / (g_c - 1), rel=1e-9)
    assert res.control_mean == pytest.approx(y_c.mean(), rel=1e-12)  # unadjusted
    raw = compare_clustered(cluster_moments(c_t, y_t), cluster_moments(c_c, y_c))
    assert res.abs_se < 0.8 * raw.abs_se


def test_clustered_cuped_relative_se_is_the_numerical_delta_method(clustered_ab):
    (c_t, y_t, x_t), (c_c, y_c, x_c) = clustered_ab
    m_t, m_c = cluster_moments(c_t, y_t, x_t), cluster_moments(c_c, y_c, x_c)
    res = compare_clustered(m_t, m_c, cuped=True)
    (ly_t, lx_t), (ly_c, lx_c) = _linearised(c_t, y_t, x_t), _linearised(c_c, y_c, x_c)
    theta = (np.cov(ly_t, lx_t)[0, 1] + np.cov(ly_c, lx_c)[0, 1]) / (np.var(lx_t, ddof=1) + np.var(lx_c, ddof=1))

    def rel_lift(means_t, means_c):
        ratio = lambda m: (m[0] - theta * m[2]) / m[1]  # noqa: E731
        return (ratio(means_t) - ratio(means_c)) / (means_c[0] / means_c[1])

    variance = 0.0
    for arm, moments_ in ((0, m_t), (1, m_c)):
        means = [m_t.mean(), m_c.mean()]
        gradient = np.zeros(3)
        for k in range(3):
            step = 1e-6 * abs(means[arm][k])
            up, down = [m.copy() for m in means], [m.copy() for m in means]
            up[arm][k] += step
            down[arm][k] -= step
            gradient[k] = (rel_lift(*up) - rel_lift(*down)) / (2 * step)
        variance += gradient @ moments_.covariance() @ gradient / moments_.n
    assert res.rel_se == pytest.approx(np.sqrt(variance), rel=1e-6)


def test_clustered_without_two_clusters_or_members_gives_nan():
    one = Moments(n=1, sums=np.array([3.0, 2.0]), cross=np.array([[9.0, 6.0], [6.0, 4.0]]))
    two = Moments(n=2, sums=np.array([3.0, 3.0]), cross=np.array([[5.0, 5.0], [5.0, 5.0]]))
    _assert_inference_nan(compare_clustered(one, two))
    empty = Moments(n=2, sums=np.zeros(2), cross=np.zeros((2, 2)))
    _assert_inference_nan(compare_clustered(two, empty))
    with pytest.raises(ValueError, match=r"needs Moments of \(Y, N, X\)"):
        compare_clustered(two, two, cuped=True)


def test_clustered_interval_covers_while_the_naive_one_does_not():
    """Strong within-company correlation: the clustered 95% interval covers the true effect about
    95% of the time; a per-user t test, ignoring the clusters, far less often. (With a few companies
    holding most users, size_spread=1.2, the delta method covers 93%: docs/data-model.md.)"""
    rng = np.random.default_rng(7)
    lift, clustered, naive = 0.6, [], []
    for _ in range(600):
        (c_t, y_t, _), (c_c, y_c, _) = companies(rng, 120, lift, 0.6), companies(rng, 120, 0.0, 0.6)
        res = compare_clustered(cluster_moments(c_t, y_t), cluster_moments(c_c, y_c))
        per_user = compare(suff(y_t), suff(y_c))
        clustered.append(res.abs_ci_low <= lift <= res.abs_ci_high)
        naive.append(per_user.abs_ci_low <= lift <= per_user.abs_ci_high)
    assert 0.93 <= np.mean(clustered) <= 0.97
    assert np.mean(naive) < 0.7
