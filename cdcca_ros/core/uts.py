"""Uncertainty-guided Token Sampling (UTS), paper Sec. 3.2, Eq. 2-4.

Stage 1 keeps samples whose answer is uncertain (entropy of the generated distributions,
Eq. 2). Stage 2 keeps, inside a selected sample, the vision tokens whose representation
varies most under Monte-Carlo dropout (Eq. 3-4). Only the kept tokens are packed for the
uplink, with their indices, so stage 2 really shrinks what is sent.

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
PACK_DTYPES = ('fp16', 'int8')

# int8 codes are symmetric in [-127, 127]; -128 never comes out of the encoder.
_INT8_MAX = 127
_ITEMSIZE = {'fp16': 2, 'int8': 1}
_FP16_MAX = float(np.finfo(np.float16).max)
# Scales are float32 on the wire (ROS float32[]), so the encoder rounds them to float32 first.
SCALE_BYTES = 4

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
    if not torch.isfinite(feats).all():
        raise ValueError('features hold non-finite values')
    return feats.var(dim=0, unbiased=False).mean(dim=-1)


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
    var = variance.detach().float().cpu()
    if not torch.isfinite(var).all():
        raise ValueError('variance holds non-finite values')
    n = var.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if mode == 'threshold':
        keep |= var > beta
    else:
        first = 1 if always_keep_cls else 0
        candidates = n - first
        k = min(candidates, math.ceil(keep_ratio * candidates - 1e-9))
        order = torch.sort(var[first:], descending=True, stable=True).indices + first
        keep[order[:k]] = True
    if always_keep_cls:
        keep[0] = True
    missing = min(min_keep, n) - int(keep.sum())
    if missing > 0:
        order = torch.sort(var, descending=True, stable=True).indices
        rest = order[~keep[order]]
        keep[rest[:missing]] = True
    return torch.nonzero(keep).flatten().to(torch.long)


# --- packing the kept tokens ---------------------------------------------------------------
@dataclass(frozen=True)
class PackedTokens:
    """Kept vision tokens as bytes for the uplink.

    Attributes:
        data: Little-endian ``float16`` (``'fp16'``) or ``int8`` codes, row-major ``[K, D]``.
        dtype: ``'fp16'`` or ``'int8'``.
        scale: Per-token symmetric absmax scale for ``'int8'`` (``x = code * scale``,
            float32-representable values), empty for ``'fp16'``.
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


def pack_tokens(tokens: Tensor, dtype: str = 'fp16') -> PackedTokens:
    """Pack ``[K, D]`` float tokens as fp16 or per-token int8.

    Raises:
        ConfigError: Unknown ``dtype``.
        CodecError: Not 2-D, non-finite values, or values beyond the fp16 range.
    """
    if dtype not in PACK_DTYPES:
        raise ConfigError(f'pack dtype must be one of {PACK_DTYPES}, got {dtype!r}')
    if tokens.dim() != 2:
        raise CodecError(f'tokens must be [K, D], got shape {tuple(tokens.shape)}')
    x = tokens.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise CodecError('tokens hold non-finite values')
    shape = (int(x.shape[0]), int(x.shape[1]))
    if dtype == 'fp16':
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak > _FP16_MAX:
            raise CodecError(f'tokens exceed the fp16 range (max |x| {peak:.4g}); use int8')
        half = x.numpy().astype('<f2')
        return PackedTokens(data=half.tobytes(), dtype='fp16', scale=[], shape=shape)
    absmax = x.abs().amax(dim=1) if shape[1] else torch.zeros(shape[0])
    scale = (absmax / _INT8_MAX).to(torch.float32)
    # An all-zero token keeps scale 0; divide by 1 there so the codes are 0, not NaN.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return PackedTokens(data=codes.numpy().tobytes(), dtype='int8',
                        scale=[float(s) for s in scale.tolist()], shape=shape)


def unpack_tokens(packed: PackedTokens) -> Tensor:
    """Decode :class:`PackedTokens` into a ``[K, D]`` float32 tensor.

    Raises:
        WireError: Unknown dtype, bad shape, a byte count or scale count that does not
            match the shape, invalid scales or codes, or non-finite decoded values.
    """
    if packed.dtype not in PACK_DTYPES:
        raise WireError(f'packed tokens: unknown dtype {packed.dtype!r}')
    shape = tuple(packed.shape)
    if len(shape) != 2 or any((not isinstance(s, (int, np.integer))) or s < 0 for s in shape):
        raise WireError(f'packed tokens: shape must be two ints >= 0, got {packed.shape!r}')
    k, d = int(shape[0]), int(shape[1])
    expected = k * d * _ITEMSIZE[packed.dtype]
    if len(packed.data) != expected:
        raise WireError(
            f'packed tokens: {len(packed.data)} data bytes, expected {expected} for '
            f'{packed.dtype} shape ({k}, {d})')
    if packed.dtype == 'fp16':
        if len(packed.scale):
            raise WireError(f'packed tokens: fp16 carries no scale, got {len(packed.scale)}')
        values = np.frombuffer(packed.data, dtype='<f2').astype(np.float32).reshape(k, d)
        if not np.all(np.isfinite(values)):
            raise WireError('packed tokens: fp16 data decodes to non-finite values')
        return torch.from_numpy(values)
    if len(packed.scale) != k:
        raise WireError(f'packed tokens: int8 needs {k} scales (one per token), '
                        f'got {len(packed.scale)}')
    scale = np.asarray(packed.scale, dtype=np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale < 0.0):
        raise WireError('packed tokens: int8 scales must be finite and >= 0')
    codes = np.frombuffer(packed.data, dtype=np.int8).reshape(k, d)
    if np.any(codes == -_INT8_MAX - 1):
        raise WireError('packed tokens: int8 code -128 never comes out of the encoder')
    values = (codes.astype(np.float32) * scale.astype(np.float32)[:, None])
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
        pack_dtype: ``'fp16'`` or ``'int8'``.
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

    def __post_init__(self) -> None:
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
    """

    entropy: EntropyStats
    kept_indices: Tensor
    variance: Tensor
    packed: PackedTokens
    stage2_ms: float


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

    def process(self, step_probs: np.ndarray, tokens: Tensor) -> UtsResult | None:
        """Run UTS on one answered sample.

        Args:
            step_probs: ``[T, V]`` per-step distributions of the device's answer.
            tokens: ``[N, D]`` vision tokens of the sample.

        Returns:
            None when stage 1 does not select the sample, else the kept tokens.

        Raises:
            ValueError: ``tokens`` is not ``[N, D]``.
            ModelError: ``mc_features`` returned the wrong shape.
        """
        if tokens.dim() != 2:
            raise ValueError(f'tokens must be [N, D], got shape {tuple(tokens.shape)}')
        entropy = answer_entropy(step_probs)
        if not self.selector.offer(entropy.mean):
            return None
        start = time.perf_counter()
        cfg = self.cfg
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
        packed = pack_tokens(tokens.detach().cpu()[kept], cfg.pack_dtype)
        return UtsResult(entropy=entropy, kept_indices=kept, variance=variance, packed=packed,
                         stage2_ms=(time.perf_counter() - start) * 1000.0)
