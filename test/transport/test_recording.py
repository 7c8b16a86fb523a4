"""MCAP recording and replay of received messages (CDR bytes with ros2msg schemas)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcap.reader import make_reader
from mcap_ros2._dynamic import serialize_dynamic

from cdcca_ros.errors import ConfigError, WireError
from cdcca_ros.transport.recording import (
    McapRecorder,
    RecordedMessage,
    decode_recording,
    main,
    read_recording,
    replay,
)

STRING = ('std_msgs/msg/String', 'string data')
encode = serialize_dynamic(*STRING)[STRING[0]]


def _record(path: Path, n: int = 5) -> None:
    with McapRecorder(path, {'/chatter': STRING}, metadata={'device': 'robot1'}) as rec:
        for i in range(n):
            rec.write('/chatter', encode({'data': f'msg {i}'}), log_time_ns=1_000_000_000 + i
                      * 100_000_000, publish_time_ns=999_000_000 + i, sequence=i + 1)
        rec.write('/raw', b'\x01\x02\x03', log_time_ns=2_000_000_000, publish_time_ns=0)
        assert rec.message_count == n + 1


def test_round_trip_with_schemas_channels_and_profile(tmp_path: Path) -> None:
    path = tmp_path / 'a.mcap'
    _record(path)
    with open(path, 'rb') as f:
        reader = make_reader(f)
        assert reader.get_header().profile == 'ros2'
        summary = reader.get_summary()
        assert {c.topic: c.message_encoding for c in summary.channels.values()} == {
            '/chatter': 'cdr', '/raw': 'cdr'}
        schemas = {s.name: (s.encoding, s.data) for s in summary.schemas.values()}
        assert schemas == {'std_msgs/msg/String': ('ros2msg', b'string data')}
        assert [(m.name, m.metadata) for m in reader.iter_metadata()] == [
            ('cdcca_ros', {'device': 'robot1'})]
    msgs = list(read_recording(path))
    assert [(m.topic, m.sequence) for m in msgs] == [('/chatter', i) for i in range(1, 6)] + [
        ('/raw', 0)]
    decoded = list(decode_recording(path, topics=['/chatter']))
    assert [v.data for _, v in decoded] == [f'msg {i}' for i in range(5)]


def test_refuses_to_overwrite_and_rejects_bad_schema_names(tmp_path: Path) -> None:
    path = tmp_path / 'a.mcap'
    _record(path)
    size = path.stat().st_size
    with pytest.raises(ConfigError, match='refusing to overwrite'):
        McapRecorder(path)
    assert path.stat().st_size == size
    with McapRecorder(tmp_path / 'b.mcap') as rec, pytest.raises(ConfigError, match='pkg/msg'):
        rec.register('/x', 'String', 'string data')


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_a_damaged_recording_raises_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / 'a.mcap'
    _record(path, n=200)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == 'truncate' else b'not an mcap file!!')
    with pytest.raises(WireError, match='cannot be read'):
        list(read_recording(path))


def test_replay_is_paced_by_log_time(tmp_path: Path) -> None:
    path = tmp_path / 'a.mcap'
    _record(path, n=3)  # log times 1.0, 1.1, 1.2 s, then /raw at 2.0 s
    waits: list[float] = []
    got: list[RecordedMessage] = []
    assert replay(path, got.append, rate=2.0, sleep=waits.append) == 4
    assert [m.sequence for m in got] == [1, 2, 3, 0]
    # At twice the speed the last message is due 0.5 s after the first.
    assert waits and max(waits) == pytest.approx(0.5, abs=0.05)
    waits.clear()
    replay(path, got.append, rate=0, sleep=waits.append)
    assert waits == []
    with pytest.raises(ConfigError):
        replay(path, got.append, rate=-1)


def test_cli_info_and_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / 'a.mcap'
    _record(path, n=3)
    assert main(['info', str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['messages'] == 4 and info['topics']['/chatter']['count'] == 3
    assert info['topics']['/chatter']['schema'] == 'std_msgs/msg/String'
    assert main(['replay', str(path), '--decode', '--topics', '/chatter', '--limit', '2']) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x['value'] for x in lines] == [{'data': 'msg 0'}, {'data': 'msg 1'}]
    assert main(['replay', str(tmp_path / 'missing.mcap')]) == 2
