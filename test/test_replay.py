"""cdcca_ros.replay: a cloud recording published again on a real DDS graph, checked first."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.serialization import serialize_message  # noqa: E402

from cdcca_ros.errors import ConfigError, WireError  # noqa: E402
from cdcca_ros.replay import ReplayConfig, check_recording, main, replay_messages  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UTS = 'cdcca_ros/msg/UtsTokens'
N = 6
SPACING_NS = 50_000_000


def _tokens(i: int):
    from cdcca_ros.msg import UtsTokens

    msg = UtsTokens(device_id='robot1', sample_id=f'robot1-{i}', model_version='robot1:v3',
                    question=f'what colour is object {i}?', device_answer='red',
                    entropy_mean=0.5 + i, num_tokens=65, token_dim=4, grid_rows=8,
                    grid_cols=8, has_cls=True, kept_indices=[1, 5 + i],
                    token_variance=[0.25, 0.125], dtype='int8', scales=[0.5, 0.25],
                    payload=bytes((i * 7 + k) % 256 for k in range(8)))
    msg.header.stamp.sec = 1_700_000_000 + i
    msg.header.frame_id = 'camera'
    return msg


def _record(path: Path, messages, compression: str = 'zstd', schema: str = UTS,
            channel: str = 'uts_tokens', extra_channel: bool = False) -> Path:
    from cdcca_ros.nodes.msg_definitions import definition
    from cdcca_ros.transport.recording import McapRecorder

    with McapRecorder(path, {channel: (schema, definition(schema))},
                      compression=compression) as rec:
        for i, msg in enumerate(messages):
            data = msg if isinstance(msg, bytes) else serialize_message(msg)
            rec.write(channel, data, 10**9 + i * SPACING_NS, 10**9 + i * SPACING_NS - 1000,
                      i + 1)
            if extra_channel:
                rec.write('diagnostics', b'\x00\x01\x00\x00', 10**9 + i * SPACING_NS + 1, 0)
    return path


@pytest.fixture
def recording(tmp_path: Path):
    messages = [_tokens(i) for i in range(N)]
    return _record(tmp_path / 'uplink.mcap', messages, extra_channel=True), messages


@pytest.fixture
def cloud_subscriber(ros_context):
    """A subscriber in /cloud on uts_tokens (the cloud node's input), spinning in a thread."""
    from cdcca_ros.msg import UtsTokens
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from cdcca_ros.nodes.common import RELIABLE_QOS

    node = Node('cloud_node', namespace='cloud', context=ros_context)
    got: list = []
    node.create_subscription(UtsTokens, 'uts_tokens', got.append, RELIABLE_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        executor.shutdown(timeout_sec=5.0)
        thread.join(timeout=5.0)
        node.destroy_node()


def _wait_for(got: list, n: int, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize('rate, limit, expected', [
    ('0', None, N),   # as fast as possible, everything
    ('5', 3, 3),      # paced (50 ms apart / 5), the first three
])
def test_replay_delivers_every_message_identical_and_in_order(recording, cloud_subscriber,
                                                              rate, limit, expected, capsys):
    path, messages = recording
    argv = [str(path), '--rate', rate, '--namespace', 'cloud', '--wait', '20']
    if limit is not None:
        argv += ['--limit', str(limit)]
    assert main(argv) == 0, capsys.readouterr().err
    _wait_for(cloud_subscriber, expected)
    assert [m.sample_id for m in cloud_subscriber] == [f'robot1-{i}' for i in range(expected)]
    assert cloud_subscriber == messages[:expected]  # every field, header stamps included
    out = capsys.readouterr().out
    assert f'replayed {expected} message(s)' in out and '/cloud/uts_tokens' in out
    assert 'all acknowledged: yes' in out and 'diagnostics' in out


def test_no_subscriber_is_reported_after_the_timeout(recording, ros_context, capsys):
    path, _ = recording
    assert main([str(path), '--namespace', 'nobody_listens', '--wait', '0.3']) == 1
    err = capsys.readouterr().err
    assert 'no subscriber on /nobody_listens/uts_tokens' in err


def test_pacing_follows_recorded_times_over_rate(recording):
    path, _ = recording
    waits: list[float] = []
    published: list = []
    now = [0.0]  # a frozen clock: each requested wait is the full offset from the start
    cfg = ReplayConfig(path, rate=2.0)
    assert replay_messages(cfg, published.append, sleep=waits.append,
                           clock=lambda: now[0]) == N
    expected = [i * SPACING_NS / 1e9 / 2.0 for i in range(1, N)]
    assert waits == pytest.approx(expected)
    assert [m.sample_id for m in published] == [f'robot1-{i}' for i in range(N)]


def _chunk_span(path: Path) -> tuple[int, int]:
    from mcap.reader import make_reader

    with open(path, 'rb') as f:
        index = make_reader(f).get_summary().chunk_indexes[0]
    return index.chunk_start_offset, index.chunk_length


def _flip_in_chunk(path: Path) -> None:
    start, length = _chunk_span(path)
    data = bytearray(path.read_bytes())
    data[start + length - 20] ^= 0x5A  # inside the chunk's records, past its header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage, compression, expected', [
    ('truncate', 'zstd', 'damaged'),
    ('garbage', 'none', 'damaged'),
    ('flip', 'zstd', 'damaged'),
    ('flip', 'none', 'damaged'),        # only the chunk CRC tells
    ('bad_cdr', 'none', 'do not deserialize'),
    ('wrong_schema', 'zstd', 'not cdcca_ros/msg/UtsTokens'),
    ('empty_channel', 'zstd', 'no message on channel'),
    ('missing', 'zstd', 'cannot open'),
])
def test_damaged_recording_is_refused_with_a_clear_error(tmp_path, damage, compression,
                                                         expected, capsys):
    path = tmp_path / 'rec.mcap'
    messages = [_tokens(i) for i in range(N)]
    if damage == 'bad_cdr':
        _record(path, messages[:2] + [b'\x00\x01\x00\x00\xff\xff\xff\x7fgarbage'], compression)
    elif damage == 'wrong_schema':
        from std_msgs.msg import String

        _record(path, [String(data='hi')], compression, schema='std_msgs/msg/String')
    elif damage == 'empty_channel':
        _record(path, messages, compression, channel='other')
    elif damage != 'missing':
        _record(path, messages, compression)
        data = path.read_bytes()
        if damage == 'truncate':
            path.write_bytes(data[:len(data) // 2])
        elif damage == 'garbage':
            path.write_bytes(bytes((i * 131 + 7) % 256 for i in range(len(data))))
        else:
            _flip_in_chunk(path)
    with pytest.raises((ConfigError, WireError), match=expected):
        check_recording(ReplayConfig(path))
    assert main([str(path), '--wait', '0.2']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and str(path) in err and expected in err


def test_cli_exit_code_on_a_corrupted_file(tmp_path):
    path = _record(tmp_path / 'rec.mcap', [_tokens(i) for i in range(3)], 'none')
    _flip_in_chunk(path)
    proc = subprocess.run([sys.executable, '-m', 'cdcca_ros.replay', str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert 'CRC' in proc.stderr and str(path) in proc.stderr


@pytest.mark.parametrize('kwargs, bad', [
    ({'rate': -1.0}, 'rate=-1.0'),
    ({'limit': 0}, 'limit=0'),
    ({'wait_s': 0.0}, 'wait_s=0.0'),
    ({'topic': ''}, "topic=''"),
])
def test_config_names_the_bad_value(tmp_path, kwargs, bad):
    with pytest.raises(ConfigError, match=bad):
        ReplayConfig(tmp_path / 'x.mcap', **kwargs)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(['--help'])
    text = capsys.readouterr().out
    assert '(default: 1.0)' in text and '(default: cloud)' in text and '(0: all)' in text


def _bag(path: Path, messages, topics=('/cloud/uts_tokens',), storage: str = 'mcap') -> Path:
    """A bag in the rosbag2 layout (metadata.yaml + storage file) written by rosbags, as
    ``ros2 bag record`` writes one; rclpy serialises the messages (typestore: rosbags')."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from cdcca_ros.nodes.msg_definitions import definition

    typestore = get_typestore(Stores.ROS2_KILTED)
    typestore.register(get_types_from_msg(definition(UTS).split('=' * 80)[0], UTS))
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = [writer.add_connection(t, UTS, typestore=typestore) for t in topics]
        chatter = writer.add_connection('/rosout_like', 'std_msgs/msg/String',
                                        typestore=typestore)
        for i, msg in enumerate(messages):
            for conn in conns:
                writer.write(conn, 10**9 + i * SPACING_NS, serialize_message(msg))
            writer.write(chatter, 10**9 + i * SPACING_NS + 1,
                         typestore.serialize_cdr(typestore.types['std_msgs/msg/String'](
                             data=f'line {i}'), 'std_msgs/msg/String'))
    return path


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_a_rosbag2_bag_is_replayed_like_a_recording(tmp_path, cloud_subscriber, storage,
                                                    capsys):
    """What `ros2 bag record` writes (rosbags writes the same layout): a folder with
    metadata.yaml; the topic is named in full, and `uts_tokens` finds it."""
    messages = [_tokens(i) for i in range(N)]
    bag = _bag(tmp_path / 'bag', messages, storage=storage)
    assert (bag / 'metadata.yaml').is_file()
    suffix = {'mcap': '.mcap', 'sqlite3': '.db3'}[storage]
    assert sorted(p.suffix for p in bag.iterdir()) == sorted(['.yaml', suffix])
    check = check_recording(ReplayConfig(bag))
    assert (check.messages, check.other_channels) == (N, ('/rosout_like',))
    assert check.span_s == pytest.approx((N - 1) * SPACING_NS / 1e9)
    assert main([str(bag), '--rate', '0', '--wait', '20']) == 0, capsys.readouterr().err
    _wait_for(cloud_subscriber, N)
    assert cloud_subscriber == messages  # every field, in order
    assert f'replayed {N} message(s)' in capsys.readouterr().out


def test_a_bag_with_the_channel_in_two_namespaces_needs_the_full_name(tmp_path, capsys):
    bag = _bag(tmp_path / 'bag', [_tokens(i) for i in range(2)],
               topics=('/robot1/uts_tokens', '/cloud/uts_tokens'))
    with pytest.raises(ConfigError, match='matches /cloud/uts_tokens, /robot1/uts_tokens'):
        check_recording(ReplayConfig(bag))
    assert check_recording(ReplayConfig(bag, channel='/robot1/uts_tokens')).messages == 2


@pytest.mark.parametrize('damage, expected', [
    ('no_metadata', 'without metadata.yaml'),
    ('bad_metadata', 'damaged'),
    ('truncated_storage', 'damaged'),
])
def test_a_damaged_bag_is_refused(tmp_path, damage, expected, capsys):
    bag = _bag(tmp_path / 'bag', [_tokens(i) for i in range(N)])
    storage = next(bag.glob('*.mcap'))
    if damage == 'no_metadata':
        (bag / 'metadata.yaml').unlink()
    elif damage == 'bad_metadata':
        (bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: [unclosed\n')
    else:
        storage.write_bytes(storage.read_bytes()[:storage.stat().st_size // 2])
    with pytest.raises((ConfigError, WireError), match=expected):
        check_recording(ReplayConfig(bag))
    assert main([str(bag), '--wait', '0.2']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and str(bag) in err
