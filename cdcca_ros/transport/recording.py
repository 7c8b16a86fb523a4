"""Record what the cloud received to MCAP, and read / replay a recording.

The link carries CDR bytes, so recording writes them untouched: one channel per topic
(``message_encoding: cdr``) with a ``ros2msg`` schema that the caller supplies as
``(type name, definition text)``, e.g. ``('cdcca_ros/msg/UtsTokens', '<the .msg text>')``,
and the ``ros2`` profile -- the layout ``ros2 bag`` (MCAP storage) and Foxglove read.
A topic without a registered schema is still recorded, schemaless, so nothing received is
left out. ``log_time`` is when the cloud stored the message, ``publish_time`` when the device
spooled it, ``sequence`` the device's sequence number.

CLI::

    python -m cdcca_ros.transport.recording info FILE
    python -m cdcca_ros.transport.recording replay FILE [--topics T ...] [--rate 1.0]
        [--decode] [--limit N]

``replay`` prints one JSON line per message, paced like the recording (``--rate 0``: as fast
as possible); :func:`replay` does the same into any callable (the cloud node will feed it back
into ROS).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdcca_ros import __version__
from cdcca_ros.errors import ConfigError, WireError


@dataclass(frozen=True)
class RecordedMessage:
    """One message read back from a recording."""

    topic: str
    schema_name: str
    data: bytes
    log_time_ns: int
    publish_time_ns: int
    sequence: int


class McapRecorder:
    """Writes received messages into a new MCAP file (thread-safe).

    Args:
        path: File to create; an existing file is never overwritten.
        schemas: ``{topic: (type name, ros2msg definition text)}``.
        compression: ``'zstd'``, ``'lz4'`` or ``'none'``.
        metadata: Optional ``{key: value}`` written as an MCAP metadata record.
    """

    def __init__(self, path: str | Path, schemas: Mapping[str, tuple[str, str]] | None = None,
                 *, compression: str = 'zstd', metadata: Mapping[str, str] | None = None
                 ) -> None:
        from mcap.writer import CompressionType, Writer

        kinds = {'zstd': CompressionType.ZSTD, 'lz4': CompressionType.LZ4,
                 'none': CompressionType.NONE}
        if compression not in kinds:
            raise ConfigError(f'compression {compression!r} must be one of {sorted(kinds)}')
        self.path = Path(path)
        try:
            self._stream = open(self.path, 'xb')  # 'x': refuse to overwrite a recording
        except FileExistsError as err:
            raise ConfigError(f'recording {self.path} exists; refusing to overwrite') from err
        self._writer = Writer(self._stream, compression=kinds[compression])
        self._writer.start(profile='ros2', library=f'cdcca_ros {__version__}')
        if metadata:
            self._writer.add_metadata('cdcca_ros', dict(metadata))
        self._lock = threading.Lock()
        self._channels: dict[str, int] = {}
        self._closed = False
        self.message_count = 0
        for topic, (name, text) in (schemas or {}).items():
            self.register(topic, name, text)

    def register(self, topic: str, schema_name: str, schema_text: str) -> int:
        """Declare ``topic``'s message type; return its channel id (idempotent per topic)."""
        if not schema_name or '/' not in schema_name:
            raise ConfigError(f'schema name {schema_name!r} for {topic!r} must look like '
                              "'pkg/msg/Type'")
        with self._lock:
            if topic in self._channels:
                return self._channels[topic]
            schema_id = self._writer.register_schema(schema_name, 'ros2msg',
                                                     schema_text.encode())
            self._channels[topic] = self._writer.register_channel(topic, 'cdr', schema_id)
            return self._channels[topic]

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int,
              sequence: int = 0) -> None:
        """Append one message (CDR bytes) on ``topic``."""
        with self._lock:
            if self._closed:
                raise ConfigError(f'recording {self.path} is closed')
            channel = self._channels.get(topic)
            if channel is None:
                # No schema known: record anyway (schema id 0 = none) so nothing is lost.
                channel = self._channels[topic] = self._writer.register_channel(
                    topic, 'cdr', 0)
            self._writer.add_message(channel, log_time_ns, bytes(data), publish_time_ns,
                                     sequence & 0xFFFFFFFF)
            self.message_count += 1

    def close(self) -> None:
        """Write the summary and close the file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._writer.finish()
            self._stream.close()

    def __enter__(self) -> McapRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


#: Largest chunk a recording may decompress to (the recorder writes 1 MiB chunks).
MAX_CHUNK_BYTES = 64 << 20


def _check_chunks(f: Any) -> None:
    """Refuse a chunk that claims to decompress to more than :data:`MAX_CHUNK_BYTES` before any
    decompression allocates that much (a corrupt or hostile size field)."""
    from mcap.records import Chunk
    from mcap.stream_reader import StreamReader

    for record in StreamReader(f, skip_magic=False, emit_chunks=True).records:
        if not isinstance(record, Chunk):
            continue
        size = record.uncompressed_size
        if record.compression == 'lz4' and record.data:
            import lz4.frame

            size = max(size, lz4.frame.get_frame_info(record.data).get('content_size', 0))
        if size > MAX_CHUNK_BYTES:
            raise WireError(f'a chunk claims {size} bytes uncompressed, over the '
                            f'{MAX_CHUNK_BYTES}-byte limit')
    f.seek(0)


def read_recording(path: str | Path, topics: Iterable[str] | None = None
                   ) -> Iterator[RecordedMessage]:
    """Yield the messages of an MCAP file in log-time order.

    Raises:
        WireError: the file is not a readable MCAP (missing, truncated, corrupt).
    """
    from mcap.reader import make_reader

    try:
        with open(path, 'rb') as f:
            _check_chunks(f)
            reader = make_reader(f, validate_crcs=True)
            for schema, channel, message in reader.iter_messages(
                    topics=list(topics) if topics is not None else None):
                yield RecordedMessage(channel.topic, schema.name if schema else '',
                                      bytes(message.data), message.log_time,
                                      message.publish_time, message.sequence)
    except WireError:
        raise
    except Exception as err:  # noqa: BLE001 - the mcap reader on damaged bytes raises
        # McapError, EOFError, struct.error, OSError (a seek before the start), KeyError (a
        # dangling channel id), OverflowError, RuntimeError (lz4), ZstdError...
        raise WireError(f'recording {path} cannot be read: {type(err).__name__}: '
                        f'{err}'[:400]) from err


def decode_recording(path: str | Path, topics: Iterable[str] | None = None
                     ) -> Iterator[tuple[RecordedMessage, Any]]:
    """Like :func:`read_recording`, with each message also decoded from its ros2msg schema
    (``None`` for schemaless topics)."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    factory = DecoderFactory()
    try:
        with open(path, 'rb') as f:
            _check_chunks(f)
            reader = make_reader(f, validate_crcs=True)
            for schema, channel, message in reader.iter_messages(
                    topics=list(topics) if topics is not None else None):
                try:
                    decoder = factory.decoder_for(channel.message_encoding, schema)
                    value = decoder(message.data) if decoder is not None else None
                except Exception as err:  # noqa: BLE001 - any parser error of untrusted text
                    raise WireError(f'recording {path}: message on {channel.topic!r} does not '
                                    f'decode with its schema: {type(err).__name__}: '
                                    f'{err}'[:400]) from err
                yield (RecordedMessage(channel.topic, schema.name if schema else '',
                                       bytes(message.data), message.log_time,
                                       message.publish_time, message.sequence), value)
    except WireError:
        raise
    except Exception as err:  # noqa: BLE001 - as in read_recording
        raise WireError(f'recording {path} cannot be decoded: {type(err).__name__}: '
                        f'{err}'[:400]) from err


def _pace(items: Iterable[tuple[RecordedMessage, Any]], rate: float,
          sleep: Callable[[float], None]) -> Iterator[tuple[RecordedMessage, Any]]:
    if rate < 0:
        raise ConfigError(f'rate={rate} must be >= 0')
    first_log: int | None = None
    start = time.monotonic()
    for msg, value in items:
        if rate > 0:
            first_log = msg.log_time_ns if first_log is None else first_log
            wait = (msg.log_time_ns - first_log) / 1e9 / rate - (time.monotonic() - start)
            if wait > 0:
                sleep(wait)
        yield msg, value


def replay(path: str | Path, sink: Callable[[RecordedMessage], None], *, rate: float = 1.0,
           topics: Iterable[str] | None = None,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Feed a recording into ``sink``, paced by log time divided by ``rate``.

    Args:
        path: MCAP file.
        sink: Called once per message, in log-time order.
        rate: Speed factor (2.0 = twice as fast); 0 = no pacing.
        topics: Only these topics (default all).
        sleep: Injected for tests.

    Returns:
        The number of messages fed.
    """
    count = 0
    for msg, _ in _pace(((m, None) for m in read_recording(path, topics)), rate, sleep):
        sink(msg)
        count += 1
    return count


def _info(path: str) -> dict[str, Any]:
    topics: dict[str, dict[str, Any]] = {}
    first = last = None
    for msg in read_recording(path):
        t = topics.setdefault(msg.topic, {'schema': msg.schema_name, 'count': 0, 'bytes': 0})
        t['count'] += 1
        t['bytes'] += len(msg.data)
        first = msg.log_time_ns if first is None else min(first, msg.log_time_ns)
        last = msg.log_time_ns if last is None else max(last, msg.log_time_ns)
    duration = 0.0 if first is None or last is None else (last - first) / 1e9
    return {'file': path, 'messages': sum(t['count'] for t in topics.values()),
            'duration_s': round(duration, 6), 'topics': topics}


def _jsonable(value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return '...'
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return f'<{len(value)} bytes>'
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v, depth + 1) for v in value[:16]]
        return items + ([f'... {len(value) - 16} more'] if len(value) > 16 else [])
    slots = getattr(value, '__slots__', None)
    if slots:
        return {s: _jsonable(getattr(value, s), depth + 1) for s in slots if s[0] != '_'}
    return repr(value)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.transport.recording')
    sub = parser.add_subparsers(dest='cmd', required=True)
    p_info = sub.add_parser('info', help='summarize a recording')
    p_info.add_argument('file')
    p_rep = sub.add_parser('replay', help='print the messages of a recording as JSON lines')
    p_rep.add_argument('file')
    p_rep.add_argument('--topics', nargs='+', default=None)
    p_rep.add_argument('--rate', type=float, default=0.0, help='pacing speed factor, 0 = none')
    p_rep.add_argument('--decode', action='store_true', help='decode with the ros2msg schema')
    p_rep.add_argument('--limit', type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.cmd == 'info':
            print(json.dumps(_info(args.file), indent=2))
            return 0
        items: Iterable[tuple[RecordedMessage, Any]] = (
            decode_recording(args.file, args.topics) if args.decode
            else ((m, None) for m in read_recording(args.file, args.topics)))
        for count, (msg, value) in enumerate(_pace(items, args.rate, time.sleep)):
            if args.limit is not None and count >= args.limit:
                break
            line = {'topic': msg.topic, 'schema': msg.schema_name, 'len': len(msg.data),
                    'log_time_ns': msg.log_time_ns, 'publish_time_ns': msg.publish_time_ns,
                    'sequence': msg.sequence}
            if args.decode:
                line['value'] = _jsonable(value)
            print(json.dumps(line), flush=True)
    except (WireError, ConfigError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
