"""A token basis shared by device and cloud: the ``'basis'`` packing of the uplink.

Vision tokens are wide (1408 values for BLIP-2's ViT-g, 1024 for LLaVA's CLIP) and correlated,
so they are sent as transform codes: a :class:`TokenBasis`, fitted once on *source-domain* tokens
of the model's own (frozen) vision encoder, holds the mean token and the principal directions
(orthonormal rows, with the spread of every coefficient). A kept token travels as its
coefficients ``q = round((x - mean) @ components.T / step)``, entropy-coded with ``constriction``'s
ANS coder under a quantised Gaussian of each direction's spread (in steps): strong directions
get several bits, weak ones almost none. ``step`` is chosen per sample as the smallest whose
payload fits a byte budget (so bytes are bounded whatever the tokens are), and travels as the
sample's one scale. The cloud decodes ``mean + (q * step) @ components``.

Payload of one sample: the bitmap of the kept tokens (``ceil(N / 8)`` bytes, bit ``i`` of byte
``i // 8``, least significant bit first), then ``M`` as an unsigned LEB128 varint (every ``|q| <=
M``), then the ANS words (uint32, little-endian) of the kept tokens' ``q``, token by token in
index order, direction by direction, each under ``QuantizedGaussian(-M, M)`` with mean 0 and
standard deviation ``max(spread / step, MIN_STD)``.

Device and cloud must hold the same basis: it is bound to the vision space it was fitted on (the
encoder's weight fingerprint is part of that id) and named by :attr:`TokenBasis.version`, a hash
of everything in it. The device puts the version into every uplinked sample; the cloud refuses a
sample coded with another version (:class:`~cdcca_ros.errors.BasisMismatchError`). It is stored
as safetensors next to the model (:data:`BASIS_FILE`), never pickled.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.errors import BasisMismatchError, ConfigError, WireError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import VisionSpace

BASIS_FILE = 'uplink_basis.safetensors'
FORMAT = 'cdcca-token-basis-v1'
VERSION_CHARS = 16
MIN_STD = 1e-3          # floor of the entropy model's spread (in steps)
MAX_LEVEL = 1 << 20     # largest |q| a payload may announce
_STEP_SEARCH = 24       # bisection rounds of the step under a byte budget


def space_id(space: VisionSpace) -> str:
    """The id of a vision-token space as the uplink names it (``UtsTokens.vision_space``):
    encoder (with its weight fingerprint), dim, token count, grid, CLS."""
    rows, cols = space.grid
    return (f'{space.encoder}:d{space.dim}:n{space.num_tokens}:g{rows}x{cols}'
            f':{"cls" if space.has_cls else "nocls"}')


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(len(raw), pos + 4)):
        value |= (raw[i] & 0x7F) << shift
        shift += 7
        if not raw[i] & 0x80:
            return value, i + 1
    raise WireError('basis payload: truncated or oversized level bound')


@dataclass(frozen=True)
class BasisPacked:
    """One sample coded in a basis: the payload bytes and the step (its one scale)."""

    data: bytes
    step: float


class TokenBasis:
    """Mean token, principal directions and their spreads (see the module docstring).

    Args:
        vision_space: :func:`space_id` of the tokens it was fitted on.
        mean: ``[D]`` mean token.
        components: ``[r, D]`` orthonormal principal directions.
        spread: ``[r]`` standard deviation of each direction's coefficient on the fit set.

    Raises:
        ConfigError: Inconsistent shapes or non-finite / negative values.
    """

    def __init__(self, vision_space: str, mean: Tensor, components: Tensor,
                 spread: Tensor) -> None:
        mean, components = mean.detach().float().cpu(), components.detach().float().cpu()
        spread = spread.detach().float().cpu()
        if mean.dim() != 1 or components.dim() != 2 or components.shape[1] != mean.shape[0] \
                or spread.shape != (components.shape[0],) or components.shape[0] < 1:
            raise ConfigError(f'TokenBasis: mean {tuple(mean.shape)}, components '
                              f'{tuple(components.shape)} and spread {tuple(spread.shape)} do '
                              'not fit ([D], [r, D], [r], r >= 1)')
        for name, t in (('mean', mean), ('components', components), ('spread', spread)):
            if not torch.isfinite(t).all():
                raise ConfigError(f'TokenBasis: {name} holds non-finite values')
        if (spread < 0).any():
            raise ConfigError('TokenBasis: spread must be >= 0')
        self.vision_space = vision_space
        self.mean, self.components = mean.contiguous(), components.contiguous()
        self.spread = spread.contiguous()
        self._spread64 = self.spread.numpy().astype(np.float64)
        self.version = self._digest()

    @property
    def dim(self) -> int:
        """Token width ``D``."""
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        """Directions kept ``r``."""
        return int(self.components.shape[0])

    def _digest(self) -> str:
        h = hashlib.sha256(FORMAT.encode())
        h.update(self.vision_space.encode())
        h.update(f'|{self.dim}|{self.rank}|'.encode())
        for t in (self.mean, self.components, self.spread):
            h.update(t.numpy().astype('<f4').tobytes())
        return h.hexdigest()[:VERSION_CHARS]

    # ---------------------------------------------------------------- transform
    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.dim:
            raise ConfigError(f'tokens must be [K, {self.dim}], got {tuple(tokens.shape)}')
        x = tokens.detach().float().cpu()
        if not torch.isfinite(x).all():
            raise ConfigError('tokens hold non-finite values')
        return x

    def coefficients(self, tokens: Tensor) -> Tensor:
        """``[K, r]`` coefficients of ``tokens [K, D]`` in the basis."""
        return (self._check_tokens(tokens) - self.mean) @ self.components.T

    def decode_levels(self, levels: Tensor | np.ndarray, step: float) -> Tensor:
        """Tokens ``[K, D]`` (float32) of quantised coefficients ``[K, r]``."""
        q = torch.as_tensor(np.asarray(levels), dtype=torch.float32)
        return self.mean + (q * float(step)) @ self.components

    def reconstruct(self, tokens: Tensor, step: float) -> Tensor:
        """What the cloud gets for ``tokens`` at ``step`` (no entropy coding needed)."""
        return self.decode_levels(torch.round(self.coefficients(tokens) / step), step)

    # ---------------------------------------------------------------- entropy coding
    def _stds(self, count: int, step: float) -> np.ndarray:
        return np.tile(np.maximum(self._spread64 / step, MIN_STD), count)

    def _code(self, levels: np.ndarray, step: float) -> bytes:
        import constriction

        # The model's support must hold two symbols at least: [-1, 1] even when all are 0.
        bound = max(1, int(np.abs(levels).max()) if levels.size else 0)
        if bound > MAX_LEVEL:
            raise ConfigError(f'basis codes reach {bound}, above {MAX_LEVEL}: step {step} is '
                              'far too small for these tokens')
        model = constriction.stream.model.QuantizedGaussian(-bound, bound)
        coder = constriction.stream.stack.AnsCoder()
        flat = levels.reshape(-1).astype(np.int32)
        coder.encode_reverse(flat, model, np.zeros(flat.size), self._stds(levels.shape[0], step))
        return _varint(bound) + coder.get_compressed().astype('<u4').tobytes()

    def pack(self, tokens: Tensor, kept: Tensor | Sequence[int], num_tokens: int,
             budget_bytes: int | None = None, step: float | None = None,
             max_error: float = 0.0) -> BasisPacked:
        """Code one sample's kept tokens.

        Args:
            tokens: ``[K, D]`` the kept tokens, in ``kept`` order.
            kept: ``[K]`` strictly ascending indices in ``[0, num_tokens)``.
            num_tokens: ``N`` of the sample.
            budget_bytes: Largest payload: the step is the smallest (searched) that fits.
            step: A fixed step instead (exactly one of ``budget_bytes`` and ``step``).
            max_error: With a budget and a value above 0, the step is instead the largest
                one whose reconstruction is within this relative L2 error of ``tokens``,
                unless that payload is over the budget (then the budget's step): a sample
                the basis codes well costs less, one of a shift unlike the basis's frames
                gets up to the budget to keep its labels right.

        Raises:
            ConfigError: Shapes or indices that do not fit, both or neither of budget and
                step, or a budget below the bitmap and an empty code.
        """
        if (budget_bytes is None) == (step is None):
            raise ConfigError('pack needs exactly one of budget_bytes and step')
        idx = torch.as_tensor(kept, dtype=torch.int64).reshape(-1).numpy()
        if idx.size != tokens.shape[0] or idx.size == 0:
            raise ConfigError(f'{idx.size} kept indices for {tokens.shape[0]} tokens (need >= 1)')
        if idx.min() < 0 or idx.max() >= num_tokens or np.any(np.diff(idx) <= 0):
            raise ConfigError(f'kept indices must ascend strictly within [0, {num_tokens})')
        mask = np.zeros(num_tokens, dtype=np.uint8)
        mask[idx] = 1
        head = np.packbits(mask, bitorder='little').tobytes()
        coeffs = self.coefficients(tokens).numpy().astype(np.float64)

        def body(at: float) -> bytes:
            return self._code(np.rint(coeffs / at).astype(np.int64), at)

        if step is not None:
            if not (math.isfinite(step) and step > 0):
                raise ConfigError(f'step must be finite and > 0, got {step}')
            return BasisPacked(head + body(float(step)), float(step))
        room = int(budget_bytes) - len(head)
        # Above this step every level is 0: the cheapest code there is.
        top = float(np.float32(2.0 * max(float(np.abs(coeffs).max()), 1e-30)))
        cheapest = body(top)
        if len(cheapest) > room:
            raise ConfigError(f'budget {budget_bytes} B is below the {len(head)}-byte bitmap '
                              f'plus the {len(cheapest)}-byte empty code of {idx.size} tokens')
        best, best_step = cheapest, top
        if max_error > 0:
            fine = self._step_within(tokens, float(max_error), top)
            try:
                coded = body(fine)
            except ConfigError:  # unreachable (levels too large): the budget decides
                coded = b''
            if coded and len(coded) <= room:
                return BasisPacked(head + coded, fine)
        low = top * 1e-6
        for _ in range(_STEP_SEARCH):   # geometric bisection: smallest step that fits
            mid = float(np.float32(math.sqrt(low * best_step)))
            if not low < mid < best_step or best_step < low * 1.002:
                break
            coded = body(mid)
            if len(coded) <= room:
                best, best_step = coded, mid
            else:
                low = mid
        return BasisPacked(head + best, best_step)

    def _step_within(self, tokens: Tensor, max_error: float, top: float) -> float:
        """The largest step (searched, below ``top``) at which :meth:`reconstruct` is within
        ``max_error`` relative L2 error of ``tokens`` (the smallest searched if none is)."""
        x = tokens.detach().float().cpu()
        norm = max(float(x.norm()), 1e-30)
        low, high = top * 1e-6, top
        for _ in range(_STEP_SEARCH):   # geometric bisection: error grows with the step
            mid = float(np.float32(math.sqrt(low * high)))
            if not low < mid < high or high < low * 1.002:
                break
            if float((self.reconstruct(x, mid) - x).norm()) / norm <= max_error:
                low = mid
            else:
                high = mid
        return float(np.float32(low))

    def unpack(self, data: bytes, step: float, num_tokens: int, dim: int
               ) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`pack`: ``(tokens [K, D] float32, indices [K] int64)``.

        Raises:
            WireError: A width this basis does not code, a bad step, a payload shorter than
                its bitmap or not ending on a word, stray bitmap bits, no token kept, an ANS
                stream that does not decode to exactly the kept tokens' codes, or
                non-finite tokens.
        """
        if dim != self.dim:
            raise WireError(f'basis payload: token_dim {dim}, the basis codes {self.dim}')
        if not (math.isfinite(step) and step > 0):
            raise WireError(f'basis payload: step must be finite and > 0, got {step}')
        if num_tokens < 1:
            raise WireError(f'basis payload: num_tokens must be >= 1, got {num_tokens}')
        raw = bytes(data)
        head = -(-num_tokens // 8)
        if len(raw) < head + 1:
            raise WireError(f'basis payload: {len(raw)} bytes, too short for the {head}-byte '
                            'bitmap and a level bound')
        mask = np.unpackbits(np.frombuffer(raw[:head], dtype=np.uint8), bitorder='little')
        if mask[num_tokens:].any():
            raise WireError('basis payload: bitmap bits beyond num_tokens are set')
        idx = np.flatnonzero(mask[:num_tokens])
        if idx.size == 0:
            raise WireError('basis payload: no token kept')
        bound, pos = _read_varint(raw, head)
        if not 1 <= bound <= MAX_LEVEL or (len(raw) - pos) % 4:
            raise WireError(f'basis payload: level bound {bound} or {len(raw) - pos} code '
                            'bytes (not whole uint32 words)')
        levels = self._decode(np.frombuffer(raw[pos:], dtype='<u4').astype(np.uint32), bound,
                              idx.size, step)
        tokens = self.decode_levels(levels.reshape(idx.size, self.rank), step)
        if not torch.isfinite(tokens).all():
            raise WireError('basis payload: decodes to non-finite tokens')
        return tokens, torch.from_numpy(idx.astype(np.int64))

    def _decode(self, words: np.ndarray, bound: int, count: int, step: float) -> np.ndarray:
        import constriction

        try:
            coder = constriction.stream.stack.AnsCoder(words)
            model = constriction.stream.model.QuantizedGaussian(-bound, bound)
            n = count * self.rank
            levels = coder.decode(model, np.zeros(n), self._stds(count, step))
            leftover = not coder.is_empty()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - a Rust panic is a BaseException
            raise WireError(f'basis payload: the ANS stream does not decode: {err}') from err
        if leftover:
            raise WireError('basis payload: the ANS stream holds more than the kept tokens')
        return np.asarray(levels, dtype=np.int64)

    def check_version(self, version: str, what: str = 'sample') -> None:
        """Raise :class:`BasisMismatchError` unless ``version`` is this basis's."""
        if version != self.version:
            raise BasisMismatchError(
                f'{what} was coded with token basis {version!r}, this side holds '
                f'{self.version!r} (fitted for {self.vision_space})')

    # ---------------------------------------------------------------- storage
    def save(self, path: str | Path) -> Path:
        """Write the basis as safetensors (the version and vision space as metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({'mean': self.mean, 'components': self.components, 'spread': self.spread},
                  str(path), metadata={'format': FORMAT, 'vision_space': self.vision_space,
                                       'version': self.version})
        return path

    @classmethod
    def load(cls, path: str | Path, vision_space: str | None = None) -> TokenBasis:
        """Read a basis written by :meth:`save`.

        Args:
            path: The safetensors file.
            vision_space: When given, the :func:`space_id` the basis must belong to.

        Raises:
            ConfigError: Unreadable, not a token basis, or its content does not hash to the
                version it names.
            BasisMismatchError: It was fitted for another vision space.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework='pt') as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (OSError, SafetensorError, ValueError) as err:
            raise ConfigError(f'cannot read a token basis from {path}: {err}') from err
        if meta.get('format') != FORMAT or set(tensors) != {'mean', 'components', 'spread'}:
            raise ConfigError(f'{path} is not a {FORMAT} file')
        basis = cls(meta.get('vision_space', ''), tensors['mean'], tensors['components'],
                    tensors['spread'])
        if basis.version != meta.get('version'):
            raise ConfigError(f'{path}: content hashes to {basis.version}, the file names '
                              f'{meta.get("version")!r} (corrupt or edited)')
        if vision_space is not None and basis.vision_space != vision_space:
            raise BasisMismatchError(f'token basis {path} was fitted for {basis.vision_space}, '
                                     f'the model produces {vision_space}')
        return basis

    def describe(self) -> dict[str, Any]:
        """Version, space and sizes, for records and diagnostics."""
        return {'version': self.version, 'vision_space': self.vision_space, 'dim': self.dim,
                'rank': self.rank}


# --- fitting -----------------------------------------------------------------------------------
def fit_basis(tokens: Tensor, vision_space: str, max_rank: int | None = None) -> TokenBasis:
    """Fit a :class:`TokenBasis` on ``tokens [..., D]`` (source-domain tokens of the encoder).

    Args:
        tokens: At least two tokens.
        vision_space: :func:`space_id` of the encoder that made them.
        max_rank: Keep at most this many directions (default: all the tokens span, up to
            ``D``); what lies outside them is not sent.

    Raises:
        ConfigError: Fewer than two tokens, non-finite values, or ``max_rank < 1``.
    """
    x = tokens.detach().float().cpu().reshape(-1, tokens.shape[-1])
    count, dim = x.shape
    if count < 2:
        raise ConfigError(f'fit_basis: needs at least 2 tokens, got {count}')
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f'fit_basis: max_rank must be >= 1, got {max_rank}')
    if not torch.isfinite(x).all():
        raise ConfigError('fit_basis: tokens hold non-finite values')
    mean = x.mean(dim=0)
    centred = x - mean
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    rank = min(vh.shape[0], count - 1, max_rank or dim)
    components = vh[:rank]
    # Each direction's sign fixed (largest entry positive): a refit gives the same basis.
    pick = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.where(pick < 0, -1.0, 1.0)
    spread = (centred @ components.T).std(dim=0)
    return TokenBasis(vision_space, mean, components, spread)
