"""Fair scheduling of due rounds: shares by weight, no starvation, late joiners, groups, and
a closed loop of devices that uplink at different rates (the fleet bench's, in simulated
time)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from cdcca_ros.core.fleet.grouping import MIXED, UplinkGroups
from cdcca_ros.core.fleet.scheduler import FairScheduler, task_size
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


def test_a_device_already_ahead_does_not_ride_along_with_one_behind_it():
    sched = FairScheduler()
    groups = {'a1': 'k5', 'a2': 'k5', 'b1': 'k3'}
    assert sched.pick(['a2'], groups, group_max=2) == ['a2']  # a2 was due first: one round
    # a1 and b1 have had none; a2 (one round, one virtual round ahead) must wait its turn.
    # (It rode along before: a2 had 2 rounds while b1 had none.)
    assert sched.pick(['a1', 'a2', 'b1'], groups, group_max=2) == ['a1']
    assert sched.pick(['a2', 'b1'], groups, group_max=2) == ['b1']
    assert sched.pick(['a1', 'a2'], groups, group_max=2) == ['a1', 'a2']  # level: together


def closed_loop(sched, n=64, workers=2, task_s=0.4, rider_s=0.2, horizon_s=900.0, seed=0,
                group_max=4, refused=()):
    """The fleet bench's closed loop in simulated time: device ``i`` is due ``period[i]``
    seconds (its uplink burst: 8-13 s, rates differ by 1.65x) after its last round came back,
    a task takes ``task_s`` plus ``rider_s`` per rider, three uplink groups. Rounds per
    device."""
    rng = random.Random(seed)
    period = {f'd{i:03d}': rng.uniform(8.0, 13.25) for i in range(n)}
    groups = {d: f'k{i % 3}' for i, d in enumerate(period)}
    due_at = {d: rng.uniform(0.0, p) for d, p in period.items()}
    served = Counter({d: 0 for d in period})
    free = [0.0] * workers
    running: list[tuple[float, str]] = []
    t = 0.0
    while t < horizon_s:
        w = min(range(workers), key=free.__getitem__)
        t = max(t, free[w])
        for end, d in [r for r in running if r[0] <= t]:
            running.remove((end, d))
            served[d] += 1
            due_at[d] = end + period[d]
            sched.finished(d, 'refused' if d in refused else 'shipped', 0.5)
        due = [d for d, at in due_at.items() if at is not None and at <= t]
        ids = sched.pick(due, groups, group_max)
        if not ids:  # idle until the next device is due or the next task ends
            free[w] = min([at for at in due_at.values() if at is not None and at > t]
                          + [end for end, _ in running if end > t] + [t + 0.01])
            continue
        end = t + task_s + rider_s * (len(ids) - 1)
        for d in ids:
            due_at[d] = None
            running.append((end, d))
        free[w] = end
    return served


def test_in_a_busy_closed_loop_fast_uplinkers_do_not_pull_away():
    # 64 devices on 2 workers: more rounds due than workers most of the time. Devices that
    # uplink faster are due more often; with riders allowed ahead they got 1.44x the rounds
    # of the slowest (this test failed at 1.43-1.45 over seeds 0-3).
    for seed in range(2):
        served = closed_loop(FairScheduler(), seed=seed)
        assert min(served.values()) >= 25, 'the loop did not run'
        assert max(served.values()) / min(served.values()) <= 1.3, (seed, served)


def test_in_a_busy_closed_loop_refused_devices_get_less_but_never_starve():
    refused = {'d000', 'd001', 'd002', 'd003'}
    served = closed_loop(FairScheduler(floor=0.75), n=24, workers=1, task_s=0.5,
                         rider_s=0.25, refused=refused)
    others = [v for d, v in served.items() if d not in refused]
    mean = sum(others) / len(others)
    for d in refused:
        assert 0.7 * mean <= served[d] <= 1.05 * mean, (d, served[d], mean)


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


@pytest.mark.parametrize(('due', 'free', 'group_max', 'size'), [
    (8, 1, 4, 4),   # one free worker: a full group rides along (one teacher batch)
    (4, 2, 4, 2),   # two free workers: the riders are split, neither worker idles
    (3, 2, 4, 2),
    (1, 2, 4, 1),
    (8, 2, 1, 1),   # no riders at all
    (0, 2, 4, 1),
])
def test_a_task_never_takes_the_devices_a_free_worker_could_run(due, free, group_max, size):
    assert task_size(due, free, group_max) == size


def test_task_size_refuses_a_group_max_below_one():
    with pytest.raises(ConfigError):
        task_size(3, 1, 0)
