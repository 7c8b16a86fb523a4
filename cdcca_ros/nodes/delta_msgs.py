"""DeltaEnvelope <-> DwcDelta messages: chunking, and reassembly with integrity checks."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from cdcca_ros.core.updates import DeltaEnvelope
from cdcca_ros.errors import ChunkError, PayloadTooLargeError
from cdcca_ros.msg import DwcDelta


def envelope_to_msgs(env: DeltaEnvelope, chunk_bytes: int, *, num_params: int = 0,
                     codec_params: dict | None = None, stamp=None) -> list[DwcDelta]:
    """Split a signed envelope into DwcDelta chunks (every chunk carries the signature)."""
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
                     signature=env.signature)
        if stamp is not None:
            m.header.stamp = stamp
        msgs.append(m)
    return msgs


@dataclass
class _Partial:
    first: DwcDelta
    chunks: dict[int, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class DeltaReassembler:
    """Collects DwcDelta chunks until a payload is complete, then yields its envelope.

    Inconsistent chunks (fields differing from the first chunk of their payload, an index out
    of range, a size over the limit) raise :class:`ChunkError` / :class:`PayloadTooLargeError`
    and drop that payload; incomplete payloads expire after ``timeout_s``.
    """

    KEY_FIELDS = ('device_id', 'round', 'base_version', 'base_hash', 'new_version', 'new_hash',
                  'codec', 'total_size', 'payload_sha256', 'chunk_count')

    def __init__(self, max_bytes: int = 64 << 20, timeout_s: float = 60.0) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._partial: dict[tuple, _Partial] = {}
        self.expired = 0

    def add(self, msg: DwcDelta) -> DeltaEnvelope | None:
        key = (msg.device_id, msg.round, msg.new_version, msg.payload_sha256)
        if msg.total_size > self.max_bytes:
            raise PayloadTooLargeError(f'delta round {msg.round} for {msg.device_id!r} announces '
                                       f'{msg.total_size} bytes, limit {self.max_bytes}')
        if msg.chunk_count == 0 or msg.chunk_index >= msg.chunk_count:
            raise ChunkError(f'delta chunk index {msg.chunk_index} of {msg.chunk_count}')
        part = self._partial.setdefault(key, _Partial(first=msg))
        for name in self.KEY_FIELDS:
            if getattr(msg, name) != getattr(part.first, name):
                del self._partial[key]
                raise ChunkError(f'delta chunk {msg.chunk_index}: {name} differs from the other '
                                 'chunks of its payload')
        if bytes(msg.signature) != bytes(part.first.signature):
            del self._partial[key]
            raise ChunkError(f'delta chunk {msg.chunk_index}: signature differs')
        part.chunks[msg.chunk_index] = bytes(msg.chunk)
        if sum(len(c) for c in part.chunks.values()) > msg.total_size:
            del self._partial[key]
            raise ChunkError(f'delta chunks exceed the announced {msg.total_size} bytes')
        if len(part.chunks) < msg.chunk_count:
            return None
        del self._partial[key]
        payload = b''.join(part.chunks[i] for i in range(msg.chunk_count))
        if len(payload) != msg.total_size:
            raise ChunkError(f'delta payload is {len(payload)} bytes, announced '
                             f'{msg.total_size}')
        if hashlib.sha256(payload).hexdigest() != msg.payload_sha256:
            raise ChunkError('delta payload sha256 does not match: corrupted chunk')
        try:
            base_version, new_version = int(msg.base_version), int(msg.new_version)
        except ValueError as err:
            raise ChunkError(f'delta versions must be integers: {err}') from err
        return DeltaEnvelope(device_id=msg.device_id, round=msg.round, base_version=base_version,
                             base_hash=msg.base_hash, new_version=new_version,
                             new_hash=msg.new_hash, codec=msg.codec, payload=payload,
                             signature=bytes(msg.signature))

    def expire(self, now: float | None = None) -> int:
        """Drop payloads that did not complete in time; returns how many."""
        now = time.monotonic() if now is None else now
        old = [k for k, p in self._partial.items() if now - p.started > self.timeout_s]
        for k in old:
            del self._partial[k]
        self.expired += len(old)
        return len(old)

    @property
    def pending(self) -> int:
        return len(self._partial)
