"""Fair scheduling of due rounds: shares by weight, no starvation, late joiners, groups."""
from __future__ import annotations

from collections import Counter

import pytest

from cdcca_ros.core.fleet.grouping import MIXED, UplinkGroups
from cdcca_ros.core.fleet.scheduler import FairScheduler
from cdcca_ros.errors import ConfigError


def serve(sched, due, n, groups=None, group_max=1):
    served = Counter()
    for _ in range(n):
        for d in sched.pick(due, groups, group_max):
            served[d] += 1
    return served


def test_equal_devices_always_due_get_rounds_within_one_of_each_other():
    sched = FairScheduler()
    devices = [f'd{i}' for i in range(10)]
    served = serve(sched, devices, 95)
    assert max(served.values()) - min(served.values()) <= 1


def test_a_device_whose_rounds_keep_being_refused_gets_its_floor_share_not_more():
    sched = FairScheduler(floor=0.75)
    devices = [f'd{i}' for i in range(4)]
    for _ in range(3):
        sched.finished('d0', 'refused', 0.2)
    served = serve(sched, devices, 400)
    share = served['d0'] / served['d1']
    assert 0.7 <= share <= 0.85  # between floor and a little above it
    assert max(served.values()) / min(served.values()) <= 1 / 0.75 + 0.05
    sched.finished('d0', 'shipped', 0.2)  # a shipped round restores it
    assert sched.share('d0').refused_in_row == 0


def test_estimated_gain_sets_priority_within_the_floor():
    sched = FairScheduler(floor=0.5)
    sched.finished('easy', 'shipped', 0.95)   # the student already agrees with the teacher
    sched.finished('hard', 'shipped', 0.10)
    assert sched.weight('hard') > sched.weight('easy') >= 0.5
    served = serve(sched, ['easy', 'hard'], 200)
    assert served['hard'] > served['easy'] >= 0.5 * served['hard'] - 2


def test_a_device_that_joins_late_does_not_take_over_and_nobody_starves():
    sched = FairScheduler()
    old = [f'd{i}' for i in range(5)]
    serve(sched, old, 100)
    served = serve(sched, old + ['late'], 60)
    assert served['late'] <= 11 and min(served[d] for d in old) >= 9


def test_devices_of_one_group_ride_along_only_when_due_and_not_far_ahead():
    sched = FairScheduler()
    groups = {'a1': 'k5', 'a2': 'k5', 'a3': 'k5', 'b1': 'k3'}
    task = sched.pick(['a1', 'a2', 'a3', 'b1'], groups, group_max=2)
    assert len(task) == 2 and {groups[d] for d in task} == {'k5'}
    assert sched.pick(['b1'], groups, group_max=4) == ['b1']
    assert sched.pick([], groups) == []
    with pytest.raises(ConfigError):
        FairScheduler(floor=0.0)


def test_uplink_groups_follow_the_kept_token_count_audits_aside():
    groups = UplinkGroups(window=10, share=0.8)
    for _ in range(9):
        groups.observe('fixed', 5, full=False)
    groups.observe('fixed', 10, full=True)  # an audit sample
    for k in (2, 3, 4, 5, 6, 7, 2, 3):
        groups.observe('varies', k, full=False)
    assert groups.group('fixed') == 'k5'
    assert groups.group('varies') == MIXED
    assert groups.group('unseen') == 'new'
    assert groups.summary() == {'groups': {'k5': 1, 'mixed': 1}, 'devices': 2}
