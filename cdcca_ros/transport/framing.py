"""Versioned frames of the link: a fixed header, a topic, one chunk of a message.

A message (opaque bytes, e.g. the CDR of a ``UtsTokens``) is cut into chunks of at most
``chunk_size`` bytes; every chunk travels in its own frame whose header names the message
(``epoch``, ``seq``), the chunk (``index`` / ``count``), the whole message's length and
SHA-256, and carries a CRC-32 over the frame. The receiver's :class:`Reassembler` puts chunks
back together in any order, checks length and SHA-256, bounds its memory, and drops a chunk set
that never completes after a timeout. Acknowledgements are frames too (``KIND_ACK``, no body).

Header layout (network byte order, :data:`HEADER_SIZE` bytes)::

    magic 4s | version B | kind B | flags H | epoch Q | seq Q | floor Q | created_ns Q |
    index I | count I | total_len Q | sha256 32s | topic_len H | body_len I | crc32 I

``floor`` is the sender's lowest sequence number still waiting for an acknowledgement: the
receiver learns from it which messages the sender dropped (bounded spool) and stops waiting
for them. Every malformed frame raises a :class:`~cdcca_ros.errors.WireError` subclass.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

from cdcca_ros.errors import (
    ChecksumError,
    ChunkError,
    ConfigError,
    PayloadTooLargeError,
    WireError,
)

MAGIC = b'CDCZ'
VERSION = 1
KIND_DATA = 1
KIND_ACK = 2
KIND_VERSION = 3
KINDS = {KIND_DATA: 'data', KIND_ACK: 'ack', KIND_VERSION: 'version'}

_HEADER = struct.Struct('>4sBBHQQQQIIQ32sHII')
HEADER_SIZE = _HEADER.size
_CRC_OFFSET = HEADER_SIZE - 4
MAX_TOPIC_BYTES = 1024


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        kind: :data:`KIND_DATA`, :data:`KIND_ACK` or :data:`KIND_VERSION`.
        epoch: Identity of the sender's sequence space (its spool's creation).
        seq: Message sequence number (for an ack: the last one acknowledged, cumulative).
        floor: Sender's lowest unacknowledged sequence number.
        created_ns: Sender's wall-clock time when the message was created.
        index: Chunk index, ``0 <= index < count``.
        count: Number of chunks of the message.
        total_len: Length of the whole message.
        sha256: SHA-256 of the whole message.
        topic: Topic the message belongs to (ROS topic name, for the application).
        body: This chunk's bytes.
    """

    kind: int
    epoch: int
    seq: int
    floor: int
    created_ns: int
    index: int
    count: int
    total_len: int
    sha256: bytes
    topic: str
    body: bytes

    def encode(self) -> bytes:
        """Serialize with a CRC-32 over header, topic and body."""
        topic = self.topic.encode('utf-8')
        if len(topic) > MAX_TOPIC_BYTES:
            raise WireError(f'topic {self.topic[:40]!r}... is {len(topic)} bytes '
                            f'(max {MAX_TOPIC_BYTES})')
        head = _HEADER.pack(MAGIC, VERSION, self.kind, 0, self.epoch, self.seq, self.floor,
                            self.created_ns, self.index, self.count, self.total_len,
                            self.sha256, len(topic), len(self.body), 0)
        crc = zlib.crc32(self.body, zlib.crc32(topic, zlib.crc32(head)))
        return b''.join((head[:_CRC_OFFSET], struct.pack('>I', crc), topic, self.body))


def decode_frame(data: bytes | bytearray | memoryview, max_payload: int | None = None) -> Frame:
    """Parse and check one frame.

    Args:
        data: The frame's bytes as received.
        max_payload: Largest whole message accepted (checked on the header, before any
            allocation); ``None`` for no limit.

    Raises:
        WireError: truncated, trailing bytes, bad magic, unknown version or kind, bad topic.
        ChecksumError: the CRC-32 does not match.
        ChunkError: inconsistent chunk index/count/length fields.
        PayloadTooLargeError: the message is larger than ``max_payload``.
    """
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise WireError(f'truncated frame: {len(data)} bytes, header alone is {HEADER_SIZE}')
    (magic, version, kind, _flags, epoch, seq, floor, created_ns, index, count, total_len,
     sha, topic_len, body_len, crc) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f'bad frame magic {magic!r} (expected {MAGIC!r})')
    if version != VERSION:
        raise WireError(f'unsupported frame version {version} (this side speaks {VERSION})')
    if kind not in KINDS:
        raise WireError(f'unknown frame kind {kind}')
    expected = HEADER_SIZE + topic_len + body_len
    if len(data) != expected:
        what = 'truncated' if len(data) < expected else 'trailing bytes in'
        raise WireError(f'{what} frame: {len(data)} bytes, header says {expected}')
    head = data[:_CRC_OFFSET] + b'\0\0\0\0'
    topic_b = data[HEADER_SIZE:HEADER_SIZE + topic_len]
    body = data[HEADER_SIZE + topic_len:]
    actual = zlib.crc32(body, zlib.crc32(topic_b, zlib.crc32(head)))
    if actual != crc:
        raise ChecksumError(f'frame CRC-32 mismatch (seq {seq}, chunk {index}/{count}): '
                            f'got {actual:08x}, header says {crc:08x}')
    if max_payload is not None and total_len > max_payload:
        raise PayloadTooLargeError(f'message seq {seq} declares {total_len} bytes, '
                                   f'over the limit of {max_payload}')
    if count == 0 or index >= count or body_len > total_len or count > max(1, total_len):
        raise ChunkError(f'inconsistent chunk fields: index {index}, count {count}, '
                         f'body {body_len} bytes, message {total_len} bytes (seq {seq})')
    try:
        topic = topic_b.decode('utf-8')
    except UnicodeDecodeError as err:
        raise WireError(f'frame topic is not UTF-8 (seq {seq})') from err
    return Frame(kind, epoch, seq, floor, created_ns, index, count, total_len, sha, topic, body)


def split_message(payload: bytes, *, chunk_size: int, epoch: int, seq: int, floor: int,
                  created_ns: int, topic: str, kind: int = KIND_DATA) -> Iterator[bytes]:
    """Encode ``payload`` as ``ceil(len / chunk_size)`` frames (one for an empty payload)."""
    if chunk_size < 1:
        raise ConfigError(f'chunk_size={chunk_size} must be positive')
    digest = hashlib.sha256(payload).digest()
    count = max(1, -(-len(payload) // chunk_size))
    view = memoryview(payload)
    for index in range(count):
        body = bytes(view[index * chunk_size:(index + 1) * chunk_size])
        yield Frame(kind, epoch, seq, floor, created_ns, index, count, len(payload), digest,
                    topic, body).encode()


def ack_frame(epoch: int, seq: int) -> bytes:
    """An acknowledgement of every message up to ``seq`` of sequence space ``epoch``."""
    return Frame(KIND_ACK, epoch, seq, 0, 0, 0, 1, 0, bytes(32), '', b'').encode()


@dataclass
class _Partial:
    first: Frame
    chunks: dict[int, bytes]
    size: int
    started: float


class Reassembler:
    """Collects chunks into whole messages, with bounded memory and a timeout.

    Args:
        max_payload: Largest message accepted.
        timeout_s: A chunk set not completed this long after its first chunk is dropped.
        max_buffered: Bytes held in incomplete chunk sets; past it the oldest set is dropped.
    """

    def __init__(self, max_payload: int, timeout_s: float = 30.0,
                 max_buffered: int | None = None) -> None:
        if max_payload < 0 or timeout_s <= 0:
            raise ConfigError(f'max_payload={max_payload} / timeout_s={timeout_s} invalid')
        self.max_payload = max_payload
        self.timeout_s = timeout_s
        self.max_buffered = max(max_payload, 1) * 2 if max_buffered is None else max_buffered
        self._partial: dict[Hashable, _Partial] = {}
        self._buffered = 0
        self.timed_out = 0
        self.evicted = 0

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def pending_sets(self) -> int:
        return len(self._partial)

    def add(self, source: Hashable, frame: Frame, now: float) -> bytes | None:
        """Add one chunk; return the whole message once its last chunk arrived.

        Args:
            source: Who sent it (e.g. the device id): sets from different senders never mix.
            frame: A decoded data/version frame.
            now: Current monotonic time (s).

        Raises:
            PayloadTooLargeError: the message is over ``max_payload``.
            ChunkError: the chunk contradicts earlier chunks of the same message (the set
                is dropped), or the reassembled bytes fail the length/SHA-256 check.
        """
        if frame.total_len > self.max_payload:
            raise PayloadTooLargeError(f'message seq {frame.seq} from {source!r} declares '
                                       f'{frame.total_len} bytes, over {self.max_payload}')
        if frame.count == 1:
            return _check_whole(source, frame, frame.body)
        key = (source, frame.epoch, frame.seq)
        part = self._partial.get(key)
        if part is not None and (part.first.count, part.first.total_len, part.first.sha256,
                                 part.first.topic) != (frame.count, frame.total_len,
                                                       frame.sha256, frame.topic):
            self._drop(key)
            raise ChunkError(f'chunk {frame.index}/{frame.count} of seq {frame.seq} from '
                             f'{source!r} contradicts earlier chunks; set dropped')
        if part is None:
            part = self._partial[key] = _Partial(frame, {}, 0, now)
        if frame.index not in part.chunks:
            part.chunks[frame.index] = frame.body
            part.size += len(frame.body)
            self._buffered += len(frame.body)
            if part.size > frame.total_len:
                self._drop(key)
                raise ChunkError(f'chunks of seq {frame.seq} from {source!r} exceed the '
                                 f'declared {frame.total_len} bytes; set dropped')
        if len(part.chunks) < frame.count:
            self._evict_over_budget(keep=key)
            return None
        self._drop(key)
        whole = b''.join(part.chunks[i] for i in range(frame.count))
        return _check_whole(source, frame, whole)

    def expire(self, now: float) -> list[Hashable]:
        """Drop chunk sets older than the timeout; return their keys."""
        old = [k for k, p in self._partial.items() if now - p.started > self.timeout_s]
        for key in old:
            self._drop(key)
        self.timed_out += len(old)
        return old

    def clear(self) -> None:
        """Forget every incomplete set."""
        self._partial.clear()
        self._buffered = 0

    def _drop(self, key: Hashable) -> None:
        part = self._partial.pop(key, None)
        if part is not None:
            self._buffered -= part.size

    def _evict_over_budget(self, keep: Hashable) -> None:
        while self._buffered > self.max_buffered and len(self._partial) > 1:
            oldest = min((k for k in self._partial if k != keep),
                         key=lambda k: self._partial[k].started)
            self._drop(oldest)
            self.evicted += 1


def _check_whole(source: Hashable, frame: Frame, whole: bytes) -> bytes:
    if len(whole) != frame.total_len:
        raise ChunkError(f'message seq {frame.seq} from {source!r} reassembled to '
                         f'{len(whole)} bytes, header says {frame.total_len}')
    if hashlib.sha256(whole).digest() != frame.sha256:
        raise ChunkError(f'message seq {frame.seq} from {source!r}: SHA-256 mismatch after '
                         'reassembly')
    return whole
