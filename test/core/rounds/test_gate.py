"""The update gate's rule on paired counts (no models)."""
from __future__ import annotations

import pytest

from cdcca_ros.core.rounds.gate import ANCHOR, NEW, GateConfig
from cdcca_ros.core.rounds.stats import PairedCounts
from cdcca_ros.errors import ConfigError


def counts(n: int, fixed: int, broken: int, old_right: int | None = None) -> PairedCounts:
    old = n // 2 if old_right is None else old_right
    return PairedCounts(n=n, old_right=old, new_right=old + fixed - broken, fixed=fixed,
                        broken=broken)


def test_a_significant_gain_ships():
    d = GateConfig().decide({NEW: counts(40, 10, 1), ANCHOR: counts(300, 1, 1)})
    assert d.ship and 'no slice falls' in d.reason


def test_a_gain_that_could_be_noise_is_refused():
    # 4 fixed, 1 broken: p = P(X >= 4 | 5) = 6/32 > 0.05.
    d = GateConfig().decide({NEW: counts(40, 4, 1)})
    assert not d.ship and 'p=0.188' in d.reason
    assert not d.harmful  # too little gain: training goes on, no reset


def test_no_held_out_new_data_is_refused():
    assert not GateConfig().decide({NEW: counts(0, 0, 0)}).ship
    assert not GateConfig().decide({}).ship


def test_the_anchor_falling_refuses_even_a_big_gain():
    d = GateConfig().decide({NEW: counts(60, 30, 0), ANCHOR: counts(300, 0, 5)})
    assert not d.ship and d.reason.startswith('anchor falls by 1.7 points')
    assert d.harmful


def test_a_lenient_anchor_lets_one_or_two_flipped_answers_pass():
    # 2 net broken of 100 is 2 points but not more than anchor_min_broken = 2 samples.
    lenient = GateConfig(anchor_tolerance=1.0, anchor_min_broken=2)
    assert lenient.decide({NEW: counts(60, 30, 0), ANCHOR: counts(100, 0, 2)}).ship
    # Held strictly, one answer lost net refuses.
    strict = GateConfig(anchor_tolerance=0.0, anchor_min_broken=0)
    d = strict.decide({NEW: counts(60, 30, 0), ANCHOR: counts(300, 0, 1)})
    assert not d.ship and d.harmful and d.reason.startswith('anchor falls by 0.3 points')


def test_a_strict_anchor_refuses_any_net_loss_and_leaves_replay_slices_alone():
    strict = GateConfig(anchor_tolerance=0.0, anchor_min_broken=0)
    d = strict.decide({NEW: counts(60, 30, 0), ANCHOR: counts(300, 1, 2)})
    assert not d.ship and d.reason.startswith('anchor falls by 0.3 points (2 broken, 1 fixed')
    assert strict.decide({NEW: counts(60, 30, 0), ANCHOR: counts(300, 2, 2)}).ship
    # Replay slices keep min_broken = 2: one net broken replay answer is no fall.
    assert strict.decide({NEW: counts(60, 30, 0), 'replay/0': counts(50, 0, 1),
                          ANCHOR: counts(300, 0, 0)}).ship


def test_a_replay_slice_falls_only_when_the_loss_is_not_noise():
    # 8 broken, 5 fixed of 80: 3.75 points but p_worse = 0.29 -> noise, ships.
    assert GateConfig().decide({NEW: counts(60, 30, 0), 'replay/0': counts(80, 5, 8)}).ship
    # 10 broken, 0 fixed of 80: 12.5 points, p_worse ~ 0.001 -> falls.
    d = GateConfig().decide({NEW: counts(60, 30, 0), 'replay/0': counts(80, 0, 10)})
    assert not d.ship and 'replay/0 falls' in d.reason
    assert d.harmful


def test_the_anchor_budget_is_cumulative_against_the_base():
    # The current adapter answers 280 of 300 anchors (93.3%), already 1.7 points below the
    # base (95%); a candidate losing 3 more net samples (92.3%, 2.7 below) exceeds the
    # budget of 2 points although its own fall (1 point) is within the per-update tolerance.
    base = 0.95
    anchor = counts(300, 3, 6, old_right=280)  # current 93.3%, candidate 92.3%
    lenient = {'anchor_tolerance': 1.0, 'anchor_min_broken': 3}  # the per-update rule passes
    gate = GateConfig(anchor_budget=2.0, **lenient)
    d = gate.decide({NEW: counts(60, 30, 0), ANCHOR: anchor}, anchor_base=base)
    assert not d.ship and 'below the base student' in d.reason
    assert d.harmful
    # A candidate that improves the anchor over the current one may pass the budget check.
    better = counts(300, 6, 3, old_right=280)
    assert gate.decide({NEW: counts(60, 30, 0), ANCHOR: better}, anchor_base=base).ship
    # Under the default budget (3 points) 2.7 points below the base is within it.
    assert GateConfig(**lenient).decide({NEW: counts(60, 30, 0), ANCHOR: anchor},
                                        anchor_base=base).ship


def test_disabled_gate_ships_everything():
    assert GateConfig(enabled=False).decide({NEW: counts(10, 0, 10)}).ship


@pytest.mark.parametrize('field,value', [('alpha', 0.0), ('alpha', 1.0), ('min_gain', -1.0),
                                         ('tolerance', float('nan')), ('harm_alpha', 0.0),
                                         ('min_slice', 0), ('anchor_min_broken', -1),
                                         ('big_fall', -1.0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ConfigError):
        GateConfig(**{field: value})


def test_the_gain_on_all_the_devices_data_ships_what_new_data_alone_cannot_show():
    from cdcca_ros.core.rounds.gate import DEVICE

    # Three new held-out samples since the last update cannot be significant; the device's
    # held-out data as a whole (new + replay) can.
    slices = {NEW: counts(3, 1, 0), 'replay/0': counts(60, 9, 1), DEVICE: counts(63, 10, 1),
              ANCHOR: counts(300, 0, 0)}
    assert GateConfig(gain_on='device').decide(slices).ship
    only_new = GateConfig().decide(slices)
    assert not only_new.ship and only_new.reason.startswith('new data gains')
    # On 'device', new data falling significantly still refuses (it is a harm slice then).
    d = GateConfig(gain_on='device').decide({**slices, NEW: counts(40, 0, 8),
                                              DEVICE: counts(100, 30, 9)})
    assert not d.ship and d.reason.startswith('new falls') and d.harmful
    with pytest.raises(ConfigError):
        GateConfig(gain_on='everything')


def test_a_gain_on_the_whole_new_data_does_not_hide_a_scene_that_falls():
    # The new data gains overall (30 fixed, 12 broken), but one of its clusters holds the
    # breaks: an update learnt on one shift breaking another that went up in the same stretch.
    slices = {NEW: counts(230, 30, 12), f'{NEW}/0': counts(150, 30, 1),
              f'{NEW}/3': counts(60, 0, 11)}
    d = GateConfig().decide(slices)
    assert not d.ship and d.harmful and d.reason.startswith('new/3 falls by 18.3 points')
    del slices[f'{NEW}/3']
    assert GateConfig().decide(slices).ship


def test_harm_tests_over_many_slices_are_corrected_together():
    # (big_fall 0: every slice inside the correction.)
    # One of eight replay slices loses 10, wins 5 of 100: 5 points, p_worse = 0.15. Tested
    # alone at harm_alpha = 0.2 it falls; among eight (Holm: its level is 0.2 / 8) it does not.
    quiet = {f'replay/{c}': counts(100, 3, 3) for c in range(1, 8)}
    slices = {NEW: counts(60, 30, 0), 'replay/0': counts(100, 5, 10), **quiet}
    assert GateConfig(big_fall=0.0).decide(slices).ship
    d = GateConfig(harm_correction='none').decide(slices)
    assert not d.ship and d.reason.startswith('replay/0 falls by 5.0 points')
    # A sure fall (6 broken, 0 fixed: p = 0.016 < 0.2 / 8) still refuses, and so does a
    # second one in the step-down (its level is 0.2 / 7), but not a slice after a miss.
    sure = {**slices, 'replay/0': counts(100, 0, 6), 'replay/1': counts(100, 0, 6)}
    assert GateConfig(big_fall=0.0).fallen(sure, skip=(NEW,)) == ['replay/0', 'replay/1']
    sure['replay/1'] = counts(100, 2, 9)  # p = 0.033 > 0.2 / 7: not rejected ...
    assert GateConfig(big_fall=0.0).fallen(sure, skip=(NEW,)) == ['replay/0']
    # ... unless its 7 points are past big_fall (5): then it is tested at 0.2 alone.
    assert GateConfig(big_fall=5.0).fallen(sure, skip=(NEW,)) == ['replay/0', 'replay/1']
    with pytest.raises(ConfigError):
        GateConfig(harm_correction='bonferroni')


def test_a_big_fall_is_tested_alone_outside_the_correction():
    # One of eight replay slices loses 16, wins 7 of 100: 9 points, p_worse = 0.047. Among
    # eight, Holm tests it at 0.2 / 8 and it hides; past big_fall (here 5 points) it is tested
    # at harm_alpha alone and refuses.
    quiet = {f'replay/{c}': counts(100, 3, 3) for c in range(1, 8)}
    slices = {NEW: counts(60, 30, 0), 'replay/0': counts(100, 7, 16), **quiet}
    assert GateConfig(big_fall=0.0).decide(slices).ship  # big_fall 0: inside it
    assert GateConfig().big_fall == 5.0  # the default
    d = GateConfig(big_fall=5.0).decide(slices)
    assert not d.ship and d.harmful and d.reason.startswith('replay/0 falls by 9.0 points')
    # A big fall that could well be noise (6 broken, 3 fixed of 30: p = 0.25) still ships,
    # and a small one stays inside the correction.
    assert GateConfig(big_fall=5.0).decide({**slices, 'replay/0': counts(30, 3, 6)}).ship
    assert GateConfig(big_fall=10.0).decide(slices).ship
