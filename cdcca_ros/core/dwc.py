"""Dynamic Weight update Compression (DWC), paper Sec. 3.4, Eq. 7-8.

The cloud sends ``Quantize(theta_updated - theta_base)`` (Eq. 7) over the trainable set (LoRA
A/B, norms, biases, query tokens: a ``dict[str, Tensor]``); the device computes
``theta_base + decoded`` (Eq. 8). This module holds the delta arithmetic, the byte-budget fit
and the cloud-side error feedback. It is pure logic: no rclpy, no network.

The quantizers and the bytes they make live in :mod:`cdcca_ros.core.codecs` (the payload
format in :mod:`~cdcca_ros.core.codecs.container`, one module per codec: ``fp16``, ``nf4``,
``sparse``, by name through :func:`~cdcca_ros.core.codecs.get_codec`). Their public names are
re-exported here, so ``from cdcca_ros.core import dwc; dwc.get_codec(...)`` keeps working.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cdcca_ros.core.codecs import (
    DEFAULT_MAX_NUMEL,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    SPARSE_SCOPES,
    Codec,
    FlatDelta,
    Fp16Codec,
    Nf4Codec,
    SparseCodec,
    Spec,
    StateDict,
    codec_names,
    decode_payload,
    flatten_delta,
    get_codec,
    is_self_describing,
    read_payload_codec,
    read_payload_kind,
    register_codec,
)
from cdcca_ros.core.codecs.container import all_finite, check_float
from cdcca_ros.errors import DeltaMismatchError, PayloadTooLargeError

__all__ = [
    # DWC (this module)
    'BUDGET_KNOBS', 'CompressStats', 'Compressed', 'ErrorFeedback', 'apply_delta', 'compress',
    'compute_delta', 'num_params', 'rel_l2_error',
    # re-exported from cdcca_ros.core.codecs (their home; kept importable from here)
    'DEFAULT_MAX_NUMEL', 'FORMAT_NAME', 'FORMAT_VERSION', 'MAGIC', 'SPARSE_SCOPES', 'Codec',
    'FlatDelta', 'Fp16Codec', 'Nf4Codec', 'SparseCodec', 'Spec', 'StateDict', 'all_finite',
    'codec_names', 'decode_payload', 'flatten_delta', 'get_codec', 'is_self_describing',
    'read_payload_codec', 'read_payload_kind', 'register_codec',
]


# --- delta arithmetic (Eq. 7-8) -----------------------------------------------------------
def _check_same_keys(a: StateDict, b: StateDict, what_a: str, what_b: str) -> None:
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing or extra:
        raise DeltaMismatchError(
            f'{what_b} keys differ from {what_a}: missing {missing[:5]}'
            f'{"..." if len(missing) > 5 else ""}, unexpected {extra[:5]}'
            f'{"..." if len(extra) > 5 else ""}')


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
        check_float(name, b, 'base')
        check_float(name, t, 'trained')
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
        check_float(name, b, 'base')
        check_float(name, d, 'delta')
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
        importance: Passed to the codec (see :meth:`~cdcca_ros.core.codecs.base.Codec.encode`).
        knob: ``'auto'``, ``'bits'`` or ``'density'``.
        min_bits: Lowest ``bits`` tried.
        min_density: Lowest density tried.
        search_steps: Bisection steps per knob (each one encodes once).
        self_describing: Write the tensor index into the payload; ``False`` (what the cloud
            sends) writes a compact payload that the device decodes with its trainable
            spec (see :mod:`~cdcca_ros.core.codecs.container`).

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
            check_float(k, v, 'base')
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
            check_float(k, d, 'delta')
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

