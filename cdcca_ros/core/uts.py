"""Uncertainty-guided Token Sampling (UTS), paper Sec. 3.2, Eq. 2-4.

Stage 1 keeps samples whose answer is uncertain (entropy of the generated distributions,
Eq. 2). Stage 2 keeps, inside a selected sample, the vision tokens whose representation
varies most under Monte-Carlo dropout (Eq. 3-4). Only the kept tokens are packed for the
uplink, with their indices, so stage 2 really shrinks what is sent: fp16, per-token int8 or
int4, or ``'ecq'`` (entropy-coded quantization, ~3.4 bits a value, see below).

The model is reached only through a callable ``mc_features(tokens, p, M)`` (bound to
:meth:`cdcca_ros.models.base.MLLM.mc_token_features` on the device): tensors in, tensors out.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.errors import CodecError, ConfigError, ModelError, WireError

STAGE1_MODES = ('threshold', 'top_fraction')
STAGE2_MODES = ('threshold', 'keep_ratio')
PACK_DTYPES = ('fp16', 'int8', 'int4', 'ecq')

_FP16_MAX = float(np.finfo(np.float16).max)
# Scales are float32 on the wire (ROS float32[]), so the encoder rounds them to float32 first.
SCALE_BYTES = 4
# UtsTokens.kept_indices is uint16[]: BLIP-2 has 257 tokens, LLaVA-1.5 576, Qwen2-VL a few
# thousand, all far below 65536.
INDEX_BYTES = 2
MAX_TOKENS = 1 << 16
# CDR writes a uint32 element count before every sequence field.
SEQUENCE_HEADER_BYTES = 4

MCFeatures = Callable[[Tensor, float, int], Tensor]


# --- stage 1: sample entropy (Eq. 2) ------------------------------------------------------
@dataclass(frozen=True)
class EntropyStats:
    """Entropy of one generated answer, in nats.

    Attributes:
        mean: Mean over the generated steps of each step's entropy (0.0 when no step).
        max: Largest step entropy (0.0 when no step).
        per_step: ``[T]`` float64 entropy of each step's full distribution.
    """

    mean: float
    max: float
    per_step: np.ndarray = field(repr=False)


def answer_entropy(step_probs: np.ndarray) -> EntropyStats:
    """Entropy of every generated step's distribution (Eq. 2), with mean and max.

    Uses each step's full distribution over the vocabulary, not a product of chosen-token
    probabilities. Zero probabilities contribute 0 (``0 log 0 = 0``); rows are renormalised
    so float32 softmax rounding (or a truncated distribution) does not bias the value.

    Args:
        step_probs: ``[T, V]`` non-negative probabilities; ``T`` may be 0.

    Returns:
        The per-step entropies and their mean and max.

    Raises:
        ValueError: Not 2-D, non-finite or negative values, or a row that sums to 0.
    """
    probs = np.asarray(step_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f'step_probs must be [T, V], got shape {probs.shape}')
    if probs.shape[0] == 0:
        return EntropyStats(mean=0.0, max=0.0, per_step=np.zeros(0, dtype=np.float64))
    if not np.all(np.isfinite(probs)):
        raise ValueError('step_probs holds non-finite values')
    if np.any(probs < 0.0):
        raise ValueError(f'step_probs holds negative values (min {probs.min():.3g})')
    totals = probs.sum(axis=1, keepdims=True)
    if np.any(totals <= 0.0):
        bad = np.flatnonzero(totals[:, 0] <= 0.0).tolist()
        raise ValueError(f'step_probs rows {bad} sum to 0')
    probs = probs / totals
    # where= keeps log(0) from ever being evaluated: no warning, and 0 log 0 = 0.
    logs = np.log(probs, out=np.zeros_like(probs), where=probs > 0.0)
    per_step = -(probs * logs).sum(axis=1)
    per_step = np.maximum(per_step, 0.0)  # -0.0 and rounding below 0 for one-hot rows
    return EntropyStats(mean=float(per_step.mean()), max=float(per_step.max()),
                        per_step=per_step)


def answer_confidence(token_probs: Sequence[float] | np.ndarray) -> float:
    """Confidence of a generated answer: the geometric mean of its tokens' probabilities
    (0.0 for an empty answer)."""
    p = np.asarray(token_probs, dtype=np.float64).reshape(-1)
    if not p.size:
        return 0.0
    return float(np.exp(np.log(np.clip(p, 1e-12, 1.0)).mean()))


class SampleSelector:
    """Stage-1 gate: decide online whether a sample is uncertain enough to send.

    ``'threshold'`` passes a sample when its entropy is above ``threshold``.
    ``'top_fraction'`` passes a sample when it ranks in the top ``fraction`` of the last
    ``window`` offered entropies (itself included): fewer than ``fraction * n`` earlier
    window entries are ``>=`` it. Ties count against the newcomer, so a constant stream
    does not pass everything; until the window fills, the rank is taken over what has been
    seen (the first sample always passes).

    Attributes:
        offered: Samples offered so far.
        passed: Samples that passed.
    """

    def __init__(self, mode: str = 'threshold', threshold: float = 0.5,
                 fraction: float = 0.2, window: int = 100) -> None:
        """Validate and set up the gate.

        Args:
            mode: ``'threshold'`` or ``'top_fraction'``.
            threshold: Entropy (nats) a sample must exceed, ``'threshold'`` mode.
            fraction: Fraction of samples to pass, in (0, 1], ``'top_fraction'`` mode.
            window: Number of recent entropies ranked against, ``'top_fraction'`` mode.

        Raises:
            ConfigError: An invalid mode or value.
        """
        if mode not in STAGE1_MODES:
            raise ConfigError(f'SampleSelector mode must be one of {STAGE1_MODES}, got {mode!r}')
        if not math.isfinite(threshold) or threshold < 0.0:
            raise ConfigError(f'SampleSelector threshold must be finite and >= 0, got {threshold}')
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f'SampleSelector fraction must be in (0, 1], got {fraction}')
        if window < 1:
            raise ConfigError(f'SampleSelector window must be >= 1, got {window}')
        self.mode = mode
        self.threshold = float(threshold)
        self.fraction = float(fraction)
        self.window = int(window)
        self._history: deque[float] = deque(maxlen=self.window)
        self.offered = 0
        self.passed = 0

    def offer(self, entropy: float) -> bool:
        """Record ``entropy`` and return whether this sample passes stage 1.

        Raises:
            ValueError: ``entropy`` is not finite.
        """
        entropy = float(entropy)
        if not math.isfinite(entropy):
            raise ValueError(f'entropy must be finite, got {entropy}')
        if self.mode == 'threshold':
            ok = entropy > self.threshold
        else:
            # Earlier window entries, before the newcomer pushes the oldest out.
            earlier = list(self._history)[-(self.window - 1):] if self.window > 1 else []
            rank = sum(1 for value in earlier if value >= entropy)
            ok = rank < self.fraction * (len(earlier) + 1)
        self._history.append(entropy)
        self.offered += 1
        self.passed += int(ok)
        return ok

    @property
    def pass_rate(self) -> float:
        """Fraction of offered samples that passed (0.0 before the first offer)."""
        return self.passed / self.offered if self.offered else 0.0

    def stats(self) -> dict[str, float]:
        """Return ``{'offered', 'passed', 'pass_rate'}``."""
        return {'offered': self.offered, 'passed': self.passed, 'pass_rate': self.pass_rate}

    def reset(self) -> None:
        """Forget the window and the counters."""
        self._history.clear()
        self.offered = 0
        self.passed = 0


# --- stage 2: token variance (Eq. 3-4) ---------------------------------------------------
def token_variance(features: Tensor) -> Tensor:
    """Per-token variance over Monte-Carlo masks (Eq. 3), averaged over feature channels.

    Args:
        features: ``[M, B, N, F]`` features of ``M >= 2`` dropout masks.

    Returns:
        ``[B, N]`` float32 population variance (``1/M``, as Eq. 3) averaged over ``F``.

    Raises:
        ValueError: Wrong rank, ``M < 2`` or non-finite features.
    """
    if features.dim() != 4:
        raise ValueError(f'features must be [M, B, N, F], got shape {tuple(features.shape)}')
    if features.shape[0] < 2:
        raise ValueError(f'token variance needs M >= 2 masks, got M={features.shape[0]}')
    feats = features.detach().float()
    variance = (feats - feats.mean(dim=0)).square_().mean(dim=0).mean(dim=-1)
    # A non-finite feature makes its token's variance non-finite: one check on [B, N].
    if not torch.isfinite(variance).all():
        raise ValueError('features hold non-finite values (or their variance overflows)')
    return variance


def select_tokens(variance: Tensor, mode: str = 'keep_ratio', beta: float = 0.0,
                  keep_ratio: float = 0.25, min_keep: int = 1,
                  always_keep_cls: bool = False) -> Tensor:
    """Pick the tokens to send (Eq. 4 or a fixed budget).

    ``'threshold'`` keeps tokens with variance ``> beta`` (Eq. 4). ``'keep_ratio'`` keeps
    the ``ceil(keep_ratio * n)`` highest-variance tokens, ``n`` counting the patch tokens
    only when the CLS token is forced in. Then token 0 is added when ``always_keep_cls``,
    and the highest-variance remaining tokens are added until ``min_keep`` tokens are kept.
    Ties go to the lower index, so the choice is deterministic.

    Args:
        variance: ``[N]`` per-token variance.
        mode: ``'threshold'`` or ``'keep_ratio'``.
        beta: Variance threshold, ``'threshold'`` mode.
        keep_ratio: Fraction of tokens kept, in (0, 1], ``'keep_ratio'`` mode.
        min_keep: Minimum number of kept tokens (clipped to ``N``).
        always_keep_cls: Always keep token 0 (the CLS token).

    Returns:
        Sorted ``int64`` indices of the kept tokens.

    Raises:
        ConfigError: An invalid mode or value.
        ValueError: ``variance`` is not 1-D, empty or not finite.
    """
    if mode not in STAGE2_MODES:
        raise ConfigError(f'select_tokens mode must be one of {STAGE2_MODES}, got {mode!r}')
    if not math.isfinite(beta) or beta < 0.0:
        raise ConfigError(f'select_tokens beta must be finite and >= 0, got {beta}')
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f'select_tokens keep_ratio must be in (0, 1], got {keep_ratio}')
    if min_keep < 0:
        raise ConfigError(f'select_tokens min_keep must be >= 0, got {min_keep}')
    if variance.dim() != 1 or variance.numel() == 0:
        raise ValueError(f'variance must be a non-empty [N] tensor, got {tuple(variance.shape)}')
    # numpy: on a few hundred values its calls cost a fraction of torch's.
    var = variance.detach().float().cpu().numpy()
    if not np.isfinite(var).all():
        raise ValueError('variance holds non-finite values')
    n = var.size
    keep = np.zeros(n, dtype=bool)
    if mode == 'threshold':
        keep |= var > beta
    else:
        first = 1 if always_keep_cls else 0
        candidates = n - first
        k = min(candidates, math.ceil(keep_ratio * candidates - 1e-9))
        # Stable sort of -var: highest variance first, ties to the lower index.
        order = np.argsort(-var[first:], kind='stable') + first
        keep[order[:k]] = True
    if always_keep_cls:
        keep[0] = True
    missing = min(min_keep, n) - int(keep.sum())
    if missing > 0:
        order = np.argsort(-var, kind='stable')
        rest = order[~keep[order]]
        keep[rest[:missing]] = True
    return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))


# --- packing the kept tokens ---------------------------------------------------------------
# 'int8' / 'int4': symmetric per-token absmax codes in [-127, 127] / [-7, 7] (the most
# negative code never comes out of the encoder), one float32 scale per token. int4 codes are
# two's-complement nibbles, two per byte, the earlier value in the low nibble; an odd count
# leaves the last high nibble 0.
_CODE_MAX = {'int8': 127, 'int4': 7}

# 'ecq' (entropy-coded quantization): one uniform step per sample, codes q = round(x / step)
# written with a static canonical Huffman code, one float32 scale (the step). The step is
# sigma / 2.5, sigma estimated robustly from all kept values as median(|x|) / 0.6745 (the
# standard deviation for Gaussian values; the root mean square when at least half the values
# are 0), so a few huge activations do not coarsen every other value: they go out as escapes.
# LayerNorm'd vision tokens are close to Gaussian with about the same spread in every token,
# so q has an entropy of ~3.38 bits and the code spends ~3.42 bits a value, at about the error
# of per-token int4 (4 bits + a scale per token; relative L2 error 0.12 vs 0.105 on 64-channel
# tokens, less than int4 on wide ones, whose absmax steps grow). The code lengths are those of a
# Huffman code for q = round(2.5 z), z ~ N(0, 1) (see the tests); the two end symbols stand for
# |q| >= ECQ_LIMIT and are each followed, after the bit stream, by an LEB128 varint of
# |q| - ECQ_LIMIT, so no value is clipped. Hard-coded so that encoder and decoder agree on
# every platform.
ECQ_STEPS_PER_SIGMA = 2.5
_MEDIAN_ABS_PER_SIGMA = 0.6744897501960817  # median |z| of z ~ N(0, 1)
ECQ_LIMIT = 10
ECQ_CODE_LENGTHS = (13, 12, 10, 7, 7, 6, 4, 4, 3, 3, 3, 3, 3, 3, 4, 6, 7, 8, 9, 11, 13)
_ECQ_MAX_VARINT = 5  # bytes: escape remainders below 2**35


def canonical_codes(lengths: Sequence[int]) -> list[int]:
    """Canonical prefix codewords for code ``lengths`` (shorter first, ties by symbol)."""
    codes = [0] * len(lengths)
    code = previous = 0
    for symbol in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code <<= lengths[symbol] - previous
        previous = lengths[symbol]
        codes[symbol] = code
        code += 1
    return codes


def _decode_table(lengths: Sequence[int], codes: Sequence[int],
                  width: int) -> tuple[list[int], list[int]]:
    """(symbol, length) of every ``width``-bit window, by the codeword it starts with."""
    symbols, sizes = [0] * (1 << width), [0] * (1 << width)
    for symbol, (length, code) in enumerate(zip(lengths, codes, strict=True)):
        lo = code << (width - length)
        hi = lo + (1 << (width - length))
        symbols[lo:hi] = [symbol] * (hi - lo)
        sizes[lo:hi] = [length] * (hi - lo)
    return symbols, sizes


_ECQ_WIDTH = max(ECQ_CODE_LENGTHS)
_ECQ_LENGTH = np.asarray(ECQ_CODE_LENGTHS, dtype=np.int64)
_ECQ_CODE = np.asarray(canonical_codes(ECQ_CODE_LENGTHS), dtype=np.int64)
_ECQ_BIT = np.arange(_ECQ_WIDTH, dtype=np.int64)
_ECQ_WEIGHT = np.int64(1) << (_ECQ_WIDTH - 1 - _ECQ_BIT)
# Per symbol: its codeword as a row of bits (MSB first, left-aligned) and which are used.
_ECQ_USED = _ECQ_BIT[None, :] < _ECQ_LENGTH[:, None]
_ECQ_BITS = ((_ECQ_CODE[:, None] << (_ECQ_WIDTH - _ECQ_LENGTH[:, None]))
             >> (_ECQ_WIDTH - 1 - _ECQ_BIT[None, :]) & 1).astype(np.uint8)
_ECQ_SYMBOL_AT, _ECQ_LENGTH_AT = _decode_table(ECQ_CODE_LENGTHS, _ECQ_CODE.tolist(), _ECQ_WIDTH)


def _varint(value: int) -> bytes:
    """Unsigned LEB128."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varints(data: bytes, count: int) -> list[int]:
    """Exactly ``count`` minimal unsigned LEB128 values filling ``data``."""
    values, pos = [], 0
    for _ in range(count):
        value = 0
        for i in range(_ECQ_MAX_VARINT):
            if pos >= len(data):
                raise WireError('packed tokens: ecq escape values are truncated')
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i:
                    raise WireError('packed tokens: ecq escape value is not minimally encoded')
                break
        else:
            raise WireError(f'packed tokens: ecq escape value longer than {_ECQ_MAX_VARINT} '
                            'bytes')
        values.append(value)
    if pos != len(data):
        raise WireError(f'packed tokens: {len(data) - pos} bytes after the ecq escape values')
    return values


def _ecq_encode(q: np.ndarray) -> bytes:
    """Bit stream of the int64 codes ``q`` (MSB first, zero-padded) plus escape varints."""
    symbols = np.clip(q, -ECQ_LIMIT, ECQ_LIMIT) + ECQ_LIMIT
    stream = np.packbits(_ECQ_BITS[symbols][_ECQ_USED[symbols]]).tobytes()
    magnitude = np.abs(q)
    if magnitude.size == 0 or magnitude.max() < ECQ_LIMIT:
        return stream
    return stream + b''.join(_varint(int(r)) for r in magnitude[magnitude >= ECQ_LIMIT]
                             - ECQ_LIMIT)


def _ecq_decode(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`_ecq_encode` for ``count`` codes; WireError on any inconsistency."""
    if count == 0:
        if data:
            raise WireError(f'packed tokens: ecq holds {len(data)} bytes for no value')
        return np.zeros(0, dtype=np.int64)
    # Every code is at least 3 bits: a short payload cannot hold `count` values (and a huge
    # claimed shape cannot make the decoder loop for long).
    if count * min(ECQ_CODE_LENGTHS) > 8 * len(data):
        raise WireError(f'packed tokens: {len(data)} ecq bytes cannot hold {count} values')
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    padded = np.concatenate([bits, np.zeros(_ECQ_WIDTH - 1, dtype=np.uint8)])
    # The window of the next `width` bits at every bit position, as an int.
    windows = (np.lib.stride_tricks.sliding_window_view(padded, _ECQ_WIDTH)
               @ _ECQ_WEIGHT).tolist()
    symbol_at, length_at = _ECQ_SYMBOL_AT, _ECQ_LENGTH_AT
    symbols = [0] * count
    pos = 0
    try:
        for i in range(count):
            window = windows[pos]
            symbols[i] = symbol_at[window]
            pos += length_at[window]
    except IndexError as err:
        raise WireError('packed tokens: ecq bit stream is truncated') from err
    if pos > bits.size:
        raise WireError('packed tokens: ecq bit stream is truncated')
    end = -(-pos // 8)
    if bits[pos:8 * end].any():
        raise WireError('packed tokens: ecq padding bits are not zero')
    q = np.asarray(symbols, dtype=np.int64) - ECQ_LIMIT
    escaped = np.flatnonzero(np.abs(q) == ECQ_LIMIT)
    extra = _read_varints(data[end:], int(escaped.size))
    if escaped.size:
        q[escaped] += np.sign(q[escaped]) * np.asarray(extra, dtype=np.int64)
    return q


@dataclass(frozen=True)
class PackedTokens:
    """Kept vision tokens as bytes for the uplink.

    Attributes:
        data: Row-major ``[K, D]`` codes: little-endian ``float16`` (``'fp16'``), ``int8``
            (``'int8'``), nibbles (``'int4'``) or the ``'ecq'`` bit stream + escapes.
        dtype: One of :data:`PACK_DTYPES`.
        scale: float32-representable scales: one per token for ``'int8'``/``'int4'``
            (``x = code * scale[row]``), one per sample for ``'ecq'`` (the step,
            ``x = q * step``), none for ``'fp16'``.
        shape: ``(K, D)``.
    """

    data: bytes
    dtype: str
    scale: list[float]
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire: codes plus float32 scales."""
        return len(self.data) + SCALE_BYTES * len(self.scale)


def uplink_bytes(payload_bytes: int, num_scales: int, num_kept: int) -> int:
    """CDR bytes of the ``UtsTokens`` fields that carry token content.

    ``payload`` (uint8[]), ``scales`` (float32[]) and ``kept_indices`` (uint16[]) each
    serialise as a 4-byte count and their elements. Alignment padding before a field (0-3
    bytes, set by the variable-length fields before it) is not counted.
    """
    return (3 * SEQUENCE_HEADER_BYTES + payload_bytes + SCALE_BYTES * num_scales
            + INDEX_BYTES * num_kept)


def _symmetric_codes(x: np.ndarray, code_max: int) -> tuple[np.ndarray, list[float]]:
    """Per-token absmax codes in ``[-code_max, code_max]`` and their float32 scales."""
    k, d = x.shape
    absmax = np.abs(x).max(axis=1) if d else np.zeros(k, dtype=np.float32)
    scale = (absmax / np.float32(code_max)).astype(np.float32)
    # An all-zero token keeps scale 0; divide by 1 there so the codes are 0, not NaN.
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint(x / safe[:, None]), -code_max, code_max).astype(np.int8)
    return codes, scale.tolist()


def pack_tokens(tokens: Tensor, dtype: str = 'fp16') -> PackedTokens:
    """Pack ``[K, D]`` float tokens as fp16, per-token int8/int4 or ``'ecq'``.

    Raises:
        ConfigError: Unknown ``dtype``.
        CodecError: Not 2-D, non-finite values, or values beyond the fp16 range.
    """
    if dtype not in PACK_DTYPES:
        raise ConfigError(f'pack dtype must be one of {PACK_DTYPES}, got {dtype!r}')
    if tokens.dim() != 2:
        raise CodecError(f'tokens must be [K, D], got shape {tuple(tokens.shape)}')
    # numpy: on a few kept tokens its calls cost a fraction of torch's.
    x = tokens.detach().cpu().float().numpy()
    if not np.isfinite(x).all():
        raise CodecError('tokens hold non-finite values')
    shape = (int(x.shape[0]), int(x.shape[1]))
    if dtype == 'fp16':
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > _FP16_MAX:
            raise CodecError(f'tokens exceed the fp16 range (max |x| {peak:.4g}); use int8')
        return PackedTokens(data=x.astype('<f2').tobytes(), dtype='fp16', scale=[],
                            shape=shape)
    if dtype == 'ecq':
        values = x.reshape(-1)
        sigma = float(np.median(np.abs(values))) / _MEDIAN_ABS_PER_SIGMA if values.size else 0.0
        if sigma == 0.0 and values.size:
            # float64: the mean square of float32 values cannot overflow there.
            sigma = math.sqrt(float(np.square(values, dtype=np.float64).mean()))
        step = float(np.float32(sigma / ECQ_STEPS_PER_SIGMA))
        # float64: a float32 quotient of a large value could round to the wrong code.
        q = (np.rint(values.astype(np.float64) / step).astype(np.int64) if step > 0.0
             else np.zeros(values.size, dtype=np.int64))
        return PackedTokens(data=_ecq_encode(q), dtype='ecq', scale=[step], shape=shape)
    codes, scale = _symmetric_codes(x, _CODE_MAX[dtype])
    if dtype == 'int8':
        return PackedTokens(data=codes.tobytes(), dtype='int8', scale=scale, shape=shape)
    nibbles = codes.reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    data = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return PackedTokens(data=data, dtype='int4', scale=scale, shape=shape)


def _unpack_int4(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.empty(2 * raw.size, dtype=np.uint8)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    if nibbles.size > count and nibbles[count:].any():
        raise WireError('packed tokens: int4 padding nibble is not 0')
    nibbles = nibbles[:count]
    if np.any(nibbles == 8):
        raise WireError('packed tokens: int4 code -8 never comes out of the encoder')
    return np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles).astype(np.float32)


#: Largest packed shape decoded: the uplink's uint16 indices name at most 65536 tokens.
MAX_PACKED_TOKENS = 1 << 16
MAX_PACKED_DIM = 1 << 16


def unpack_tokens(packed: PackedTokens) -> Tensor:
    """Decode :class:`PackedTokens` into a ``[K, D]`` float32 tensor.

    Raises:
        WireError: Unknown dtype, bad shape, a byte count or scale count that does not
            match the shape, invalid scales or codes, or non-finite decoded values.
    """
    dtype = packed.dtype
    if dtype not in PACK_DTYPES:
        raise WireError(f'packed tokens: unknown dtype {dtype!r}')
    shape = tuple(packed.shape)
    if len(shape) != 2 or any((not isinstance(s, (int, np.integer))) or s < 0 for s in shape):
        raise WireError(f'packed tokens: shape must be two ints >= 0, got {packed.shape!r}')
    k, d = int(shape[0]), int(shape[1])
    if k > MAX_PACKED_TOKENS or d > MAX_PACKED_DIM:
        raise WireError(f'packed tokens: shape ({k}, {d}) exceeds ({MAX_PACKED_TOKENS}, '
                        f'{MAX_PACKED_DIM})')
    expected = {'fp16': 2 * k * d, 'int8': k * d, 'int4': -(-k * d // 2)}.get(dtype)
    if expected is not None and len(packed.data) != expected:
        raise WireError(
            f'packed tokens: {len(packed.data)} data bytes, expected {expected} for '
            f'{dtype} shape ({k}, {d})')
    scales = {'fp16': 0, 'int8': k, 'int4': k, 'ecq': 1}[dtype]
    if len(packed.scale) != scales:
        raise WireError(f'packed tokens: {dtype} needs {scales} scales for shape ({k}, {d}), '
                        f'got {len(packed.scale)}')
    scale = np.asarray(packed.scale, dtype=np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale < 0.0):
        raise WireError(f'packed tokens: {dtype} scales must be finite and >= 0')
    scale = scale.astype(np.float32)
    if dtype == 'fp16':
        values = np.frombuffer(packed.data, dtype='<f2').astype(np.float32).reshape(k, d)
    elif dtype == 'int8':
        codes = np.frombuffer(packed.data, dtype=np.int8).reshape(k, d)
        if np.any(codes == -128):
            raise WireError('packed tokens: int8 code -128 never comes out of the encoder')
        values = codes.astype(np.float32) * scale[:, None]
    elif dtype == 'int4':
        values = _unpack_int4(packed.data, k * d).reshape(k, d) * scale[:, None]
    else:
        q = _ecq_decode(bytes(packed.data), k * d)
        with np.errstate(over='ignore'):
            values = (q.astype(np.float64) * float(scale[0])).astype(np.float32).reshape(k, d)
    if not np.all(np.isfinite(values)):
        raise WireError(f'packed tokens: {dtype} data decodes to non-finite values')
    return torch.from_numpy(values)


@dataclass(frozen=True)
class PackStats:
    """How well a packing reproduces its tokens.

    Attributes:
        dtype: The packing.
        nbytes: Bytes on the wire (codes + scales).
        rel_l2: ``||x - x'|| / ||x||`` over the whole tensor.
        max_abs: Largest absolute element error.
        cosine: Mean per-token cosine similarity between ``x`` and ``x'``.
    """

    dtype: str
    nbytes: int
    rel_l2: float
    max_abs: float
    cosine: float


def pack_stats(tokens: Tensor, dtype: str) -> PackStats:
    """Pack, unpack and measure the reconstruction error of ``tokens [K, D]``."""
    x = tokens.detach().float().cpu()
    packed = pack_tokens(x, dtype)
    y = unpack_tokens(packed)
    err = y - x
    norm = float(x.norm())
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-12).mean()
    return PackStats(dtype=dtype, nbytes=packed.nbytes,
                     rel_l2=float(err.norm()) / norm if norm > 0 else 0.0,
                     max_abs=float(err.abs().max()) if err.numel() else 0.0,
                     cosine=float(cosine) if x.numel() else 1.0)


# --- visualisation ---------------------------------------------------------------------------
def variance_heatmap(variance: Tensor | np.ndarray, grid: tuple[int, int], has_cls: bool,
                     frame: np.ndarray, kept: Tensor | np.ndarray | Sequence[int] | None = None,
                     alpha: float = 0.5) -> np.ndarray:
    """Overlay the per-patch variance on a camera frame, for rviz.

    Variance is min-max normalised over the patches and coloured with OpenCV's TURBO map
    (blue = low, red = high); each patch covers the same pixel block as in a resize of the
    frame to the grid. Kept patches are outlined in white.

    Args:
        variance: ``[N]`` per-token variance (``N = rows * cols + has_cls``).
        grid: Patch grid ``(rows, cols)``.
        has_cls: Whether token 0 is a CLS token (not drawn).
        frame: ``H x W x 3`` uint8 RGB image.
        kept: Kept token indices (CLS index ignored), or None.
        alpha: Weight of the heatmap in the blend, in [0, 1].

    Returns:
        ``H x W x 3`` uint8 RGB overlay.

    Raises:
        ValueError: Inconsistent shapes or values.
    """
    import cv2  # lazy: only the visualisation needs OpenCV

    rows, cols = int(grid[0]), int(grid[1])
    if rows <= 0 or cols <= 0:
        raise ValueError(f'grid must be two positive ints, got {grid!r}')
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}')
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f'frame must be HxWx3 uint8, got shape {frame.shape} {frame.dtype}')
    height, width = frame.shape[:2]
    if height < rows or width < cols:
        raise ValueError(f'frame {width}x{height} is smaller than the grid {grid}')
    var = (variance.detach().float().cpu().numpy() if isinstance(variance, Tensor)
           else np.asarray(variance, dtype=np.float32)).reshape(-1)
    first = 1 if has_cls else 0
    if var.size != rows * cols + first:
        raise ValueError(f'variance has {var.size} tokens, grid {grid} with has_cls={has_cls} '
                         f'needs {rows * cols + first}')
    if not np.all(np.isfinite(var)):
        raise ValueError('variance holds non-finite values')
    patches = var[first:].reshape(rows, cols).astype(np.float64)
    span = patches.max() - patches.min()
    norm = (patches - patches.min()) / span if span > 0 else np.zeros_like(patches)
    levels = np.round(norm * 255.0).astype(np.uint8)
    # Pixel y belongs to patch row (y * rows) // H: blocks as even as integers allow.
    row_of = (np.arange(height) * rows) // height
    col_of = (np.arange(width) * cols) // width
    heat = levels[row_of[:, None], col_of[None, :]]
    colored = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(frame, 1.0 - alpha, colored, alpha, 0.0)
    if kept is not None:
        kept_idx = (kept.detach().cpu().numpy() if isinstance(kept, Tensor)
                    else np.asarray(kept)).astype(np.int64).reshape(-1)
        if kept_idx.size and (kept_idx.min() < 0 or kept_idx.max() >= var.size):
            raise ValueError(f'kept indices must be in [0, {var.size}), got '
                             f'{kept_idx.min()}..{kept_idx.max()}')
        row_edges = -(-np.arange(rows + 1) * height // rows)  # ceil: first pixel of each row
        col_edges = -(-np.arange(cols + 1) * width // cols)
        for index in kept_idx[kept_idx >= first] - first:
            r, c = divmod(int(index), cols)
            cv2.rectangle(out, (int(col_edges[c]), int(row_edges[r])),
                          (int(col_edges[c + 1]) - 1, int(row_edges[r + 1]) - 1),
                          (255, 255, 255), 1)
    return out


# --- the two stages together ---------------------------------------------------------------
@dataclass
class UtsConfig:
    """UTS settings.

    Attributes:
        mc_masks: Monte-Carlo dropout masks ``M`` (>= 2).
        dropout_p: Dropout rate of the masks, in (0, 1).
        stage1_mode: ``'threshold'`` or ``'top_fraction'``.
        stage1_threshold: Mean answer entropy (nats) to exceed, threshold mode.
        stage1_fraction: Fraction of samples passed, top-fraction mode, in (0, 1].
        stage1_window: Recent samples ranked against, top-fraction mode (>= 1).
        stage2_mode: ``'threshold'`` (Eq. 4) or ``'keep_ratio'``.
        beta: Token variance threshold, threshold mode (>= 0).
        keep_ratio: Fraction of tokens kept, keep-ratio mode, in (0, 1].
        min_keep: Minimum tokens kept (>= 1).
        always_keep_cls: Keep the CLS token whenever the model has one.
        pack_dtype: One of :data:`PACK_DTYPES` (``'fp16'``, ``'int8'``, ``'int4'``,
            ``'ecq'``).
        audit_fraction: Share of all answered samples sent whole (every token), whatever
            their uncertainty, flagged as audit samples: the cloud's unbiased view of how
            the device does (drawn before stage 1, so independent of it), in [0, 1].
        audit_seed: Seed of the audit draws.
    """

    mc_masks: int = 8
    dropout_p: float = 0.1
    stage1_mode: str = 'threshold'
    stage1_threshold: float = 0.5
    stage1_fraction: float = 0.2
    stage1_window: int = 100
    stage2_mode: str = 'keep_ratio'
    beta: float = 0.0
    keep_ratio: float = 0.25
    min_keep: int = 1
    always_keep_cls: bool = True
    pack_dtype: str = 'fp16'
    audit_fraction: float = 0.0
    audit_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ConfigError(
                f'UtsConfig.audit_fraction must be in [0, 1], got {self.audit_fraction}')
        if self.mc_masks < 2:
            raise ConfigError(f'UtsConfig.mc_masks must be >= 2, got {self.mc_masks}')
        if not 0.0 < self.dropout_p < 1.0:
            raise ConfigError(f'UtsConfig.dropout_p must be in (0, 1), got {self.dropout_p}')
        if self.stage1_mode not in STAGE1_MODES:
            raise ConfigError(
                f'UtsConfig.stage1_mode must be one of {STAGE1_MODES}, got {self.stage1_mode!r}')
        if not math.isfinite(self.stage1_threshold) or self.stage1_threshold < 0.0:
            raise ConfigError(
                f'UtsConfig.stage1_threshold must be finite and >= 0, '
                f'got {self.stage1_threshold}')
        if not 0.0 < self.stage1_fraction <= 1.0:
            raise ConfigError(
                f'UtsConfig.stage1_fraction must be in (0, 1], got {self.stage1_fraction}')
        if self.stage1_window < 1:
            raise ConfigError(f'UtsConfig.stage1_window must be >= 1, got {self.stage1_window}')
        if self.stage2_mode not in STAGE2_MODES:
            raise ConfigError(
                f'UtsConfig.stage2_mode must be one of {STAGE2_MODES}, got {self.stage2_mode!r}')
        if not math.isfinite(self.beta) or self.beta < 0.0:
            raise ConfigError(f'UtsConfig.beta must be finite and >= 0, got {self.beta}')
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f'UtsConfig.keep_ratio must be in (0, 1], got {self.keep_ratio}')
        if self.min_keep < 1:
            raise ConfigError(f'UtsConfig.min_keep must be >= 1, got {self.min_keep}')
        if self.pack_dtype not in PACK_DTYPES:
            raise ConfigError(
                f'UtsConfig.pack_dtype must be one of {PACK_DTYPES}, got {self.pack_dtype!r}')

    def make_selector(self) -> SampleSelector:
        """Return a fresh stage-1 :class:`SampleSelector` with these settings."""
        return SampleSelector(mode=self.stage1_mode, threshold=self.stage1_threshold,
                              fraction=self.stage1_fraction, window=self.stage1_window)


@dataclass
class UtsResult:
    """What UTS decided for one selected sample.

    Attributes:
        entropy: Stage-1 answer entropy.
        kept_indices: Sorted ``int64 [K]`` indices of the kept tokens.
        variance: ``[N]`` float32 per-token variance (Eq. 3).
        packed: The kept tokens, packed for the uplink.
        stage2_ms: Wall time of stage 2 (MC features, selection, packing).
        audit: An audit sample (every token, chosen at random, not by uncertainty).
    """

    entropy: EntropyStats
    kept_indices: Tensor
    variance: Tensor
    packed: PackedTokens
    stage2_ms: float
    audit: bool = False

    @property
    def uplink_bytes(self) -> int:
        """CDR bytes of the token content this sample puts on the link (:func:`uplink_bytes`)."""
        return uplink_bytes(len(self.packed.data), len(self.packed.scale),
                            int(self.kept_indices.numel()))


class UtsPipeline:
    """Stage 1 (answer entropy) then stage 2 (token variance), sample by sample."""

    def __init__(self, cfg: UtsConfig, mc_features: MCFeatures, has_cls: bool = False) -> None:
        """Set up both stages.

        Args:
            cfg: The settings.
            mc_features: ``(tokens [1, N, D], p, M) -> [M, 1, N, F]`` features under
                ``M`` dropout masks (the device binds ``model.mc_token_features``).
            has_cls: Whether token 0 is a CLS token (from the model's vision space);
                ``cfg.always_keep_cls`` only applies when it is.
        """
        self.cfg = cfg
        self.mc_features = mc_features
        self.has_cls = has_cls
        self.selector = cfg.make_selector()
        self._audit_rng = np.random.default_rng(cfg.audit_seed)
        self.audits = 0

    def process(self, step_probs: np.ndarray, tokens: Tensor) -> UtsResult | None:
        """Run UTS on one answered sample.

        Args:
            step_probs: ``[T, V]`` per-step distributions of the device's answer.
            tokens: ``[N, D]`` vision tokens of the sample.

        Returns:
            None when stage 1 does not select the sample (and it is not drawn for the
            audit), else the kept tokens (every token for an audit sample).

        Raises:
            ValueError: ``tokens`` is not ``[N, D]`` or has more than :data:`MAX_TOKENS`
                tokens (the uplink indexes them with uint16).
            ModelError: ``mc_features`` returned the wrong shape.
        """
        if tokens.dim() != 2:
            raise ValueError(f'tokens must be [N, D], got shape {tuple(tokens.shape)}')
        if tokens.shape[0] > MAX_TOKENS:
            raise ValueError(f'{tokens.shape[0]} vision tokens: UtsTokens.kept_indices is '
                             f'uint16[], so at most {MAX_TOKENS} tokens')
        entropy = answer_entropy(step_probs)
        cfg = self.cfg
        # Drawn first and always, so the audit stream is independent of uncertainty.
        audit = cfg.audit_fraction > 0 and float(self._audit_rng.random()) < cfg.audit_fraction
        selected = self.selector.offer(entropy.mean)
        if audit:
            start = time.perf_counter()
            self.audits += 1
            kept = torch.arange(tokens.shape[0])
            packed = pack_tokens(tokens.detach().cpu(), cfg.pack_dtype)
            return UtsResult(entropy=entropy, kept_indices=kept,
                             variance=torch.zeros(tokens.shape[0]), packed=packed,
                             stage2_ms=(time.perf_counter() - start) * 1000.0, audit=True)
        if not selected:
            return None
        start = time.perf_counter()
        n = tokens.shape[0]
        with torch.no_grad():
            feats = self.mc_features(tokens[None], cfg.dropout_p, cfg.mc_masks)
        if feats.dim() != 4 or tuple(feats.shape[:3]) != (cfg.mc_masks, 1, n):
            raise ModelError(
                f'mc_features returned shape {tuple(feats.shape)}, expected '
                f'[{cfg.mc_masks}, 1, {n}, F]')
        variance = token_variance(feats)[0].cpu()
        kept = select_tokens(variance, mode=cfg.stage2_mode, beta=cfg.beta,
                             keep_ratio=cfg.keep_ratio, min_keep=cfg.min_keep,
                             always_keep_cls=cfg.always_keep_cls and self.has_cls)
        packed = pack_tokens(tokens.detach().cpu().index_select(0, kept), cfg.pack_dtype)
        return UtsResult(entropy=entropy, kept_indices=kept, variance=variance, packed=packed,
                         stage2_ms=(time.perf_counter() - start) * 1000.0)


# --- the device's ring of recent samples (token pulls) -------------------------------------
class TokenRing:
    """The full tokens of the device's recent uplinked samples, for the cloud's pulls.

    When the teacher cannot label a sample confidently from the kept tokens, the cloud asks
    for the rest; the device answers from this ring while the sample is still in it. Bounded
    in samples and in bytes (oldest dropped first).

    Args:
        max_samples: Most samples kept.
        max_bytes: Most bytes of tokens kept.
    """

    def __init__(self, max_samples: int = 256, max_bytes: int = 64 << 20) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ConfigError(f'TokenRing bounds must be >= 1, got max_samples={max_samples}, '
                              f'max_bytes={max_bytes}')
        self.max_samples, self.max_bytes = int(max_samples), int(max_bytes)
        self._items: dict[str, tuple[Tensor, Tensor]] = {}
        self._bytes = 0
        self.served = 0
        self.missed = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, sample_id: str, tokens: Tensor, sent: Tensor) -> None:
        """Keep ``tokens [N, D]`` of ``sample_id`` and which indices were already sent."""
        if sample_id in self._items:
            self._drop(sample_id)
        tokens = tokens.detach().cpu()
        size = tokens.numel() * tokens.element_size()
        self._items[sample_id] = (tokens, sent.detach().cpu().long())
        self._bytes += size
        while self._items and (len(self._items) > self.max_samples
                               or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))

    def _drop(self, sample_id: str) -> None:
        tokens, _ = self._items.pop(sample_id)
        self._bytes -= tokens.numel() * tokens.element_size()

    def rest(self, sample_id: str) -> tuple[Tensor, Tensor] | None:
        """``(tokens [K', D], indices [K'])`` of ``sample_id`` not sent before, or None when
        the ring no longer holds it."""
        item = self._items.get(sample_id)
        if item is None:
            self.missed += 1
            return None
        tokens, sent = item
        mask = torch.ones(tokens.shape[0], dtype=torch.bool)
        mask[sent] = False
        rest = torch.nonzero(mask).flatten()
        self.served += 1
        return tokens.index_select(0, rest), rest
