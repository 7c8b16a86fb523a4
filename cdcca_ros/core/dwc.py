"""Dynamic Weight update Compression (DWC), paper Sec. 3.4, Eq. 7-8.

The cloud sends ``Quantize(theta_updated - theta_base)`` (Eq. 7) over the trainable set (LoRA
A/B, norms, biases, query tokens: a ``dict[str, Tensor]``); the device computes
``theta_base + decoded`` (Eq. 8). This module holds the delta arithmetic, the codecs, the
byte-budget fit and the cloud-side error feedback. It is pure logic: no rclpy, no network.

Codecs (registry by name, :func:`get_codec`):

* ``fp16``: every value as float16 (reference, ~exact, 16 bits per parameter).
* ``nf4``: bitsandbytes NF4, blocksize 64 (the paper's choice via QLoRA): 4 bits per
  parameter plus a float32 absmax per block (4.5 bits), or with ``double_quant`` an 8-bit
  absmax re-quantized per 256 blocks (~4.13 bits).
* ``sparse`` (ours): optional top-k selection by importance (``density``), then a uniform
  quantizer whose step follows the kept values' RMS (``bits``: about that many bits per kept
  value for Gaussian values, fewer for heavy-tailed ones), a per-tensor reconstruction
  point for the +-1 level, and a static ANS entropy coder (``constriction``) over all
  symbols. Zeros are cheap symbols, so positions need no separate index. On Gaussian deltas
  it reaches NF4's error (~0.09) at ~3.7 bits per parameter; on heavy-tailed deltas it
  needs far fewer bits.

Payload format, version 2 (the same container for every codec; never pickle). All integers
little-endian; ``varint`` is unsigned LEB128 (at most 9 bytes)::

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

The codecs' arrays, in the order of the elements they describe:

* ``fp16``: ``values`` f16, all tensors flattened and concatenated.
* ``nf4``: ``packed`` u8 (two 4-bit codes per byte, per tensor ``ceil(n/2)`` bytes),
  ``absmax`` f32 per 64-block; with double quantization ``absmax`` is u8 and ``absmax2`` f32
  (per 256 absmax values) and ``offset`` f32 (per tensor) come along.
* ``sparse``: ``freq`` u16 (symbol table over the levels ``[-E, E]`` plus an escape symbol,
  summing to 2**14, every symbol that occurs at least 1), ``ans`` u32 (the ``constriction``
  ANS stack of all levels, i.i.d. under ``freq / 2**14``, ``Categorical(perfect=False)``),
  ``esc`` i32 (levels beyond ``+-E``, in order; absent when none), ``step`` u8 (per tensor
  holding a non-zero level: quantization step ``2 ** ((code - 200) / 8)``) and ``lv1`` u8
  (per tensor holding a +-1 level: its reconstruction point in steps,
  ``0.5 + (code + 0.5) / 256``).

Decoding never trusts the bytes: any malformed, truncated or inconsistent payload (checksum,
lengths, table, a coder that does not end exactly empty, escape counts, spec digest) raises
:class:`~cdcca_ros.errors.CodecError`.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.errors import (
    CodecError,
    DeltaMismatchError,
    PayloadTooLargeError,
    SpecMismatchError,
)

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


# --- delta arithmetic (Eq. 7-8) -----------------------------------------------------------
def _check_same_keys(a: StateDict, b: StateDict, what_a: str, what_b: str) -> None:
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing or extra:
        raise DeltaMismatchError(
            f'{what_b} keys differ from {what_a}: missing {missing[:5]}'
            f'{"..." if len(missing) > 5 else ""}, unexpected {extra[:5]}'
            f'{"..." if len(extra) > 5 else ""}')


def _check_float(name: str, t: Tensor, what: str) -> None:
    if not isinstance(t, Tensor):
        raise DeltaMismatchError(f'{what}[{name!r}] is a {type(t).__name__}, not a tensor')
    if t.dtype not in _DTYPE_NAMES:
        raise DeltaMismatchError(f'{what}[{name!r}] has dtype {t.dtype}; expected a float dtype')


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    # Deltas of half-precision weights are taken in float32 so the subtraction loses nothing.
    return torch.promote_types(dtype, torch.float32)


def compute_delta(trained: StateDict, base: StateDict) -> dict[str, Tensor]:
    """Eq. 7's argument: ``trained - base`` for every tensor of the trainable set.

    Args:
        trained: Updated tensors (after AKD).
        base: Tensors the device holds; same keys, shapes and dtypes as ``trained``.

    Returns:
        A new dict (same key order as ``base``) of detached float32 (float64 for float64
        inputs) differences.

    Raises:
        DeltaMismatchError: Keys, shapes or dtypes differ, or a value is not a float tensor.
    """
    _check_same_keys(base, trained, 'base', 'trained')
    out: dict[str, Tensor] = {}
    for name, b in base.items():
        t = trained[name]
        _check_float(name, b, 'base')
        _check_float(name, t, 'trained')
        if t.shape != b.shape:
            raise DeltaMismatchError(
                f'trained[{name!r}] has shape {tuple(t.shape)}, base has {tuple(b.shape)}')
        if t.dtype != b.dtype:
            raise DeltaMismatchError(
                f'trained[{name!r}] has dtype {t.dtype}, base has {b.dtype}')
        acc = _delta_dtype(b.dtype)
        out[name] = t.detach().to(acc) - b.detach().to(acc)
    return out


def apply_delta(base: StateDict, delta: StateDict) -> dict[str, Tensor]:
    """Eq. 8: ``base + delta`` on a copy, cast back to each base tensor's dtype.

    One elementwise add in ``promote(dtype, float32)`` then a cast: correctly rounded on any
    IEEE hardware, so the cloud's copy and the device's copy come out bit-identical.

    Args:
        base: Tensors the device holds (left unchanged).
        delta: Float tensors with exactly the same keys and shapes.

    Returns:
        A new dict in ``base``'s key order, on ``base``'s devices.

    Raises:
        DeltaMismatchError: Keys or shapes differ, or a value is not a float tensor.
    """
    _check_same_keys(base, delta, 'base', 'delta')
    out: dict[str, Tensor] = {}
    for name, b in base.items():
        d = delta[name]
        _check_float(name, b, 'base')
        _check_float(name, d, 'delta')
        if d.shape != b.shape:
            raise DeltaMismatchError(
                f'delta[{name!r}] has shape {tuple(d.shape)}, base has {tuple(b.shape)}')
        acc = _delta_dtype(b.dtype)
        out[name] = (b.detach().to(acc) + d.detach().to(device=b.device, dtype=acc)).to(b.dtype)
    return out


def num_params(sd: StateDict) -> int:
    """Number of scalar values in a state dict."""
    return int(sum(t.numel() for t in sd.values()))


def rel_l2_error(reference: StateDict, approx: StateDict) -> float:
    """``||approx - reference|| / ||reference||`` over all tensors (0.0 when both are 0).

    Raises:
        DeltaMismatchError: Keys or shapes differ.
    """
    _check_same_keys(reference, approx, 'reference', 'approx')
    num = 0.0
    den = 0.0
    for name, r in reference.items():
        a = approx[name]
        if a.shape != r.shape:
            raise DeltaMismatchError(
                f'approx[{name!r}] has shape {tuple(a.shape)}, reference has {tuple(r.shape)}')
        r64 = r.detach().to('cpu', torch.float64)
        num += float(((a.detach().to('cpu', torch.float64) - r64) ** 2).sum())
        den += float((r64 ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


# --- payload container ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _flat_f32(name: str, t: Tensor) -> np.ndarray:
    """A tensor as a flat float32 numpy array, refusing non-float and non-finite values."""
    _check_float(name, t, 'delta')
    arr = t.detach().to('cpu', torch.float32).contiguous().reshape(-1).numpy()
    if not np.all(np.isfinite(arr)):
        raise CodecError(f'delta[{name!r}] holds non-finite values; refusing to encode')
    return arr


def _entries(delta: StateDict, self_describing: bool = True) -> list[_Entry]:
    """The delta's tensors in payload order: the delta's own order when self-describing,
    else sorted by name (float32, as a compact payload decodes)."""
    out = []
    for name, t in delta.items():
        if not isinstance(name, str):
            raise CodecError(f'delta key {name!r} is not a string')
        if not isinstance(t, Tensor) or t.dtype not in _DTYPE_NAMES:
            raise CodecError(f'delta[{name!r}] must be a float tensor, got '
                             f'{getattr(t, "dtype", type(t).__name__)}')
        out.append(_Entry(name, _DTYPE_NAMES[t.dtype] if self_describing else 'float32',
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


def _spec_digest(entries: Sequence[_Entry]) -> bytes:
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


def _layout(entries: Sequence[_Entry]) -> _Layout:
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


def _per_tensor_any(layout: _Layout, mask: np.ndarray) -> np.ndarray:
    """Per tensor of ``layout``: whether ``mask`` (one bool per value) holds any True."""
    out = np.zeros(len(layout.sizes), dtype=bool)
    if layout.starts.size:
        out[layout.nonempty] = np.logical_or.reduceat(mask, layout.starts)
    return out


@functools.lru_cache(maxsize=16)
def _spec_resolved(key: tuple[tuple[str, tuple[int, ...]], ...]
                   ) -> tuple[tuple[_Entry, ...], bytes, _Layout]:
    """Entries, digest and layout of a spec (cached: a device decodes against the same
    trainable set every time)."""
    for name, dims in key:
        if (not isinstance(name, str)
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                           and d >= 0 for d in dims)):
            raise CodecError(f'spec entry {name!r}: {dims} is not a valid name and shape')
    entries = tuple(_Entry(name, 'float32', tuple(int(d) for d in dims)) for name, dims in key)
    return entries, _spec_digest(entries), _layout(entries)


def _write_payload(codec: str, params: dict[str, Any], entries: list[_Entry],
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


@dataclass(frozen=True)
class _Payload:
    codec: str
    params: dict[str, Any]
    entries: list[_Entry]
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


def _parse_index(blob: bytes, max_numel: int) -> tuple[list[_Entry], dict[str, Any]]:
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
    entries: list[_Entry] = []
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
        entry = _Entry(row[0], row[1], tuple(row[2]))
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


def _read_payload(payload: bytes, max_numel: int = DEFAULT_MAX_NUMEL,
                  spec: Spec | None = None) -> _Payload:
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
    return _Payload(c.codec, params, entries, c.arrays, layout, c.index is not None)


def _array(p: _Payload, key: str, dtype: type, size: int | None,
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


def _unflatten(layout: _Layout, flat: np.ndarray) -> dict[str, Tensor]:
    """Split one flat float array into the payload's tensors (float32 ones are views of one
    buffer; others are cast copies)."""
    whole = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    if whole.numel() != layout.total:
        raise CodecError(f'decoded {whole.numel()} values, the payload holds {layout.total}')
    return {name: (whole.as_strided(shape, strides, offset) if dtype == 'float32' else
                   whole.as_strided(shape, strides, offset).to(_DTYPES[dtype]))
            for name, dtype, shape, strides, offset in layout.views}


@dataclass(frozen=True)
class FlatDelta:
    """A decoded compact delta as one float32 vector (:meth:`Codec.decode_flat`).

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
        return _unflatten(self.layout, self.values.numpy())

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


# --- codec interface and registry ------------------------------------------------------------
class Codec(abc.ABC):
    """Turns a delta into bytes and back; ``decode(encode(d))`` approximates ``d``.

    Decoding reads everything it needs from the payload (and, for a compact payload, the
    trainable spec), so any instance of a codec class decodes what any other instance (other
    knobs) encoded.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The encoder's knobs (recorded in the payload)."""

    @abc.abstractmethod
    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        """Encode a delta.

        Args:
            delta: Float tensors (keys in any order; kept when self-describing).
            importance: Optional per-tensor importance (e.g. input-activation scale, or the
                square root of the diagonal Fisher), broadcastable to each delta tensor;
                codecs that select use it, others ignore it.
            self_describing: Carry the tensor index (names, dtypes, shapes); ``False``
                writes a compact payload that only a decoder given the spec reads.

        Raises:
            CodecError: The delta cannot be encoded (non-finite, non-float, out of range).
        """

    def decode(self, payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL,
               spec: Spec | None = None) -> dict[str, Tensor]:
        """Decode a payload into tensors of the recorded names, shapes and dtypes.

        Args:
            payload: The bytes.
            max_numel: Refuse payloads (or specs) of more values.
            spec: The trainable set (name -> tensor or shape); needed for compact payloads
                (their tensors come out float32, sorted by name), unused by self-describing
                ones.

        Raises:
            CodecError: Malformed, truncated or foreign bytes, another codec's payload, or a
                compact payload without (or with another) spec.
        """
        p = self._open(payload, max_numel, spec)
        return _unflatten(p.layout, self._values(p))

    def decode_flat(self, payload: bytes, spec: Spec, *,
                    max_numel: int = DEFAULT_MAX_NUMEL) -> FlatDelta:
        """Decode a compact payload into one float32 vector over ``spec`` (the device's path).

        The values come out in the compact layout (the spec's tensors sorted by name, each
        flattened), with no per-tensor objects on the way: what a device adds to weights it
        keeps in the same order (Eq. 8 as one add).

        Raises:
            CodecError: As :meth:`decode`; also for a self-describing payload (its index, not
                the spec, would decide names, order and dtypes).
        """
        p = self._open(payload, max_numel, spec)
        if p.self_describing:
            raise CodecError(f'{p.codec} payload is self-describing: decode_flat reads compact '
                             'payloads (decode() reads both)')
        values = torch.from_numpy(np.ascontiguousarray(self._values(p), dtype=np.float32))
        if values.numel() != p.layout.total:
            raise CodecError(f'decoded {values.numel()} values, the payload holds '
                             f'{p.layout.total}')
        return FlatDelta(p.layout, values)

    @abc.abstractmethod
    def _values(self, p: _Payload) -> np.ndarray:
        """Every decoded value, flat in the payload's layout order (float32 or wider)."""

    def describe(self) -> str:
        """``name(k=v,...)`` for logs and the envelope's codec description."""
        knobs = ','.join(f'{k}={v}' for k, v in sorted(self.params().items()))
        return f'{self.name}({knobs})'

    def _open(self, payload: bytes, max_numel: int, spec: Spec | None) -> _Payload:
        p = _read_payload(payload, max_numel, spec)
        if p.codec != self.name:
            raise CodecError(f'payload was encoded by codec {p.codec!r}, not {self.name!r}')
        return p


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str, factory: Callable[..., Codec]) -> None:
    """Make a codec available by name (``factory(**params)`` builds one)."""
    if name in _REGISTRY:
        raise CodecError(f'codec {name!r} is already registered')
    _REGISTRY[name] = factory


def codec_names() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """Build a registered codec.

    Raises:
        CodecError: Unknown name.
        ConfigError: Invalid knobs.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise CodecError(f'unknown codec {name!r}; known: {codec_names()}') from None
    return factory(**params)


def decode_payload(payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL,
                   spec: Spec | None = None) -> dict[str, Tensor]:
    """Decode any registered codec's payload (the codec is read from the payload).

    Raises:
        CodecError: Malformed bytes, an unknown codec, or a compact payload without its spec.
    """
    return get_codec(read_payload_codec(payload)).decode(payload, max_numel=max_numel,
                                                         spec=spec)


# --- fp16 -------------------------------------------------------------------------------------
_FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Codec(Codec):
    """Every value as IEEE float16: the reference (relative error ~3e-4, 16 bits/param)."""

    name = 'fp16'

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        entries = _entries(delta, self_describing)
        flats = [_flat_f32(e.name, delta[e.name]) for e in entries]
        for e, f in zip(entries, flats, strict=True):
            if f.size and float(np.abs(f).max()) > _FP16_MAX:
                raise CodecError(f'delta[{e.name!r}] exceeds the float16 range '
                                 f'(max |x| = {float(np.abs(f).max()):.3g})')
        values = np.concatenate(flats).astype(np.float16) if flats else np.zeros(0, np.float16)
        return _write_payload(self.name, self.params(), entries, {'values': values},
                              self_describing=self_describing)

    def _values(self, p: _Payload) -> np.ndarray:
        return _array(p, 'values', np.float16, p.layout.total).astype(np.float32)


# --- nf4 (bitsandbytes) -------------------------------------------------------------------------
_NF4_BLOCK = 64
_DQ_BLOCK = 256


class Nf4Codec(Codec):
    """bitsandbytes NF4 per tensor, blocksize 64: the paper's quantizer (QLoRA) and baseline.

    Args:
        double_quant: Quantize the per-block absmax to 8 bits (QLoRA's double quantization):
            ~4.13 instead of 4.5 bits per parameter, slightly higher error.
    """

    name = 'nf4'

    def __init__(self, double_quant: bool = False) -> None:
        self.double_quant = bool(double_quant)

    def params(self) -> dict[str, Any]:
        return {'double_quant': self.double_quant}

    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        from bitsandbytes import functional as bnbf

        entries = _entries(delta, self_describing)
        packed, absmax, absmax2, offsets = [], [], [], []
        nf4 = bnbf.get_4bit_type('nf4', device='cpu')
        for e in entries:
            flat = _flat_f32(e.name, delta[e.name])
            if flat.size == 0:
                offsets.append(0.0)
                continue
            q, st = bnbf.quantize_4bit(torch.from_numpy(flat), blocksize=_NF4_BLOCK,
                                       quant_type='nf4', compress_statistics=self.double_quant)
            if not torch.equal(st.code, nf4):
                raise CodecError('bitsandbytes returned an unexpected NF4 code book')
            packed.append(q.reshape(-1).numpy())
            if self.double_quant:
                absmax.append(st.absmax.numpy().astype(np.uint8))
                absmax2.append(st.state2.absmax.numpy().astype(np.float32))
                offsets.append(float(st.offset))
            else:
                absmax.append(st.absmax.numpy().astype(np.float32))
        arrays = {
            'packed': np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            'absmax': (np.concatenate(absmax) if absmax
                       else np.zeros(0, np.uint8 if self.double_quant else np.float32)),
        }
        if self.double_quant:
            arrays['absmax2'] = (np.concatenate(absmax2) if absmax2
                                 else np.zeros(0, np.float32))
            arrays['offset'] = np.asarray(offsets, dtype=np.float32)
        return _write_payload(self.name, self.params(), entries, arrays,
                              self_describing=self_describing)

    def _values(self, p: _Payload) -> np.ndarray:
        from bitsandbytes import functional as bnbf

        double = 'absmax2' in p.arrays
        sizes = [e.numel for e in p.entries]
        n_bytes = [(n + 1) // 2 for n in sizes]
        n_blocks = [-(-n // _NF4_BLOCK) for n in sizes]
        n_blocks2 = [-(-b // _DQ_BLOCK) for b in n_blocks]
        # Every length is checked before bitsandbytes sees the arrays: its kernels trust them.
        packed = _array(p, 'packed', np.uint8, sum(n_bytes))
        absmax = _array(p, 'absmax', np.uint8 if double else np.float32, sum(n_blocks))
        if double:
            absmax2 = _array(p, 'absmax2', np.float32, sum(n_blocks2))
            offsets = _array(p, 'offset', np.float32, len(sizes))
            dyn = bnbf.create_dynamic_map(signed=True)
        nf4 = bnbf.get_4bit_type('nf4', device='cpu')
        flats: list[np.ndarray] = []
        pos = blk = blk2 = 0
        for i, n in enumerate(sizes):
            if n == 0:
                flats.append(np.zeros(0, np.float32))
                continue
            q = torch.from_numpy(packed[pos:pos + n_bytes[i]].copy()).reshape(-1, 1)
            if double:
                am = bnbf.dequantize_blockwise(
                    torch.from_numpy(absmax[blk:blk + n_blocks[i]].copy()),
                    absmax=torch.from_numpy(absmax2[blk2:blk2 + n_blocks2[i]].copy()),
                    code=dyn, blocksize=_DQ_BLOCK) + float(offsets[i])
            else:
                am = torch.from_numpy(absmax[blk:blk + n_blocks[i]].copy())
            state = bnbf.QuantState(absmax=am.float(), shape=torch.Size([n]), code=nf4,
                                    blocksize=_NF4_BLOCK, quant_type='nf4',
                                    dtype=torch.float32)
            flats.append(bnbf.dequantize_4bit(q, state).reshape(-1).numpy())
            pos += n_bytes[i]
            blk += n_blocks[i]
            blk2 += n_blocks2[i]
        return np.concatenate(flats) if flats else np.zeros(0, np.float32)


# --- sparse (ours) ----------------------------------------------------------------------------
_SQRT_2PI_E = math.sqrt(2.0 * math.pi * math.e)
_MAX_ESCAPE_RANGE = 4095
_MAX_LEVEL = (1 << 31) - 1
_FREQ_BITS = 14
_FREQ_TOTAL = 1 << _FREQ_BITS
# Step codes: 8 per octave, code 200 = a step of 1.0 (range 2**-25 .. 2**6.9).
_STEP_ZERO_CODE = 200
_STEP_CODES_PER_OCTAVE = 8
SPARSE_SCOPES = ('tensor', 'global')


def _step_code(step: float) -> int:
    """The u8 code of the wire step nearest ``step`` (clamped to the code range)."""
    if not (step > 0 and math.isfinite(step)):
        return _STEP_ZERO_CODE
    code = round(_STEP_CODES_PER_OCTAVE * math.log2(step)) + _STEP_ZERO_CODE
    return min(255, max(0, code))


def _steps_from_codes(codes: np.ndarray) -> np.ndarray:
    return np.exp2((codes.astype(np.float64) - _STEP_ZERO_CODE) / _STEP_CODES_PER_OCTAVE)


def _lv1_code(ratio: float) -> int:
    return min(255, max(0, math.floor((ratio - 0.5) * 256.0)))


def _lv1_from_codes(codes: np.ndarray) -> np.ndarray:
    return 0.5 + (codes.astype(np.float64) + 0.5) / 256.0


def _freq_table(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to 2**14, every present symbol at least 1."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    freq = np.zeros(counts.size, dtype=np.int64)
    if total == 0:
        freq[0] = _FREQ_TOTAL
        return freq
    present = counts > 0
    n_present = int(present.sum())
    freq[present] = counts[present] * (_FREQ_TOTAL - n_present) // total + 1
    freq[int(np.argmax(freq))] += _FREQ_TOTAL - int(freq.sum())
    return freq


def _ans_model(freq: np.ndarray) -> Any:
    """The entropy model both ends build from the same integer table (identical floats)."""
    import constriction

    return constriction.stream.model.Categorical(freq.astype(np.float64) / _FREQ_TOTAL,
                                                 perfect=False)


class SparseCodec(Codec):
    """Top-k selection + entropy-coded uniform quantization (ours, beats NF4 in bits/param).

    Per tensor (or over all tensors with ``scope='global'``) the codec keeps the
    ``density`` fraction of elements with the largest importance (``|delta|``, times the
    given importance if any), quantizes kept values with step
    ``sqrt(2*pi*e) * rms(kept) * 2**-bits`` (rounded to the wire's 8 steps per octave; for
    Gaussian values the symbol entropy is then ~``bits``) and entropy-codes all symbols
    (zeros included) with one static ANS model (``constriction``). Values that round to +-1
    are rebuilt at their mean magnitude (one byte per tensor), which lowers the error of the
    many small values at no rate cost.

    Args:
        density: Fraction of elements that may be sent, in (0, 1]. 1.0 keeps everything
            (small values still quantize to 0).
        bits: Resolution in [0.25, 16]; ~3.7 matches NF4's error on Gaussian deltas.
        scope: ``'tensor'``: selection and step per tensor (every tensor gets the same
            relative error); ``'global'``: one threshold and step for the whole delta (lowest
            total L2 error for the rate; small tensors may drop out).
    """

    name = 'sparse'

    def __init__(self, density: float = 1.0, bits: float = 4.0, scope: str = 'tensor') -> None:
        from cdcca_ros.errors import ConfigError

        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise ConfigError(f'sparse codec density must be in (0, 1], got {density!r}')
        if not (isinstance(bits, (int, float)) and 0.25 <= bits <= 16.0):
            raise ConfigError(f'sparse codec bits must be in [0.25, 16], got {bits!r}')
        if scope not in SPARSE_SCOPES:
            raise ConfigError(f'sparse codec scope must be one of {SPARSE_SCOPES}, '
                              f'got {scope!r}')
        self.density = float(density)
        self.bits = float(bits)
        self.scope = scope

    def params(self) -> dict[str, Any]:
        return {'density': self.density, 'bits': self.bits, 'scope': self.scope}

    def with_density(self, density: float) -> SparseCodec:
        """The same codec at another density (used by :func:`compress`)."""
        return SparseCodec(density=density, bits=self.bits, scope=self.scope)

    def with_bits(self, bits: float) -> SparseCodec:
        """The same codec at another resolution (used by :func:`compress`)."""
        return SparseCodec(density=self.density, bits=bits, scope=self.scope)

    # encode ----------------------------------------------------------------------------
    def _importance(self, name: str, flat: np.ndarray, shape: tuple[int, ...],
                    importance: Mapping[str, Tensor] | None) -> np.ndarray:
        score = np.abs(flat)
        if importance is None or name not in importance:
            return score
        imp = importance[name]
        if not isinstance(imp, Tensor):
            raise CodecError(f'importance[{name!r}] is a {type(imp).__name__}, not a tensor')
        try:
            w = torch.broadcast_to(imp.detach().to('cpu', torch.float32), shape)
        except RuntimeError as err:
            raise CodecError(f'importance[{name!r}] of shape {tuple(imp.shape)} does not '
                             f'broadcast to the delta shape {shape}') from err
        w = w.contiguous().reshape(-1).numpy()
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise CodecError(f'importance[{name!r}] must be finite and non-negative')
        return score * w

    def _keep_masks(self, flats: list[np.ndarray], scores: list[np.ndarray]
                    ) -> list[np.ndarray | None]:
        if self.density >= 1.0:
            return [None] * len(flats)
        if self.scope == 'tensor':
            masks: list[np.ndarray | None] = []
            for s in scores:
                k = _keep_count(self.density, s.size)
                m = np.zeros(s.size, dtype=bool)
                if k:
                    m[np.argpartition(-s, k - 1)[:k]] = True
                masks.append(m)
            return masks
        allscore = np.concatenate(scores) if scores else np.zeros(0)
        k = _keep_count(self.density, allscore.size)
        keep = np.zeros(allscore.size, dtype=bool)
        if k:
            keep[np.argpartition(-allscore, k - 1)[:k]] = True
        bounds = np.cumsum([0] + [s.size for s in scores])
        return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _step(self, kept: np.ndarray) -> float:
        """The wire step (a power of 2**(1/8)) for values of this RMS."""
        rms = math.sqrt(float(np.mean(kept.astype(np.float64) ** 2))) if kept.size else 0.0
        code = _step_code(_SQRT_2PI_E * rms * 2.0 ** -self.bits)
        return float(_steps_from_codes(np.asarray([code]))[0])

    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        entries = _entries(delta, self_describing)
        flats = [_flat_f32(e.name, delta[e.name]) for e in entries]
        scores = [self._importance(e.name, f, e.shape, importance)
                  for e, f in zip(entries, flats, strict=True)]
        masks = self._keep_masks(flats, scores)
        kept = [f if m is None else f[m] for f, m in zip(flats, masks, strict=True)]
        if self.scope == 'global':
            g = self._step(np.concatenate(kept) if kept else np.zeros(0, np.float32))
            steps = [g] * len(flats)
        else:
            steps = [self._step(k) for k in kept]
        levels: list[np.ndarray] = []
        for e, f, m, step in zip(entries, flats, masks, steps, strict=True):
            q = np.rint(f.astype(np.float64) / step)
            if q.size and float(np.abs(q).max()) > _MAX_LEVEL:
                raise CodecError(f'delta[{e.name!r}] spans too many quantization levels; '
                                 f'raise bits or check the values')
            q = q.astype(np.int64)
            if m is not None:
                q[~m] = 0
            levels.append(q)
        # The +-1 level's reconstruction point: the mean |x|/step of what rounded to it.
        ones = [np.abs(q) == 1 for q in levels]
        ratios = [np.abs(f[o].astype(np.float64)) / s
                  for f, o, s in zip(flats, ones, steps, strict=True)]
        if self.scope == 'global':
            allr = np.concatenate(ratios) if ratios else np.zeros(0)
            lv1 = [float(allr.mean()) if allr.size else 1.0] * len(flats)
        else:
            lv1 = [float(r.mean()) if r.size else 1.0 for r in ratios]
        allq = np.concatenate(levels) if levels else np.zeros(0, np.int64)
        arrays = _encode_levels(allq)
        # Side data only for the tensors that use it (the decoder knows which from the levels).
        arrays['step'] = np.asarray([_step_code(s) for s, q in zip(steps, levels, strict=True)
                                     if np.any(q)], dtype=np.uint8)
        arrays['lv1'] = np.asarray([_lv1_code(v) for v, o in zip(lv1, ones, strict=True)
                                    if np.any(o)], dtype=np.uint8)
        return _write_payload(self.name, self.params(), entries, arrays,
                              self_describing=self_describing)

    # decode ----------------------------------------------------------------------------
    def _values(self, p: _Payload) -> np.ndarray:
        layout = p.layout
        count = len(layout.sizes)
        levels = _decode_levels(p, layout.total)
        # Vectorised over every value with the layout's value -> tensor map: this runs on
        # the device between receiving and applying. Level * step in float64 (the +-1 levels
        # at their reconstruction point), rounded once to float32.
        tid = layout.tid
        ones = np.flatnonzero((levels == 1) | (levels == -1))
        one_mask = np.zeros(levels.size, dtype=bool)
        one_mask[ones] = True
        has_nz = _per_tensor_any(layout, levels != 0)
        has_one = _per_tensor_any(layout, one_mask)
        steps = np.zeros(count)
        steps[has_nz] = _steps_from_codes(_array(p, 'step', np.uint8, int(has_nz.sum())))
        lv1 = np.ones(count)
        lv1[has_one] = _lv1_from_codes(_array(p, 'lv1', np.uint8, int(has_one.sum())))
        out = levels.astype(np.float64)
        out[ones] = np.copysign(lv1[tid[ones]], out[ones])
        out *= steps[tid]
        return out.astype(np.float32)


def _keep_count(density: float, n: int) -> int:
    """Elements kept out of ``n``: never above ``density * n`` but at least one (n > 0)."""
    # The epsilon absorbs float noise such as 0.1 * 26240 = 2624.0000000000005.
    return min(n, max(1, math.floor(density * n + 1e-6))) if n else 0


def _escape_range(absq: np.ndarray) -> int:
    """The direct symbol range E minimising table bytes (2 per symbol) + escapes (4 each)."""
    if absq.size == 0:
        return 0
    cap = _MAX_ESCAPE_RANGE
    hist = np.bincount(np.minimum(absq, cap + 1), minlength=cap + 2)
    beyond = hist[::-1].cumsum()[::-1]  # beyond[e] = count(|q| >= e)
    e = np.arange(cap + 1)
    cost = 2 * (2 * e + 2) + 4 * beyond[1:cap + 2]
    return int(np.argmin(cost))


def _encode_levels(levels: np.ndarray) -> dict[str, np.ndarray]:
    """Levels -> symbol table, ANS words and escapes (see the module docstring)."""
    import constriction

    absq = np.abs(levels)
    erange = _escape_range(absq)
    esc = absq > erange
    symbols = np.where(esc, 2 * erange + 1, levels + erange).astype(np.int32)
    freq = _freq_table(np.bincount(symbols, minlength=2 * erange + 2))
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols, _ans_model(freq))
    out = {'freq': freq.astype(np.uint16), 'ans': coder.get_compressed().astype(np.uint32)}
    if esc.any():
        out['esc'] = levels[esc].astype(np.int32)
    return out


def _decode_levels(p: _Payload, n: int) -> np.ndarray:
    import constriction

    freq = _array(p, 'freq', np.uint16, None)
    if freq.size < 2 or freq.size % 2 or freq.size > 2 * _MAX_ESCAPE_RANGE + 2:
        raise CodecError(f'sparse payload symbol table has {freq.size} entries')
    freq = freq.astype(np.int64)
    if int(freq.sum()) != _FREQ_TOTAL:
        raise CodecError(f'sparse payload symbol table sums to {int(freq.sum())}, '
                         f'expected {_FREQ_TOTAL}')
    words = _array(p, 'ans', np.uint32, None)
    escapes = _array(p, 'esc', np.int32, None, optional=True)
    if n == 0:
        if words.size or escapes.size:
            raise CodecError('sparse payload holds symbols for an empty delta')
        return np.zeros(0, np.int64)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        symbols = coder.decode(_ans_model(freq), n)
    except (ValueError, RuntimeError) as err:
        raise CodecError(f'sparse payload ANS stream is invalid: {err}') from err
    if not coder.is_empty():
        raise CodecError('sparse payload ANS stream holds more data than its symbols')
    erange = freq.size // 2 - 1
    levels = symbols.astype(np.int64, copy=False) - erange
    esc = levels == erange + 1  # the escape symbol 2E+1
    if int(np.count_nonzero(esc)) != escapes.size:
        raise CodecError(f'sparse payload has {escapes.size} escapes, the stream needs '
                         f'{int(np.count_nonzero(esc))}')
    if escapes.size:
        levels[esc] = escapes
    return levels


register_codec(Fp16Codec.name, Fp16Codec)
register_codec(Nf4Codec.name, Nf4Codec)
register_codec(SparseCodec.name, SparseCodec)


# --- byte budget --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressStats:
    """What one compressed delta costs and how far it is from the original.

    Attributes:
        codec: The codec's description (name and knobs actually used).
        nbytes: Payload size in bytes.
        num_params: Values in the delta.
        bits_per_param: ``8 * nbytes / num_params`` (0.0 for an empty delta).
        rel_l2_error: ``||decoded - delta|| / ||delta||``.
        nonzero_fraction: Fraction of decoded values that are not zero.
        encode_ms: Wall time of the whole compression (search included).
    """

    codec: str
    nbytes: int
    num_params: int
    bits_per_param: float
    rel_l2_error: float
    nonzero_fraction: float
    encode_ms: float


@dataclass(frozen=True)
class Compressed:
    """A payload, its decoding (exactly what the device will add) and its stats."""

    payload: bytes
    decoded: dict[str, Tensor]
    codec: Codec
    stats: CompressStats


def _stats(delta: StateDict, payload: bytes, decoded: dict[str, Tensor], codec: Codec,
           t0: float) -> CompressStats:
    n = num_params(delta)
    nz = sum(int(torch.count_nonzero(t)) for t in decoded.values())
    return CompressStats(
        codec=codec.describe(), nbytes=len(payload), num_params=n,
        bits_per_param=8.0 * len(payload) / n if n else 0.0,
        rel_l2_error=rel_l2_error(delta, decoded),
        nonzero_fraction=nz / n if n else 0.0,
        encode_ms=(time.perf_counter() - t0) * 1000.0)


BUDGET_KNOBS = ('auto', 'bits', 'density')


def _bisect(delta: StateDict, importance: Mapping[str, Tensor] | None, budget: int,
            make: Callable[[float], Codec], lo: float, hi: float, geometric: bool,
            steps: int, self_describing: bool) -> tuple[Codec, bytes] | None:
    """Largest knob in [lo, hi] whose payload fits; None when even ``lo`` does not."""
    best_codec = make(lo)
    best = best_codec.encode(delta, importance=importance, self_describing=self_describing)
    if len(best) > budget:
        return None
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if geometric else 0.5 * (lo + hi)
        mid = float(f'{mid:.4g}')  # readable knobs in logs; finer steps buy nothing
        trial_codec = make(mid)
        trial = trial_codec.encode(delta, importance=importance,
                                   self_describing=self_describing)
        if len(trial) <= budget:
            lo, best, best_codec = mid, trial, trial_codec
        else:
            hi = mid
    return best_codec, best


def compress(delta: StateDict, codec: Codec, budget_bytes: int | None = None, *,
             importance: Mapping[str, Tensor] | None = None, knob: str = 'auto',
             min_bits: float = 1.0, min_density: float = 1e-4,
             search_steps: int = 10, self_describing: bool = True) -> Compressed:
    """Encode a delta under a byte budget and report what it cost.

    When the codec's own setting does not fit and the codec is tunable (``sparse``), a knob
    is bisected for the largest value that fits: ``'bits'`` (down to ``min_bits``),
    ``'density'`` (geometrically, down to ``min_density``), or ``'auto'``: bits first, then
    density at ``min_bits``. Measured on LoRA-like deltas, coarser steps lose less accuracy
    per byte saved than dropping elements down to ~1 bit per parameter; below that,
    dropping elements wins (and importance-based selection only acts through density).

    Args:
        delta: Float tensors.
        codec: The codec and its knobs (the upper end of the search).
        budget_bytes: Per-device limit on the payload size; ``None`` for no limit.
        importance: Passed to the codec (see :meth:`Codec.encode`).
        knob: ``'auto'``, ``'bits'`` or ``'density'``.
        min_bits: Lowest ``bits`` tried.
        min_density: Lowest density tried.
        search_steps: Bisection steps per knob (each one encodes once).
        self_describing: Write the tensor index into the payload; ``False`` (what the cloud
            sends) writes a compact payload that the device decodes with its trainable
            spec (see the module docstring).

    Returns:
        The payload, its decoding (from the bytes, as the device decodes it) and stats.

    Raises:
        PayloadTooLargeError: Nothing the codec can produce fits the budget.
        CodecError: The delta cannot be encoded.
        ConfigError: Unknown knob.
    """
    from cdcca_ros.errors import ConfigError

    if knob not in BUDGET_KNOBS:
        raise ConfigError(f'compress knob must be one of {BUDGET_KNOBS}, got {knob!r}')
    t0 = time.perf_counter()
    payload = codec.encode(delta, importance=importance, self_describing=self_describing)
    chosen: Codec = codec
    if budget_bytes is not None and len(payload) > budget_bytes:
        if not isinstance(codec, SparseCodec):
            raise PayloadTooLargeError(
                f'{codec.describe()} payload is {len(payload)} bytes, over the budget of '
                f'{budget_bytes}, and the codec has no knob to turn down')
        found = None
        current = codec
        for name in ('bits', 'density') if knob == 'auto' else (knob,):
            if name == 'bits' and current.bits > min_bits:
                found = _bisect(delta, importance, budget_bytes, current.with_bits, min_bits,
                                current.bits, False, search_steps, self_describing)
                current = current.with_bits(min_bits)
            elif name == 'density' and current.density > min_density:
                found = _bisect(delta, importance, budget_bytes, current.with_density,
                                min_density, current.density, True, search_steps,
                                self_describing)
                current = current.with_density(min_density)
            if found is not None:
                break
        if found is None:
            raise PayloadTooLargeError(
                f'{current.describe()} still exceeds the budget of {budget_bytes} bytes '
                f'(knob {knob!r}); raise the budget')
        chosen, payload = found
    # Decoded from the bytes, exactly as the device decodes them, in the delta's key order.
    decoded = chosen.decode(payload, spec=delta)
    decoded = {k: decoded[k] for k in delta}
    return Compressed(payload, decoded, chosen, _stats(delta, payload, decoded, chosen, t0))


# --- error feedback -----------------------------------------------------------------------------
class ErrorFeedback:
    """Cloud-side state of one device: the weights it holds and what quantization dropped.

    ``view`` is ``base + sum(decoded deltas)`` computed with :func:`apply_delta`, i.e.
    bit-identical to the device's copy (its :func:`~cdcca_ros.core.wire.state_dict_hash`
    is the device's new base hash). ``residual`` is ``sent - decoded`` of the last round
    (float32); :meth:`compensate` adds it to the next raw delta, so nothing quantization
    dropped is lost. Equivalently, ``compute_delta(trained, view)`` is the compensated delta
    when the cloud keeps training its own copy.

    Args:
        base: What the device holds now (cloned).
        enabled: ``False`` turns feedback off (the residual stays zero): a baseline.
    """

    def __init__(self, base: StateDict, *, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self.view: dict[str, Tensor] = {k: v.detach().clone() for k, v in base.items()}
        for k, v in self.view.items():
            _check_float(k, v, 'base')
        self.residual: dict[str, Tensor] = {
            k: torch.zeros(v.shape, dtype=_delta_dtype(v.dtype)) for k, v in self.view.items()}

    def compensate(self, delta: StateDict) -> dict[str, Tensor]:
        """``delta + residual`` (a new dict); ``delta`` unchanged when disabled.

        Raises:
            DeltaMismatchError: Keys or shapes differ from the device's set.
        """
        _check_same_keys(self.view, delta, 'device view', 'delta')
        out: dict[str, Tensor] = {}
        for k, r in self.residual.items():
            d = delta[k]
            _check_float(k, d, 'delta')
            if d.shape != r.shape:
                raise DeltaMismatchError(
                    f'delta[{k!r}] has shape {tuple(d.shape)}, device holds {tuple(r.shape)}')
            d = d.detach().to('cpu', r.dtype)
            out[k] = d + r if self.enabled else d.clone()
        return out

    def commit(self, sent: StateDict, decoded: StateDict) -> dict[str, Tensor]:
        """Record a round once its payload went out; returns the new device view.

        Args:
            sent: The (compensated) delta that was encoded.
            decoded: The payload's decoding (what the device adds).

        Raises:
            DeltaMismatchError: Keys or shapes differ from the device's set.
        """
        new_view = apply_delta(self.view, decoded)
        _check_same_keys(self.view, sent, 'device view', 'sent delta')
        if self.enabled:
            residual = {}
            for k, r in self.residual.items():
                s = sent[k]
                if s.shape != r.shape:
                    raise DeltaMismatchError(f'sent[{k!r}] has shape {tuple(s.shape)}, '
                                             f'device holds {tuple(r.shape)}')
                residual[k] = s.detach().to('cpu', r.dtype) - decoded[k].detach().to(
                    'cpu', r.dtype)
            self.residual = residual
        self.view = new_view
        return self.view

    def view_hash(self) -> str:
        """Hash of what the device holds (:func:`cdcca_ros.core.wire.state_dict_hash`)."""
        from cdcca_ros.core.wire import state_dict_hash

        return state_dict_hash(self.view)

    def residual_norm(self) -> float:
        """L2 norm of the residual (what the device still lacks)."""
        return math.sqrt(sum(float((r.double() ** 2).sum()) for r in self.residual.values()))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors for a checkpoint: ``view/<name>`` and ``residual/<name>``."""
        out = {f'view/{k}': v.contiguous() for k, v in self.view.items()}
        out.update({f'residual/{k}': v.contiguous() for k, v in self.residual.items()})
        return out

    @classmethod
    def from_state_dict(cls, sd: StateDict, *, enabled: bool = True) -> ErrorFeedback:
        """Rebuild from :meth:`state_dict` output.

        Raises:
            DeltaMismatchError: Views and residuals do not pair up.
        """
        view = {k[len('view/'):]: v for k, v in sd.items() if k.startswith('view/')}
        res = {k[len('residual/'):]: v for k, v in sd.items() if k.startswith('residual/')}
        stray = [k for k in sd if not k.startswith(('view/', 'residual/'))]
        if stray:
            raise DeltaMismatchError(f'error-feedback state has stray keys {stray[:5]}')
        ef = cls(view, enabled=enabled)
        _check_same_keys(ef.residual, res, 'view', 'residual')
        for k, r in res.items():
            if r.shape != ef.residual[k].shape:
                raise DeltaMismatchError(f'residual[{k!r}] has shape {tuple(r.shape)}, '
                                         f'view has {tuple(ef.residual[k].shape)}')
            ef.residual[k] = r.detach().to('cpu', ef.residual[k].dtype).clone()
        return ef

    def save(self, path: str | Path) -> None:
        """Write the state as a safetensors file."""
        import safetensors.torch

        safetensors.torch.save_file(self.state_dict(), str(path),
                                    metadata={'enabled': str(self.enabled)})

    @classmethod
    def load(cls, path: str | Path) -> ErrorFeedback:
        """Read a state written by :meth:`save`.

        Raises:
            DeltaMismatchError: The file cannot be read, or views and residuals do not pair.
        """
        import safetensors
        import safetensors.torch

        try:
            sd = safetensors.torch.load_file(str(path))
            with safetensors.safe_open(str(path), framework='pt') as f:
                meta = f.metadata() or {}
        except (safetensors.SafetensorError, OSError) as err:
            raise DeltaMismatchError(f'cannot read error-feedback state {path}: {err}') from err
        return cls.from_state_dict(sd, enabled=meta.get('enabled', 'True') == 'True')


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
