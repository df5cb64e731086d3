"""Frequentist experiment statistics from per-variant sufficient statistics.

Everything here is pure: numbers in, numbers out. Degenerate inputs (too few
subjects, a zero control mean, no variance) give NaN fields instead of raising
or emitting numpy warnings, so one empty metric cannot abort or flood a
pipeline run over many metrics. Invalid arguments (bad alpha, unknown
variants, negative counts) still raise ValueError: those are caller bugs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy import stats as sps

_NAN = math.nan


def _co_moment(n: int, sum_a: float, sum_b: float, sum_ab: float) -> float:
    """Sample (ddof=1) covariance of a and b from raw sums; NaN below n=2."""
    if n < 2:
        return _NAN
    return (sum_ab - sum_a * sum_b / n) / (n - 1)


def _clamp0(value: float) -> float:
    # Cancellation in sum_y2 - n*mean^2 can leave a tiny negative variance.
    # Written as a comparison (not max) so NaN passes through unchanged.
    return 0.0 if value < 0 else value


@dataclass(frozen=True)
class SufficientStats:
    """Per-variant sums of metric y and pre-period covariate x (for CUPED)."""

    n: int
    sum_y: float
    sum_y2: float
    sum_x: float = 0.0
    sum_x2: float = 0.0
    sum_xy: float = 0.0

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be non-negative, got {self.n}")

    @property
    def mean(self) -> float:
        return self.sum_y / self.n if self.n > 0 else _NAN

    @property
    def variance(self) -> float:
        return _clamp0(_co_moment(self.n, self.sum_y, self.sum_y, self.sum_y2))

    @property
    def mean_x(self) -> float:
        return self.sum_x / self.n if self.n > 0 else _NAN

    @property
    def var_x(self) -> float:
        return _clamp0(_co_moment(self.n, self.sum_x, self.sum_x, self.sum_x2))

    @property
    def cov_xy(self) -> float:
        return _co_moment(self.n, self.sum_x, self.sum_y, self.sum_xy)


@dataclass(frozen=True)
class LiftResult:
    """Treatment vs control; ci_low/ci_high, t_stat and p_value refer to the relative lift.

    For a CUPED comparison, control_mean is the unadjusted control mean (the denominator of the
    relative lift) and treatment_mean is control_mean + abs_lift, the adjusted treatment mean on
    the control's scale.
    """

    control_mean: float
    treatment_mean: float
    abs_lift: float
    abs_se: float
    abs_ci_low: float
    abs_ci_high: float
    rel_lift: float
    rel_se: float
    ci_low: float
    ci_high: float
    df: float
    t_stat: float
    p_value: float


def welch_df(var_t: float, n_t: int, var_c: float, n_c: int) -> float:
    """Welch–Satterthwaite degrees of freedom; NaN when undefined."""
    if n_t < 2 or n_c < 2:
        return _NAN
    a, b = var_t / n_t, var_c / n_c
    if not a + b > 0:  # also catches NaN variances
        return _NAN
    return (a + b) ** 2 / (a**2 / (n_t - 1) + b**2 / (n_c - 1))


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _inference(
    control_mean: float, treatment_mean: float, abs_lift: float, abs_var: float, rel_var: float,
    df: float, alpha: float,
) -> LiftResult:
    """Welch interval of the absolute lift, t test and interval of the relative lift
    abs_lift / control_mean, both on the same degrees of freedom."""
    rel_lift = abs_lift / control_mean if control_mean != 0 else _NAN
    abs_se = abs_lo = abs_hi = rel_se = lo = hi = t_stat = p_value = _NAN
    if abs_var > 0 and df == df:  # False for NaN: too few subjects or no variance anywhere
        q = float(sps.t.ppf(1 - alpha / 2, df))
        abs_se = math.sqrt(abs_var)
        abs_lo, abs_hi = abs_lift - q * abs_se, abs_lift + q * abs_se
        if control_mean != 0 and rel_var > 0:
            rel_se = math.sqrt(rel_var)
            lo, hi = rel_lift - q * rel_se, rel_lift + q * rel_se
            t_stat = rel_lift / rel_se
            p_value = float(2 * sps.t.sf(abs(t_stat), df))
    else:
        df = _NAN
    return LiftResult(
        control_mean=float(control_mean),
        treatment_mean=float(treatment_mean),
        abs_lift=float(abs_lift),
        abs_se=abs_se,
        abs_ci_low=abs_lo,
        abs_ci_high=abs_hi,
        rel_lift=float(rel_lift),
        rel_se=rel_se,
        ci_low=lo,
        ci_high=hi,
        df=df,
        t_stat=t_stat,
        p_value=p_value,
    )


def _mean_variance(var: float, n: int) -> float:
    """Variance of a sample mean; NaN below two subjects."""
    return var / n if n >= 2 else _NAN


def compare(
    treatment: SufficientStats, control: SufficientStats, alpha: float = 0.05
) -> LiftResult:
    """Unadjusted treatment-vs-control comparison (GrowthBook frequentist convention).

    The relative lift's variance is the delta method on m_t / m_c: gradient (1/m_c, -m_t/m_c^2).
    """
    _check_alpha(alpha)
    m_t, m_c = treatment.mean, control.mean
    v_t = _mean_variance(treatment.variance, treatment.n)
    v_c = _mean_variance(control.variance, control.n)
    rel_var = (v_t + (m_t / m_c) ** 2 * v_c) / m_c**2 if m_c != 0 else _NAN
    return _inference(
        m_c, m_t, m_t - m_c, v_t + v_c, rel_var,
        welch_df(treatment.variance, treatment.n, control.variance, control.n), alpha,
    )


@dataclass(frozen=True)
class WelchTest:
    """Welch's t test of a difference in means."""

    difference: float
    t_stat: float
    df: float
    p_value: float


def welch_test(treatment: SufficientStats, control: SufficientStats) -> WelchTest:
    """Two-sided Welch test of mean_t - mean_c; NaN fields when undefined (too few subjects, no
    variance in either arm)."""
    v_t = _mean_variance(treatment.variance, treatment.n)
    v_c = _mean_variance(control.variance, control.n)
    difference = treatment.mean - control.mean
    df = welch_df(treatment.variance, treatment.n, control.variance, control.n)
    if not (v_t + v_c > 0 and df == df):
        return WelchTest(float(difference), _NAN, _NAN, _NAN)
    t_stat = difference / math.sqrt(v_t + v_c)
    return WelchTest(float(difference), float(t_stat), float(df), float(2 * sps.t.sf(abs(t_stat), df)))


def covariate_stats(s: SufficientStats) -> SufficientStats:
    """The pre-period covariate x of a variant as the sample to test."""
    return SufficientStats(n=s.n, sum_y=s.sum_x, sum_y2=s.sum_x2)


def _pooled(stats: Sequence[SufficientStats]) -> SufficientStats:
    """All given variants summed into one sample."""
    return SufficientStats(
        *(sum(getattr(s, f.name) for s in stats) for f in fields(SufficientStats))
    )


def cuped_theta(stats: Sequence[SufficientStats]) -> float:
    """CUPED theta = cov(x, y) / var(x) over the variants pooled as one sample.

    Returns 0.0 (no adjustment) when var(x) is zero or undefined, e.g. no
    covariate was collected or fewer than two subjects in total.
    """
    pooled = _pooled(stats)
    var_x = pooled.var_x
    return pooled.cov_xy / var_x if var_x > 0 else 0.0


def _adjusted_variance(s: SufficientStats, theta: float) -> float:
    """Per-subject variance of y - theta * x."""
    return _clamp0(s.variance + theta**2 * s.var_x - 2 * theta * s.cov_xy)


def compare_cuped(
    treatment: SufficientStats,
    control: SufficientStats,
    alpha: float = 0.05,
    theta: float | None = None,
) -> LiftResult:
    """CUPED-adjusted comparison on GrowthBook's convention (docs/data-model.md#cuped).

    Each arm's mean becomes m - theta * mean_x (theta pooled over both arms by default); the
    absolute lift is the difference of adjusted means with a Welch interval on the adjusted
    variances. The relative lift divides that difference by the UNADJUSTED control mean, so raw
    and CUPED relative lifts estimate the same (mu_t - mu_c) / mu_c. Its variance is the delta
    method with the gradient taken where the arms' covariate means are equal (as randomization
    makes them in expectation): treatment (y_t - theta x_t) / m_c, control
    -(m_t / m_c^2) y_c + (theta / m_c) x_c.
    """
    _check_alpha(alpha)
    if theta is None:
        theta = cuped_theta([treatment, control])
    m_t, m_c = treatment.mean, control.mean
    abs_lift = (m_t - theta * treatment.mean_x) - (m_c - theta * control.mean_x)
    var_t, var_c = _adjusted_variance(treatment, theta), _adjusted_variance(control, theta)
    v_t, v_c = _mean_variance(var_t, treatment.n), _mean_variance(var_c, control.n)
    rel_var = _NAN
    if m_c != 0:
        ratio = m_t / m_c
        # Variance of ratio * y_c - theta * x_c: a quadratic form, so never negative.
        control_term = _clamp0(
            ratio**2 * control.variance - 2 * theta * ratio * control.cov_xy + theta**2 * control.var_x
        )
        rel_var = (v_t + _mean_variance(control_term, control.n)) / m_c**2
    return _inference(
        m_c, m_c + abs_lift, abs_lift, v_t + v_c, rel_var, welch_df(var_t, treatment.n, var_c, control.n), alpha
    )


@dataclass(frozen=True)
class Moments:
    """A variant's first and second moments of the vector (y, z_1, ..., z_k): n, the sums, and the
    matrix of cross-product sums (index 0 is the metric y, the others covariates)."""

    n: int
    sums: np.ndarray  # shape (k + 1,)
    cross: np.ndarray  # shape (k + 1, k + 1), symmetric

    def mean(self) -> np.ndarray:
        return self.sums / self.n

    def covariance(self) -> np.ndarray:
        """Sample (ddof=1) covariance matrix."""
        return (self.cross - np.outer(self.sums, self.sums) / self.n) / (self.n - 1)


def compare_regression_adjusted(treatment: Moments, control: Moments, alpha: float = 0.05) -> LiftResult:
    """CUPED++: the treatment effect adjusted on several covariates z, their coefficients pooled
    over both arms (docs/data-model.md#cuped-1).

    beta is the within-arm regression of y on z (the two arms' centred cross products summed), so
    abs_lift = (m_t - m_c) - beta . (mean_z_t - mean_z_c) is the treatment coefficient of OLS of y
    on an intercept, the treatment indicator and z. Its variance is that of y - beta . z per arm
    (Welch); the relative lift divides it by the unadjusted control mean, with the delta method of
    `compare_cuped`: treatment (y_t - beta . z_t) / m_c, control ((m_t / m_c) y_c - beta . z_c) / m_c.
    """
    _check_alpha(alpha)
    if min(treatment.n, control.n) < 2:
        return _inference(_NAN, _NAN, _NAN, _NAN, _NAN, _NAN, alpha)
    c_t, c_c = treatment.covariance(), control.covariance()
    within = (treatment.n - 1) * c_t + (control.n - 1) * c_c
    # pinv: a covariate constant within the arms (or collinear with others) gets no weight.
    beta = np.linalg.pinv(within[1:, 1:]) @ within[1:, 0]
    mean_t, mean_c = treatment.mean(), control.mean()
    m_t, m_c = float(mean_t[0]), float(mean_c[0])
    abs_lift = (m_t - m_c) - float(beta @ (mean_t[1:] - mean_c[1:]))
    adjust = np.r_[1.0, -beta]
    var_t, var_c = (_clamp0(float(adjust @ c @ adjust)) for c in (c_t, c_c))
    v_t, v_c = var_t / treatment.n, var_c / control.n
    rel_var = _NAN
    if m_c != 0:
        control_gradient = np.r_[m_t / m_c, -beta]
        rel_var = (v_t + _clamp0(float(control_gradient @ c_c @ control_gradient)) / control.n) / m_c**2
    return _inference(m_c, m_c + abs_lift, abs_lift, v_t + v_c, rel_var, welch_df(var_t, treatment.n, var_c, control.n), alpha)


def _ratio_gradients(m: Moments) -> tuple[float, np.ndarray, float, np.ndarray]:
    """The per-member ratios of a variant's cluster Moments over (Y, N[, X]) and their gradients in
    the cluster means: r_y = mean_Y / mean_N with gradient (1, -r_y, 0) / mean_N, and likewise r_x
    for the pre-period sum X (zeros without one)."""
    means = m.mean()
    mean_n = float(means[1])
    r_y = float(means[0]) / mean_n
    grad_y = np.zeros(len(means))
    grad_y[:2] = 1 / mean_n, -r_y / mean_n
    r_x, grad_x = 0.0, np.zeros(len(means))
    if len(means) > 2:
        r_x = float(means[2]) / mean_n
        grad_x[1:3] = -r_x / mean_n, 1 / mean_n
    return r_y, grad_y, r_x, grad_x


def compare_clustered(treatment: Moments, control: Moments, alpha: float = 0.05, cuped: bool = False) -> LiftResult:
    """A per-member metric of an experiment randomized by cluster (company), on GrowthBook's ratio
    statistics (docs/data-model.md#clustered-experiments).

    Each variant's Moments run over its clusters, of the vector (Y, N) — the cluster's metric sum
    and member count — or (Y, N, X) with X the cluster's pre-period sum, used when `cuped`. A
    variant's estimate is the per-member mean r = sum Y / sum N; its variance is the delta method
    on the cluster means, var(Y - r N) / (G mean_N^2), which is the cluster-robust variance of a
    mean (CR0 times G / (G - 1)). Welch degrees of freedom run on clusters, not members.

    With CUPED the estimate is r_y - theta r_x, theta = the arms' summed covariance of the two
    ratios' per-cluster linearisations over their summed variance of r_x
    (gbstats' compute_theta_regression_adjusted_ratio). The relative lift divides by the unadjusted
    control ratio, its variance the delta method through that denominator as well.
    """
    _check_alpha(alpha)
    if cuped and min(len(treatment.sums), len(control.sums)) < 3:
        raise ValueError("compare_clustered(cuped=True) needs Moments of (Y, N, X): X is the pre-period sum")
    if min(treatment.n, control.n) < 2 or not (treatment.sums[1] > 0 and control.sums[1] > 0):
        return _inference(_NAN, _NAN, _NAN, _NAN, _NAN, _NAN, alpha)
    (r_t, gy_t, rx_t, gx_t), (r_c, gy_c, rx_c, gx_c) = _ratio_gradients(treatment), _ratio_gradients(control)
    c_t, c_c = treatment.covariance(), control.covariance()
    theta = 0.0
    if cuped:
        var_x = float(gx_t @ c_t @ gx_t + gx_c @ c_c @ gx_c)
        theta = float(gy_t @ c_t @ gx_t + gy_c @ c_c @ gx_c) / var_x if var_x > 0 else 0.0
    adjust_t, adjust_c = gy_t - theta * gx_t, gy_c - theta * gx_c
    var_t, var_c = (_clamp0(float(a @ c @ a)) for a, c in ((adjust_t, c_t), (adjust_c, c_c)))
    abs_lift = (r_t - theta * rx_t) - (r_c - theta * rx_c)
    rel_var = _NAN
    if r_c != 0:
        control_gradient = -(r_c + abs_lift) / r_c**2 * gy_c + theta / r_c * gx_c
        rel_var = var_t / (treatment.n * r_c**2) + _clamp0(float(control_gradient @ c_c @ control_gradient)) / control.n
    return _inference(
        r_c, r_c + abs_lift, abs_lift, var_t / treatment.n + var_c / control.n, rel_var,
        welch_df(var_t, treatment.n, var_c, control.n), alpha,
    )


@dataclass(frozen=True)
class SrmResult:
    """Sample-ratio-mismatch test; expected holds expected counts, not weights."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    df: int
    p_value: float
    judged: bool
    flagged: bool

    @property
    def verdict(self) -> str:
        """'SRM', 'ok', or 'not judged' (fewer subjects than the minimum): the one rule for every view."""
        return "SRM" if self.flagged else ("ok" if self.judged else "not judged")


def srm_test(
    observed: Mapping[str, int],
    weights: Mapping[str, float],
    threshold: float = 0.001,
    min_total: int = 100,
) -> SrmResult:
    """Pearson chi-square goodness of fit of variant counts against traffic weights.

    Variants in weights but not in observed count as 0. Weights must be
    positive (a zero-weight variant has no expected count to test against);
    subjects in a variant without a weight raise, as that is a config error.
    """
    if len(weights) < 2:
        raise ValueError("SRM needs at least two weighted variants")
    if not all(w > 0 for w in weights.values()):
        raise ValueError(f"weights must be positive, got {dict(weights)}")
    unweighted = sorted(v for v, k in observed.items() if k and v not in weights)
    if unweighted:
        raise ValueError(f"subjects observed in variants without weight: {unweighted}")
    counts = {v: int(observed.get(v, 0)) for v in weights}
    if any(k < 0 for k in counts.values()):
        raise ValueError(f"counts must be non-negative, got {counts}")

    total = sum(counts.values())
    weight_sum = sum(weights.values())
    expected = {v: total * w / weight_sum for v, w in weights.items()}
    df = len(weights) - 1
    chi2 = p_value = _NAN
    if total > 0:
        chi2 = sum((counts[v] - e) ** 2 / e for v, e in expected.items())
        p_value = float(sps.chi2.sf(chi2, df))
    judged = total >= min_total
    return SrmResult(
        observed=counts,
        expected=expected,
        chi2=chi2,
        df=df,
        p_value=p_value,
        judged=judged,
        flagged=judged and p_value < threshold,
    )


@dataclass(frozen=True)
class SrmCause:
    """SRM test within one segment (property == value) of the experiment."""

    property: str
    value: str
    chi2: float
    p_value: float
    p_value_bonferroni: float
    observed: dict
    expected: dict


def srm_by_property(
    counts: Mapping[tuple[str, str], Mapping[str, int]],
    weights: Mapping[str, float],
    min_total: int = 100,
) -> list[SrmCause]:
    """SRM per segment, most likely root cause first.

    Segments with fewer than min_total subjects (or none) are skipped and do
    not count towards the Bonferroni family size. Ties in p (e.g. several
    underflowing to 0) are broken by larger chi2 first.
    """
    tested = {
        key: srm_test(obs, weights, min_total=min_total)
        for key, obs in counts.items()
        if sum(obs.values()) >= max(min_total, 1)
    }
    m = len(tested)
    causes = [
        SrmCause(
            property=prop,
            value=value,
            chi2=r.chi2,
            p_value=r.p_value,
            p_value_bonferroni=min(1.0, r.p_value * m),
            observed=r.observed,
            expected=r.expected,
        )
        for (prop, value), r in tested.items()
    ]
    return sorted(causes, key=lambda c: (c.p_value, -c.chi2))


@dataclass(frozen=True)
class Heterogeneity:
    """Cochran's Q test that k estimates share one true value."""

    k: int
    pooled: float
    q: float
    df: int
    p_value: float
    i_squared: float


def cochran_q(estimates: Sequence[float], standard_errors: Sequence[float]) -> Heterogeneity:
    """Fixed-effect (inverse-variance) pooling and Cochran's Q over the estimates with a positive,
    finite standard error; NaN fields with fewer than two of them."""
    pairs = [(e, se) for e, se in zip(estimates, standard_errors, strict=True) if math.isfinite(e) and se > 0 and math.isfinite(se)]
    k = len(pairs)
    if k < 2:
        return Heterogeneity(k, _NAN, _NAN, max(k - 1, 0), _NAN, _NAN)
    e = np.array([p[0] for p in pairs])
    w = 1.0 / np.array([p[1] for p in pairs]) ** 2
    pooled = float(w @ e / w.sum())
    q = float(w @ (e - pooled) ** 2)
    df = k - 1
    return Heterogeneity(k, pooled, q, df, float(sps.chi2.sf(q, df)), max(0.0, (q - df) / q) if q > 0 else 0.0)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values in input order; NaNs stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m = len(order)
    stepped = (m - np.arange(m)) * p[order]
    adjusted = np.full(p.shape, np.nan)
    # Running max enforces monotonicity of the step-down procedure.
    adjusted[order] = np.minimum(np.maximum.accumulate(stepped), 1.0)
    return adjusted.tolist()
