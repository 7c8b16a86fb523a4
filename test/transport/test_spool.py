"""Spool (sender) and Inbox (receiver): order, bounds, drop-oldest, persistence, dedup."""
from __future__ import annotations

from pathlib import Path

import pytest

from cdcca_ros.errors import ConfigError, PayloadTooLargeError
from cdcca_ros.transport.spool import Inbox, LatestStore, Spool


def test_append_pending_ack_keep_order(tmp_path: Path) -> None:
    with Spool(tmp_path / 's.sqlite', max_bytes=10_000) as sp:
        seqs = [sp.append('/t', bytes([i]) * 10, created_ns=i) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert [e.payload[0] for e in sp.pending()] == [0, 1, 2, 3, 4]
        assert [e.seq for e in sp.pending(after=2)] == [3, 4, 5]
        assert sp.next_after(3).seq == 4 and sp.next_after(5) is None
        assert sp.ack_through(2) == 2
        assert sp.ack(4) and not sp.ack(4)
        assert [e.seq for e in sp.pending()] == [3, 5]
        st = sp.stats()
        assert (st.messages, st.bytes, st.first_seq, st.last_seq) == (2, 20, 3, 5)


def test_bound_drops_oldest_first_and_counts(tmp_path: Path) -> None:
    with Spool(tmp_path / 's.sqlite', max_bytes=1000) as sp:
        for i in range(25):
            sp.append('/t', bytes([i]) * 100)
        st = sp.stats()
        assert st.bytes <= 1000 and st.messages == 10
        assert (st.dropped, st.dropped_bytes) == (15, 1500)
        assert [e.payload[0] for e in sp.pending()] == list(range(15, 25))
        with pytest.raises(PayloadTooLargeError, match='spool bound of 1000'):
            sp.append('/t', b'x' * 1001)
        assert sp.stats().messages == 10  # the refused message dropped nothing


def test_message_count_bound(tmp_path: Path) -> None:
    with Spool(tmp_path / 's.sqlite', max_bytes=10_000, max_messages=3) as sp:
        for i in range(5):
            sp.append('/t', bytes([i]))
        assert [e.seq for e in sp.pending()] == [3, 4, 5]
        assert sp.stats().dropped == 2


def test_survives_restart_with_epoch_counters_and_seq(tmp_path: Path) -> None:
    path = tmp_path / 'deep' / 's.sqlite'
    sp = Spool(path, max_bytes=300)
    for i in range(5):
        sp.append('/t', bytes([i]) * 100)
    sp.ack_through(3)  # seq 1, 2 were dropped; 3 acked
    epoch = sp.epoch
    sp.close()
    sp = Spool(path, max_bytes=300)
    try:
        assert sp.epoch == epoch
        assert [e.seq for e in sp.pending()] == [4, 5]
        assert sp.stats().dropped == 2 and sp.stats().bytes == 200
        assert sp.append('/t', b'new') == 6  # never reuses a sequence number
    finally:
        sp.close()


@pytest.mark.parametrize('kwargs', [{'max_bytes': 0}, {'max_bytes': 10, 'max_messages': 0}])
def test_bad_bounds_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        Spool(tmp_path / 's.sqlite', **kwargs)


def test_inbox_accepts_in_order_and_dedups_across_restart(tmp_path: Path) -> None:
    path = tmp_path / 'inbox.sqlite'
    inbox = Inbox(path)
    offer = lambda seq, floor=1, epoch=100: inbox.offer('robot1', epoch, seq, floor, '/t',  # noqa: E731
                                                        b'%d' % seq, 0)
    assert offer(1) == ('accepted', 1, 0)
    assert offer(3) == ('gap', 1, 0)  # 2 missing: refused, the sender goes back
    assert offer(2) == ('accepted', 2, 0)
    assert offer(2) == ('duplicate', 2, 0)
    inbox.close()
    inbox = Inbox(path)  # restart: position and undelivered messages persist
    try:
        assert inbox.position('robot1') == (100, 2)
        assert offer(1).status == 'duplicate' and offer(3).status == 'accepted'
        rows = inbox.undelivered()
        assert [(e.seq, e.payload) for _, e in rows] == [(1, b'1'), (2, b'2'), (3, b'3')]
        inbox.done(rows[0][0])
        assert inbox.undelivered_count() == 2
        # The sender dropped 4..6 from its bounded spool: its floor says so.
        assert offer(8, floor=7) == ('gap', 6, 3)
        assert offer(7, floor=7) == ('accepted', 7, 0)
        # A recreated sender spool (newer epoch) restarts the expectation...
        assert offer(1, epoch=200) == ('accepted', 1, 0)
        # ...and a late frame of the old epoch is ignored.
        assert offer(9, floor=9, epoch=100).status == 'stale'
        assert inbox.position('robot1') == (200, 1)
    finally:
        inbox.close()


def test_latest_store_keeps_the_last_value_and_counts(tmp_path: Path) -> None:
    store = LatestStore(tmp_path / 'v.sqlite')
    assert store.get('robot1') is None
    assert store.put('robot1', b'v1') == 1 and store.put('robot1', b'v2') == 2
    store.close()
    store = LatestStore(tmp_path / 'v.sqlite')
    assert store.get('robot1') == (2, b'v2')
    store.close()

