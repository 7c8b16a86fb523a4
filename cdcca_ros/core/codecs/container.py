"""The DWC payload format: one container for every codec (never pickle).

Version 2. All integers little-endian; ``varint`` is unsigned LEB128 (at most 9 bytes)::

    magic      4 B    b'CDWC'
    version    u8     2
    flags      u8     bit 0: self-describing (an index follows); other bits must be 0
    codec      u8 length (1..32) + ASCII name ('fp16', 'nf4', 'sparse', ...)
    index      self-describing: varint length + zlib-compressed UTF-8 JSON
                 {"index": [[name, dtype, [shape...]], ...], "params": {knobs}}
                 (payload order; dtype one of float16/bfloat16/float32/float64);
               compact: 8 B spec digest (below); the decoder is given the spec
    arrays     u8 count, then per array: u8 name length + ASCII name, u8 dtype code
                 (1 u8, 2 u16, 3 u32, 4 u64, 5 i8, 6 i16, 7 i32, 8 i64, 9 f16, 10 f32,
                 11 f64), varint element count, the elements (1-D, little-endian)
    check      8 B    first 8 bytes of sha256 over every byte before it

Compact payloads (what the cloud sends: the device always knows its trainable set) carry no
names, dtypes or shapes: their tensors are the spec's, sorted by name, decoded as float32,
and the spec digest is the first 8 bytes of sha256 over ``b'cdcca-dwc-spec-v2'`` then, per
tensor in name order, varint(len(name)) + UTF-8 name + varint(ndim) + varint(each dim). A
decoder given another trainable set refuses the payload. Self-describing payloads (tools,
replay, tests) decode without a spec and keep every tensor's name, dtype and key order.

What the arrays hold is each codec's business (its module says, in the order of the elements
they describe). Decoding never trusts the bytes: any malformed, truncated or inconsistent
payload (checksum, lengths, table, a coder that does not end exactly empty, escape counts,
spec digest) raises :class:`~cdcca_ros.errors.CodecError`.

The codecs build payloads with :func:`entries`, :func:`flat_f32` and :func:`write_payload`
and read them back through :func:`read_payload` and :func:`array`. Pure logic: no rclpy,
no network.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.errors import CodecError, DeltaMismatchError, SpecMismatchError

FORMAT_NAME = 'cdcca-dwc'
FORMAT_VERSION = 2
MAGIC = b'CDWC'
# Refuse to decode payloads that claim more values than this (2**28 floats = 1 GiB).
DEFAULT_MAX_NUMEL = 1 << 28
_MAX_INDEX_BYTES = 64 << 20
_FLAG_SELF_DESCRIBING = 0x01
_CHECK_BYTES = 8
_DIGEST_BYTES = 8
_MAX_CODEC_NAME = 32
_SPEC_SALT = b'cdcca-dwc-spec-v2'

_DTYPES: dict[str, torch.dtype] = {
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
    'float32': torch.float32,
    'float64': torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# Array element types on the wire (code -> little-endian numpy dtype).
_WIRE_DTYPES: dict[int, np.dtype] = {
    1: np.dtype('<u1'), 2: np.dtype('<u2'), 3: np.dtype('<u4'), 4: np.dtype('<u8'),
    5: np.dtype('<i1'), 6: np.dtype('<i2'), 7: np.dtype('<i4'), 8: np.dtype('<i8'),
    9: np.dtype('<f2'), 10: np.dtype('<f4'), 11: np.dtype('<f8'),
}
_WIRE_CODES = {dt.str: code for code, dt in _WIRE_DTYPES.items()}

StateDict = Mapping[str, Tensor]
# What a decoder is told of the trainable set: name -> tensor or shape.
Spec = Mapping[str, Tensor | Sequence[int]]


def check_float(name: str, t: Tensor, what: str) -> None:
    """Refuse anything but a float tensor of a dtype the format carries.

    Raises:
        DeltaMismatchError: ``t`` is not a tensor, or not of a float dtype.
    """
    if not isinstance(t, Tensor):
        raise DeltaMismatchError(f'{what}[{name!r}] is a {type(t).__name__}, not a tensor')
    if t.dtype not in _DTYPE_NAMES:
        raise DeltaMismatchError(f'{what}[{name!r}] has dtype {t.dtype}; expected a float dtype')


def all_finite(t: Tensor) -> bool:
    """Whether every value of a float tensor is finite (True when it is empty).

    One ``aminmax`` reduction (NaN propagates to both ends, +-Inf lands on one of them):
    on CPU several times faster than ``isfinite().all()``, which builds a bool tensor.
    """
    import torch

    if not t.numel():
        return True
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


# --- tensors in payload order -----------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor of a payload: its name, dtype name (a key of the index) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def flat_f32(name: str, t: Tensor) -> np.ndarray:
    """A tensor as a flat float32 numpy array, refusing non-float and non-finite values."""
    check_float(name, t, 'delta')
    arr = t.detach().to('cpu', torch.float32).contiguous().reshape(-1).numpy()
    if not np.all(np.isfinite(arr)):
        raise CodecError(f'delta[{name!r}] holds non-finite values; refusing to encode')
    return arr


def entries(delta: StateDict, self_describing: bool = True) -> list[Entry]:
    """The delta's tensors in payload order: the delta's own order when self-describing,
    else sorted by name (float32, as a compact payload decodes)."""
    out = []
    for name, t in delta.items():
        if not isinstance(name, str):
            raise CodecError(f'delta key {name!r} is not a string')
        if not isinstance(t, Tensor) or t.dtype not in _DTYPE_NAMES:
            raise CodecError(f'delta[{name!r}] must be a float tensor, got '
                             f'{getattr(t, "dtype", type(t).__name__)}')
        out.append(Entry(name, _DTYPE_NAMES[t.dtype] if self_describing else 'float32',
                         tuple(int(s) for s in t.shape)))
    return out if self_describing else sorted(out, key=lambda e: e.name)


def _varint(value: int) -> bytes:
    if value < 0:
        raise CodecError(f'cannot write a negative length {value}')
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _spec_digest(entries: Sequence[Entry]) -> bytes:
    """The 8-byte digest of a trainable set's names and shapes (see the module docstring)."""
    h = hashlib.sha256(_SPEC_SALT)
    for e in sorted(entries, key=lambda e: e.name):
        name = e.name.encode()
        h.update(_varint(len(name)) + name + _varint(len(e.shape)))
        h.update(b''.join(_varint(s) for s in e.shape))
    return h.digest()[:_DIGEST_BYTES]


def _spec_key(spec: Spec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A hashable, order-free form of a spec: ((name, shape), ...) sorted by name (checked
    by :func:`_spec_resolved`; building it is on every device decode, so it is kept cheap)."""
    if not isinstance(spec, Mapping):
        raise CodecError(f'spec must map names to tensors or shapes, got {type(spec).__name__}')
    try:
        key = tuple(sorted((name, value if type(value) is tuple
                            else tuple(getattr(value, 'shape', value)))
                           for name, value in spec.items()))
        hash(key)
    except TypeError as err:
        raise CodecError(f'spec must map names (str) to shapes: {err}') from err
    return key


@dataclass(frozen=True)
class _Layout:
    """Where each tensor lies in the flat value array: ``(name, dtype, shape, strides,
    offset)`` per tensor, precomputed (decoding is on the device's hot path)."""

    views: tuple[tuple[str, str, tuple[int, ...], tuple[int, ...], int], ...]
    sizes: tuple[int, ...]
    total: int
    tid: np.ndarray  # per value: index of its tensor (intp)
    nonempty: np.ndarray  # per tensor: holds any value (bool)
    starts: np.ndarray  # start offsets of the non-empty tensors (for ``reduceat``)


def _layout(entries: Sequence[Entry]) -> _Layout:
    views = []
    pos = 0
    for e in entries:
        strides = []
        step = 1
        for dim in reversed(e.shape):
            strides.append(step)
            step *= dim
        views.append((e.name, e.dtype, e.shape, tuple(reversed(strides)), pos))
        pos += e.numel
    sizes = np.asarray([e.numel for e in entries], dtype=np.int64)
    ends = np.cumsum(sizes)
    nonempty = sizes > 0
    return _Layout(tuple(views), tuple(int(n) for n in sizes), pos,
                   np.repeat(np.arange(sizes.size, dtype=np.intp), sizes), nonempty,
                   (ends - sizes)[nonempty])


def per_tensor_any(layout: _Layout, mask: np.ndarray) -> np.ndarray:
    """Per tensor of ``layout``: whether ``mask`` (one bool per value) holds any True."""
    out = np.zeros(len(layout.sizes), dtype=bool)
    if layout.starts.size:
        out[layout.nonempty] = np.logical_or.reduceat(mask, layout.starts)
    return out


@functools.lru_cache(maxsize=16)
def _spec_resolved(key: tuple[tuple[str, tuple[int, ...]], ...]
                   ) -> tuple[tuple[Entry, ...], bytes, _Layout]:
    """Entries, digest and layout of a spec (cached: a device decodes against the same
    trainable set every time)."""
    for name, dims in key:
        if (not isinstance(name, str)
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                           and d >= 0 for d in dims)):
            raise CodecError(f'spec entry {name!r}: {dims} is not a valid name and shape')
    entries = tuple(Entry(name, 'float32', tuple(int(d) for d in dims)) for name, dims in key)
    return entries, _spec_digest(entries), _layout(entries)


# --- writing ----------------------------------------------------------------------------------
def write_payload(codec: str, params: dict[str, Any], entries: list[Entry],
                  arrays: dict[str, np.ndarray], *, self_describing: bool = True) -> bytes:
    """Build a container (see the module docstring); ``params`` travel only when
    self-describing (they are informational)."""
    name = codec.encode('ascii')
    if not 0 < len(name) <= _MAX_CODEC_NAME:
        raise CodecError(f'codec name {codec!r} must be 1..{_MAX_CODEC_NAME} ASCII characters')
    parts = [MAGIC, bytes([FORMAT_VERSION, _FLAG_SELF_DESCRIBING if self_describing else 0,
                           len(name)]), name]
    if self_describing:
        index = json.dumps({'index': [[e.name, e.dtype, list(e.shape)] for e in entries],
                            'params': params}, separators=(',', ':'), sort_keys=True)
        blob = zlib.compress(index.encode(), 9)
        parts += [_varint(len(blob)), blob]
    else:
        parts.append(_spec_digest(entries))
    if len(arrays) > 255:
        raise CodecError(f'{codec} payload has {len(arrays)} arrays (at most 255)')
    parts.append(bytes([len(arrays)]))
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        wire = arr.dtype.newbyteorder('<') if arr.dtype.itemsize > 1 else arr.dtype
        code = _WIRE_CODES.get(np.dtype(wire).str)
        key_b = key.encode('ascii')
        if code is None or arr.ndim != 1 or not 0 < len(key_b) < 256:
            raise CodecError(f'{codec} payload array {key!r} ({arr.dtype} {arr.shape}) '
                             'cannot go on the wire')
        parts += [bytes([len(key_b)]), key_b, bytes([code]), _varint(arr.size),
                  np.ascontiguousarray(arr, dtype=wire).tobytes()]
    body = b''.join(parts)
    return body + hashlib.sha256(body).digest()[:_CHECK_BYTES]


# --- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """A parsed, checked container: what a codec's decoder reads its arrays from."""

    codec: str
    params: dict[str, Any]
    entries: list[Entry]
    arrays: dict[str, np.ndarray]
    layout: _Layout
    self_describing: bool


class _Reader:
    """Bounds-checked reads from a byte string (every overrun is a CodecError)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f'payload is truncated (reading {what})')
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        value = 0
        for i in range(9):
            b = self.byte(what)
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                return value
        raise CodecError(f'payload {what} is not a valid length')


def _parse_index(blob: bytes, max_numel: int) -> tuple[list[Entry], dict[str, Any]]:
    dec = zlib.decompressobj()
    try:
        text = dec.decompress(blob, _MAX_INDEX_BYTES)
    except zlib.error as err:
        raise CodecError(f'payload index does not decompress: {err}') from err
    if dec.unconsumed_tail or not dec.eof or dec.unused_data:
        raise CodecError('payload index is truncated, followed by stray bytes or larger than '
                         f'{_MAX_INDEX_BYTES} bytes')
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CodecError(f'payload index is not JSON: {err}') from err
    rows = doc.get('index') if isinstance(doc, dict) else None
    params = doc.get('params', {}) if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not isinstance(params, dict):
        raise CodecError('payload index is not {"index": [...], "params": {...}}')
    entries: list[Entry] = []
    seen: set[str] = set()
    total = 0
    for row in rows:
        if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str)
                or row[1] not in _DTYPES or not isinstance(row[2], list)
                or not all(type(s) is int and 0 <= s < (1 << 40) for s in row[2])):
            raise CodecError(f'payload index row is malformed: {str(row)[:120]}')
        if row[0] in seen:
            raise CodecError(f'payload index names {row[0]!r} twice')
        seen.add(row[0])
        entry = Entry(row[0], row[1], tuple(row[2]))
        total += entry.numel
        if total > max_numel:
            raise CodecError(f'payload claims more than max_numel={max_numel} values')
        entries.append(entry)
    return entries, params


@dataclass(frozen=True)
class _Container:
    codec: str
    index: bytes | None     # zlib'd JSON when self-describing
    digest: bytes | None    # spec digest when compact
    arrays: dict[str, np.ndarray]


def _parse_container(payload: bytes) -> _Container:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f'payload must be bytes, got {type(payload).__name__}')
    data = bytes(payload)
    if len(data) < len(MAGIC) + 3 + _CHECK_BYTES or data[:len(MAGIC)] != MAGIC:
        raise CodecError(f'payload is not a {FORMAT_NAME} container ({len(data)} bytes, '
                         f'starts {data[:4]!r})')
    body, check = data[:-_CHECK_BYTES], data[-_CHECK_BYTES:]
    if hashlib.sha256(body).digest()[:_CHECK_BYTES] != check:
        raise CodecError(f'payload fails its checksum ({len(data)} bytes: truncated or '
                         'corrupted in transit?)')
    r = _Reader(body)
    r.take(len(MAGIC), 'magic')
    version = r.byte('version')
    if version != FORMAT_VERSION:
        raise CodecError(f'payload format version {version} is not supported '
                         f'(this build reads {FORMAT_VERSION})')
    flags = r.byte('flags')
    if flags & ~_FLAG_SELF_DESCRIBING:
        raise CodecError(f'payload has unknown flags {flags:#04x}')
    name_len = r.byte('codec name')
    if not 0 < name_len <= _MAX_CODEC_NAME:
        raise CodecError(f'payload codec name length {name_len} is invalid')
    try:
        codec = r.take(name_len, 'codec name').decode('ascii')
    except UnicodeDecodeError as err:
        raise CodecError('payload codec name is not ASCII') from err
    index = digest = None
    if flags & _FLAG_SELF_DESCRIBING:
        index = r.take(r.varint('index length'), 'index')
    else:
        digest = r.take(_DIGEST_BYTES, 'spec digest')
    arrays: dict[str, np.ndarray] = {}
    for _ in range(r.byte('array count')):
        key_b = r.take(r.byte('array name'), 'array name')
        try:
            key = key_b.decode('ascii')
        except UnicodeDecodeError as err:
            raise CodecError('payload array name is not ASCII') from err
        dtype = _WIRE_DTYPES.get(r.byte('array dtype'))
        if dtype is None or not key or key in arrays:
            raise CodecError(f'payload array {key!r} has an unknown dtype or repeats')
        count = r.varint(f'array {key!r} length')
        if count > (len(body) - r.pos) // dtype.itemsize:
            raise CodecError(f'payload array {key!r} claims {count} values; the payload is '
                             'shorter')
        raw = r.take(count * dtype.itemsize, f'array {key!r}')
        arrays[key] = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder('='))
    if r.pos != len(body):
        raise CodecError(f'payload has {len(body) - r.pos} stray bytes after its arrays')
    return _Container(codec, index, digest, arrays)


def read_payload(payload: bytes, max_numel: int = DEFAULT_MAX_NUMEL,
                 spec: Spec | None = None) -> Payload:
    c = _parse_container(payload)
    if c.index is not None:
        # Self-describing: the index is authoritative (a gate compares it with its set).
        entries, params = _parse_index(c.index, max_numel)
        layout = _layout(entries)
    else:
        if spec is None:
            raise CodecError(f'{c.codec} payload is compact (no tensor index): the decoder '
                             'needs the trainable spec (decode(..., spec=...))')
        resolved, digest, layout = _spec_resolved(_spec_key(spec))
        if layout.total > max_numel:
            raise CodecError(f'spec holds {layout.total} values, more than '
                             f'max_numel={max_numel}')
        if digest != c.digest:
            raise SpecMismatchError(
                f'{c.codec} payload was encoded for another trainable set (its spec digest '
                f'{c.digest.hex()} differs from this decoder\'s {digest.hex()} over '
                f'{len(resolved)} tensors)')
        entries, params = list(resolved), {}
    return Payload(c.codec, params, entries, c.arrays, layout, c.index is not None)


def array(p: Payload, key: str, dtype: type, size: int | None,
          optional: bool = False) -> np.ndarray:
    """A codec array from the payload, checked for dtype and (when given) size; an absent
    ``optional`` array reads as empty."""
    arr = p.arrays.get(key)
    if arr is None:
        if optional:
            arr = np.zeros(0, dtype)
        else:
            raise CodecError(f'{p.codec} payload lacks array {key!r}')
    if arr.dtype != np.dtype(dtype):
        raise CodecError(f'{p.codec} payload array {key!r} is {arr.dtype}, expected '
                         f'{np.dtype(dtype)}')
    if size is not None and arr.size != size:
        raise CodecError(f'{p.codec} payload array {key!r} has {arr.size} values, '
                         f'expected {size}')
    return arr


def unflatten(layout: _Layout, flat: np.ndarray) -> dict[str, Tensor]:
    """Split one flat float array into the payload's tensors (float32 ones are views of one
    buffer; others are cast copies)."""
    whole = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    if whole.numel() != layout.total:
        raise CodecError(f'decoded {whole.numel()} values, the payload holds {layout.total}')
    return {name: (whole.as_strided(shape, strides, offset) if dtype == 'float32' else
                   whole.as_strided(shape, strides, offset).to(_DTYPES[dtype]))
            for name, dtype, shape, strides, offset in layout.views}


# --- flat deltas and payload queries ----------------------------------------------------------
@dataclass(frozen=True)
class FlatDelta:
    """A decoded compact delta as one float32 vector
    (:meth:`~cdcca_ros.core.codecs.base.Codec.decode_flat`).

    ``values`` holds the spec's tensors sorted by name, each flattened (row-major), back to
    back; :attr:`names` and :attr:`shapes` say which is which.
    """

    layout: _Layout
    values: Tensor

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names, in the order their values lie in :attr:`values`."""
        return tuple(v[0] for v in self.layout.views)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape."""
        return {v[0]: v[2] for v in self.layout.views}

    def tensors(self) -> dict[str, Tensor]:
        """Name -> tensor (views of :attr:`values`)."""
        return unflatten(self.layout, self.values.numpy())

    def first_non_finite(self) -> str | None:
        """Name of the first tensor holding NaN or Inf (one reduction when all are finite)."""
        if all_finite(self.values):
            return None
        first = int(torch.nonzero(~torch.isfinite(self.values))[0, 0])
        return self.layout.views[int(self.layout.tid[first])][0]


def read_payload_codec(payload: bytes) -> str:
    """The codec name recorded in a payload (compact or self-describing).

    Raises:
        CodecError: The bytes are not a DWC payload.
    """
    return _parse_container(payload).codec


def read_payload_kind(payload: bytes) -> tuple[str, bool]:
    """``(codec name, self-describing)`` of a payload, read once.

    Raises:
        CodecError: The bytes are not a DWC payload.
    """
    c = _parse_container(payload)
    return c.codec, c.index is not None


def flatten_delta(delta: Mapping[str, Tensor], spec: Spec) -> FlatDelta:
    """A delta of ``spec``'s names and shapes as a :class:`FlatDelta` (float32, name order).

    Raises:
        CodecError: ``delta`` lacks a tensor of ``spec``, has another, or one of another
            number of values.
    """
    _, _, layout = _spec_resolved(_spec_key(spec))
    names = [v[0] for v in layout.views]
    if delta.keys() != set(names):
        raise CodecError(f'delta names differ from the spec: missing '
                         f'{sorted(set(names) - set(delta))[:5]}, unexpected '
                         f'{sorted(set(delta) - set(names))[:5]}')
    for name, size in zip(names, layout.sizes, strict=True):
        if delta[name].numel() != size:
            raise CodecError(f'delta[{name!r}] holds {delta[name].numel()} values, the spec '
                             f'{size}')
    values = (torch.cat([delta[n].detach().reshape(-1).to('cpu', torch.float32) for n in names])
              if names else torch.zeros(0))
    return FlatDelta(layout, values)


def is_self_describing(payload: bytes) -> bool:
    """Whether a payload carries its own tensor index (else it needs a spec to decode).

    Raises:
        CodecError: The bytes are not a DWC payload.
    """
    return _parse_container(payload).index is not None

