"""The replay memory: splits, bounds, clusters, persistence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.core.rounds.memory import Memory, Record, kmeans, split_of
from cdcca_ros.errors import ConfigError


def record(i: int, shift: float = 0.0, k: int = 4, dim: int = 8) -> Record:
    gen = torch.Generator().manual_seed(i)
    tokens = (torch.randn(k, dim, generator=gen) + shift).to(torch.float16)
    return Record(sample_id=f'r{i}', seq=-1, tokens=tokens,
                  indices=torch.arange(k) * 2, question=f'q{i}?', label=f'a{i}',
                  labelled=True, confidence=0.9)


def test_split_is_a_pure_function_of_the_id_and_respects_the_fractions():
    splits = [split_of(f'robot1-{i}', 0.1, 0.2) for i in range(4000)]
    assert splits == [split_of(f'robot1-{i}', 0.1, 0.2) for i in range(4000)]
    shares = {s: splits.count(s) / len(splits) for s in ('train', 'val', 'gate')}
    assert shares['gate'] == pytest.approx(0.2, abs=0.02)
    assert shares['val'] == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ConfigError):
        split_of('x', 0.5, 0.5)


def test_record_round_trips_through_bytes():
    r = record(3)
    r.device_answer, r.device_version, r.audit, r.pull, r.pull_round = 'red', 4, True, 'done', 2
    back = Record.from_bytes(r.to_bytes())
    assert torch.equal(back.tokens, r.tokens) and torch.equal(back.indices, r.indices)
    for field in ('sample_id', 'question', 'label', 'device_answer', 'device_version', 'audit',
                  'pull', 'pull_round', 'labelled', 'split'):
        assert getattr(back, field) == getattr(r, field), field
    assert back.confidence == pytest.approx(0.9)
    with pytest.raises(ValueError):
        Record.from_bytes(b'not a record')


def test_memory_stays_within_its_bytes_and_evicts_from_the_largest_cluster(tmp_path):
    one = record(0).nbytes()
    mem = Memory(max_bytes=30 * one, directory=tmp_path, clusters=2, min_cluster=5)
    for i in range(10):          # a small, old cluster far from the rest
        mem.add(record(i, shift=-20.0))
    for i in range(10, 20):      # then a long stay somewhere else
        mem.add(record(i, shift=20.0))
    assert mem.recluster() == 2  # (rounds recluster; new records join the nearest cluster)
    for i in range(20, 60):
        mem.add(record(i, shift=20.0))
        assert mem.nbytes <= 30 * one
    kept = {int(sid[1:]) for sid in mem.records}
    assert len(kept) <= 30 and mem.stats.evicted == 60 - len(kept)
    # The large cluster paid: all 10 of the small one survive, the oldest large ones went.
    assert set(range(10)) <= kept and min(k for k in kept if k >= 10) > 20
    assert len(list(tmp_path.glob('*.safetensors'))) == len(kept)


def test_memory_survives_a_restart_and_sets_torn_files_aside(tmp_path):
    mem = Memory(max_bytes=1 << 20, directory=tmp_path)
    for i in range(5):
        mem.add(record(i))
    (tmp_path / '000000000099.safetensors').write_bytes(b'torn write')
    again = Memory(max_bytes=1 << 20, directory=tmp_path)
    assert sorted(again.records) == sorted(mem.records)
    assert again.next_seq == mem.next_seq
    assert again.stats.unreadable == 1 and (tmp_path / '000000000099.unreadable').exists()
    assert torch.equal(again.get('r2').tokens, mem.get('r2').tokens)


def test_kmeans_finds_two_separated_groups():
    rng = np.random.default_rng(0)
    pts = np.vstack([rng.normal(-5, 1, (40, 3)), rng.normal(5, 1, (30, 3))])
    labels, _ = kmeans(pts, 2)
    assert len(set(labels[:40])) == 1 and len(set(labels[40:])) == 1
    assert labels[0] != labels[-1]


def test_balanced_sampler_draws_clusters_evenly():
    mem = Memory(max_bytes=1 << 22, clusters=2, min_cluster=5)
    records = [record(i, shift=-20.0) for i in range(10)] + [
        record(i, shift=20.0) for i in range(10, 100)]
    for r in records:
        mem.add(r)
    mem.recluster()
    draws = [next(s) for s in [mem.balanced_sampler(records)] for _ in range(2000)]
    small = sum(int(r.sample_id[1:]) < 10 for r in draws) / len(draws)
    assert small == pytest.approx(0.5, abs=0.05)  # 10% of the records, half the draws
