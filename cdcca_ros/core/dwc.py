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
  point for the +-1 level, and a static rANS entropy coder over all symbols. Zeros are cheap
  symbols, so positions need no separate index. On Gaussian deltas it reaches NF4's error
  (~0.09) at ~3.7 bits per parameter; on heavy-tailed deltas it needs far fewer bits.

Payload format (version 1), the same container for every codec: a safetensors file
(``safetensors.numpy.save``; never pickle) whose ``__metadata__`` holds ``format``
(``'cdcca-dwc'``), ``version`` (``'1'``), ``codec`` (name), ``params`` (the encoder's
knobs as JSON, informational) and ``sha256`` (hex digest over every tensor's name, dtype
string, shape and bytes in sorted-name order, so corruption never decodes silently).
Tensor ``__index__`` is zlib-compressed UTF-8 JSON ``[[name, dtype, [shape...]], ...]`` in
payload order (compressed because LoRA key names repeat and would otherwise dominate small
payloads). The other tensors belong to the codec:

* ``fp16``: ``values`` float16, all tensors flattened and concatenated.
* ``nf4``: ``packed`` uint8 (two 4-bit codes per byte, per tensor ``ceil(n/2)`` bytes),
  ``absmax`` float32 per 64-block; with double quantization ``absmax`` is uint8 and
  ``absmax2`` float32 (per 256 absmax values) and ``offset`` float32 (per tensor) come along.
* ``sparse``: ``step`` and ``level1`` float32 per tensor, and the rANS stream: ``freq``
  uint16 (symbol table over ``[-E, E]`` plus an escape, summing to 2**15), ``states``
  uint32 (final state of each interleaved lane), ``words`` uint16 (renormalisation words in
  decoding order), ``escapes`` int32 (levels beyond ``+-E``).

Decoding never trusts the bytes: any malformed, truncated or inconsistent payload raises
:class:`~cdcca_ros.errors.CodecError`.
"""
from __future__ import annotations

import abc
import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.errors import CodecError, DeltaMismatchError, PayloadTooLargeError

FORMAT_NAME = 'cdcca-dwc'
FORMAT_VERSION = 1
# Refuse to decode payloads that claim more values than this (2**28 floats = 1 GiB).
DEFAULT_MAX_NUMEL = 1 << 28
_MAX_INDEX_BYTES = 64 << 20
_INDEX_KEY = '__index__'

_DTYPES: dict[str, torch.dtype] = {
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
    'float32': torch.float32,
    'float64': torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

StateDict = Mapping[str, Tensor]


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


def _entries(delta: StateDict) -> list[_Entry]:
    out = []
    for name, t in delta.items():
        if not isinstance(name, str):
            raise CodecError(f'delta key {name!r} is not a string')
        if not isinstance(t, Tensor) or t.dtype not in _DTYPE_NAMES:
            raise CodecError(f'delta[{name!r}] must be a float tensor, got '
                             f'{getattr(t, "dtype", type(t).__name__)}')
        out.append(_Entry(name, _DTYPE_NAMES[t.dtype], tuple(int(s) for s in t.shape)))
    return out


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in sorted-name order."""
    h = hashlib.sha256(b'cdcca-dwc-arrays-v1')
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        for part in (name.encode(), a.dtype.str.encode(), str(a.shape).encode()):
            h.update(len(part).to_bytes(8, 'little') + part)
        h.update(a.size.to_bytes(8, 'little'))
        h.update(a.reshape(-1).view(np.uint8).tobytes())
    return h.hexdigest()


def _write_payload(codec: str, params: dict[str, Any], entries: list[_Entry],
                   arrays: dict[str, np.ndarray]) -> bytes:
    import safetensors.numpy

    index = json.dumps([[e.name, e.dtype, list(e.shape)] for e in entries],
                       separators=(',', ':')).encode()
    tensors = {_INDEX_KEY: np.frombuffer(zlib.compress(index, 9), dtype=np.uint8)}
    tensors.update({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    meta = {'format': FORMAT_NAME, 'version': str(FORMAT_VERSION), 'codec': codec,
            'params': json.dumps(params, sort_keys=True), 'sha256': _arrays_digest(tensors)}
    return safetensors.numpy.save(tensors, metadata=meta)


@dataclass(frozen=True)
class _Payload:
    codec: str
    params: dict[str, Any]
    entries: list[_Entry]
    arrays: dict[str, np.ndarray]


def _read_header_meta(data: bytes) -> dict[str, str]:
    # safetensors.numpy.load drops __metadata__; after it validated the file, read the
    # header (8-byte little-endian length + JSON) ourselves.
    (size,) = np.frombuffer(data[:8], dtype='<u8')
    header = json.loads(data[8:8 + int(size)])
    meta = header.get('__metadata__', {})
    if not isinstance(meta, dict):
        raise CodecError('payload __metadata__ is not a JSON object')
    return meta


def _parse_index(raw: np.ndarray, max_numel: int) -> list[_Entry]:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CodecError(f'payload index must be 1-D uint8, got {raw.dtype} {raw.shape}')
    dec = zlib.decompressobj()
    try:
        text = dec.decompress(raw.tobytes(), _MAX_INDEX_BYTES)
    except zlib.error as err:
        raise CodecError(f'payload index does not decompress: {err}') from err
    if dec.unconsumed_tail or not dec.eof:
        raise CodecError('payload index is truncated or larger than '
                         f'{_MAX_INDEX_BYTES} bytes')
    try:
        rows = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CodecError(f'payload index is not JSON: {err}') from err
    if not isinstance(rows, list):
        raise CodecError('payload index is not a list')
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
    return entries


def _read_payload(payload: bytes, max_numel: int = DEFAULT_MAX_NUMEL) -> _Payload:
    import safetensors
    import safetensors.numpy

    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f'payload must be bytes, got {type(payload).__name__}')
    data = bytes(payload)
    try:
        arrays = safetensors.numpy.load(data)
        meta = _read_header_meta(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as err:
        raise CodecError(f'payload is not a valid safetensors container '
                         f'({len(data)} bytes): {err}') from err
    if meta.get('format') != FORMAT_NAME:
        raise CodecError(f'payload format is {meta.get("format")!r}, expected {FORMAT_NAME!r}')
    if meta.get('version') != str(FORMAT_VERSION):
        raise CodecError(f'payload format version {meta.get("version")!r} is not supported '
                         f'(this build reads {FORMAT_VERSION})')
    codec = meta.get('codec')
    if not isinstance(codec, str):
        raise CodecError('payload names no codec')
    try:
        params = json.loads(meta.get('params', '{}'))
    except json.JSONDecodeError as err:
        raise CodecError(f'payload params are not JSON: {err}') from err
    if meta.get('sha256') != _arrays_digest(arrays):
        raise CodecError(f'{codec} payload fails its sha256 check (corrupted in transit?)')
    if _INDEX_KEY not in arrays:
        raise CodecError('payload has no index')
    entries = _parse_index(arrays.pop(_INDEX_KEY), max_numel)
    return _Payload(codec, params if isinstance(params, dict) else {}, entries, arrays)


def _array(p: _Payload, key: str, dtype: type, size: int | None) -> np.ndarray:
    """A codec array from the payload, checked for dtype, rank and (when given) size."""
    arr = p.arrays.get(key)
    if arr is None:
        raise CodecError(f'{p.codec} payload lacks tensor {key!r}')
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise CodecError(f'{p.codec} payload tensor {key!r} is {arr.dtype} {arr.shape}, '
                         f'expected 1-D {np.dtype(dtype)}')
    if size is not None and arr.size != size:
        raise CodecError(f'{p.codec} payload tensor {key!r} has {arr.size} values, '
                         f'expected {size}')
    return arr


def _unflatten(entries: list[_Entry], flats: list[np.ndarray]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for e, flat in zip(entries, flats, strict=True):
        t = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).reshape(e.shape)
        out[e.name] = t.to(_DTYPES[e.dtype])
    return out


def read_payload_codec(payload: bytes) -> str:
    """The codec name recorded in a payload.

    Raises:
        CodecError: The bytes are not a DWC payload.
    """
    return _read_payload(payload).codec


# --- codec interface and registry ------------------------------------------------------------
class Codec(abc.ABC):
    """Turns a delta into bytes and back; ``decode(encode(d))`` approximates ``d``.

    Decoding reads everything it needs from the payload, so any instance of a codec class
    decodes what any other instance (other knobs) encoded.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The encoder's knobs (recorded in the payload)."""

    @abc.abstractmethod
    def encode(self, delta: StateDict, *,
               importance: Mapping[str, Tensor] | None = None) -> bytes:
        """Encode a delta.

        Args:
            delta: Float tensors (keys in any order; order is kept).
            importance: Optional per-tensor importance (e.g. input-activation scale),
                broadcastable to each delta tensor; codecs that select use it, others
                ignore it.

        Raises:
            CodecError: The delta cannot be encoded (non-finite, non-float, out of range).
        """

    @abc.abstractmethod
    def decode(self, payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL
               ) -> dict[str, Tensor]:
        """Decode a payload into tensors of the recorded names, shapes and dtypes.

        Raises:
            CodecError: Malformed, truncated or foreign bytes, or another codec's payload.
        """

    def describe(self) -> str:
        """``name(k=v,...)`` for logs and the envelope's codec description."""
        knobs = ','.join(f'{k}={v}' for k, v in sorted(self.params().items()))
        return f'{self.name}({knobs})'

    def _open(self, payload: bytes, max_numel: int) -> _Payload:
        p = _read_payload(payload, max_numel)
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


def decode_payload(payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL
                   ) -> dict[str, Tensor]:
    """Decode any registered codec's payload (the codec is read from the payload).

    Raises:
        CodecError: Malformed bytes or an unknown codec.
    """
    return get_codec(read_payload_codec(payload)).decode(payload, max_numel=max_numel)


# --- fp16 -------------------------------------------------------------------------------------
_FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Codec(Codec):
    """Every value as IEEE float16: the reference (relative error ~3e-4, 16 bits/param)."""

    name = 'fp16'

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, delta: StateDict, *,
               importance: Mapping[str, Tensor] | None = None) -> bytes:
        entries = _entries(delta)
        flats = [_flat_f32(e.name, delta[e.name]) for e in entries]
        for e, f in zip(entries, flats, strict=True):
            if f.size and float(np.abs(f).max()) > _FP16_MAX:
                raise CodecError(f'delta[{e.name!r}] exceeds the float16 range '
                                 f'(max |x| = {float(np.abs(f).max()):.3g})')
        values = np.concatenate(flats).astype(np.float16) if flats else np.zeros(0, np.float16)
        return _write_payload(self.name, self.params(), entries, {'values': values})

    def decode(self, payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL
               ) -> dict[str, Tensor]:
        p = self._open(payload, max_numel)
        total = sum(e.numel for e in p.entries)
        values = _array(p, 'values', np.float16, total)
        bounds = np.cumsum([0] + [e.numel for e in p.entries])
        return _unflatten(p.entries, [values[a:b] for a, b in zip(bounds[:-1], bounds[1:],
                                                                    strict=True)])


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

    def encode(self, delta: StateDict, *,
               importance: Mapping[str, Tensor] | None = None) -> bytes:
        from bitsandbytes import functional as bnbf

        entries = _entries(delta)
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
        return _write_payload(self.name, self.params(), entries, arrays)

    def decode(self, payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL
               ) -> dict[str, Tensor]:
        from bitsandbytes import functional as bnbf

        p = self._open(payload, max_numel)
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
        return _unflatten(p.entries, flats)


# --- static rANS entropy coder (vectorised over interleaved lanes) -------------------------
# 32-bit states in [2**16, 2**32), 16-bit renormalisation words, 15-bit probabilities: at
# most one word per symbol and lane. Symbol i goes to lane i % K; the encoder walks the steps
# backwards, the decoder forwards, and at each step the lanes that renormalise read the next
# words in lane order, so the stream needs no per-lane offsets. The encoder starts every lane
# at 2**16, so a correct decode ends there too: a built-in integrity check.
_PROB_BITS = 15
_PROB_SCALE = 1 << _PROB_BITS
_RANS_L = 1 << 16
_STEPS_PER_LANE = 2048
_MAX_LANES = 4096


def _rans_lanes(n: int) -> int:
    # ~2048 steps per lane: 32 bits of final state per lane cost ~0.016 bits/symbol.
    return int(min(_MAX_LANES, max(1, -(-n // _STEPS_PER_LANE))))


def _rans_freqs(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to 2**15, every present symbol at least 1."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    present = counts > 0
    freq = np.zeros(counts.size, dtype=np.int64)
    if total == 0:
        freq[0] = _PROB_SCALE
        return freq
    n_present = int(present.sum())
    freq[present] = counts[present] * (_PROB_SCALE - n_present) // total + 1
    freq[int(np.argmax(freq))] += _PROB_SCALE - int(freq.sum())
    return freq


def _rans_encode(symbols: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode symbol indices; returns (final lane states uint32, words uint16)."""
    n = symbols.size
    if n == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint16)
    lanes = _rans_lanes(n)
    steps = -(-n // lanes)
    f64 = freq.astype(np.uint64)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint64)
    x = np.full(lanes, _RANS_L, dtype=np.uint64)
    shift_max = np.uint64(32 - _PROB_BITS)
    out: list[np.ndarray] = []
    for j in range(steps - 1, -1, -1):
        s = symbols[j * lanes:(j + 1) * lanes]
        xa = x[:s.size]
        fs = f64[s]
        emit = xa >= (fs << shift_max)
        out.append((xa[emit] & np.uint64(0xFFFF)).astype(np.uint16))
        xa[emit] >>= np.uint64(16)
        xa[:] = ((xa // fs) << np.uint64(_PROB_BITS)) + (xa % fs) + cum[s]
    words = np.concatenate(out[::-1]) if out else np.zeros(0, np.uint16)
    return x.astype(np.uint32), words


def _rans_decode(n: int, freq: np.ndarray, states: np.ndarray, words: np.ndarray
                 ) -> np.ndarray:
    """Decode ``n`` symbol indices; raises CodecError on any inconsistency."""
    if n == 0:
        if states.size or words.size:
            raise CodecError('rANS stream holds data for zero symbols')
        return np.zeros(0, np.int64)
    if states.size != _rans_lanes(n):
        raise CodecError(f'rANS stream has {states.size} lanes, expected {_rans_lanes(n)}')
    if np.any(states < _RANS_L):
        raise CodecError('rANS lane state out of range')
    lanes = states.size
    steps = -(-n // lanes)
    f64 = freq.astype(np.uint64)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint64)
    slot2sym = np.repeat(np.arange(freq.size, dtype=np.int64), freq)
    x = states.astype(np.uint64)
    w64 = words.astype(np.uint64)
    out = np.empty(n, dtype=np.int64)
    ptr = 0
    mask = np.uint64(_PROB_SCALE - 1)
    for j in range(steps):
        a = min(lanes, n - j * lanes)
        xa = x[:a]
        slot = xa & mask
        s = slot2sym[slot]
        out[j * lanes:j * lanes + a] = s
        xa[:] = f64[s] * (xa >> np.uint64(_PROB_BITS)) + slot - cum[s]
        need = xa < _RANS_L
        cnt = int(need.sum())
        if cnt:
            if ptr + cnt > w64.size:
                raise CodecError('rANS stream is truncated')
            xa[need] = (xa[need] << np.uint64(16)) | w64[ptr:ptr + cnt]
            ptr += cnt
    if ptr != w64.size or np.any(x != _RANS_L):
        raise CodecError('rANS stream is corrupt (final state or length mismatch)')
    return out


# --- sparse (ours) ----------------------------------------------------------------------------
_SQRT_2PI_E = math.sqrt(2.0 * math.pi * math.e)
_MAX_ESCAPE_RANGE = 4095
_MAX_LEVEL = (1 << 31) - 1
SPARSE_SCOPES = ('tensor', 'global')


class SparseCodec(Codec):
    """Top-k selection + entropy-coded uniform quantization (ours, beats NF4 in bits/param).

    Per tensor (or over all tensors with ``scope='global'``) the codec keeps the
    ``density`` fraction of elements with the largest importance (``|delta|``, times the
    given importance if any), quantizes kept values with step
    ``sqrt(2*pi*e) * rms(kept) * 2**-bits`` (for Gaussian values the symbol entropy is then
    ~``bits``) and entropy-codes all symbols (zeros included) with rANS. Values that round
    to +-1 are rebuilt at their mean magnitude (one float per tensor), which lowers the error
    of the many small values at no rate cost.

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
        rms = math.sqrt(float(np.mean(kept.astype(np.float64) ** 2))) if kept.size else 0.0
        step = _SQRT_2PI_E * rms * 2.0 ** -self.bits
        # float32 on the wire; a zero step would make every level ambiguous.
        return float(np.float32(step)) if step > 0 and math.isfinite(step) else 1.0

    def encode(self, delta: StateDict, *,
               importance: Mapping[str, Tensor] | None = None) -> bytes:
        entries = _entries(delta)
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
        arrays['step'] = np.asarray(steps, dtype=np.float32)
        arrays['level1'] = np.asarray(lv1, dtype=np.float32)
        return _write_payload(self.name, self.params(), entries, arrays)

    # decode ----------------------------------------------------------------------------
    def decode(self, payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL
               ) -> dict[str, Tensor]:
        p = self._open(payload, max_numel)
        sizes = [e.numel for e in p.entries]
        steps = _array(p, 'step', np.float32, len(sizes))
        lv1 = _array(p, 'level1', np.float32, len(sizes))
        allq = _decode_levels(p, sum(sizes))
        flats: list[np.ndarray] = []
        pos = 0
        for i, n in enumerate(sizes):
            q = allq[pos:pos + n]
            pos += n
            mag = np.where(np.abs(q) == 1, np.float64(lv1[i]), np.abs(q).astype(np.float64))
            flats.append((np.sign(q) * mag * np.float64(steps[i])).astype(np.float32))
        return _unflatten(p.entries, flats)


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
    absq = np.abs(levels)
    erange = _escape_range(absq)
    esc = absq > erange
    symbols = np.where(esc, 2 * erange + 1, levels + erange).astype(np.int64)
    counts = np.bincount(symbols, minlength=2 * erange + 2)
    freq = _rans_freqs(counts)
    states, words = _rans_encode(symbols, freq)
    # Frequencies are at most 2**15, so uint16 holds every one.
    return {'freq': freq.astype(np.uint16), 'states': states, 'words': words,
            'escapes': levels[esc].astype(np.int32)}


def _decode_levels(p: _Payload, n: int) -> np.ndarray:
    freq = p.arrays.get('freq')
    if freq is None or freq.ndim != 1 or freq.dtype != np.uint16:
        raise CodecError('sparse payload lacks a valid symbol table')
    if freq.size < 2 or freq.size % 2 or freq.size > 2 * _MAX_ESCAPE_RANGE + 2:
        raise CodecError(f'sparse payload symbol table has {freq.size} entries')
    freq = freq.astype(np.int64)
    if int(freq.sum()) != _PROB_SCALE:
        raise CodecError(f'sparse payload symbol table sums to {int(freq.sum())}, '
                         f'expected {_PROB_SCALE}')
    states = _array(p, 'states', np.uint32, None)
    words = _array(p, 'words', np.uint16, None)
    escapes = _array(p, 'escapes', np.int32, None)
    symbols = _rans_decode(n, freq, states, words)
    erange = freq.size // 2 - 1
    esc = symbols == 2 * erange + 1
    if int(esc.sum()) != escapes.size:
        raise CodecError(f'sparse payload has {escapes.size} escapes, the stream needs '
                         f'{int(esc.sum())}')
    levels = symbols - erange
    levels[esc] = escapes.astype(np.int64)
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
            steps: int) -> tuple[Codec, bytes] | None:
    """Largest knob in [lo, hi] whose payload fits; None when even ``lo`` does not."""
    best_codec = make(lo)
    best = best_codec.encode(delta, importance=importance)
    if len(best) > budget:
        return None
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if geometric else 0.5 * (lo + hi)
        mid = float(f'{mid:.4g}')  # readable knobs in logs; finer steps buy nothing
        trial_codec = make(mid)
        trial = trial_codec.encode(delta, importance=importance)
        if len(trial) <= budget:
            lo, best, best_codec = mid, trial, trial_codec
        else:
            hi = mid
    return best_codec, best


def compress(delta: StateDict, codec: Codec, budget_bytes: int | None = None, *,
             importance: Mapping[str, Tensor] | None = None, knob: str = 'auto',
             min_bits: float = 1.0, min_density: float = 1e-4,
             search_steps: int = 10) -> Compressed:
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
    payload = codec.encode(delta, importance=importance)
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
                                current.bits, False, search_steps)
                current = current.with_bits(min_bits)
            elif name == 'density' and current.density > min_density:
                found = _bisect(delta, importance, budget_bytes, current.with_density,
                                min_density, current.density, True, search_steps)
                current = current.with_density(min_density)
            if found is not None:
                break
        if found is None:
            raise PayloadTooLargeError(
                f'{current.describe()} still exceeds the budget of {budget_bytes} bytes '
                f'(knob {knob!r}); raise the budget')
        chosen, payload = found
    decoded = chosen.decode(payload)
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
