"""Paired statistics for comparing two adapters on the same samples (no torch, no rclpy).

Two adapters answered the same ``n`` samples; each answer is right or wrong against a
reference. Only the discordant pairs carry information about which adapter is better:
``fixed`` (the new one right, the old one wrong) and ``broken`` (the reverse). Under "no
difference", ``fixed`` is Binomial(fixed + broken, 1/2): McNemar's exact test.

:class:`PairedScores` is the same comparison for a per-sample score instead of right/wrong (a
caption metric such as CIDEr-D against each sample's reference): ``gain`` is the mean score
difference in points (x100), ``fixed`` / ``broken`` count the samples the new adapter scores
higher / lower, and the test is the sign test on them -- McNemar's test is the sign test of
0/1 scores, so on right/wrong arrays both classes give the same figures. The gate
(:mod:`~cdcca_ros.core.rounds.gate`) takes either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def binom_sf(k: int, n: int, p: float = 0.5) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` (exact, in log space)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms)))


class Paired:
    """What the gate reads of a slice, for :class:`PairedCounts` and :class:`PairedScores`
    alike: everything follows from ``n``, ``fixed``, ``broken`` and the two totals."""

    n: int
    fixed: int
    broken: int

    @property
    def old_total(self) -> float:
        raise NotImplementedError

    @property
    def new_total(self) -> float:
        raise NotImplementedError

    @property
    def sq_diff(self) -> float:
        """Sum of the squared per-sample differences (for :meth:`gain_interval`)."""
        raise NotImplementedError

    @property
    def old_accuracy(self) -> float:
        """The old adapter's mean score (accuracy for right/wrong)."""
        return self.old_total / self.n if self.n else math.nan

    @property
    def new_accuracy(self) -> float:
        """The new adapter's mean score."""
        return self.new_total / self.n if self.n else math.nan

    @property
    def gain(self) -> float:
        """New minus old mean score, in points (0 for no samples)."""
        return 100.0 * (self.new_total - self.old_total) / self.n if self.n else 0.0

    def p_better(self) -> float:
        """One-sided exact sign-test (McNemar) p-value of "the new adapter is better"."""
        return binom_sf(self.fixed, self.fixed + self.broken)

    def p_worse(self) -> float:
        """One-sided exact sign-test (McNemar) p-value of "the new adapter is worse"."""
        return binom_sf(self.broken, self.fixed + self.broken)

    def gain_interval(self, z: float = 1.96) -> tuple[float, float]:
        """Approximate interval of :attr:`gain` (points), from the paired differences."""
        if not self.n:
            return (math.nan, math.nan)
        d = (self.new_total - self.old_total) / self.n
        var = (self.sq_diff / self.n - d * d) / self.n
        half = z * math.sqrt(max(var, 0.0))
        return (100.0 * (d - half), 100.0 * (d + half))

    def to_dict(self) -> dict[str, float | int]:
        lo, hi = self.gain_interval()
        return {'n': self.n, 'old': round(100.0 * self.old_accuracy, 2) if self.n else None,
                'new': round(100.0 * self.new_accuracy, 2) if self.n else None,
                'fixed': self.fixed, 'broken': self.broken, 'gain': round(self.gain, 2),
                'gain_ci95': [round(lo, 2), round(hi, 2)] if self.n else None,
                'p_better': round(self.p_better(), 5), 'p_worse': round(self.p_worse(), 5)}


@dataclass(frozen=True)
class PairedCounts(Paired):
    """How two adapters did on the same samples, right or wrong.

    Attributes:
        n: Samples.
        old_right: Samples the old adapter got right.
        new_right: Samples the new adapter got right.
        fixed: Right with the new adapter, wrong with the old.
        broken: Wrong with the new adapter, right with the old.
    """

    n: int
    old_right: int
    new_right: int
    fixed: int
    broken: int

    @classmethod
    def of(cls, old: np.ndarray, new: np.ndarray) -> PairedCounts:
        """Counts from two boolean arrays (right/wrong per sample, same order)."""
        old = np.asarray(old, dtype=bool)
        new = np.asarray(new, dtype=bool)
        if old.shape != new.shape:
            raise ValueError(f'paired results of different shapes {old.shape}, {new.shape}')
        return cls(n=int(old.size), old_right=int(old.sum()), new_right=int(new.sum()),
                   fixed=int((new & ~old).sum()), broken=int((old & ~new).sum()))

    @property
    def old_total(self) -> float:
        return float(self.old_right)

    @property
    def new_total(self) -> float:
        return float(self.new_right)

    @property
    def sq_diff(self) -> float:
        return float(self.fixed + self.broken)  # each discordant pair differs by 1


@dataclass(frozen=True)
class PairedScores(Paired):
    """How two adapters scored on the same samples (see the module docstring).

    Attributes:
        n: Samples.
        old_sum: Sum of the old adapter's scores.
        new_sum: Sum of the new adapter's scores.
        fixed: Samples the new adapter scores higher (by more than the tie tolerance).
        broken: Samples the new adapter scores lower.
        sq_sum: Sum of the squared per-sample differences.
    """

    n: int
    old_sum: float
    new_sum: float
    fixed: int
    broken: int
    sq_sum: float = 0.0

    @classmethod
    def of(cls, old: np.ndarray, new: np.ndarray, tie: float = 1e-9) -> PairedScores:
        """Scores from two per-sample score arrays (same order; points are ``100 x`` their
        unit); differences within ``tie`` count as neither fixed nor broken."""
        old = np.asarray(old, dtype=np.float64)
        new = np.asarray(new, dtype=np.float64)
        if old.shape != new.shape:
            raise ValueError(f'paired results of different shapes {old.shape}, {new.shape}')
        if not (np.isfinite(old).all() and np.isfinite(new).all()):
            raise ValueError('paired scores must be finite')
        d = new - old
        return cls(n=int(old.size), old_sum=float(old.sum()), new_sum=float(new.sum()),
                   fixed=int((d > tie).sum()), broken=int((d < -tie).sum()),
                   sq_sum=float((d * d).sum()))

    @property
    def old_total(self) -> float:
        return self.old_sum

    @property
    def new_total(self) -> float:
        return self.new_sum

    @property
    def sq_diff(self) -> float:
        return self.sq_sum
