"""A student worker on the store: rounds commit once, retries return the committed result,
a task that dies mid-round loses nothing (no Ray here: the teacher runs in this process)."""
from __future__ import annotations

import pytest
import torch
from fleet_helpers import short_round  # noqa: E402

from cdcca_ros.core.fleet.store import DirectoryStore
from cdcca_ros.core.fleet.teacher import LocalTeacherClient, TeacherProxy
from cdcca_ros.core.fleet.worker import RoundWorker
from cdcca_ros.core.updates import DeltaEnvelope, DeltaGate
from cdcca_ros.core.wire import generate_keypair


@pytest.fixture(scope='module')
def parts(tiny_dirs):
    from cdcca_ros.models import bundled

    teacher = bundled.load(tiny_dirs['teacher'])
    private, public = generate_keypair()
    return teacher, private, public, tiny_dirs['student']


def make_worker(parts, store, **cfg):
    from cdcca_ros.models import bundled

    teacher, private, _, student_dir = parts
    student = bundled.load(student_dir)
    proxy = TeacherProxy(LocalTeacherClient(teacher), student.vision_space())
    return RoundWorker(student, proxy, private, short_round(**cfg), store)


def uplink(store, device, first, rows, tiny_tokens, number=None, keep=8):
    """What the engine's add_sample writes: kept tokens and their indices, in the inbox."""
    tokens, questions, space = tiny_tokens
    for j, row in enumerate(rows):
        gen = torch.Generator().manual_seed(row)
        idx = torch.randperm(space.num_tokens, generator=gen)[:keep].sort().values
        store.put_sample(device, (number if number is not None else first) + j,
                         tokens[row][idx], idx,
                         {'sample_id': f'{device}-{row}', 'question': questions[row],
                          'num_tokens': space.num_tokens, 'token_dim': space.dim})


def record_ids(store, device):
    from cdcca_ros.core.rounds.memory import Record

    return sorted(Record.from_bytes(p.read_bytes()).sample_id
                  for p in (store.device_dir(device) / 'memory').glob('*.safetensors'))


def test_a_round_commits_once_and_a_retry_returns_the_committed_delta(parts, tiny_tokens,
                                                                      tmp_path):
    store = DirectoryStore(tmp_path)
    worker = make_worker(parts, store)
    uplink(store, 'r1', 0, range(6), tiny_tokens)
    [out] = worker.run([{'device_id': 'r1', 'ticket': 't1'}])
    assert out['outcome'] == 'shipped' and not out['replayed'], out
    assert out['applied']['samples'] == 6 and out['inbox_upto'] == 5
    head = store.head('r1')
    assert (head.gen, head.ticket) == (1, 't1') and store.inbox('r1') == []
    envelope = DeltaEnvelope.decode(out['envelope'])
    assert (envelope.base_version, envelope.new_version) == (0, 1)
    # The device takes it: the cloud signed it against the base the device holds.
    _, _, public, student_dir = parts
    from cdcca_ros.models import bundled

    base = bundled.load(student_dir).trainable_state_dict()
    from cdcca_ros.core.wire import state_dict_hash

    gate = DeltaGate('r1', public, 0, state_dict_hash(base), base)
    gate.accept(envelope)
    # The worker answering t1 died after its commit: the retry gets the same delta, and no
    # second generation is made.
    other = make_worker(parts, store)
    [again] = other.run([{'device_id': 'r1', 'ticket': 't1'}])
    assert again['replayed'] and again['envelope'] == out['envelope']
    assert store.head('r1').gen == 1
    assert record_ids(store, 'r1') == sorted(f'r1-{i}' for i in range(6))


def test_a_task_that_dies_mid_round_loses_nothing(parts, tiny_tokens, tmp_path):
    store = DirectoryStore(tmp_path)
    uplink(store, 'r1', 0, range(6), tiny_tokens)
    [first] = make_worker(parts, store).run([{'device_id': 'r1', 'ticket': 't1'}])
    uplink(store, 'r1', 6, range(6, 12), tiny_tokens)
    # A worker takes t2: it applies the inbox to the memory and labels, then is killed.
    doomed = make_worker(parts, store)
    item = doomed._open({'device_id': 'r1', 'ticket': 't2'})
    doomed._prepare_together([item])
    assert item.applied['samples'] == 6 and store.head('r1').gen == 1
    # The retry on another worker: one commit, on the committed generation, every sample.
    [out] = make_worker(parts, store).run([{'device_id': 'r1', 'ticket': 't2'}])
    assert out['outcome'] == 'shipped' and not out['replayed']
    env = DeltaEnvelope.decode(out['envelope'])
    assert (env.base_version, env.new_version) == (1, 2)
    assert env.base_hash == DeltaEnvelope.decode(first['envelope']).new_hash
    assert store.head('r1').gen == 2 and store.inbox('r1') == []
    assert record_ids(store, 'r1') == sorted(f'r1-{i}' for i in range(12))
    assert out['applied']['duplicates'] == 6  # what the dead task had added, taken once
    assert not item.new_dir.exists()  # its half-written generation is gone


def test_one_task_serves_a_group_and_mirrors_reports_and_counts_bad_entries(parts, tiny_tokens,
                                                                           tmp_path):
    store = DirectoryStore(tmp_path)
    uplink(store, 'r1', 0, range(5), tiny_tokens)
    uplink(store, 'r2', 0, range(10, 15), tiny_tokens)
    store.put_control('r2', 5, 'rolled_back', {'version': 7, 'hash': 'unknown'})
    (store.device_dir('r2') / 'inbox' / f'{6:016d}-sample').write_bytes(b'torn')
    worker = make_worker(parts, store)
    out = worker.run([{'device_id': 'r1', 'ticket': 'a'}, {'device_id': 'r2', 'ticket': 'b'}])
    assert [o['outcome'] for o in out] == ['shipped', 'shipped']
    # Both devices' samples stack (8 kept tokens each): one label request, one for targets.
    teacher = worker.runtime.teacher.client.batcher.report()
    assert teacher['label']['requests'] == 1 and teacher['label']['samples'] == 10
    assert teacher['targets']['requests'] == 1
    assert out[1]['mirrors'] == [{'version': 7, 'hash': 'unknown', 'ok': False}]
    assert out[1]['applied']['unreadable'] == 1 and out[1]['inbox_upto'] == 6
    assert store.inbox('r2') == []
    assert not worker.runtime.devices  # states dropped after the task: only adapters swap
