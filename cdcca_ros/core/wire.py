"""Downlink wire helpers: state-dict hashing, Ed25519 signing of deltas, chunking.

* :func:`state_dict_hash` names the exact weights a device holds (the base a delta applies
  to, and the result it must produce).
* :func:`sign_delta` / :func:`verify_delta` sign a canonical byte string: a domain tag, then
  every field length-prefixed (8-byte little-endian length), the payload by its sha256, the
  signing key's id and the expiry (:mod:`cdcca_ros.core.trust` decides which keys count). Keys
  are Ed25519 (``cryptography``), stored as PEM (PKCS#8 private, SubjectPublicKeyInfo public).
* :func:`split_chunks` / :class:`ChunkAssembler` carry a payload over a transport with a
  message-size limit. Each chunk is a fixed header (struct ``<4sB16sIIIQ32s``: magic
  ``b'CDCK'``, format version 1, 16-byte message id, index, count, chunk size, total length,
  sha256 of the whole payload) followed by its slice of the payload.

No rclpy, no torch at import time (hashing imports torch when called).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cdcca_ros.errors import (
    ChecksumError,
    ChunkError,
    ConfigError,
    PayloadTooLargeError,
    SignatureError,
    WireError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import Tensor

_U64_MAX = (1 << 64) - 1
_HASH_TAG = b'cdcca-state-dict-v1'
_SIGN_TAG = b'cdcca-dwc-delta-v2'


def _lp(data: bytes) -> bytes:
    """Length-prefixed field: 8-byte little-endian length, then the bytes."""
    return struct.pack('<Q', len(data)) + data


# --- state-dict hash --------------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)
def _tensor_header(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    nbytes = math.prod(shape) * dtype.itemsize
    return b''.join([_lp(name.encode()), _lp(str(dtype).removeprefix('torch.').encode()),
                     _lp(','.join(str(s) for s in shape).encode()), struct.pack('<Q', nbytes)])


def tensor_hash_header(name: str, dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    """The bytes :func:`state_dict_hash` feeds in front of one tensor's raw bytes.

    Length-prefixed UTF-8 name, dtype name (e.g. ``float32``) and comma-joined shape, then
    the tensor's byte length as an 8-byte little-endian integer. Cached: the same trainable
    set is hashed once per delta.
    """
    return _tensor_header(name, dtype, tuple(int(s) for s in shape))


def hash_tensor_bytes(parts: Iterable[tuple[bytes, bytes | memoryview]]) -> str:
    """:func:`state_dict_hash` from ``(tensor_hash_header(...), raw bytes)`` pairs.

    For callers that already hold the tensors' bytes (e.g. one flat buffer sliced per
    tensor): the pairs must come in sorted-name order, the raw bytes in native
    (little-endian) order, C-contiguous.
    """
    h = hashlib.sha256(_HASH_TAG)
    for header, raw in parts:
        h.update(header)
        h.update(raw)
    return h.hexdigest()


def state_dict_hash(sd: Mapping[str, Tensor]) -> str:
    """Deterministic sha256 (hex) of a state dict's names, dtypes, shapes and raw bytes.

    Keys are visited in sorted order; each contributes its UTF-8 name, dtype name (e.g.
    ``float32``), shape and little-endian raw bytes, all length-prefixed. Equal hashes mean
    bit-identical tensors; devices and strides do not matter.

    The tensors of each device are gathered into one byte buffer (one copy, one transfer to
    the CPU) and hashed in a single pass; the digest is the one a tensor-by-tensor walk gives.

    Raises:
        TypeError: A key is not a string or a value is not a tensor.
    """
    import torch

    names = sorted(sd)
    tensors = []
    for name in names:
        t = sd[name]
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f'state_dict_hash needs str -> Tensor, got {name!r}: '
                            f'{type(t).__name__}')
        tensors.append(t.detach())
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    raw: list[memoryview] = [memoryview(b'')] * len(tensors)
    for members in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).view(torch.uint8) for i in members])
        view = memoryview(flat.cpu().numpy())
        pos = 0
        for i in members:
            n = tensors[i].numel() * tensors[i].element_size()
            raw[i] = view[pos:pos + n]
            pos += n
    return hash_tensor_bytes(
        (_tensor_header(name, t.dtype, tuple(t.shape)), r)
        for name, t, r in zip(names, tensors, raw, strict=True))


# --- device ids -------------------------------------------------------------------------------
# The link's rule (cdcca_ros.transport.keys.validate_device_id): a key-expression part, a
# certificate common name and a file name.
_DEVICE_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]{0,62}', re.ASCII)


def check_device_id(device_id: object) -> str:
    """A device id read from a message, checked like the link checks configured ones: 1-63
    ASCII letters, digits, ``_``, ``.`` or ``-``, starting with a letter or digit.

    Raises:
        WireError: Anything else (it came from a message, so it is the sender's fault).
    """
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise WireError(f'device id {str(device_id)[:40]!r} is not 1-63 ASCII letters, digits, '
                        '"_", "." or "-" starting with a letter or digit')
    return device_id


# --- keys -------------------------------------------------------------------------------------
def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A fresh Ed25519 key pair (the cloud signs, every device holds the public key)."""
    key = Ed25519PrivateKey.generate()
    return key, key.public_key()


def _write_new(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(f'key file {path} exists; pass overwrite=True to replace it')
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.chmod(path, mode)


def save_private_key(key: Ed25519PrivateKey, path: str | Path, *,
                     password: bytes | None = None, overwrite: bool = False) -> None:
    """Write a private key as PKCS#8 PEM, readable by the owner only (mode 0600).

    Raises:
        ConfigError: The file exists and ``overwrite`` is False.
    """
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    _write_new(Path(path), pem, 0o600, overwrite)


def save_public_key(key: Ed25519PublicKey, path: str | Path, *, overwrite: bool = False
                    ) -> None:
    """Write a public key as SubjectPublicKeyInfo PEM.

    Raises:
        ConfigError: The file exists and ``overwrite`` is False.
    """
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(Path(path), pem, 0o644, overwrite)


def load_private_key(path: str | Path, *, password: bytes | None = None
                     ) -> Ed25519PrivateKey:
    """Read a PEM private key.

    Raises:
        ConfigError: Unreadable, wrong password, malformed, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f'cannot load private key {path}: {err}') from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f'private key {path} is a {type(key).__name__}, not Ed25519')
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a PEM public key.

    Raises:
        ConfigError: Unreadable, malformed, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f'cannot load public key {path}: {err}') from err
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f'public key {path} is a {type(key).__name__}, not Ed25519')
    return key


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key (for logs)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- delta signatures ---------------------------------------------------------------------------
def _u64(name: str, value: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise SignatureError(f'{name} must be an integer in [0, 2**64), got {value!r}')
    return struct.pack('<Q', value)


def _text(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f'{name} must be a str, got {type(value).__name__}')
    return _lp(value.encode())


def delta_signing_bytes(payload: bytes, device_id: str, round: int, base_hash: str,
                        new_version: int, *, base_version: int = 0, new_hash: str = '',
                        codec: str = '', key_id: str = '', expires: int = 0) -> bytes:
    """The canonical byte string a delta signature covers.

    Domain tag, then length-prefixed device id, round, base version, base hash, new version,
    new hash, codec, the sha256 of the payload, the signing key's id and the expiry (unix
    seconds). Every envelope field is covered, so no field can be changed without breaking
    the signature.

    Raises:
        SignatureError: A field has the wrong type or range.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise SignatureError(f'payload must be bytes, got {type(payload).__name__}')
    return b''.join([
        _lp(_SIGN_TAG),
        _text('device_id', device_id),
        _lp(_u64('round', round)),
        _lp(_u64('base_version', base_version)),
        _text('base_hash', base_hash),
        _lp(_u64('new_version', new_version)),
        _text('new_hash', new_hash),
        _text('codec', codec),
        _lp(hashlib.sha256(payload).digest()),
        _text('key_id', key_id),
        _lp(_u64('expires', expires)),
    ])


def sign_delta(private_key: Ed25519PrivateKey, payload: bytes, device_id: str, round: int,
               base_hash: str, new_version: int, *, base_version: int = 0,
               new_hash: str = '', codec: str = '', key_id: str = '', expires: int = 0
               ) -> bytes:
    """Ed25519 signature (64 bytes) over :func:`delta_signing_bytes`."""
    return private_key.sign(delta_signing_bytes(
        payload, device_id, round, base_hash, new_version, base_version=base_version,
        new_hash=new_hash, codec=codec, key_id=key_id, expires=expires))


def verify_delta(public_key: Ed25519PublicKey, signature: bytes, payload: bytes,
                 device_id: str, round: int, base_hash: str, new_version: int, *,
                 base_version: int = 0, new_hash: str = '', codec: str = '',
                 key_id: str = '', expires: int = 0) -> None:
    """Check a delta signature against one key (no key list, no expiry check: see
    :class:`cdcca_ros.core.trust.TrustStore` for those).

    Raises:
        SignatureError: The signature does not verify (any field or byte changed, another
            key) or a field is malformed.
    """
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
        got = len(signature) if isinstance(signature, (bytes, bytearray)) else signature
        raise SignatureError(f'delta signature for device {device_id!r} round {round} must '
                             f'be 64 bytes, got {got!r}')
    message = delta_signing_bytes(payload, device_id, round, base_hash, new_version,
                                  base_version=base_version, new_hash=new_hash, codec=codec,
                                  key_id=key_id, expires=expires)
    try:
        public_key.verify(bytes(signature), message)
    except InvalidSignature as err:
        raise SignatureError(f'delta signature for device {device_id!r} round {round} '
                             f'(version {new_version}) does not verify') from err


# --- chunking ---------------------------------------------------------------------------------
CHUNK_MAGIC = b'CDCK'
CHUNK_VERSION = 1
_CHUNK_STRUCT = struct.Struct('<4sB16sIIIQ32s')
CHUNK_HEADER_SIZE = _CHUNK_STRUCT.size
_MAX_COUNT = (1 << 32) - 1


@dataclass(frozen=True)
class ChunkHeader:
    """The fixed header in front of every chunk.

    Attributes:
        message_id: 16 bytes naming the payload.
        index: Position of this chunk, ``0 <= index < count``.
        count: Number of chunks of the payload.
        chunk_size: Payload bytes per chunk (the last one may hold fewer).
        total: Length of the whole payload.
        sha256: Digest of the whole payload.
    """

    message_id: bytes
    index: int
    count: int
    chunk_size: int
    total: int
    sha256: bytes

    def expected_length(self) -> int:
        """Bytes of payload this chunk must carry."""
        return max(0, min(self.chunk_size, self.total - self.index * self.chunk_size))


def split_chunks(payload: bytes, chunk_size: int, *, message_id: bytes | None = None
                 ) -> list[bytes]:
    """Cut a payload into self-describing chunks (header + up to ``chunk_size`` bytes).

    Args:
        payload: The bytes to send (may be empty: one chunk).
        chunk_size: Payload bytes per chunk (the header adds :data:`CHUNK_HEADER_SIZE`).
        message_id: 16 bytes; random when omitted.

    Raises:
        ConfigError: ``chunk_size`` is not positive, the id is not 16 bytes, or the payload
            needs more than 2**32 - 1 chunks.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
            0 < chunk_size <= _MAX_COUNT):
        raise ConfigError(f'chunk_size must be an integer in [1, 2**32), got {chunk_size!r}')
    mid = os.urandom(16) if message_id is None else message_id
    if not isinstance(mid, bytes) or len(mid) != 16:
        raise ConfigError(f'message_id must be 16 bytes, got {mid!r}')
    data = bytes(payload)
    count = max(1, -(-len(data) // chunk_size))
    if count > _MAX_COUNT:
        raise ConfigError(f'payload of {len(data)} bytes needs {count} chunks of '
                          f'{chunk_size}; raise chunk_size')
    digest = hashlib.sha256(data).digest()
    return [_CHUNK_STRUCT.pack(CHUNK_MAGIC, CHUNK_VERSION, mid, i, count, chunk_size,
                               len(data), digest) + data[i * chunk_size:(i + 1) * chunk_size]
            for i in range(count)]


def parse_chunk(chunk: bytes) -> tuple[ChunkHeader, bytes]:
    """Split a chunk into its header and data, checking the header's own consistency.

    Raises:
        ChunkError: Too short, wrong magic/version, or fields that contradict each other.
    """
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise ChunkError(f'chunk must be bytes, got {type(chunk).__name__}')
    chunk = bytes(chunk)
    if len(chunk) < CHUNK_HEADER_SIZE:
        raise ChunkError(f'chunk of {len(chunk)} bytes is shorter than the '
                         f'{CHUNK_HEADER_SIZE}-byte header')
    magic, version, mid, index, count, size, total, digest = _CHUNK_STRUCT.unpack_from(chunk)
    if magic != CHUNK_MAGIC:
        raise ChunkError(f'chunk magic is {magic!r}, expected {CHUNK_MAGIC!r}')
    if version != CHUNK_VERSION:
        raise ChunkError(f'chunk format version {version} is not supported '
                         f'(this build reads {CHUNK_VERSION})')
    head = ChunkHeader(mid, index, count, size, total, digest)
    if size == 0 or count != max(1, -(-total // size)):
        raise ChunkError(f'chunk of message {mid.hex()} claims {count} chunks of {size} bytes '
                         f'for {total} bytes')
    if index >= count:
        raise ChunkError(f'chunk index {index} is out of range for {count} chunks '
                         f'(message {mid.hex()})')
    data = chunk[CHUNK_HEADER_SIZE:]
    if len(data) != head.expected_length():
        raise ChunkError(f'chunk {index}/{count} of message {mid.hex()} carries {len(data)} '
                         f'bytes, expected {head.expected_length()}')
    return head, data


@dataclass
class _Partial:
    head: ChunkHeader
    parts: dict[int, bytes] = field(default_factory=dict)
    last_seen: float = 0.0


class ChunkAssembler:
    """Reassembles chunked payloads arriving in any order.

    A payload is returned once all its chunks arrived and its sha256 matches. Chunks that
    contradict the first chunk of their message, repeat an index, or belong to a message
    already delivered are refused; so are payloads over ``max_total_bytes``. Incomplete
    messages are dropped by :meth:`expire` once no chunk arrived for ``timeout_s``; when
    ``max_pending`` messages are incomplete, the stalest one makes room for a new one.

    Args:
        max_total_bytes: Largest payload accepted.
        timeout_s: Idle time after which an incomplete message is dropped.
        max_pending: Incomplete messages held at once.
    """

    def __init__(self, *, max_total_bytes: int = 64 << 20, timeout_s: float = 30.0,
                 max_pending: int = 8) -> None:
        if max_total_bytes <= 0:
            raise ConfigError(f'max_total_bytes must be positive, got {max_total_bytes}')
        if not timeout_s > 0:
            raise ConfigError(f'timeout_s must be positive, got {timeout_s}')
        if max_pending < 1:
            raise ConfigError(f'max_pending must be at least 1, got {max_pending}')
        self.max_total_bytes = int(max_total_bytes)
        self.timeout_s = float(timeout_s)
        self.max_pending = int(max_pending)
        self._pending: OrderedDict[bytes, _Partial] = OrderedDict()
        self._done: deque[bytes] = deque(maxlen=256)
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Number of incomplete messages held."""
        return len(self._pending)

    def add(self, chunk: bytes, now: float | None = None) -> bytes | None:
        """Take one chunk; returns the whole payload when this chunk completes it.

        Args:
            chunk: One chunk from :func:`split_chunks`.
            now: Monotonic time in seconds (``time.monotonic()`` when omitted).

        Raises:
            ChunkError: Malformed, inconsistent or duplicate chunk (state unchanged).
            PayloadTooLargeError: The message is larger than ``max_total_bytes``.
            ChecksumError: The reassembled payload's sha256 does not match (the message is
                dropped).
        """
        now = time.monotonic() if now is None else now
        head, data = parse_chunk(chunk)
        mid = head.message_id
        if head.total > self.max_total_bytes:
            raise PayloadTooLargeError(f'message {mid.hex()} is {head.total} bytes, over the '
                                       f'limit of {self.max_total_bytes}')
        if mid in self._done:
            raise ChunkError(f'chunk {head.index} of message {mid.hex()} arrived after the '
                             'message was delivered')
        partial = self._pending.get(mid)
        if partial is None:
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.dropped += 1
            partial = self._pending[mid] = _Partial(
                ChunkHeader(mid, 0, head.count, head.chunk_size, head.total, head.sha256))
        else:
            ref = partial.head
            if (head.count, head.chunk_size, head.total, head.sha256) != (
                    ref.count, ref.chunk_size, ref.total, ref.sha256):
                raise ChunkError(f'chunk {head.index} of message {mid.hex()} disagrees with '
                                 f'earlier chunks (count/size/total/sha256)')
            if head.index in partial.parts:
                raise ChunkError(f'duplicate chunk {head.index} of message {mid.hex()}')
        partial.parts[head.index] = data
        partial.last_seen = now
        self._pending.move_to_end(mid)
        if len(partial.parts) < head.count:
            return None
        del self._pending[mid]
        payload = b''.join(partial.parts[i] for i in range(head.count))
        if hashlib.sha256(payload).digest() != head.sha256:
            raise ChecksumError(f'message {mid.hex()} ({head.total} bytes) fails its sha256 '
                                'check; dropped')
        self._done.append(mid)
        return payload

    def expire(self, now: float | None = None) -> list[bytes]:
        """Drop incomplete messages idle for more than ``timeout_s``; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [mid for mid, p in self._pending.items() if now - p.last_seen > self.timeout_s]
        for mid in gone:
            del self._pending[mid]
        self.dropped += len(gone)
        return gone
