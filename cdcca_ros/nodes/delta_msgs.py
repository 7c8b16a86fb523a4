"""DeltaEnvelope <-> DwcDelta messages: chunking, and reassembly with integrity checks.

Reassembly holds incomplete payloads in bounded memory: at most ``max_pending`` of them and
``max_pending_bytes`` of chunk bytes in all (the oldest incomplete payload makes room for a
new one, counted in ``evicted``), each for at most ``timeout_s`` from its first chunk (then
``expired``). Every chunk must carry at least one byte (an empty chunk stream never ends),
so a payload has at most ``total_size`` chunks.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from cdcca_ros.core.trust import MAX_KEY_LIST_BYTES
from cdcca_ros.core.updates import MAX_VERSION, DeltaEnvelope
from cdcca_ros.errors import ChunkError, ConfigError, PayloadTooLargeError
from cdcca_ros.msg import DwcDelta

_VERSION_RE = re.compile(r'(0|[1-9][0-9]{0,19})', re.ASCII)
_SHA256_RE = re.compile(r'[0-9a-f]{64}', re.ASCII)
MAX_FIELD_CHARS = 256  # hashes, codec names, key ids, device ids


def parse_version(text: str, what: str = 'version') -> int:
    """A version string as an integer: ASCII decimal digits only, no sign, spaces,
    underscores or leading zeros, at most 2**64 - 1.

    Raises:
        ChunkError: Anything else (``' 1'``, ``'1_0'``, ``'٣'``, ``'-1'``, ``'01'``...).
    """
    if not isinstance(text, str) or not _VERSION_RE.fullmatch(text) or (
            int(text) > MAX_VERSION):
        raise ChunkError(f'delta {what} must be a decimal integer in [0, 2**64), got '
                         f'{str(text)[:40]!r}')
    return int(text)


def envelope_to_msgs(env: DeltaEnvelope, chunk_bytes: int, *, num_params: int = 0,
                     codec_params: dict | None = None, stamp=None) -> list[DwcDelta]:
    """Split a signed envelope into DwcDelta chunks (every chunk carries the signature, the
    key id, the expiry and the attached key list)."""
    payload = env.payload
    count = max(1, -(-len(payload) // chunk_bytes))
    digest = hashlib.sha256(payload).hexdigest()
    msgs = []
    for i in range(count):
        m = DwcDelta(device_id=env.device_id, round=env.round,
                     base_version=str(env.base_version), base_hash=env.base_hash,
                     new_version=str(env.new_version), new_hash=env.new_hash, codec=env.codec,
                     codec_params=json.dumps(codec_params or {}), num_params=num_params,
                     total_size=len(payload), payload_sha256=digest, chunk_index=i,
                     chunk_count=count, chunk=payload[i * chunk_bytes:(i + 1) * chunk_bytes],
                     signature=env.signature, key_id=env.key_id, expires=env.expires,
                     key_list=env.key_list)
        if stamp is not None:
            m.header.stamp = stamp
        msgs.append(m)
    return msgs


@dataclass
class _Partial:
    first: DwcDelta
    chunks: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0
    started: float = field(default_factory=time.monotonic)


class DeltaReassembler:
    """Collects DwcDelta chunks until a payload is complete, then yields its envelope.

    Inconsistent chunks (fields differing from the first chunk of their payload, an index out
    of range, an empty chunk, a size over the limit, a malformed version or hash) raise
    :class:`ChunkError` / :class:`PayloadTooLargeError`; a chunk that contradicts its payload
    drops that payload. A chunk repeated with the same bytes is ignored (``duplicates``); a
    payload delivered again is reassembled again (the gate refuses it as a replay).

    Args:
        max_bytes: Largest payload accepted.
        timeout_s: An incomplete payload is dropped this long after its first chunk.
        max_pending: Incomplete payloads held at once.
        max_pending_bytes: Chunk bytes of incomplete payloads held at once.
    """

    KEY_FIELDS = ('device_id', 'round', 'base_version', 'base_hash', 'new_version', 'new_hash',
                  'codec', 'total_size', 'payload_sha256', 'chunk_count', 'key_id', 'expires')

    def __init__(self, max_bytes: int = 64 << 20, timeout_s: float = 60.0, *,
                 max_pending: int = 4, max_pending_bytes: int = 64 << 20) -> None:
        if max_bytes < 1 or max_pending < 1 or max_pending_bytes < 1 or not timeout_s > 0:
            raise ConfigError(f'reassembler limits must be positive, got max_bytes='
                              f'{max_bytes}, timeout_s={timeout_s}, max_pending={max_pending},'
                              f' max_pending_bytes={max_pending_bytes}')
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._partial: OrderedDict[tuple, _Partial] = OrderedDict()
        self.pending_bytes = 0
        self.expired = 0
        self.evicted = 0
        self.duplicates = 0

    def _check(self, msg: DwcDelta) -> None:
        """Checks of one chunk on its own (no state)."""
        if msg.total_size > self.max_bytes:
            raise PayloadTooLargeError(f'delta round {msg.round} announces {msg.total_size} '
                                       f'bytes, limit {self.max_bytes}')
        if msg.chunk_count == 0 or msg.chunk_index >= msg.chunk_count:
            raise ChunkError(f'delta chunk index {msg.chunk_index} of {msg.chunk_count}')
        if msg.chunk_count > max(1, msg.total_size):
            raise ChunkError(f'delta announces {msg.chunk_count} chunks for {msg.total_size} '
                             'bytes: every chunk must carry at least one byte')
        if len(msg.chunk) > msg.total_size or (msg.total_size and not len(msg.chunk)):
            raise ChunkError(f'delta chunk {msg.chunk_index} carries {len(msg.chunk)} bytes of '
                             f'a {msg.total_size}-byte payload')
        for name in ('base_hash', 'new_hash', 'codec', 'key_id', 'device_id'):
            if len(getattr(msg, name)) > MAX_FIELD_CHARS:
                raise ChunkError(f'delta {name} is longer than {MAX_FIELD_CHARS} characters')
        if not _SHA256_RE.fullmatch(msg.payload_sha256):
            raise ChunkError('delta payload_sha256 must be 64 lowercase hex digits')
        if len(msg.signature) > 1024 or len(msg.key_list) > MAX_KEY_LIST_BYTES:
            raise ChunkError(f'delta signature ({len(msg.signature)} B) or key list '
                             f'({len(msg.key_list)} B) is too large')
        parse_version(msg.base_version, 'base_version')
        parse_version(msg.new_version, 'new_version')

    def _drop(self, key: tuple) -> None:
        part = self._partial.pop(key, None)
        if part is not None:
            self.pending_bytes -= part.nbytes

    def add(self, msg: DwcDelta, now: float | None = None) -> DeltaEnvelope | None:
        """Take one chunk; the envelope when this chunk completes its payload.

        Raises:
            ChunkError: A malformed or inconsistent chunk, or a payload failing its checks.
            PayloadTooLargeError: The payload is announced larger than ``max_bytes``.
        """
        now = time.monotonic() if now is None else now
        self._check(msg)
        key = (msg.device_id, msg.round, msg.new_version, msg.payload_sha256)
        part = self._partial.get(key)
        data = bytes(msg.chunk)
        if part is None:
            while self._partial and (len(self._partial) >= self.max_pending or
                                     self.pending_bytes + len(data) > self.max_pending_bytes):
                self._drop(next(iter(self._partial)))
                self.evicted += 1
            part = self._partial[key] = _Partial(first=msg, started=now)
        for name in self.KEY_FIELDS:
            if getattr(msg, name) != getattr(part.first, name):
                self._drop(key)
                raise ChunkError(f'delta chunk {msg.chunk_index}: {name} differs from the other '
                                 'chunks of its payload')
        for name in ('signature', 'key_list'):
            if bytes(getattr(msg, name)) != bytes(getattr(part.first, name)):
                self._drop(key)
                raise ChunkError(f'delta chunk {msg.chunk_index}: {name} differs from the other '
                                 'chunks of its payload')
        if msg.chunk_index in part.chunks:
            if part.chunks[msg.chunk_index] == data:
                self.duplicates += 1
                return None
            raise ChunkError(f'delta chunk {msg.chunk_index} arrived twice with different bytes')
        if part.nbytes + len(data) > msg.total_size:
            self._drop(key)
            raise ChunkError(f'delta chunks exceed the announced {msg.total_size} bytes')
        if self.pending_bytes + len(data) > self.max_pending_bytes:
            self._drop(key)
            self.evicted += 1
            raise PayloadTooLargeError(f'delta chunks held would exceed '
                                       f'{self.max_pending_bytes} bytes; payload dropped')
        part.chunks[msg.chunk_index] = data
        part.nbytes += len(data)
        self.pending_bytes += len(data)
        if len(part.chunks) < msg.chunk_count:
            return None
        self._drop(key)
        payload = b''.join(part.chunks[i] for i in range(msg.chunk_count))
        if len(payload) != msg.total_size:
            raise ChunkError(f'delta payload is {len(payload)} bytes, announced '
                             f'{msg.total_size}')
        if hashlib.sha256(payload).hexdigest() != msg.payload_sha256:
            raise ChunkError('delta payload sha256 does not match: corrupted or mixed chunks')
        return DeltaEnvelope(device_id=msg.device_id, round=msg.round,
                             base_version=parse_version(msg.base_version, 'base_version'),
                             base_hash=msg.base_hash,
                             new_version=parse_version(msg.new_version, 'new_version'),
                             new_hash=msg.new_hash, codec=msg.codec, payload=payload,
                             signature=bytes(msg.signature), key_id=msg.key_id,
                             expires=int(msg.expires), key_list=bytes(msg.key_list))

    def expire(self, now: float | None = None) -> int:
        """Drop payloads that did not complete in time; returns how many."""
        now = time.monotonic() if now is None else now
        old = [k for k, p in self._partial.items() if now - p.started > self.timeout_s]
        for k in old:
            self._drop(k)
        self.expired += len(old)
        return len(old)

    @property
    def pending(self) -> int:
        """Incomplete payloads held."""
        return len(self._partial)

    def status(self) -> dict[str, int]:
        """For diagnostics: what is held and what was dropped."""
        return {'delta_chunks_pending': self.pending,
                'delta_chunk_bytes_pending': self.pending_bytes,
                'delta_partials_expired': self.expired,
                'delta_partials_evicted': self.evicted,
                'delta_chunks_duplicate': self.duplicates}
