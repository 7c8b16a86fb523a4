"""The fleet bench's figures from a phase's records (the phases themselves run Ray: the
engine's fault test, test/core/fleet/test_engine_ray.py, runs a worker kill on real Ray)."""
from __future__ import annotations

import pytest

from cdcca_ros.bench.fleet import _round_config, kill_figures, phase_figures, refusal_kind
from cdcca_ros.bench.fleet_sim import PhaseRecord, machine_cpu_s, process_cpu_s


def round_row(device, trigger, dispatch, done, outcome='refused', attempts=1, delta=None,
              reason='new data gains +0.0 points on 6 held-out samples (p=1.000; ...)'):
    row = {'device': device, 'trigger': trigger, 'dispatch': dispatch, 'done': done,
           'outcome': outcome, 'attempts': attempts, 'reason': reason}
    if delta is not None:
        row['delta'] = delta
    return row


def phase() -> PhaseRecord:
    rec = PhaseRecord('w2', workers=2, devices=3)
    rec.rounds = [
        round_row('a', 0.0, 0.0, 1.0),
        round_row('b', 0.0, 0.0, 1.2, reason='anchor would be 2.2 points below the base '
                                              'student (budget 1.5)'),
        round_row('c', 0.5, 1.0, 2.0, outcome='shipped', delta='applied', reason='new data'),
        round_row('a', 3.0, 3.0, 4.0, outcome='shipped', delta='applied', reason='new data'),
        round_row('b', 3.5, 4.0, 5.0),
        round_row('c', 4.0, 5.0, 9.0, attempts=2),  # its worker killed at 5.5
    ]
    rec.due = [(0.0, 3, 0), (1.0, 1, 2), (2.0, 0, 1), (4.0, 1, 2)]
    rec.cutoff, rec.served_at_cutoff = 9.0, {'a': 2, 'b': 2, 'c': 1}
    return rec


def test_phase_figures_count_every_round_answered_and_only_deltas_taken():
    f = phase_figures(phase())
    assert f['fairness'] == 2.0 and (f['served_min'], f['served_max']) == (1, 2)
    # trigger->delta: shipped rounds whose delta the device took; ->result: every round.
    assert f['deltas_applied'] == 2
    assert f['trigger_to_delta_p50_s'] == pytest.approx(1.0)
    assert f['trigger_to_delta_p99_s'] == pytest.approx(1.5)
    assert f['trigger_to_result_p99_s'] == pytest.approx(5.0)
    assert f['outcomes'] == {'refused': 4, 'shipped': 2}
    assert f['refusals'] == {'no_significant_gain': 3, 'anchor_fell': 1}
    assert f['contended_share'] == pytest.approx(0.5)  # due work and every worker busy


def test_throughput_counts_the_saturated_window_and_not_the_drain():
    f = phase_figures(phase())
    # Work for both workers from 0 s to 4 s (the last sample with due + busy >= 2): 4 rounds
    # done in it. The drain to the cutoff at 9 s (one slow round) counts only in to_last.
    assert f['window_s'] == pytest.approx(4.0) and f['rounds_in_window'] == 4
    assert f['rounds_per_min'] == pytest.approx(60.0)
    assert f['rounds_per_min_to_last'] == pytest.approx(60.0 * 6 / 9.0)


def test_kill_figures_time_the_victims_round_and_never_count_a_restart_not_seen():
    rec = phase()
    rec.kill = {'t': 5.5, 'worker': 1, 'devices': ['c'], 'in_round_s': 0.5,
                'detected_t': 5.9}  # the worker was never seen back
    k = kill_figures(rec, phase_figures(rec))
    assert k['recover_s'] == pytest.approx(3.5) and k['detect_s'] == pytest.approx(0.4)
    assert k['restart_s'] is None and k['lost_tickets'] == 0
    # task p50 over the phase is 1.0 s: the victim's round took 4.0 s, 3 rounds of delay.
    assert k['kill_delay_rounds'] == pytest.approx(3.0)
    rec.kill['devices'] = ['c', 'd']  # a device whose round never came back: lost
    assert kill_figures(rec, phase_figures(rec))['lost_tickets'] == 1


def test_refusal_reasons_are_classified_from_the_gates_text():
    assert refusal_kind('replay/2 falls by 3.1 points (4 broken, 1 fixed of 40)') == 'replay_fell'
    assert refusal_kind('anchor falls by 2.0 points (3 broken, 0 fixed of 77)') == 'anchor_fell'
    assert refusal_kind(None) == 'other'


def test_round_settings_keep_the_light_profile_under_cloud_overrides():
    # An override of one parameter once brought every cloud_node default back (min_samples
    # 64, 300 steps, 150 refit steps) under the light profile and the devices' 16-sample
    # bursts: rounds came due only after round.max_wait_s and cost 3x.
    cfg = _round_config('light', 16, ['guard.alpha=0.2'])
    assert cfg.min_samples == 16 and cfg.max_wait_s == 3600.0
    assert (cfg.guard.train.max_steps, cfg.refit.steps) == (12, 0)
    assert cfg.guard.gate.alpha == pytest.approx(0.2)
    assert _round_config('light', 16, ['guard.max_steps=40']).guard.train.max_steps == 40
    assert _round_config('node', 16).guard.train.max_steps == 300


def test_cpu_figures_say_how_much_of_a_core_each_worker_got():
    rec = phase()  # 2 workers
    rec.cpu = {'workers': 12.0, 'teacher': 1.0, 'driver': 0.5, 'machine': 17.5,
               'wall_s': 10.0, 'rounds': 6}
    cpu = phase_figures(rec)['cpu']
    assert cpu['core_share_per_worker'] == pytest.approx(0.6)
    assert cpu['worker_cpu_s_per_round'] == pytest.approx(2.0)
    assert cpu['others_cores'] == pytest.approx(0.4)  # 17.5 - 13.5 over 10 s
    rec.cpu['workers'] = None  # a worker killed: its seconds are lost, not guessed
    assert phase_figures(rec)['cpu']['core_share_per_worker'] is None


def test_cpu_seconds_come_from_proc():
    import os
    import time

    me, machine = process_cpu_s(os.getpid()), machine_cpu_s()
    # Some work of this process, until both clocks tick (10 ms; on a loaded machine a short
    # burst can fall between two ticks, and /proc/stat's total may lag the process's own
    # count by a tick), at most ~2 s of it.
    deadline = time.process_time() + 2.0
    while ((process_cpu_s(os.getpid()) <= me or machine_cpu_s() <= machine)
           and time.process_time() < deadline):
        sum(i * i for i in range(100_000))
    assert process_cpu_s(os.getpid()) > me and machine_cpu_s() > machine
    assert process_cpu_s(2 ** 22 + 12345) is None  # beyond pid_max: no such process
