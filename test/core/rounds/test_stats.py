"""Paired statistics of the update gate, against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cdcca_ros.core.rounds.stats import PairedCounts, binom_sf


@pytest.mark.parametrize('k,n,expected', [
    (8, 10, 56 / 1024),          # C(10,8)+C(10,9)+C(10,10) = 45+10+1
    (0, 5, 1.0), (6, 5, 0.0), (5, 5, 1 / 32), (3, 4, 5 / 16)])
def test_binomial_tail_matches_the_hand_count(k, n, expected):
    assert binom_sf(k, n) == pytest.approx(expected, rel=1e-9)


def test_paired_counts_of_two_answer_vectors():
    old = np.array([1, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    new = np.array([1, 0, 1, 1, 1, 1, 0, 1], dtype=bool)
    c = PairedCounts.of(old, new)
    assert (c.n, c.old_right, c.new_right, c.fixed, c.broken) == (8, 4, 6, 3, 1)
    assert c.gain == pytest.approx(25.0)
    # McNemar: P(X >= 3 | n = 4) = 5/16; the reverse direction P(X >= 1 | 4) = 15/16.
    assert c.p_better() == pytest.approx(5 / 16)
    assert c.p_worse() == pytest.approx(15 / 16)
    lo, hi = c.gain_interval()
    d, var = 2 / 8, (4 / 8 - (2 / 8) ** 2) / 8
    assert (lo, hi) == pytest.approx((100 * (d - 1.96 * math.sqrt(var)),
                                      100 * (d + 1.96 * math.sqrt(var))))


def test_shapes_must_match():
    with pytest.raises(ValueError, match='shapes'):
        PairedCounts.of(np.zeros(3, bool), np.zeros(4, bool))
