"""A predicted output length as a distribution, not a point: quantiles at fixed levels.

The predictor knows how uncertain each prediction is; a point throws that away.
Quantiles at fixed levels are the one representation shared by the predictor
(which fills them), the contract (``Prediction.quantiles``) and the scheduler's
policies (risk-aware and remaining-length keys), so none depends on the family
the predictor happens to fit.

:class:`LengthDistribution` turns the quantiles into a full distribution: the CDF
is linear in ``log x`` between quantiles (a density ``c / x`` per segment, so every
partial expectation has a closed form), extended below the first quantile with the
first segment's log-slope (down to 1 token), and beyond the last quantile by an
exponential tail fitted to the last two quantiles. Exponential, not Pareto: a Pareto
tail fitted to two quantiles (0.9 and 0.99) gets a shape <= 1 from any slightly
wide pair and then an infinite mean, which would make a job's key explode on one
noisy quantile; the exponential's mean is always finite and its mean residual life
is constant, so a job that has outlived its 0.99 quantile keeps a bounded remaining
length instead of one that grows with every token. For a log-normal of sigma 1 the
true mean excess beyond q99 lies between the two (exponential 0.58x, Pareto 1.7x);
the tail holds 1% of the mass, so the mean moves by under 2%.

Everything a queued job's key needs at ``generated = 0`` is computed once, when the
prediction arrives (:attr:`mean`, :attr:`risk0`, :attr:`gittins0`); conditional
values for a job that has run cost O(levels) pure-Python arithmetic (no numpy: with
seven knots, Python floats are faster than array calls).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

# Levels of the predicted quantiles, ascending; the contract carries one value per level.
QUANTILE_LEVELS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

# Tail inflation of ssjf-risk's key: E[R] + RISK_KAPPA * (q90 - q50) of the remaining length.
RISK_KAPPA = 0.5
_Z = {0.1: -1.2815515655446004, 0.25: -0.6744897501960817, 0.5: 0.0, 0.75: 0.6744897501960817}
_Z |= {0.9: 1.2815515655446004, 0.99: 2.3263478740408408}


class DistributionError(ValueError):
    """Quantiles that do not describe a length distribution (wrong count, not finite)."""


def lognormal_quantiles(
    median: float, sigma: float, levels: Sequence[float] = QUANTILE_LEVELS
) -> tuple[float, ...]:
    """Quantiles of a log-normal with this median and log-sigma (the fallback when the
    predictor returns only a point: sigma from the held-out spread of log residuals)."""
    return tuple(median * math.exp(sigma * _z(p)) for p in levels)


def _z(p: float) -> float:
    z = _Z.get(p)
    if z is not None:
        return z
    from statistics import NormalDist  # only for levels outside the contract's

    return NormalDist().inv_cdf(p)


class LengthDistribution:
    """Output length (tokens) as a distribution built from quantiles at ``levels``.

    Immutable; one per job, shared freely. ``generated`` arguments are the tokens a
    job has produced so far: conditional values are of the length still to come given
    that the job has not ended yet (the distribution conditioned on ``X > generated``).
    """

    __slots__ = ("_beta", "_c", "_ep", "_f", "_pe", "_x", "gittins0", "mean", "quantiles", "risk0")

    def __init__(
        self,
        quantiles: Sequence[float],
        levels: Sequence[float] = QUANTILE_LEVELS,
        *,
        cap: float = math.inf,
    ) -> None:
        """``cap``: the job cannot run longer (its max_tokens); quantiles above it are
        clipped and, when the last one is, no tail remains."""
        if len(quantiles) != len(levels) or len(levels) < 2:
            raise DistributionError(
                f"expected {len(levels)} quantiles (levels {tuple(levels)}), got {len(quantiles)}"
            )
        qs: list[float] = []
        prev = 1.0
        for q in quantiles:
            q = float(q)
            if not math.isfinite(q):
                raise DistributionError(f"quantiles must be finite, got {tuple(quantiles)}")
            # Quantile crossing (a model's independent heads) is repaired, not refused.
            prev = min(max(q, prev), cap) if cap >= 1.0 else max(q, prev)
            qs.append(prev)
        self.quantiles = tuple(qs)
        ps = [float(p) for p in levels]
        # Left end: the first segment's log-slope extended down to F = 0 (at least 1 token).
        lo = qs[0]
        if qs[1] > qs[0]:
            lo = qs[0] * (qs[0] / qs[1]) ** (ps[0] / (ps[1] - ps[0]))
        lo = min(max(lo, 1.0), qs[0])
        xs = [lo, *qs]
        fs = [0.0, *ps]
        n = len(xs)
        cs = []
        for i in range(n - 1):
            w = math.log(xs[i + 1] / xs[i])
            cs.append((fs[i + 1] - fs[i]) / w if w > 0.0 else math.inf)
        s_last = 1.0 - fs[-1]
        top = xs[-1]
        if top >= cap or s_last <= 0.0:
            beta = 0.0  # no mass beyond the last quantile: it sits on it
        else:
            d = top - xs[-2]
            ratio = (1.0 - fs[-2]) / s_last
            beta = d / math.log(ratio) if d > 0.0 and ratio > 1.0 else 1.0
            beta = max(beta, 1.0)
        # pe[i] = E[X; X > x_i] (right-continuous: a point mass at x_i is not included).
        pe = [0.0] * n
        pe[-1] = s_last * (top + beta)
        for i in range(n - 2, -1, -1):
            c = cs[i]
            seg = c * (xs[i + 1] - xs[i]) if c != math.inf else 0.0
            # A point mass (c inf) at x_{i+1} belongs to (x_i, x_{i+1}].
            mass_at_next = (fs[i + 1] - fs[i]) * xs[i + 1] if c == math.inf else 0.0
            pe[i] = seg + mass_at_next + pe[i + 1]
        self._x = tuple(xs)
        self._f = tuple(fs)
        self._c = tuple(cs)
        self._pe = tuple(pe)
        self._beta = beta
        # ep[i] = E[(X - x_i)^+], the expected work beyond knot i.
        self._ep = tuple(pe[i] - xs[i] * (1.0 - fs[i]) for i in range(n))
        self.mean = pe[0] + xs[0] * fs[0]  # fs[0] = 0: all mass lies above lo
        self.risk0 = self.tail_inflated(0)
        self.gittins0 = self.gittins_key(0)

    @classmethod
    def lognormal(cls, median: float, sigma: float, *, cap: float = math.inf) -> LengthDistribution:
        return cls(lognormal_quantiles(median, sigma), cap=cap)

    @property
    def levels(self) -> tuple[float, ...]:
        return self._f[1:]

    def scaled(self, factor: float) -> LengthDistribution:
        """The same distribution with every length divided by ``factor`` (the scheduler's
        prediction scale in benchmark mode)."""
        return LengthDistribution([q / factor for q in self.quantiles], self.levels)

    # ---- the distribution at one point -------------------------------------

    def _at(self, g: float) -> tuple[float, float]:
        """(P(X > g), E[(X - g)^+])."""
        xs = self._x
        if g < xs[0]:
            return 1.0, self.mean - (g if g > 0.0 else 0.0)
        i = bisect_right(xs, g) - 1
        last = len(xs) - 1
        if i >= last:
            beta = self._beta
            if beta == 0.0:
                return 0.0, 0.0
            s = (1.0 - self._f[last]) * math.exp(-(g - xs[last]) / beta)
            return s, s * beta
        c = self._c[i]
        s = 1.0 - self._f[i] - c * math.log(g / xs[i])
        pe = c * (xs[i + 1] - g) + self._pe[i + 1]
        return s, pe - g * s

    def survival(self, g: float) -> float:
        """P(X > g)."""
        return self._at(g)[0]

    def cdf(self, x: float) -> float:
        return 1.0 - self._at(x)[0]

    def quantile(self, u: float) -> float:
        """The length at CDF level ``u`` in [0, 1)."""
        fs = self._f
        xs = self._x
        if u >= fs[-1]:
            beta = self._beta
            if beta == 0.0:
                return xs[-1]
            return xs[-1] - beta * math.log((1.0 - u) / (1.0 - fs[-1]))
        i = bisect_right(fs, u) - 1
        c = self._c[i]
        return xs[i] * math.exp((u - fs[i]) / c) if c != math.inf else xs[i + 1]

    # ---- what the policies use ---------------------------------------------

    def expected_remaining(self, generated: float) -> float:
        """E[X - g | X > g]: the mean length still to come for a job that has produced
        ``g`` tokens and not ended (0 when the distribution says it cannot still run)."""
        if generated <= 0:
            return self.mean
        s, ep = self._at(generated)
        if s <= 1e-12:
            return self._beta
        return ep / s

    def tail_inflated(self, generated: float = 0, kappa: float = RISK_KAPPA) -> float:
        """A risk-aware size: E[R] + ``kappa`` x (q90 - q50) of the remaining length R.

        After Zheng et al. 2026 (arXiv:2604.00499, "Tail Inflated Expectation"), who fit a
        heavy-tailed length distribution per request and order SJF by an expectation
        raised by the tail's weight: of two jobs with the same typical length, the one
        more likely to run long goes later, since holding a slot for a long run is what
        blocks the queue. Here the inflation is the spread between the conditional 0.9
        and 0.5 quantiles, which needs no parametric family."""
        g = generated if generated > 0 else 0.0
        s, ep = self._at(g)
        if s <= 1e-12:
            return self._beta
        f = 1.0 - s
        q50 = self.quantile(f + 0.5 * s)
        q90 = self.quantile(f + 0.9 * s)
        return ep / s + kappa * (q90 - q50)

    def gittins_key(self, generated: float) -> float:
        """1 / the Gittins index of a job that has run ``g`` tokens, in tokens.

        The index is the best ratio, over the candidate quanta (run to the next
        quantile ``x_j`` above ``g``, or to completion), of the chance to finish within
        the quantum to the expected work spent in it:
        ``max_j P(X <= x_j | X > g) / E[min(X, x_j) - g | X > g]``. Its inverse is an
        effective remaining size (at most E[X - g | X > g]); the smallest goes first. A
        job whose bulk of mass lies just ahead has a small key; one that has survived
        past its bulk only has the tail left and its key grows. In the exponential tail
        the hazard is constant, so the key is the tail's mean ``beta``."""
        g = generated if generated > 0 else 0.0
        s, ep = self._at(g)
        if s <= 1e-12:
            return self._beta
        best = ep / s  # run to completion
        xs = self._x
        fs = self._f
        eps = self._ep
        for j in range(bisect_right(xs, g), len(xs)):
            done = s - (1.0 - fs[j])  # P(g < X <= x_j)
            if done > 1e-12:
                key = (ep - eps[j]) / done
                if key < best:
                    best = key
        return best

    def __repr__(self) -> str:
        qs = ", ".join(f"{q:.0f}" for q in self.quantiles)
        return f"LengthDistribution([{qs}], mean={self.mean:.1f})"


def as_distribution(
    quantiles: Sequence[float] | LengthDistribution | None, cap: float = math.inf
) -> LengthDistribution | None:
    """The distribution of a prediction's quantiles, or None when there are none or they
    are unusable (then the point prediction is used: a bad distribution never fails a
    request)."""
    if quantiles is None:
        return None
    if isinstance(quantiles, LengthDistribution):
        if cap < quantiles.quantiles[-1]:
            return LengthDistribution(quantiles.quantiles, quantiles.levels, cap=cap)
        return quantiles
    if len(quantiles) != len(QUANTILE_LEVELS):
        return None
    try:
        return LengthDistribution(quantiles, cap=cap)
    except (DistributionError, ValueError, ZeroDivisionError, OverflowError):
        return None
