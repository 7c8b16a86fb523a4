"""What the device sends about one answered sample: UTS, then tokens or the frame.

:class:`UplinkPipeline` runs UTS (:class:`~cdcca_ros.core.uts.UtsPipeline`: stage 1 on the
answer's entropy, stage 2 on the tokens' Monte-Carlo variance) and packs what passes:

* mode ``'tokens'``: the kept tokens, in one of UTS's own packings (``fp16``, ``int8``,
  ``int4``, ``ecq``) or ``'basis'`` (transform-coded in the shared token basis under a byte
  budget, :mod:`.basis`; the kept set travels as a bitmap inside the payload);
* mode ``'image'``: stage 1 only, then the frame as a JPEG (:mod:`.image`): the cloud encodes
  it with its own vision encoder(s).

Audit samples (``cfg.audit_fraction``, drawn whatever the uncertainty) go whole: every token
(when the packing is ``'basis'``: ``ecq``, or in the basis under the same budget and error
target, ``audit_packing``), or the frame in image mode.

The cloud's side is :func:`decode_tokens` (token packings).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.core.uplink.basis import TokenBasis
from cdcca_ros.core.uplink.image import DEFAULT_QUALITY, encode_jpeg
from cdcca_ros.core.uts import (
    PACK_DTYPES,
    SEQUENCE_HEADER_BYTES,
    EntropyStats,
    PackedTokens,
    UtsConfig,
    UtsPipeline,
    UtsResult,
    answer_entropy,
    pack_tokens,
    unpack_tokens,
    uplink_bytes,
)
from cdcca_ros.errors import ConfigError, WireError

UPLINK_MODES = ('tokens', 'image')
BASIS = 'basis'
IMAGE = 'image'
PACKINGS = (*PACK_DTYPES, BASIS)
AUDIT_PACKINGS = ('ecq', BASIS)


@dataclass
class UplinkSample:
    """What goes up for one selected sample.

    Attributes:
        entropy: Stage-1 answer entropy.
        uts: Stage 2's result (tokens mode; ``uts.packed`` is what travels), else None.
        basis_version: Version of the token basis of a ``'basis'`` packing, else ``''``.
        image: JPEG bytes of the frame (image mode), else None.
        encode_ms: Wall time of packing the tokens or encoding the frame.
        audit: An audit sample (drawn at random, not by uncertainty; sent whole).
    """

    entropy: EntropyStats
    uts: UtsResult | None = None
    basis_version: str = ''
    image: bytes | None = None
    encode_ms: float = 0.0
    audit: bool = False

    @property
    def dtype(self) -> str:
        """The ``UtsTokens.dtype`` of this sample (a packing, or ``'image'``)."""
        return IMAGE if self.uts is None else self.uts.packed.dtype

    @property
    def uplink_bytes(self) -> int:
        """CDR bytes of the content fields on the link: payload, scales and kept indices
        (each a count plus elements; ``'basis'`` sends no indices: its payload holds the
        bitmap), or the JPEG (count plus bytes) of the image mode."""
        if self.uts is None:
            return SEQUENCE_HEADER_BYTES + len(self.image or b'')
        packed = self.uts.packed
        indices = 0 if packed.dtype == BASIS else int(self.uts.kept_indices.numel())
        return uplink_bytes(len(packed.data), len(packed.scale), indices)


class UplinkPipeline:
    """UTS on every answered sample, then the packing or the frame of the selected ones.

    Args:
        cfg: UTS settings (its ``pack_dtype`` is ignored: ``packing`` says how).
        mc_features: Stage 2's model features (see :class:`UtsPipeline`).
        has_cls: Whether token 0 is a CLS token.
        packing: One of :data:`PACKINGS` (tokens mode).
        basis: The token basis (``'basis'`` packing).
        budget_bytes: Payload budget of a ``'basis'`` sample.
        max_error: ``'basis'``: code each sample only as finely as this relative error
            needs, up to the budget (0: always the budget; see
            :meth:`~cdcca_ros.core.uplink.basis.TokenBasis.pack`).
        mode: ``'tokens'`` or ``'image'``.
        jpeg_quality: JPEG quality of the image mode.
        audit_packing: ``'basis'`` packing only: how an audit sample's tokens (every one)
            travel: ``'ecq'`` (~0.12 relative error, ~270 B on the bundled model) or
            ``'basis'`` (as an uplinked sample: the budget and ``max_error``).

    Raises:
        ConfigError: An unknown mode or packing, or ``'basis'`` without a basis or budget.
    """

    def __init__(self, cfg: UtsConfig, mc_features: Callable[[Tensor, float, int], Tensor],
                 has_cls: bool = False, packing: str = 'ecq', basis: TokenBasis | None = None,
                 budget_bytes: int | None = None, mode: str = 'tokens',
                 jpeg_quality: int = DEFAULT_QUALITY, max_error: float = 0.0,
                 audit_packing: str = 'ecq') -> None:
        if mode not in UPLINK_MODES:
            raise ConfigError(f'uplink mode must be one of {UPLINK_MODES}, got {mode!r}')
        if packing not in PACKINGS:
            raise ConfigError(f'uplink packing must be one of {PACKINGS}, got {packing!r}')
        if mode == 'tokens' and packing == BASIS and (basis is None or not budget_bytes):
            raise ConfigError('the basis packing needs a token basis and a byte budget')
        if not 1 <= int(jpeg_quality) <= 100:
            raise ConfigError(f'JPEG quality must be in 1..100, got {jpeg_quality}')
        self.mode, self.packing, self.basis = mode, packing, basis
        if not 0.0 <= max_error < 1.0:
            raise ConfigError(f'max_error must be in [0, 1), got {max_error}')
        if audit_packing not in AUDIT_PACKINGS:
            raise ConfigError(f'audit packing must be one of {AUDIT_PACKINGS}, got '
                              f'{audit_packing!r}')
        self.budget_bytes, self.max_error = budget_bytes, float(max_error)
        self.audit_packing = audit_packing
        self.jpeg_quality = int(jpeg_quality)
        # UTS packs with its own packings; for 'basis' it hands over fp16 (cheap) and the
        # kept tokens are re-packed from the exact ones.
        uts_cfg = dataclasses.replace(cfg, pack_dtype=packing if packing in PACK_DTYPES
                                      else 'fp16')
        self.uts = UtsPipeline(uts_cfg, mc_features, has_cls=has_cls)

    @property
    def selector(self):  # noqa: ANN201 - SampleSelector, re-exported for counters
        """The stage-1 gate."""
        return self.uts.selector

    @property
    def pull_dtype(self) -> str:
        """The packing of pulled tokens and of whole samples: the packing, ``ecq`` for
        ``'basis'`` (whose byte budget is meant for a kept subset)."""
        return self.packing if self.packing in PACK_DTYPES else 'ecq'

    def process(self, step_probs: np.ndarray, tokens: Tensor, frame: np.ndarray | None = None
                ) -> UplinkSample | None:
        """Run UTS on one answered sample; None when it is not selected.

        Args:
            step_probs: ``[T, V]`` per-step distributions of the device's answer.
            tokens: ``[N, D]`` vision tokens of the sample.
            frame: The RGB frame the answer was about (image mode).

        Raises:
            ConfigError: Image mode without a frame.
        """
        if self.mode == IMAGE:
            if frame is None:
                raise ConfigError('the image uplink mode needs the frame')
            entropy = answer_entropy(step_probs)
            audit = self.uts.draw_audit()  # first and always, as UtsPipeline.process
            selected = self.uts.selector.offer(entropy.mean)
            if not (audit or selected):
                return None
            t0 = time.perf_counter()
            jpeg = encode_jpeg(frame, self.jpeg_quality)
            return UplinkSample(entropy=entropy, image=jpeg,
                                encode_ms=(time.perf_counter() - t0) * 1e3, audit=audit)
        result = self.uts.process(step_probs, tokens)
        if result is None:
            return None
        if result.audit and self.packing == BASIS and self.audit_packing == 'ecq':
            t0 = time.perf_counter()
            packed = pack_tokens(tokens.detach().cpu(), 'ecq')
            return UplinkSample(entropy=result.entropy,
                                uts=dataclasses.replace(result, packed=packed),
                                encode_ms=(time.perf_counter() - t0) * 1e3, audit=True)
        if self.packing != BASIS:
            return UplinkSample(entropy=result.entropy, uts=result, audit=result.audit)
        assert self.basis is not None and self.budget_bytes
        t0 = time.perf_counter()
        kept = result.kept_indices
        exact = tokens.detach().float().cpu().index_select(0, kept)
        coded = self.basis.pack(exact, kept, int(tokens.shape[0]),
                                budget_bytes=int(self.budget_bytes), max_error=self.max_error)
        packed = PackedTokens(data=coded.data, dtype=BASIS, scale=[coded.step],
                              shape=(int(kept.numel()), int(tokens.shape[1])))
        return UplinkSample(entropy=result.entropy,
                            uts=dataclasses.replace(result, packed=packed),
                            basis_version=self.basis.version,
                            encode_ms=(time.perf_counter() - t0) * 1e3, audit=result.audit)


def decode_tokens(dtype: str, payload: bytes, scales: list[float], kept_indices: list[int],
                  num_tokens: int, token_dim: int, basis_version: str = '',
                  basis: TokenBasis | None = None) -> tuple[Tensor, Tensor]:
    """The cloud's decoding of an uplinked token sample: ``(tokens [K, D], indices [K])``.

    Raises:
        WireError: Inconsistent data, an unknown dtype, or a ``'basis'`` sample this side
            holds no basis for (:class:`~cdcca_ros.errors.BasisMismatchError` when the
            versions differ).
    """
    if dtype == BASIS:
        if basis is None:
            raise WireError(f'a basis-coded sample (basis {basis_version!r}) but this side '
                            'holds no token basis')
        basis.check_version(basis_version)
        if kept_indices or len(scales) != 1:
            raise WireError(f'basis packing: {len(kept_indices)} kept indices and '
                            f'{len(scales)} scales (expected none and one)')
        return basis.unpack(payload, float(scales[0]), num_tokens, token_dim)
    if dtype not in PACK_DTYPES:
        raise WireError(f'unknown token packing {dtype!r}')
    k = len(kept_indices)
    tokens = unpack_tokens(PackedTokens(data=bytes(payload), dtype=dtype,
                                        scale=[float(s) for s in scales],
                                        shape=(k, int(token_dim))))
    return tokens, torch.as_tensor(list(kept_indices), dtype=torch.long)
