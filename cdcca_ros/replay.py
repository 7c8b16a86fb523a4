"""Replay a cloud recording into ROS, so a cloud node re-runs on what it received.

``cloud_bridge_node`` (role ``cloud``, parameter ``record_mcap``) records every uplink message
as its CDR bytes in MCAP. This tool publishes those ``UtsTokens`` again on the cloud node's
input topic (``/<namespace>/<topic>``, default ``/cloud/uts_tokens``) -- for an audit, to
redo a round, to debug the cloud side without robots::

    python -m cdcca_ros.replay FILE.mcap|BAG_DIR [--rate R] [--topic uts_tokens]
        [--namespace cloud] [--channel uts_tokens] [--limit N] [--wait S] [--ack-timeout S]

It reads the cloud's MCAP file, or a bag in the rosbag2 layout (a folder with
``metadata.yaml`` and its MCAP or sqlite3 files: what ``ros2 bag record`` and ``rosbags``
write), read through ``rosbags``. A bag names topics in full (``/cloud/uts_tokens``): the
channel ``uts_tokens`` then means the one topic of that name in any namespace (give the full
name when several match).

1. The file is checked whole before anything is published: chunk CRCs (MCAP files), the
   channel's schema, and every message deserialized from its CDR with
   ``rclpy.serialization`` (never pickle). A corrupted recording publishes nothing (exit
   code 2).
2. Waits up to ``--wait`` seconds for a subscriber on the topic (exit code 1 if none).
3. Publishes in recorded order, paced by the recorded log times divided by ``--rate``
   (``0``: as fast as possible; reliable keep-all QoS, so the publisher drops nothing -- a
   subscriber with a short keep-last history can still fall behind at ``--rate 0``).
4. Waits until the subscribers acknowledged every message and prints a summary.
"""
from __future__ import annotations

import argparse
import contextlib
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdcca_ros.errors import ConfigError, WireError
from cdcca_ros.transport.recording import RecordedMessage

UTS_TYPE = 'cdcca_ros/msg/UtsTokens'
DEFAULT_CHANNEL = 'uts_tokens'  # cloud_bridge_node.UPLINK_TOPIC, the link topic it records
EXIT_OK = 0
EXIT_NOT_DELIVERED = 1
EXIT_BAD_INPUT = 2


@dataclass
class ReplayConfig:
    """What to replay and how.

    Attributes:
        path: The MCAP recording.
        rate: Speed factor of the pacing (2.0: twice as fast); 0 publishes without pauses.
        topic: Topic to publish on, relative to ``namespace`` unless it starts with ``/``.
        namespace: Namespace of the replaying node (the cloud node's).
        channel: Channel (topic name) of the recording to read.
        limit: Replay only the first ``limit`` messages (None: all).
        wait_s: How long to wait for a subscriber.
        ack_timeout_s: How long to wait for the subscribers' acknowledgements at the end.
    """

    path: Path
    rate: float = 1.0
    topic: str = DEFAULT_CHANNEL
    namespace: str = 'cloud'
    channel: str = DEFAULT_CHANNEL
    limit: int | None = None
    wait_s: float = 10.0
    ack_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not (self.rate >= 0 and self.rate < float('inf')):
            raise ConfigError(f'rate={self.rate} must be finite and >= 0')
        if not self.topic or not self.channel:
            raise ConfigError(f'topic={self.topic!r} and channel={self.channel!r} must be '
                              'non-empty')
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f'limit={self.limit} must be >= 1')
        if self.wait_s <= 0 or self.ack_timeout_s <= 0:
            raise ConfigError(f'wait_s={self.wait_s} and ack_timeout_s={self.ack_timeout_s} '
                              'must be positive')


@dataclass(frozen=True)
class RecordingCheck:
    """What :func:`check_recording` found.

    Attributes:
        messages: Messages that will be replayed.
        bytes: Their CDR bytes.
        span_s: Recorded log time from the first to the last of them.
        other_channels: Channels of the file that are not replayed.
    """

    messages: int
    bytes: int
    span_s: float
    other_channels: tuple[str, ...]


def _read_errors() -> tuple[type[BaseException], ...]:
    """What the MCAP reader and its decompressors raise on damaged bytes."""
    from mcap.exceptions import McapError

    errors: list[type[BaseException]] = [McapError, EOFError, ValueError, struct.error,
                                         RuntimeError]  # lz4.frame raises RuntimeError
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - mcap's zstd support is optional
        pass
    return tuple(errors)


def read_checked(path: str | Path) -> Iterator[RecordedMessage]:
    """Every message of an MCAP file in log-time order, chunk CRCs checked.

    Raises:
        ConfigError: the file cannot be opened.
        WireError: the file is not a readable MCAP (truncated, corrupt, CRC mismatch).
    """
    from mcap.reader import make_reader

    errors = _read_errors()
    try:
        stream = open(path, 'rb')
    except OSError as err:
        raise ConfigError(f'cannot open recording {path}: {err}') from err
    with stream:
        try:
            # validate_crcs: an uncompressed chunk with a flipped bit would otherwise
            # deserialize into a silently different message.
            reader = make_reader(stream, validate_crcs=True)
            for schema, channel, message in reader.iter_messages(log_time_order=True):
                yield RecordedMessage(channel.topic, schema.name if schema else '',
                                      bytes(message.data), message.log_time,
                                      message.publish_time, message.sequence)
        except errors as err:
            raise WireError(f'recording {path} is damaged and cannot be read: '
                            f'{type(err).__name__}: {err}') from err


def read_bag(path: str | Path) -> Iterator[RecordedMessage]:
    """Every message of a rosbag2 folder (``metadata.yaml`` + MCAP or sqlite3 files), read
    through ``rosbags``; the schema name is the connection's message type.

    Raises:
        ConfigError: the folder is not a rosbag2 bag.
        WireError: the bag cannot be read (damaged files or metadata).
    """
    with _open_bag(path) as reader:
        try:
            for sequence, (conn, timestamp, raw) in enumerate(reader.messages(), 1):
                yield RecordedMessage(conn.topic, conn.msgtype, bytes(raw), timestamp,
                                      timestamp, sequence)
        except _bag_errors() as err:
            raise WireError(f'bag {path} is damaged and cannot be read: '
                            f'{type(err).__name__}: {err}') from err


def _bag_errors() -> tuple[type[BaseException], ...]:
    from rosbags.rosbag2 import ReaderError

    return (ReaderError, OSError, *_read_errors())


@contextlib.contextmanager
def _open_bag(path: str | Path) -> Iterator[Any]:
    """An open ``rosbags`` reader of a rosbag2 folder (errors as in :func:`read_bag`)."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not (path / 'metadata.yaml').is_file():
        raise ConfigError(f'{path} is a folder without metadata.yaml: not a rosbag2 bag')
    reader = Reader(path)
    try:
        reader.open()
    except _bag_errors() as err:
        raise WireError(f'bag {path} is damaged and cannot be read: '
                        f'{type(err).__name__}: {err}') from err
    try:
        yield reader
    finally:
        reader.close()


def _bag_topics(path: Path) -> set[str]:
    with _open_bag(path) as reader:
        return set(reader.topics)


def read_any(path: str | Path) -> Iterator[RecordedMessage]:
    """The messages of a recording: a rosbag2 folder (:func:`read_bag`) or an MCAP file
    (:func:`read_checked`)."""
    return read_bag(path) if Path(path).is_dir() else read_checked(path)


def resolve_channel(topics: Iterable[str], channel: str) -> str:
    """The recording's topic that ``channel`` names: the same name, else the one topic whose
    last component it is (a bag's ``/cloud/uts_tokens`` for ``uts_tokens``).

    Raises:
        ConfigError: several topics match (the message lists them).
    """
    topics = set(topics)
    if channel in topics or channel.startswith('/'):
        return channel
    matches = sorted(t for t in topics if t.rsplit('/', 1)[-1] == channel)
    if len(matches) > 1:
        raise ConfigError(f'channel {channel!r} matches {", ".join(matches)}: give one with '
                          '--channel')
    return matches[0] if matches else channel


def deserialize_tokens(data: bytes, where: str) -> Any:
    """``UtsTokens`` from CDR bytes.

    Raises:
        WireError: the bytes are not a ``UtsTokens`` (``where`` names the message).
    """
    from rclpy.serialization import deserialize_message

    from cdcca_ros.msg import UtsTokens

    try:
        return deserialize_message(data, UtsTokens)
    except Exception as err:  # noqa: BLE001 - rclpy raises several C-level types on bad CDR
        raise WireError(f'{where}: {len(data)} bytes do not deserialize as {UTS_TYPE}: '
                        f'{type(err).__name__}: {err}') from err


def _channel(cfg: ReplayConfig) -> str:
    """``cfg.channel`` resolved against the recording's topics (a bag's names are full)."""
    if cfg.channel.startswith('/'):
        return cfg.channel
    topics = (_bag_topics(cfg.path) if cfg.path.is_dir()
              else {m.topic for m in read_checked(cfg.path)})
    return resolve_channel(topics, cfg.channel)


def _selected(cfg: ReplayConfig, others: set[str] | None = None
              ) -> Iterator[tuple[int, RecordedMessage]]:
    """``(index, message)`` of the channel's messages, up to the limit; checks the schema."""
    count = 0
    channel = _channel(cfg)
    for msg in read_any(cfg.path):
        if msg.topic != channel:
            if others is not None:
                others.add(msg.topic)
            continue
        if cfg.limit is not None and count >= cfg.limit:
            return
        if msg.schema_name not in ('', UTS_TYPE):
            raise WireError(f'recording {cfg.path}: channel {channel!r} holds '
                            f'{msg.schema_name}, not {UTS_TYPE}')
        yield count, msg
        count += 1


def check_recording(cfg: ReplayConfig) -> RecordingCheck:
    """Read and deserialize every message to replay, publishing nothing.

    Raises:
        ConfigError: unreadable file, or no message on the channel.
        WireError: damaged file, wrong schema, or a message that does not deserialize.
    """
    others: set[str] = set()
    n = total = 0
    first = last = None
    for i, msg in _selected(cfg, others):
        deserialize_tokens(msg.data, f'recording {cfg.path}, message {i} (sequence '
                                     f'{msg.sequence})')
        n += 1
        total += len(msg.data)
        first = msg.log_time_ns if first is None else first
        last = msg.log_time_ns
    if n == 0:
        raise ConfigError(f'recording {cfg.path} has no message on channel {cfg.channel!r} '
                          f'(channels: {sorted(others) or "none"})')
    span = 0.0 if first is None or last is None else (last - first) / 1e9
    return RecordingCheck(n, total, span, tuple(sorted(others)))


def replay_messages(cfg: ReplayConfig, publish: Callable[[Any], None],
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> int:
    """Deserialize and ``publish`` the channel's messages in order, paced by ``cfg.rate``.

    Returns:
        The number of messages published.
    """
    first_log: int | None = None
    start = clock()
    count = 0
    for i, msg in _selected(cfg):
        tokens = deserialize_tokens(msg.data, f'recording {cfg.path}, message {i}')
        if cfg.rate > 0:
            first_log = msg.log_time_ns if first_log is None else first_log
            wait = (msg.log_time_ns - first_log) / 1e9 / cfg.rate - (clock() - start)
            if wait > 0:
                sleep(wait)
        publish(tokens)
        count += 1
    return count


def replay_qos() -> Any:
    """Reliable keep-all: the publisher blocks rather than overwrite unacknowledged samples."""
    from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy

    return QoSProfile(depth=1, history=QoSHistoryPolicy.KEEP_ALL,
                      reliability=QoSReliabilityPolicy.RELIABLE,
                      durability=QoSDurabilityPolicy.VOLATILE)


def _replay_on_graph(cfg: ReplayConfig, check: RecordingCheck) -> int:
    import rclpy
    from rclpy.context import Context
    from rclpy.duration import Duration
    from rclpy.node import Node

    from cdcca_ros.msg import UtsTokens
    from cdcca_ros.nodes.dds_profile import use_dds_profile

    use_dds_profile()
    context = Context()
    rclpy.init(context=context)
    node = None
    try:
        node = Node('cdcca_replay', namespace=cfg.namespace, context=context)
        pub = node.create_publisher(UtsTokens, cfg.topic, replay_qos())
        name = pub.topic_name
        deadline = time.monotonic() + cfg.wait_s
        while pub.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                print(f'error: no subscriber on {name} within {cfg.wait_s:g} s; is the cloud '
                      f'node running (namespace {cfg.namespace!r}, same ROS_DOMAIN_ID)?',
                      file=sys.stderr)
                return EXIT_NOT_DELIVERED
            time.sleep(0.05)
        t0 = time.monotonic()
        count = replay_messages(cfg, pub.publish)
        acked = pub.wait_for_all_acked(Duration(seconds=cfg.ack_timeout_s))
        elapsed = time.monotonic() - t0
        print(f'replayed {count} message(s), {check.bytes} bytes of CDR (recorded over '
              f'{check.span_s:.3f} s) from {cfg.path} on {name} in {elapsed:.3f} s '
              f'(rate {cfg.rate:g}); subscribers {pub.get_subscription_count()}; '
              f'all acknowledged: {"yes" if acked else "NO"}'
              + (f'; channels not replayed: {", ".join(check.other_channels)}'
                 if check.other_channels else ''))
        if not acked:
            print(f'error: the subscribers of {name} did not acknowledge every message '
                  f'within {cfg.ack_timeout_s:g} s', file=sys.stderr)
            return EXIT_NOT_DELIVERED
        return EXIT_OK
    finally:
        if node is not None:
            node.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit code."""
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.replay',
                                     description='publish the UtsTokens of a cloud recording '
                                                 'on the cloud node\'s input topic',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('file', type=Path, help='MCAP written by cloud_bridge_node '
                                                '(record_mcap), or a rosbag2 bag folder')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='pacing speed factor of the recorded times; 0 = no pauses')
    parser.add_argument('--topic', default=DEFAULT_CHANNEL, help='topic to publish on')
    parser.add_argument('--namespace', default='cloud', help='namespace of the cloud node')
    parser.add_argument('--channel', default=DEFAULT_CHANNEL,
                        help='channel of the recording to replay')
    parser.add_argument('--limit', type=int, default=0, help='replay the first N only (0: all)')
    parser.add_argument('--wait', type=float, default=10.0,
                        help='seconds to wait for a subscriber')
    parser.add_argument('--ack-timeout', type=float, default=10.0,
                        help='seconds to wait for the subscribers to acknowledge everything')
    args = parser.parse_args(argv)
    try:
        cfg = ReplayConfig(args.file, rate=args.rate, topic=args.topic,
                           namespace=args.namespace, channel=args.channel,
                           limit=args.limit or None,
                           wait_s=args.wait, ack_timeout_s=args.ack_timeout)
        check = check_recording(cfg)
    except (ConfigError, WireError) as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _replay_on_graph(cfg, check)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except (ConfigError, WireError) as err:  # the file changed between check and replay
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == '__main__':
    sys.exit(main())
