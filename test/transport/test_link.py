"""The link in one process: routing per device, versions, bounds, dedup, bad frames, recording.

The router is an in-process Zenoh router with mTLS and access control (see conftest); the
tests with separate processes and faults are in ``test_link_processes.py``.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from linktest_utils import wait_until

from cdcca_ros.errors import ConfigError, PayloadTooLargeError
from cdcca_ros.transport.framing import KIND_DATA, Frame, decode_frame, split_message
from cdcca_ros.transport.link import CloudLink, DeviceLink, LinkMessage
from cdcca_ros.transport.recording import McapRecorder, decode_recording


class Sink:
    """Thread-safe collector of delivered messages."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, item: Any) -> None:
        with self._lock:
            self.items.append(item)

    def __len__(self) -> int:
        with self._lock:
            return len(self.items)

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.items)


def test_three_devices_one_cloud_each_gets_only_its_own_downlink(
        router_port: int, link_config: Callable[..., Any], links: list[Any],
        tmp_path: Path) -> None:
    up = Sink()
    devices = ['robot1', 'robot2', 'robot3']
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, devices)
    links.append(cloud)
    down = {d: Sink() for d in devices}
    for d in devices:
        links.append(DeviceLink(d, link_config(router_port, d), tmp_path / d, down[d]))
    dev_links = {lk.device_id: lk for lk in links[1:]}
    for i in range(5):
        for d in devices:
            cloud.send(d, '/cdcca/dwc_delta', f'{d}:{i}'.encode() * 300)  # 2 chunks each
            dev_links[d].send('/cdcca/uts_tokens', f'from-{d}:{i}'.encode())
    assert wait_until(lambda: len(up) == 15 and all(len(s) == 5 for s in down.values()), 15)
    time.sleep(0.3)  # anything misrouted would show up now
    for d in devices:
        got = down[d].snapshot()
        assert [m.payload for m in got] == [f'{d}:{i}'.encode() * 300 for i in range(5)]
        assert all(m.device == d and m.topic == '/cdcca/dwc_delta' for m in got)
        mine = [m for m in up.snapshot() if m.device == d]
        assert [m.payload for m in mine] == [f'from-{d}:{i}'.encode() for i in range(5)]
        assert [m.seq for m in mine] == [1, 2, 3, 4, 5]
    assert len(up) == 15
    stats = cloud.stats()
    assert stats['connected'] and stats['received'] == 15
    assert all(stats['devices'][d]['acked'] == 5 for d in devices)
    assert dev_links['robot2'].stats()['acked'] == 5
    with pytest.raises(ConfigError, match='not served'):
        cloud.send('robot9', '/t', b'x')


def test_version_is_latched_for_late_devices_and_dedup_by_content(
        router_port: int, link_config: Callable[..., Any], links: list[Any],
        tmp_path: Path) -> None:
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', Sink(),
                      ['robot1'])
    links.append(cloud)
    assert cloud.announce_version('robot1', b'v1') == 1  # before the device exists
    versions = Sink()
    dev = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1', Sink(),
                     on_version=versions)
    links.append(dev)
    assert wait_until(lambda: versions.snapshot() == [b'v1'], 10)
    time.sleep(1.2)  # the cloud repeats it every 0.5 s: same content, no new callback
    assert versions.snapshot() == [b'v1']
    cloud.announce_version('robot1', b'v2')
    assert wait_until(lambda: versions.snapshot() == [b'v1', b'v2'], 10)
    with pytest.raises(PayloadTooLargeError):
        cloud.announce_version('robot1', b'x' * 2000)


def test_bounded_spool_drops_oldest_while_the_cloud_is_away(
        router_port: int, link_config: Callable[..., Any], links: list[Any],
        tmp_path: Path) -> None:
    cfg = link_config(router_port, 'robot1', spool_max_bytes=10_000, max_payload_bytes=1000)
    dev = DeviceLink('robot1', cfg, tmp_path / 'r1', Sink())
    links.append(dev)
    up = Sink()
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, ['robot1'])
    for i in range(2):
        dev.send('/t', bytes([i]) * 1000)
    assert wait_until(lambda: len(up) == 2 and dev.stats()['acked'] == 2, 10)
    cloud.close()
    assert wait_until(lambda: not dev.stats()['cloud_reachable'], 5)
    for i in range(2, 32):
        dev.send('/t', bytes([i]) * 1000)
    st = dev.stats()
    assert (st['spooled_messages'], st['dropped'], st['dropped_bytes']) == (10, 20, 20_000)
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, ['robot1'])
    links.append(cloud)
    assert wait_until(lambda: len(up) == 12, 10)
    got = up.snapshot()[2:]
    assert [m.seq for m in got] == list(range(23, 33))  # the 10 newest, in order
    assert [m.payload[0] for m in got] == list(range(22, 32))
    # The device's floor told the cloud to stop waiting for the 20 dropped ones.
    assert cloud.stats()['skipped'] == 20
    assert wait_until(lambda: dev.stats()['spooled_messages'] == 0, 5)


def test_device_spool_survives_a_restart(router_port: int, link_config: Callable[..., Any],
                                         links: list[Any], tmp_path: Path) -> None:
    dev = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1', Sink())
    for i in range(5):
        dev.send('/t', b'early-%d' % i)
    dev.close()  # no cloud yet: all five stay spooled on disk
    up = Sink()
    links.append(CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up,
                           ['robot1']))
    dev = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1', Sink())
    links.append(dev)
    dev.send('/t', b'late')
    assert wait_until(lambda: len(up) == 6, 10)
    assert [m.payload for m in up.snapshot()] == [b'early-%d' % i for i in range(5)] + [b'late']
    assert [m.seq for m in up.snapshot()] == [1, 2, 3, 4, 5, 6]


def _publish_when_matched(session: Any, key: str) -> Any:
    pub = session.declare_publisher(key)
    assert wait_until(lambda: pub.matching_status.matching, 5), f'nobody listens on {key}'
    return pub


def test_cloud_dedups_across_its_restart(router_port: int, link_config: Callable[..., Any],
                                         raw: Callable[..., Any], certs: Path,
                                         tmp_path: Path) -> None:
    # A hand-driven robot1 (its real certificate) resends what the first cloud stored.
    dev = raw(certs, 'robot1', router_port)
    acks = Sink()
    dev.declare_subscriber('cdcca/robot1/down/ack', lambda s: acks(decode_frame(
        s.payload.to_bytes()).seq))

    def frames(seqs: range) -> list[bytes]:
        return [f for s in seqs for f in split_message(
            b'm%d' % s, chunk_size=1024, epoch=777, seq=s, floor=1, created_ns=0, topic='/t')]

    first = Sink()
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', first, ['robot1'])
    pub = _publish_when_matched(dev, 'cdcca/robot1/up/data')
    for f in frames(range(1, 6)):
        pub.put(f)
    assert wait_until(lambda: len(first) == 5 and 5 in acks.snapshot(), 10)
    cloud.close()
    pub.undeclare()
    second = Sink()
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', second,
                      ['robot1'])
    try:
        pub = _publish_when_matched(dev, 'cdcca/robot1/up/data')
        for f in frames(range(1, 8)):  # 1..5 again (acks "lost"), then 6, 7
            pub.put(f)
        assert wait_until(lambda: len(second) == 2 and 7 in acks.snapshot(), 10)
        time.sleep(0.2)
        assert [m.payload for m in second.snapshot()] == [b'm6', b'm7']
        assert cloud.stats()['duplicates'] == 5
    finally:
        cloud.close()


def test_bad_frames_are_rejected_and_the_link_keeps_running(
        router_port: int, link_config: Callable[..., Any], links: list[Any],
        raw: Callable[..., Any], certs: Path, tmp_path: Path) -> None:
    up, down = Sink(), Sink()
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, ['robot1'])
    dev = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1', down)
    links += [cloud, dev]
    for i in range(5):
        dev.send('/t', b'good-%d' % i * 500)
    assert wait_until(lambda: len(up) == 5, 10)

    # A faulty sender with robot1's certificate injects broken frames on robot1's uplink.
    inj = raw(certs, 'robot1', router_port)
    pub = _publish_when_matched(inj, 'cdcca/robot1/up/data')
    good = list(split_message(b'z' * 3000, chunk_size=1024, epoch=1, seq=99, floor=99,
                              created_ns=0, topic='/t'))
    corrupted = bytearray(good[1])
    corrupted[-5] ^= 0xFF
    oversized = Frame(KIND_DATA, 1, 98, 98, 0, 0, 10 << 10, 10 << 20, bytes(32), '/t',
                      b'o' * 1024).encode()  # declares a 10 MiB message
    for bad in (bytes(corrupted), good[0][:60], good[2][:-3], b'not a frame', oversized):
        pub.put(bad)
    pub.put(good[0])  # first chunk of a set that never completes: must time out
    for i in range(5, 10):
        dev.send('/t', b'good-%d' % i * 500)
    assert wait_until(lambda: len(up) == 10, 10)
    assert wait_until(lambda: cloud.stats()['chunk_timeouts'] == 1, 5)
    st = cloud.stats()
    assert st['rx_errors'] == 5, st
    assert st['last_error'] and 'Error' in st['last_error']
    assert [m.payload for m in up.snapshot()] == [b'good-%d' % i * 500 for i in range(10)]

    # Same on the device side: a corrupted downlink frame is counted, the next one arrives.
    inj_cloud = raw(certs, 'cloud', router_port)
    cpub = _publish_when_matched(inj_cloud, 'cdcca/robot1/down/data')
    frame = bytearray(list(split_message(b'd' * 10, chunk_size=1024, epoch=5, seq=1, floor=1,
                                         created_ns=0, topic='/t'))[0])
    frame[-1] ^= 1
    cpub.put(bytes(frame))
    cloud.send('robot1', '/cdcca/dwc_delta', b'delta')
    assert wait_until(lambda: len(down) == 1, 10)
    assert down.snapshot()[0].payload == b'delta'
    assert 'ChecksumError' in dev.stats()['last_error'] and dev.stats()['rx_errors'] == 1

    with pytest.raises(PayloadTooLargeError, match='max_payload_bytes=65536'):
        dev.send('/t', b'x' * (65536 + 1))
    with pytest.raises(PayloadTooLargeError):
        cloud.send('robot1', '/t', b'x' * (65536 + 1))


def test_callback_errors_do_not_stop_delivery(router_port: int,
                                              link_config: Callable[..., Any],
                                              links: list[Any], tmp_path: Path) -> None:
    got: list[bytes] = []

    def flaky(msg: LinkMessage) -> None:
        if msg.payload == b'boom':
            raise RuntimeError('application bug')
        got.append(msg.payload)

    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', flaky, ['robot1'])
    dev = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1', Sink())
    links += [cloud, dev]
    for p in (b'a', b'boom', b'c'):
        dev.send('/t', p)
    assert wait_until(lambda: got == [b'a', b'c'], 10)
    st = cloud.stats()
    assert st['callback_errors'] == 1 and 'application bug' in st['last_error']


def test_cloud_records_what_it_received_to_mcap(router_port: int,
                                                link_config: Callable[..., Any],
                                                links: list[Any], tmp_path: Path) -> None:
    from mcap_ros2._dynamic import serialize_dynamic

    encode = serialize_dynamic('std_msgs/msg/String', 'string data')['std_msgs/msg/String']
    path = tmp_path / 'rec.mcap'
    recorder = McapRecorder(path, {'/chatter': ('std_msgs/msg/String', 'string data')})
    up = Sink()
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, ['robot1'],
                      recorder=recorder)
    dev = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1', Sink())
    links += [cloud, dev]
    for i in range(3):
        dev.send('/chatter', encode({'data': f'hello {i}'}))
    dev.send('/raw', b'\x00\x01')  # no schema given: recorded schemaless
    assert wait_until(lambda: len(up) == 4, 10)
    cloud.close()
    recorder.close()
    decoded = list(decode_recording(path))
    assert [(m.topic, m.sequence) for m, _ in decoded] == [('/chatter', 1), ('/chatter', 2),
                                                          ('/chatter', 3), ('/raw', 4)]
    assert [v.data for _, v in decoded[:3]] == ['hello 0', 'hello 1', 'hello 2']
    assert decoded[3][1] is None and decoded[3][0].data == b'\x00\x01'
    assert all(m.log_time_ns >= m.publish_time_ns for m, _ in decoded)


def test_delivery_waits_until_the_application_is_ready(router_port: int,
                                                       link_config: Callable[..., Any],
                                                       links: list[Any],
                                                       tmp_path: Path) -> None:
    """While ``ready`` says no (no subscriber on the ROS side yet: a cloud node restarting),
    stored messages wait in the inbox instead of being handed to nobody and lost; then each
    arrives once, in order, also across a restart of the waiting end."""
    up, ready = Sink(), threading.Event()
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, ['robot1'],
                      ready=ready.is_set)
    device = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'robot1',
                        Sink())
    links += [device, cloud]
    for i in range(5):
        device.send('/cdcca/uts_tokens', f'{i}'.encode())
    assert wait_until(lambda: device.stats()['acked'] == 5, 15)  # stored by the cloud
    time.sleep(1.2)
    assert len(up) == 0 and cloud.stats()['undelivered'] == 5
    cloud.close()
    again = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up, ['robot1'],
                      ready=ready.is_set)
    links.append(again)
    time.sleep(1.0)
    assert len(up) == 0
    ready.set()
    assert wait_until(lambda: len(up) == 5, 10)
    time.sleep(0.3)
    assert [m.payload for m in up.snapshot()] == [f'{i}'.encode() for i in range(5)]
