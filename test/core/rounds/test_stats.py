"""Paired statistics of the update gate, against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cdcca_ros.core.rounds.stats import PairedCounts, PairedScores, binom_sf


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


def test_paired_scores_of_right_wrong_are_the_paired_counts():
    old = np.array([1, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    new = np.array([1, 0, 1, 1, 1, 1, 0, 1], dtype=bool)
    c, s = PairedCounts.of(old, new), PairedScores.of(old, new)
    assert (s.n, s.fixed, s.broken) == (c.n, c.fixed, c.broken)
    assert s.gain == pytest.approx(c.gain)
    assert (s.old_accuracy, s.new_accuracy) == pytest.approx((c.old_accuracy, c.new_accuracy))
    assert (s.p_better(), s.p_worse()) == pytest.approx((c.p_better(), c.p_worse()))
    assert s.gain_interval() == pytest.approx(c.gain_interval())


def test_paired_scores_gain_is_the_mean_difference_and_the_test_a_sign_test():
    old = np.array([0.5, 0.2, 0.9, 0.4, 0.3])
    new = np.array([0.9, 0.2, 0.8, 1.0, 0.6])
    s = PairedScores.of(old, new)
    assert s.gain == pytest.approx(100 * (new - old).mean())
    assert (s.fixed, s.broken) == (3, 1)          # one tie
    assert s.p_better() == pytest.approx(binom_sf(3, 4))
    with pytest.raises(ValueError, match='finite'):
        PairedScores.of(np.array([np.nan]), np.array([1.0]))
