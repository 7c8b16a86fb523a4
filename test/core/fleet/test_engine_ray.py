"""The fleet on real Ray (a local cluster started by the engine): three devices, two student
workers, one teacher service; a worker SIGKILLed mid-round loses nothing, its round is run
once by the other worker (the killed device gets exactly one delta per version), and the
killed worker comes back. One Ray runtime for the module (it costs seconds to start)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from fleet_helpers import short_round  # noqa: E402

from cdcca_ros.core.fleet.engine import FleetEngine, FleetOptions, RoundDone, WorkerChanged
from cdcca_ros.core.updates import DeltaGate
from cdcca_ros.core.wire import generate_keypair, state_dict_hash

pytest.importorskip('ray')

DEVICES = ('r0', 'r1', 'r2')


@pytest.fixture(scope='module')
def keys():
    return generate_keypair()


@pytest.fixture(scope='module')
def fleet(tiny_dirs, tmp_path_factory, keys):
    from cdcca_ros.models import bundled

    private, public = keys
    # Rounds long enough (100 steps) to be killed in the middle of one.
    engine = FleetEngine(tiny_dirs['teacher'], tiny_dirs['student'], 'cpu', None, private,
                         short_round(steps=100, min_samples=4), 'none',
                         FleetOptions(workers=2, store=str(tmp_path_factory.mktemp('store')),
                                      group_max=1))
    base = bundled.load(tiny_dirs['student']).trainable_state_dict()
    gates = {d: DeltaGate(d, public, 0, state_dict_hash(base), base) for d in DEVICES}
    try:
        yield engine, gates
    finally:
        engine.close()


def uplink(engine, device, rows, tiny_tokens):
    tokens, questions, space = tiny_tokens
    for row in rows:
        idx = torch.randperm(space.num_tokens,
                             generator=torch.Generator().manual_seed(row))[:8].sort().values
        assert engine.add_sample(device, tokens[row][idx], idx, questions[row],
                                 space.num_tokens, space.dim, f'{device}-{row}')


def apply(gates, event):
    """The device's side: verify and take the delta (a duplicate or a delta for another base
    would be refused here)."""
    env = event.result.envelope
    gate = gates[event.device_id]
    gate.accept(env)
    gate.commit(env.new_version, env.new_hash)


def run_until(engine, done, want, timeout, on_poll=None):
    events = []
    deadline = time.monotonic() + timeout
    while len(done) < want and time.monotonic() < deadline:
        for event in engine.poll(timeout=0.1):
            events.append(event)
            if isinstance(event, RoundDone):
                done.append(event)
        if on_poll is not None:
            on_poll()
    return events


def test_rounds_of_three_devices_ship_one_signed_delta_each(fleet, tiny_tokens):
    engine, gates = fleet
    for n, device in enumerate(DEVICES):
        uplink(engine, device, range(5 * n, 5 * n + 5), tiny_tokens)
    assert not engine.add_sample(DEVICES[0], *_again(tiny_tokens, 0))  # a re-delivery
    # Due and not yet started: all three (nothing polled yet); none after their rounds.
    assert engine.queue() == (3, 0)
    done: list[RoundDone] = []
    run_until(engine, done, 3, 180.0)
    assert sorted(e.device_id for e in done) == list(DEVICES), engine.figures()
    assert engine.queue() == (0, 0)
    for event in done:
        assert event.result.outcome == 'shipped' and event.attempts == 1
        apply(gates, event)
        assert engine.device(event.device_id).version == 1
        assert engine.status(event.device_id)['pending'] == 0
    teacher = engine.teacher_report()[0]
    assert teacher['label']['samples'] == 15 and teacher['targets']['samples'] >= 3
    # Each actor holds one CPU: one torch thread (two would fight the other actor's core).
    actors = engine.actors()
    assert [a['threads']['intra'] for a in actors['workers'] + actors['teachers']] == [1, 1, 1]
    assert [a['pid'] for a in actors['workers']] == [s.pid for s in engine.slots]


def _again(tiny_tokens, row):
    tokens, questions, space = tiny_tokens
    idx = torch.arange(8)
    return (tokens[row][idx], idx, questions[row], space.num_tokens, space.dim, f'r0-{row}')


def test_a_worker_killed_mid_round_loses_nothing_and_duplicates_nothing(fleet, tiny_tokens):
    engine, gates = fleet
    for n, device in enumerate(DEVICES):
        uplink(engine, device, range(20 + 5 * n, 25 + 5 * n), tiny_tokens)
    killed: dict[str, object] = {}

    def kill_mid_round():
        if killed:
            return
        for device in DEVICES:
            marker = engine.store.device_dir(device) / 'running.json'
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if info['phase'] == 'round':  # state loaded, samples applied, training now
                os.kill(info['pid'], signal.SIGKILL)
                killed.update(device=device, pid=info['pid'], t=time.monotonic())
                return

    done: list[RoundDone] = []
    events = run_until(engine, done, 3, 300.0, on_poll=kill_mid_round)
    assert killed, 'no round was seen in progress'
    # Seen by the engine itself (the process is gone) before Ray's report (~2 s later).
    died = [e for e in events if isinstance(e, WorkerChanged) and not e.alive]
    assert died and 'is gone' in died[0].message, died
    assert sorted(e.device_id for e in done) == list(DEVICES), engine.figures()
    for event in done:  # one delta per device, v1 -> v2, on the base the device holds
        apply(gates, event)
        assert (event.result.envelope.base_version, event.result.envelope.new_version) == (1, 2)
    victim = next(e for e in done if e.device_id == killed['device'])
    assert victim.attempts == 2 and not victim.replayed
    assert victim.done_t - killed['t'] < 120.0  # bounded: another worker ran it
    # Nothing lost: every uplinked sample is in its device's memory, each once.
    from cdcca_ros.core.rounds.memory import Record

    for n, device in enumerate(DEVICES):
        ids = [Record.from_bytes(p.read_bytes()).sample_id
               for p in (engine.store.device_dir(device) / 'memory').glob('*.safetensors')]
        want = {f'{device}-{r}' for r in list(range(5 * n, 5 * n + 5))
                + list(range(20 + 5 * n, 25 + 5 * n))}
        assert sorted(ids) == sorted(want)
        assert engine.store.head(device).gen == 2
    assert engine.counters['duplicates_suppressed'] == 0 and engine.counters['retried'] >= 1
    # The killed worker is restarted by Ray (its bundle kept) and serves again.
    assert engine.wait_workers(120.0)
    assert killed['pid'] not in {s.pid for s in engine.slots}


def test_open_loop_devices_uplink_while_their_rounds_run_and_hold_a_full_round(
        fleet, keys, tiny_dirs):
    """The fleet bench's open-loop robots (bench/fleet_sim.py) on this engine: they uplink
    while their rounds run, and hold back while a full round of theirs waits untaken, so no
    round grows past about min_samples however far the workers fall behind."""
    from cdcca_ros.bench.common import model_image_size
    from cdcca_ros.bench.fleet_sim import FleetRun, SimDevice, TokenPool, make_profiles
    from cdcca_ros.models import bundled

    engine, _ = fleet
    assert engine.wait_workers(120.0)
    student = bundled.load(tiny_dirs['student'])
    pool = TokenPool.build(student, 0, 4, model_image_size(student, 64), start=1_900_000)
    base = student.trainable_state_dict()
    burst = engine.cfg.min_samples
    # 40 samples a second: a round's worth in 0.1 s, far faster than a 100-step round.
    profiles = make_profiles(2, 0, pool.space.num_tokens, (40.0, 40.0), pool.domains)
    for p in profiles:
        p.device_id = p.device_id.replace('robot', 'open')
    sims = [SimDevice(p, pool, burst, keys[1], base, state_dict_hash(base)) for p in profiles]
    rec = FleetRun(engine, sims, rounds=2, max_s=240.0, presend=0.0, log=lambda _: None,
                   uplink='open').run('open')
    assert rec.cutoff is not None and min(rec.served_at_cutoff.values()) >= 2
    assert rec.owed_after_drain == 0 and rec.samples_lost == 0
    assert rec.sent_while_running > 0 and rec.samples_held > 0
    for dev in sims:  # never more than the rounds served and one more round's worth ahead
        assert dev.sent <= burst * (dev.served + 2), (dev.sent, dev.served)
        assert dev.counts['duplicate'] == dev.counts['rejected'] == 0
