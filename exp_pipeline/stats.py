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
    """Treatment vs control; ci_low/ci_high, t_stat and p_value refer to the relative lift."""

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


@dataclass(frozen=True)
class _Arm:
    """Mean, per-subject variance and size of one variant: all a lift needs."""

    mean: float
    var: float
    n: int


def welch_df(var_t: float, n_t: int, var_c: float, n_c: int) -> float:
    """Welch–Satterthwaite degrees of freedom; NaN when undefined."""
    if n_t < 2 or n_c < 2:
        return _NAN
    a, b = var_t / n_t, var_c / n_c
    if not a + b > 0:  # also catches NaN variances
        return _NAN
    return (a + b) ** 2 / (a**2 / (n_t - 1) + b**2 / (n_c - 1))


def _lift(t: _Arm, c: _Arm, alpha: float) -> LiftResult:
    """Welch interval for the absolute lift, delta-method t test for the relative one."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    abs_lift = t.mean - c.mean
    rel_lift = t.mean / c.mean - 1 if c.mean != 0 else _NAN
    abs_se = abs_lo = abs_hi = rel_se = lo = hi = df = t_stat = p_value = _NAN

    abs_var = t.var / t.n + c.var / c.n if min(t.n, c.n) >= 2 else _NAN
    if abs_var > 0:  # False for NaN: too few subjects or no variance anywhere
        df = welch_df(t.var, t.n, c.var, c.n)
        q = float(sps.t.ppf(1 - alpha / 2, df))
        abs_se = math.sqrt(abs_var)
        abs_lo, abs_hi = abs_lift - q * abs_se, abs_lift + q * abs_se
        if c.mean != 0:
            # Gradient of m_t/m_c - 1 is (1/m_c, -m_t/m_c^2); this is the spec's
            # var_t/(n_t m_c^2) + m_t^2 var_c/(n_c m_c^4) without the 4th power.
            ratio = t.mean / c.mean
            rel_se = math.sqrt(t.var / t.n + ratio**2 * c.var / c.n) / abs(c.mean)
            if rel_se > 0:
                lo, hi = rel_lift - q * rel_se, rel_lift + q * rel_se
                t_stat = rel_lift / rel_se
                p_value = float(2 * sps.t.sf(abs(t_stat), df))

    return LiftResult(
        control_mean=float(c.mean),
        treatment_mean=float(t.mean),
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


def compare(
    treatment: SufficientStats, control: SufficientStats, alpha: float = 0.05
) -> LiftResult:
    """Unadjusted treatment-vs-control comparison (GrowthBook frequentist convention)."""
    return _lift(
        _Arm(treatment.mean, treatment.variance, treatment.n),
        _Arm(control.mean, control.variance, control.n),
        alpha,
    )


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


def _cuped_arm(s: SufficientStats, theta: float, pooled_mean_x: float) -> _Arm:
    """Moments of y - theta*(x - pooled_mean_x) for one variant."""
    return _Arm(
        mean=s.mean - theta * (s.mean_x - pooled_mean_x),
        var=_clamp0(s.variance + theta**2 * s.var_x - 2 * theta * s.cov_xy),
        n=s.n,
    )


def compare_cuped(
    treatment: SufficientStats,
    control: SufficientStats,
    alpha: float = 0.05,
    theta: float | None = None,
) -> LiftResult:
    """CUPED-adjusted comparison (Deng et al. 2013); theta pooled over both arms by default."""
    if theta is None:
        theta = cuped_theta([treatment, control])
    # Centering on the pooled mean keeps adjusted means on the metric's scale,
    # which the relative lift needs; it cancels out of the absolute lift.
    pooled_mean_x = _pooled([treatment, control]).mean_x
    return _lift(
        _cuped_arm(treatment, theta, pooled_mean_x),
        _cuped_arm(control, theta, pooled_mean_x),
        alpha,
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
