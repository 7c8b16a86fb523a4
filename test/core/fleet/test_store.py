"""The fleet's device store: inbox order, exclusive commits, clean-up, unsafe names."""
from __future__ import annotations

import json

import pytest
import torch

from cdcca_ros.core.fleet.store import (
    ROLLED_BACK,
    SAMPLE,
    Commit,
    DirectoryStore,
)
from cdcca_ros.errors import WireError


def test_inbox_keeps_arrival_order_and_round_trips_samples(tmp_path):
    store = DirectoryStore(tmp_path)
    tokens = torch.randn(3, 8)
    store.put_sample('robot1', 1, tokens, torch.tensor([0, 2, 5]),
                     {'sample_id': 's1', 'question': 'q?'})
    store.put_control('robot1', 0, ROLLED_BACK, {'version': 3, 'hash': 'h'})
    store.put_sample('robot1', 2, tokens, None, {'sample_id': 's2', 'question': 'q?'})
    entries = store.inbox('robot1')
    assert [(e.number, e.kind) for e in entries] == [(0, ROLLED_BACK), (1, SAMPLE), (2, SAMPLE)]
    info, tensors = entries[1].read()
    assert info['sample_id'] == 's1'
    torch.testing.assert_close(tensors['tokens'].float(), tokens.half().float())
    assert tensors['indices'].tolist() == [0, 2, 5]
    assert 'indices' not in entries[2].read()[1]
    assert entries[0].read()[0] == {'version': 3, 'hash': 'h'}
    assert [e.number for e in store.inbox('robot1', after=1)] == [2]
    assert store.last_number('robot1') == 2


def test_an_entry_that_is_not_ours_is_refused_with_its_path(tmp_path):
    store = DirectoryStore(tmp_path)
    path = store.put_sample('robot1', 0, torch.zeros(2, 4), None, {'sample_id': 'a'})
    path.write_bytes(b'garbage')
    with pytest.raises(WireError, match='unreadable'):
        store.inbox('robot1')[0].read()


def test_a_generation_commits_once(tmp_path):
    """Two tasks that ran the same generation (a worker thought dead, and its retry): the
    first commit wins, the second is told so and changes nothing."""
    store = DirectoryStore(tmp_path)
    assert store.head('robot1') is None
    first = Commit('robot1', 1, 'ticket-a', 'gen-a', inbox_upto=4, result={'n': 1})
    second = Commit('robot1', 1, 'ticket-b', 'gen-b', inbox_upto=9, result={'n': 2})
    assert store.commit(first)
    assert not store.commit(second)
    head = store.head('robot1')
    assert (head.ticket, head.inbox_upto, head.result) == ('ticket-a', 4, {'n': 1})
    assert store.find('robot1', 'ticket-a').gen == 1
    assert store.find('robot1', 'ticket-b') is None
    assert not list((tmp_path / 'robot1' / 'commits').glob('.*.tmp'))


def test_prepare_links_history_and_memory_and_clean_drops_what_the_commit_made_obsolete(
        tmp_path):
    store = DirectoryStore(tmp_path)
    for n in range(3):
        store.put_sample('robot1', n, torch.zeros(2, 4), None, {'sample_id': f's{n}'})
    gen1 = store.prepare('robot1', None)
    (gen1 / 'history').mkdir()
    (gen1 / 'history' / '0.safetensors').write_bytes(b'v0')
    (gen1 / 'memory' / 'r.safetensors').write_bytes(b'record')
    c1 = Commit('robot1', 1, 't1', gen1.name, inbox_upto=1)
    assert store.commit(c1)
    store.clean('robot1', c1)
    assert [e.number for e in store.inbox('robot1')] == [2]
    gen2 = store.prepare('robot1', c1)
    assert (gen2 / 'history' / '0.safetensors').read_bytes() == b'v0'
    assert (gen2 / 'memory' / 'r.safetensors').read_bytes() == b'record'  # one memory
    dead = store.prepare('robot1', c1)  # an attempt that died before committing
    c2 = Commit('robot1', 2, 't2', gen2.name, inbox_upto=2)
    assert store.commit(c2)
    store.clean('robot1', c2)
    assert gen1.is_dir() and gen2.is_dir() and not dead.exists()
    assert store.state_dir(store.head('robot1')) == gen2
    c3 = Commit('robot1', 3, 't3', store.prepare('robot1', c2).name, inbox_upto=2)
    assert store.commit(c3)
    store.clean('robot1', c3)
    assert not gen1.exists()  # only the head and the one before stay
    assert json.loads((tmp_path / 'robot1' / 'commits' / '000000000003.json').read_text())[
        'ticket'] == 't3'


@pytest.mark.parametrize('bad', ['', '../etc', 'a/b', '.hidden', 'x' * 200, 'sp ace'])
def test_device_ids_that_cannot_be_folder_names_are_refused(tmp_path, bad):
    store = DirectoryStore(tmp_path)
    with pytest.raises(WireError):
        store.device_dir(bad)
    with pytest.raises(WireError):
        store.put_control(bad, 0, ROLLED_BACK, {'version': 1, 'hash': 'h'})
    assert not any(tmp_path.iterdir())  # nothing written for a refused id
    assert store.device_dir('robot-7.a_b') == tmp_path / 'robot-7.a_b'
