"""The device's model runtime: answering, UTS hand-off and hot-apply of deltas (no rclpy).

One :class:`DeviceRuntime` owns the on-device MLLM. Answers and weight swaps take the same lock,
so a delta is swapped in *between* two answers: everything slow (signature check, decoding,
building the candidate weights, the finite check, the hash) happens outside the lock, and only
the in-place load of the trainable tensors and one probe step happen inside it. A candidate
that fails the probe is swapped back out before the lock is released, so no answer ever sees it.

Hot-apply path (see :meth:`DeviceRuntime.apply`): the runtime keeps its own copy of the weights
in use packed in flat buffers (:class:`FlatWeights`), so Eq. 8 is one add per buffer, the
finite check one reduction and the hash one pass over contiguous bytes; the swap is a direct
``copy_`` into the model's parameters. The runtime is the only writer of the trainable set.

The probe runs the probe image's vision tokens (computed once: the vision encoder is frozen,
checked at start) through the whole trainable path -- Q-Former / projector and the language
model with the new weights -- for one decoding step, and checks that the step distribution is
finite, sums to 1 and is not flat (all logits equal: what a LayerNorm whose variance overflowed
gives); it runs in ``torch.inference_mode`` (this model is never trained on the device).
Together with the hash check (the weights are bit-identical to what the cloud computed) this
proves the swapped weights run and give sane numbers; it does not judge
whether the update is *good* (that is the cloud's job), though ``max_probe_tv`` can bound how
far the probe distribution may move in one update and ``max_update_ratio`` how far the weights
may move (a signed delta of random values that breaks every answer moves them several times
further than a trained one).

The adapter in use is persisted (one safetensors file carrying its version record, written
atomically) by a background writer *after* :meth:`DeviceRuntime.apply` returned: the writer
always writes the latest version, in version order, and :attr:`DeviceRuntime.persisted_version`
says what a restart would come back on. A runtime starting on a folder waits for pending
writes to it; pending writes also finish at interpreter exit, but a crash (or SIGKILL) in the
few milliseconds between an apply and its write restarts on the version before. The previous
adapter is kept in memory for :meth:`DeviceRuntime.rollback`.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.core import wire
from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.captions.describe import DESCRIBE, is_describe
from cdcca_ros.core.codecs.container import all_finite
from cdcca_ros.core.coverage import Coverage, CoverageConfig
from cdcca_ros.core.entropy_guard import EntropyGuard, EntropyGuardConfig
from cdcca_ros.core.rounds.memory import token_feature
from cdcca_ros.core.trust import TrustStore
from cdcca_ros.core.updates import (
    MAX_VERSION,
    DeltaEnvelope,
    DeltaGate,
    RejectReason,
    RollbackEnvelope,
    check_rollback,
)
from cdcca_ros.core.uts import answer_confidence, answer_entropy
from cdcca_ros.errors import (
    CdccaError,
    ConfigError,
    DeltaMismatchError,
    DeltaRejectedError,
    ModelError,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from torch import Tensor

    from cdcca_ros.core.codecs.container import FlatDelta
    from cdcca_ros.models.base import MLLM, AnswerResult, StepCallback

WEIGHTS_FILE = 'adapter.safetensors'
STATE_FILE = 'adapter.json'  # the version record of older runtimes (read when restoring)
ADAPTER_FORMAT = 'cdcca-adapter-v1'
PROBE_SUM_TOLERANCE = 1e-3
PROBE_FLAT_TOLERANCE = 1e-7
_log = logging.getLogger(__name__)


@dataclass
class AnsweredSample:
    """One answer and what UTS needs of it."""

    question: str
    text: str
    choice_index: int
    confidence: float
    entropy_mean: float
    entropy_max: float
    step_probs: np.ndarray
    tokens: Tensor  # [N, D] vision tokens of the frame
    version: int
    latency_ms: float
    adapted: bool = True  # False: the frame lay outside the update's coverage (base answered)
    caption: bool = False  # a caption of the frame (a describe question), not an answer


@dataclass
class ApplyReport:
    """What one hot-apply did.

    ``apply_ms`` covers everything :meth:`DeviceRuntime.apply` waits for (verify, decode,
    build, finite check, hash, swap, probe, commit); the adapter is then handed to the
    background writer, which persists it after apply returned. ``extra['steps_ms']`` times
    each step, ``extra['probe_tv']`` is the total variation distance between the probe's step
    distribution before and after the swap and ``extra['probe_token_changed']`` whether its
    top token changed, ``extra['update_ratio']`` the delta's L2 norm over the weights';
    ``extra['probe_mode']`` (traced / eager) and ``extra['probe_shadow']``
    say how the probe ran.
    """

    round: int
    old_version: int
    new_version: int
    payload_bytes: int
    num_params: int
    apply_ms: float          # verify + decode + build + finite + hash + swap + probe
    swap_ms: float           # time the answer lock was held (the swap; + probe unshadowed)
    probe_answer: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.payload_bytes / max(self.num_params, 1)


def match_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the choice the answer names (case/space-insensitive), or -1."""
    norm = text.strip().lower()
    for i, choice in enumerate(choices):
        if choice.strip().lower() == norm:
            return i
    for i, choice in enumerate(choices):
        if norm and (norm in choice.strip().lower() or choice.strip().lower() in norm):
            return i
    return -1


def format_question(question: str, choices: Sequence[str]) -> str:
    """The prompt for a multiple-choice question: the choices follow the question."""
    if not choices:
        return question
    return f'{question} choices: {", ".join(choices)}'


class FlatWeights:
    """One immutable copy of a trainable set, packed in flat buffers (one per dtype/device).

    The tensors are views into the buffers, laid out in sorted-name order, so the
    :func:`~cdcca_ros.core.wire.state_dict_hash` is one pass over contiguous bytes, Eq. 8
    (:meth:`plus`) is one add per buffer and the finite check one reduction per buffer.
    Nothing writes into a buffer once built, so the weights in use, the previous ones (for
    rollback) and a snapshot being persisted share them safely.
    """

    def __init__(self, layout: _Layout, buffers: list[Tensor]) -> None:
        self.layout = layout
        self.buffers = buffers
        self.tensors: dict[str, Tensor] = layout.views(buffers)
        self.tensor_list = list(self.tensors.values())  # in layout (sorted-name) order
        self._hash: str | None = None
        self._norm: float | None = None

    @classmethod
    def pack(cls, sd: Mapping[str, Tensor]) -> FlatWeights:
        """Copy a state dict into flat buffers (dtypes and devices kept)."""
        import torch

        layout = _Layout(sd)
        buffers = [torch.cat([sd[name].detach().reshape(-1) for name in members])
                   for members in layout.members]
        return cls(layout, buffers)

    def plus(self, delta: Mapping[str, Tensor]) -> FlatWeights:
        """Eq. 8 on a copy: bit-identical to :func:`cdcca_ros.core.dwc.apply_delta`.

        Per buffer: the delta's values gathered in layout order, one add in
        ``promote(dtype, float32)``, one cast back -- the same elementwise IEEE operations
        as the per-tensor version.

        Raises:
            DeltaMismatchError: The delta's names, shapes or dtypes do not fit.
        """
        import torch

        layout = self.layout
        if delta.keys() != layout.name_set:
            missing = sorted(layout.name_set - set(delta))[:5]
            extra = sorted(set(delta) - layout.name_set)[:5]
            raise DeltaMismatchError(f'delta names differ from the trainable set: missing '
                                     f'{missing}, unexpected {extra}')
        values = [delta[name] for name in layout.names]
        try:
            shapes_ok = [v.shape for v in values] == layout.shape_list
            dtypes_ok = all(dt.is_floating_point for dt in {v.dtype for v in values})
        except AttributeError:
            shapes_ok = dtypes_ok = False
        if not (shapes_ok and dtypes_ok):
            name, v = next((n, v) for n, v in zip(layout.names, values, strict=True)
                           if not isinstance(v, torch.Tensor) or not v.is_floating_point()
                           or v.shape != layout.shapes[n])
            got = f'{v.dtype} {tuple(v.shape)}' if isinstance(v, torch.Tensor) else \
                type(v).__name__
            raise DeltaMismatchError(f'delta[{name!r}] is {got}, expected a float tensor of '
                                     f'shape {tuple(layout.shapes[name])}')
        out: list[Tensor] = []
        with torch.no_grad():
            for base, (dtype, device), members in zip(self.buffers, layout.groups,
                                                      layout.members, strict=True):
                acc = torch.promote_types(dtype, torch.float32)
                flat = torch.cat([delta[name].reshape(-1) for name in members])
                flat = flat.to(device=device, dtype=acc)
                out.append(base + flat if dtype == acc else (base.to(acc) + flat).to(dtype))
        return FlatWeights(layout, out)

    def plus_flat(self, delta: FlatDelta) -> FlatWeights:
        """:meth:`plus` for a :class:`~cdcca_ros.core.codecs.container.FlatDelta`: one add
        when these weights are one buffer laid out as the delta (the usual case: one dtype, one
        device, names sorted alike), else through :meth:`plus`. Bit-identical either way.

        Raises:
            DeltaMismatchError: The delta's names or shapes do not fit.
        """
        import torch

        layout = self.layout
        if len(self.buffers) != 1 or delta.names != layout.names:
            return self.plus(delta.tensors())
        if tuple(v[2] for v in delta.layout.views) != layout.shape_tuples:
            name = next(n for n, v in zip(layout.names, delta.layout.views, strict=True)
                        if v[2] != tuple(layout.shapes[n]))
            raise DeltaMismatchError(f'delta[{name!r}] has shape {delta.shapes[name]}, '
                                     f'expected {tuple(layout.shapes[name])}')
        (dtype, device), base = layout.groups[0], self.buffers[0]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.no_grad():
            flat = delta.values.to(device=device, dtype=acc)
            out = base + flat if dtype == acc else (base.to(acc) + flat).to(dtype)
        return FlatWeights(layout, [out])

    def first_non_finite(self) -> str | None:
        """Name of the first tensor holding NaN or Inf, or None when all are finite."""
        for buffer, members in zip(self.buffers, self.layout.members, strict=True):
            if not all_finite(buffer):
                return next(name for name in members if not all_finite(self.tensors[name]))
        return None

    def norm(self) -> float:
        """L2 norm of all the weights together (cached)."""
        import torch

        if self._norm is None:
            self._norm = math.sqrt(sum(
                float(torch.linalg.vector_norm(b.detach(), dtype=torch.float64)) ** 2
                for b in self.buffers))
        return self._norm

    def digest(self) -> str:
        """:func:`~cdcca_ros.core.wire.state_dict_hash` of these weights (cached)."""
        import torch

        if self._hash is None:
            raw = [memoryview(b.view(torch.uint8).cpu().numpy()) for b in self.buffers]
            layout = self.layout
            self._hash = wire.hash_tensor_bytes(
                (header, raw[group][start:stop])
                for header, (group, start, stop) in zip(layout.headers, layout.byte_ranges,
                                                        strict=True))
        return self._hash

    def cpu_state_dict(self) -> dict[str, Tensor]:
        """Separate CPU copies of every tensor (for safetensors, which refuses shared memory)."""
        return {name: t.to('cpu', copy=True) for name, t in self.tensors.items()}


class _Layout:
    """Where each tensor of a trainable set sits in :class:`FlatWeights` buffers."""

    def __init__(self, sd: Mapping[str, Tensor]) -> None:
        import torch

        self.names = tuple(sorted(sd))
        self.name_set = frozenset(self.names)
        group_of: dict[tuple[torch.dtype, torch.device], int] = {}
        self.groups: list[tuple[torch.dtype, torch.device]] = []
        self.members: list[list[str]] = []
        self.shapes: dict[str, torch.Size] = {}
        slots: dict[str, tuple[int, int]] = {}  # name -> (group, element offset)
        sizes: list[int] = []
        for name in self.names:
            t = sd[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ModelError(f'trainable tensor {name!r} is not a float tensor')
            key = (t.dtype, t.device)
            if key not in group_of:
                group_of[key] = len(self.groups)
                self.groups.append(key)
                self.members.append([])
                sizes.append(0)
            g = group_of[key]
            slots[name] = (g, sizes[g])
            sizes[g] += t.numel()
            self.members[g].append(name)
            self.shapes[name] = t.shape
        self.shape_list = [self.shapes[name] for name in self.names]
        self.shape_tuples = tuple(tuple(s) for s in self.shape_list)
        self._slots = [(name, *slots[name], tuple(self.shapes[name]),
                        torch.empty(self.shapes[name], device='meta').stride())
                       for name in self.names]
        self.headers = [wire.tensor_hash_header(name, sd[name].dtype, self.shapes[name])
                        for name in self.names]
        self.byte_ranges = []
        for name in self.names:
            g, offset = slots[name]
            size = self.groups[g][0].itemsize
            start = offset * size
            self.byte_ranges.append((g, start, start + sd[name].numel() * size))

    def views(self, buffers: list[Tensor]) -> dict[str, Tensor]:
        """Tensors of the layout as views into ``buffers``."""
        return {name: buffers[g].as_strided(shape, stride, buffers[g].storage_offset() + off)
                for name, g, off, shape, stride in self._slots}


@dataclass(frozen=True)
class AdapterSnapshot:
    """One adapter version to persist (what :func:`write_adapter` writes)."""

    device_id: str
    version: int
    round: int
    hash: str
    weights: FlatWeights


class _AdapterWriter:
    """Persists adapters to one folder off the apply path: latest version first, in order.

    One daemon thread per folder; :meth:`submit` only hands over the snapshot (newer ones
    replace an older one not yet written, so versions reach the disk in increasing order and
    the last one always does). Writes are atomic (temporary file, fsync, rename).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.persisted_version: int | None = None
        self.error = ''
        self._cond = threading.Condition()
        self._pending: AdapterSnapshot | None = None
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, snapshot: AdapterSnapshot) -> None:
        with self._cond:
            self._pending = snapshot
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f'adapter-writer:{self.directory.name}')
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy,
                                       timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None)
                snapshot, self._pending, self._busy = self._pending, None, True
            assert snapshot is not None
            try:
                write_adapter(self.directory, snapshot)
                error = ''
            except Exception as err:  # noqa: BLE001 - the writer must outlive a failed write
                error = f'cannot persist v{snapshot.version} to {self.directory}: {err}'
                _log.error(error)
            with self._cond:
                self._busy = False
                self.error = error
                if not error:
                    self.persisted_version = snapshot.version
                self._cond.notify_all()


_WRITERS: dict[Path, _AdapterWriter] = {}
_WRITERS_LOCK = threading.Lock()


def _writer_for(directory: Path) -> _AdapterWriter:
    """The one writer of a folder (runtimes on the same folder share it)."""
    key = directory.resolve()
    with _WRITERS_LOCK:
        if key not in _WRITERS:
            _WRITERS[key] = _AdapterWriter(directory)
        return _WRITERS[key]


@atexit.register
def _flush_writers_at_exit() -> None:
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
    for writer in writers:
        writer.flush(timeout=30.0)


def write_adapter(directory: Path, snapshot: AdapterSnapshot) -> None:
    """Write one adapter file atomically: tensors plus the version record as metadata."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    meta = {'format': ADAPTER_FORMAT, 'device_id': snapshot.device_id,
            'version': str(snapshot.version), 'round': str(snapshot.round),
            'hash': snapshot.hash}
    atomic_write(directory / WEIGHTS_FILE, save(snapshot.weights.cpu_state_dict(), meta))
    (directory / STATE_FILE).unlink(missing_ok=True)  # an older runtime's record


def _live_parameters(model: MLLM, weights: FlatWeights) -> list[Tensor] | None:
    """The model's trainable parameters in ``weights``' layout order, for a direct copy.

    None when the model does not expose them (``trainable_parameters``) or they do not match
    the layout exactly; the swap then goes through ``load_trainable_state_dict``.
    """
    get = getattr(model, 'trainable_parameters', None)
    if get is None:
        return None
    params = get()
    layout = weights.layout
    if set(params) != layout.name_set:
        return None
    out = [params[name] for name in layout.names]
    for param, value in zip(out, weights.tensor_list, strict=True):
        if (param.shape, param.dtype, param.device) != (value.shape, value.dtype,
                                                         value.device):
            return None
    return out


def _vision_frozen(model: MLLM, trainable: Sequence[str]) -> bool:
    """Whether no trainable tensor can change the vision tokens.

    True when the model declares its shared vision encoder (``shared_vision_prefixes``,
    minus ``vision_not_shared_prefixes``: parts applied after the tokens, such as Qwen2-VL's
    merger) and no trainable name lies inside it. Unknown: False (tokens are recomputed).
    """
    prefixes = tuple(getattr(model, 'shared_vision_prefixes', ()) or ())
    if not prefixes:
        return False
    exceptions = tuple(getattr(model, 'vision_not_shared_prefixes', ()) or ())
    return not any(name.startswith(prefixes) and not name.startswith(exceptions)
                   for name in trainable)


def _shadow_model(model: MLLM) -> tuple[MLLM | None, str]:
    """A copy of ``model`` for the probe that shares every frozen weight with it.

    ``copy.deepcopy`` with the frozen parameters (and the tokenizer and image processor)
    mapped to themselves: only the trainable tensors, buffers and module objects are new, so
    it costs the trainable set's memory once more, and a candidate adapter can be probed on
    it while the model itself keeps answering. Returns (copy or None, why not).
    """
    import copy

    get = getattr(model, 'trainable_parameters', None)
    module = getattr(model, 'torch_model', None)
    if get is None or module is None:
        return None, 'the model exposes no torch_model / trainable_parameters'
    try:
        trainable = {id(p) for p in get().values()}
        memo: dict[int, Any] = {id(p): p for p in module.parameters() if id(p) not in trainable}
        for attr in ('tokenizer', 'image_processor', 'processor'):
            obj = getattr(model, attr, None)
            if obj is not None:
                memo[id(obj)] = obj
        return copy.deepcopy(model, memo), ''
    except Exception as err:  # noqa: BLE001 - any failure means: probe the model itself
        return None, f'copying the model failed: {type(err).__name__}: {err}'


class _TracedProbe:
    """The probe (``model.next_token_probs(tokens, None, [question])`` for one fixed input)
    recorded once with ``torch.jit.trace`` and replayed without Python's per-module cost.

    On a small model the probe is almost all interpreter overhead (3.6x faster traced on
    the bundled student). The trace computes with the model's own parameter tensors, not
    copies, so an in-place copy into them is what it sees; it is built only when it matches
    eager on the current weights and again after every trainable tensor was perturbed (a
    trace that froze a weight as a constant fails that), and :meth:`usable` checks before
    each use that the live trainable tensors are still the storages traced. Anything else
    (tracing fails, a mismatch, a model without a ``torch_model``): no trace, the eager
    probe runs.
    """

    def __init__(self, traced: Any, tokens: Tensor, pointers: list[int]) -> None:
        self._traced = traced
        self._tokens = tokens
        self._pointers = pointers

    @classmethod
    def build(cls, model: MLLM, tokens: Tensor, question: str, params: list[Tensor],
              eager: Any) -> tuple[_TracedProbe | None, str]:
        """Trace and check; returns (probe or None, why not)."""
        import warnings

        import torch
        from torch import nn

        module = getattr(model, 'torch_model', None)
        if not isinstance(module, nn.Module):
            return None, 'the model has no torch_model to trace'

        class _Probe(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = module  # registered: the trace refers to its parameters

            def forward(self, x: Tensor) -> Tensor:
                return model.next_token_probs(x, None, [question])

        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # tracer and deprecation warnings
                with torch.no_grad():
                    traced = torch.jit.trace(_Probe(), (tokens,), check_trace=False)
            probe = cls(traced, tokens, [p.data_ptr() for p in params])
            if not torch.allclose(probe(), eager(), rtol=1e-5, atol=1e-6):
                return None, 'the trace differs from the eager probe'
            saved = [p.detach().clone() for p in params]
            gen = torch.Generator(device='cpu').manual_seed(0)
            try:
                with torch.no_grad():
                    for p in params:
                        scale = float(p.detach().float().abs().mean()) or 1e-2
                        noise = torch.randn(p.shape, generator=gen) * (0.5 * scale)
                        p.add_(noise.to(p.device, p.dtype))
                    same = torch.allclose(probe(), eager(), rtol=1e-5, atol=1e-6)
            finally:
                with torch.no_grad():
                    for p, v in zip(params, saved, strict=True):
                        p.copy_(v)
            if not same:
                return None, 'the trace does not follow the trainable weights'
            return probe, ''
        except Exception as err:  # noqa: BLE001 - any failure means: probe eagerly
            return None, f'tracing failed: {type(err).__name__}: {err}'

    def usable(self, params: list[Tensor]) -> bool:
        """Whether the live trainable tensors are still the storages traced."""
        return [p.data_ptr() for p in params] == self._pointers

    def __call__(self) -> Tensor:
        import torch

        with torch.inference_mode():
            return self._traced(self._tokens)


class DeviceRuntime:
    """The on-device model behind a lock, with verified hot-apply and rollback.

    Args:
        model: the on-device MLLM (its trainable set already configured).
        device_id: this device's id (deltas name it).
        public_key: who may sign deltas: a :class:`~cdcca_ros.core.trust.TrustStore` (root
            key, key lists, rotation), or the cloud's one Ed25519 key (pinned); None refuses
            every delta.
        state_dir: where the adapter in use is persisted; None: not persisted.
        probe_image: image for the probe after a swap (default: mid-grey); fixed at start.
        probe_question: question for the probe.
        max_new_tokens: longest answer.
        max_probe_tv: refuse an update that moves the probe's step distribution by more than
            this total variation distance (in (0, 1]); None: no bound.
        max_update_ratio: refuse a delta whose L2 norm is more than this fraction of the L2
            norm of the weights it applies to (> 0); None: no bound. A delta of random values
            large enough to break the answers is far larger than a trained one.
        trace_probe: run the probe as a ``torch.jit`` trace of the eager one when it checks
            out equal (see :class:`_TracedProbe`; :attr:`probe_mode` says which runs).
        shadow_probe: probe candidates on a copy of the model that shares its frozen weights
            (:func:`_shadow_model`), so answers wait only for the copy into the model, not
            for the probe; False (or a model that cannot be copied so): probe the model
            itself, under the lock.
        entropy_guard: roll an update back on the device's own when its answers turn much
            less sure than its predecessor's (:mod:`cdcca_ros.core.entropy_guard`); None:
            no local guard. Local rollbacks are listed in :attr:`local_rollbacks`.
        coverage: answer with the adapter only on frames like those the update was trained
            on (:mod:`cdcca_ros.core.coverage`), with the base elsewhere; None: the adapter
            answers everything.
        anchor_tokens: ``[N, T, D]`` vision tokens of the student's anchor set (what the
            cloud also trains on): covered from the start.
        caption_head: The model's caption head (:mod:`cdcca_ros.models.caption_head`), for
            :meth:`caption` and questions :func:`~cdcca_ros.core.captions.describe.is_describe`
            matches; None: the device does not caption.
    """

    def __init__(self, model: MLLM, device_id: str,
                 public_key: TrustStore | Ed25519PublicKey | None = None,
                 state_dir: str | Path | None = None, probe_image: np.ndarray | None = None,
                 probe_question: str = 'what color is the object?', max_new_tokens: int = 6,
                 max_probe_tv: float | None = None, trace_probe: bool = True,
                 shadow_probe: bool = True, max_update_ratio: float | None = None,
                 entropy_guard: EntropyGuardConfig | None = None,
                 coverage: CoverageConfig | None = None,
                 anchor_tokens: Tensor | None = None, caption_head: Any = None) -> None:
        if max_probe_tv is not None and not 0.0 < max_probe_tv <= 1.0:
            raise ConfigError(f'max_probe_tv must be in (0, 1] or None, got {max_probe_tv}')
        if max_update_ratio is not None and not (0.0 < max_update_ratio < math.inf):
            raise ConfigError(f'max_update_ratio must be a positive number or None, got '
                              f'{max_update_ratio}')
        self.model = model
        self.caption_head = caption_head
        self.device_id = device_id
        self.public_key = public_key
        #: Who may sign deltas (None: every delta is refused).
        self.trust: TrustStore | None = (
            None if public_key is None else public_key if isinstance(public_key, TrustStore)
            else TrustStore.pinned_key(public_key))
        self.state_dir = Path(state_dir) if state_dir else None
        self.probe_image = (probe_image if probe_image is not None
                            else np.full((64, 64, 3), 128, np.uint8))
        self.probe_question = probe_question
        self.max_new_tokens = max_new_tokens
        self.max_probe_tv = max_probe_tv
        self.max_update_ratio = max_update_ratio
        self.lock = threading.RLock()
        self._apply_lock = threading.Lock()  # one apply / rollback at a time
        self.version = 0
        self.round = 0
        self._previous: tuple[int, str, FlatWeights, np.ndarray | None] | None = None
        self.rejected = 0
        self.applied = 0
        self.rollbacks = 0
        self._guard = EntropyGuard(entropy_guard) if entropy_guard is not None else None
        #: Local rollbacks (entropy guard): dicts with from/to version, hash, reason.
        self.local_rollbacks: list[dict[str, Any]] = []
        self._writer = _writer_for(self.state_dir) if self.state_dir else None
        # The weights the model shipped with (what answers outside an update's coverage).
        self._base_weights = FlatWeights.pack(self.model.trainable_state_dict())
        restored = self._restore()
        self._weights = FlatWeights.pack(self.model.trainable_state_dict())
        self.base_hash = self._weights.digest()
        self._params = _live_parameters(model, self._weights)
        if self._writer is not None:
            self._writer.persisted_version = self.version if restored else 0
        self._probe_tokens: Tensor | None = None
        self._probe_ref: np.ndarray | None = None
        self._traced_probe: _TracedProbe | None = None
        self._probe_traced = False  # whether the last probe ran the trace
        # What the probe runs on: a shadow copy sharing the frozen weights, or the model.
        self._probe_model: MLLM = model
        self._probe_params = self._params
        #: Whether candidates are probed on a shadow copy (answers wait only for the copy).
        self.probe_shadow = False
        #: 'traced' or 'eager' (and why), for diagnostics.
        self.probe_mode = 'eager (no cloud key: nothing to probe)'
        self._gate = self._make_gate()
        if self._gate is not None:
            if _vision_frozen(model, self._weights.layout.names):
                self._probe_tokens = model.vision_tokens([self.probe_image])
            if shadow_probe and self._params is not None:
                shadow, why = _shadow_model(model)
                shadow_params = (_live_parameters(shadow, self._weights) if shadow is not None
                                 else None)
                if shadow is not None and shadow_params is not None:
                    self._probe_model, self._probe_params = shadow, shadow_params
                    self.probe_shadow = True
                else:
                    _log.warning('probing the model itself: %s', why or 'no shadow parameters')
            self.probe_mode = 'eager'
            if (trace_probe and self._probe_tokens is not None
                    and self._probe_params is not None):
                with self.lock:
                    self._traced_probe, why = _TracedProbe.build(
                        self._probe_model, self._probe_tokens, self.probe_question,
                        self._probe_params, self._eager_probe)
                self.probe_mode = ('traced' if self._traced_probe is not None
                                   else f'eager ({why})')
                if self._traced_probe is None:
                    _log.warning('probe runs eagerly: %s', why)
            self._probe_ref = self._probe()
        #: Where the adapter answers (None: everywhere) and the model that answers elsewhere.
        self.coverage: Coverage | None = None
        self._base_model: MLLM | None = None
        self.base_answers = 0
        if coverage is not None and self._gate is not None:
            anchors = (None if anchor_tokens is None else
                       np.stack([token_feature(t) for t in anchor_tokens]))
            self.coverage = Coverage(coverage, anchors)
            self._base_model, why = _shadow_model(model)
            if self._base_model is None:
                _log.warning('coverage off: %s', why)
                self.coverage = None
            else:
                self._base_model.load_trainable_state_dict(self._base_weights.tensors)
                if self.version > 0:
                    self.coverage.snapshot()

    # ------------------------------------------------------------------ answering
    def _answering_model(self, tokens: Tensor) -> tuple[MLLM, bool]:
        """The model that answers a frame with these ``[1, N, D]`` tokens (under the lock):
        the adapted one, or the shipped one outside the update's coverage (counted)."""
        if self.coverage is None or self.version == 0 or self._base_model is None:
            return self.model, True
        if self.coverage.covers(token_feature(tokens[0])):
            return self.model, True
        self.base_answers += 1
        return self._base_model, False

    def caption(self, image: np.ndarray, question: str = DESCRIBE) -> AnsweredSample:
        """A caption of ``image`` (RGB uint8) by the caption head over the model that the
        coverage picks (as :meth:`answer`); entropy: Eq. 2 over every step of the caption
        (:func:`~cdcca_ros.core.captions.adapt.caption_entropy`, UTS stage 1's input). The
        entropy guard watches answers only (a caption's entropy is on another scale).

        Raises:
            ConfigError: The model has no caption head.
        """
        if self.caption_head is None:
            raise ConfigError('this model has no caption head: it cannot describe a frame '
                              '(train one with `make models`)')
        from cdcca_ros.core.captions.adapt import caption_entropy
        from cdcca_ros.models.caption_head import Captioner

        with self.lock:
            t0 = time.perf_counter()
            tokens = self.model.vision_tokens([image])
            model, adapted = self._answering_model(tokens)
            result = Captioner(model, self.caption_head).caption_from_tokens(tokens)[0]
            latency = (time.perf_counter() - t0) * 1e3
            version = self.version
        stats = caption_entropy(result)
        return AnsweredSample(
            question=question, text=result.text, choice_index=-1,
            confidence=answer_confidence(result.token_probs), entropy_mean=float(stats.mean),
            entropy_max=float(stats.max), step_probs=result.step_probs,
            tokens=tokens[0].detach(), version=version, latency_ms=latency, adapted=adapted,
            caption=True)

    def answer(self, image: np.ndarray, question: str, choices: Sequence[str] = (),
               on_step: StepCallback | None = None) -> AnsweredSample:
        """Answer ``question`` about ``image`` (RGB uint8), keeping the vision tokens for UTS.

        ``on_step`` streams the answer: it gets each generated step (token, probability,
        entropy, text so far) under the model lock, as soon as it is computed; raising
        :class:`~cdcca_ros.errors.GenerationCancelled` there stops generation after that step
        (nothing is answered, the lock is released).
        """
        if self.caption_head is not None and is_describe(question):
            return self.caption(image, question)
        prompt = format_question(question, choices)
        stream = {} if on_step is None else {'on_step': on_step}
        with self.lock:
            t0 = time.perf_counter()
            tokens = self.model.vision_tokens([image])
            model, adapted = self._answering_model(tokens)
            result: AnswerResult = model.answer_from_tokens(
                tokens, None, [prompt], max_new_tokens=self.max_new_tokens, **stream)[0]
            latency = (time.perf_counter() - t0) * 1e3
            version = self.version
        stats = answer_entropy(result.step_probs)
        confidence = answer_confidence(result.token_probs)
        if self._guard is not None:
            reason = self._guard.observe(version, float(stats.mean))
            if reason is not None:
                self._local_rollback(version, reason)
        return AnsweredSample(
            question=question, text=result.text, choice_index=match_choice(result.text, choices),
            confidence=confidence, entropy_mean=float(stats.mean), entropy_max=float(stats.max),
            step_probs=result.step_probs, tokens=tokens[0].detach(), version=version,
            latency_ms=latency, adapted=adapted)

    def routes(self, tokens: Tensor) -> tuple[np.ndarray, MLLM, MLLM]:
        """How the device would answer frames with these ``[B, N, D]`` tokens: a per-frame
        mask (True: the adapter answers; False: the shipped model), the adapted model and the
        shipped one (for evaluations; nothing is counted)."""
        if self.coverage is None or self.version == 0 or self._base_model is None:
            return np.ones(tokens.shape[0], dtype=bool), self.model, self.model
        features = np.stack([token_feature(t) for t in tokens])
        return self.coverage.covers_all(features), self.model, self._base_model

    def note_uplinked(self, tokens: Tensor) -> None:
        """Record that a sample with these ``[N, D]`` tokens went up the link: the next
        update is trained on it, so frames like it are covered from then on."""
        if self.coverage is not None:
            self.coverage.note(token_feature(tokens))

    def mc_token_features(self, tokens: Tensor, p: float, num_masks: int) -> Tensor:
        """UTS stage 2 features through the device model, under the model lock."""
        with self.lock:
            return self.model.mc_token_features(tokens, p, num_masks)

    # ------------------------------------------------------------------ updates
    def _make_gate(self) -> DeltaGate | None:
        if self.trust is None:
            return None
        return DeltaGate(self.device_id, self.trust, self.version, self.base_hash,
                         self._weights.tensors)

    def _load(self, weights: FlatWeights) -> None:
        """Copy ``weights`` into the model's trainable parameters (callers hold the lock)."""
        if self._params is None:
            self.model.load_trainable_state_dict(weights.tensors)
            return
        _copy_into(self._params, weights)

    def _probe(self) -> np.ndarray:
        """The probe's first answer step through the whole trainable path, checked.

        The cached vision tokens skip the frozen encoder; Q-Former / projector and every
        language-model layer run with the weights in place, in one decoder pass
        (:meth:`~cdcca_ros.models.base.MLLM.next_token_probs`). Runs under :attr:`lock`.

        Returns:
            The step distribution ``[V]`` (float32).

        Raises:
            ModelError: The step distribution is not finite, does not sum to 1 or is flat.
        """
        import torch

        traced = self._traced_probe
        self._probe_traced = (traced is not None and self._probe_params is not None
                              and traced.usable(self._probe_params))
        dist = traced() if self._probe_traced else self._eager_probe()
        probs = dist.detach().to('cpu', torch.float32).numpy()
        if probs.ndim != 2 or probs.shape[0] < 1 or not np.isfinite(probs).all():
            raise ModelError(f'probe step distribution of shape {probs.shape} is empty or '
                             'holds NaN or Inf')
        probs = probs[0]
        total = float(probs.sum(dtype=np.float64))
        if abs(total - 1.0) > PROBE_SUM_TOLERANCE:
            raise ModelError(f'probe step distribution sums to {total:.6f}, not 1')
        if probs.size > 1 and float(probs.max() - probs.min()) <= PROBE_FLAT_TOLERANCE:
            # All logits equal: what a LayerNorm whose variance overflowed to Inf gives.
            raise ModelError('probe step distribution is flat: the model lost its input')
        return probs

    def _checked_probe(self) -> tuple[np.ndarray, float, bool]:
        """:meth:`_probe`, then its shift from the reference: (probs, total variation, top
        token changed).

        Raises:
            ModelError: the probe failed, or moved more than ``max_probe_tv``.
        """
        probs = self._probe()
        ref = self._probe_ref
        tv = (0.5 * float(np.abs(probs - ref).sum())
              if ref is not None and probs.shape == ref.shape else float('nan'))
        token_changed = bool(ref is not None and int(np.argmax(probs)) != int(np.argmax(ref)))
        if self.max_probe_tv is not None and not tv <= self.max_probe_tv:
            raise ModelError(f'probe distribution moved by {tv:.3f} (total variation), more '
                             f'than max_probe_tv={self.max_probe_tv}')
        return probs, tv, token_changed

    def _eager_probe(self) -> Tensor:
        """The probe's step distribution ``[1, V]`` through the model's own forward."""
        import torch

        model = self._probe_model
        tokens = self._probe_tokens
        if tokens is None:
            tokens = model.vision_tokens([self.probe_image])
        with torch.inference_mode():
            return model.next_token_probs(tokens, None, [self.probe_question])

    def _probe_text(self, probs: np.ndarray) -> str:
        """The probe's most likely first token as text (for reports)."""
        tokenizer = getattr(self.model, 'tokenizer', None)
        top = int(np.argmax(probs))
        try:
            return str(tokenizer.decode([top], skip_special_tokens=True)).strip()
        except Exception:  # noqa: BLE001 - a report string; never fail an apply on it
            return f'<token {top}>'

    def apply(self, envelope: DeltaEnvelope) -> ApplyReport:
        """Verify, decode, apply on a copy, probe it, swap it in between two answers, commit.

        The probe runs on the shadow copy before the swap (answers wait only for the copy);
        without a shadow it runs on the model right after the swap, under the lock.

        Returns once the new version answers; persisting it follows in the background (see
        :attr:`persisted_version` and :meth:`flush`).

        Raises:
            DeltaRejectedError: refused or failed; the model and version are unchanged.
        """
        t0 = time.perf_counter()
        try:
            with self._apply_lock:
                return self._apply(envelope, t0)
        except DeltaRejectedError:
            self.rejected += 1
            raise

    def _apply(self, envelope: DeltaEnvelope, t0: float) -> ApplyReport:
        if self._gate is None:
            raise DeltaRejectedError('no cloud public key is configured: every delta is refused')
        steps: dict[str, float] = {}
        t = t0
        # Signature, device, version, base, finite, shapes; one float32 vector in name order.
        delta = self._gate.accept_flat(envelope)
        t, steps['gate_ms'] = _lap(t)
        current = self._weights
        update_ratio = _update_ratio(delta.values, current)
        if self.max_update_ratio is not None and not update_ratio <= self.max_update_ratio:
            raise DeltaRejectedError(
                f'{RejectReason.UPDATE_TOO_LARGE.value}: the delta\'s L2 norm is '
                f'{update_ratio:.3g} of the weights\', more than max_update_ratio='
                f'{self.max_update_ratio}; v{self.version} stays')
        try:
            candidate = current.plus_flat(delta)
        except DeltaMismatchError as err:
            raise DeltaRejectedError(f'{RejectReason.WRONG_SHAPE.value}: {err}') from err
        t, steps['build_ms'] = _lap(t)
        # Finite base + finite delta can still overflow to Inf.
        bad = candidate.first_non_finite()
        if bad is not None:
            raise DeltaRejectedError(f'{RejectReason.NON_FINITE.value}: applying the delta '
                                     f'makes {bad!r} non-finite')
        t, steps['finite_ms'] = _lap(t)
        new_hash = candidate.digest()
        if new_hash != envelope.new_hash:
            raise DeltaRejectedError(
                f'{RejectReason.HASH_MISMATCH.value}: weights after applying hash to '
                f'{new_hash[:12]}, the cloud computed {envelope.new_hash[:12]}')
        t, steps['hash_ms'] = _lap(t)
        if self.probe_shadow:
            # Probe the candidate on the shadow copy while the model keeps answering.
            assert self._probe_params is not None
            _copy_into(self._probe_params, candidate)
            try:
                probs, tv, token_changed = self._checked_probe()
            except (CdccaError, RuntimeError, ValueError) as err:
                raise DeltaRejectedError(f'probe of the candidate failed, v{self.version} '
                                         f'stays: {err}') from err
            t, steps['probe_ms'] = _lap(t)
        with self.lock:
            t_swap = t = time.perf_counter()
            self._load(candidate)
            t, steps['swap_ms'] = _lap(t)
            try:
                if not self.probe_shadow:
                    probs, tv, token_changed = self._checked_probe()
                self._gate.commit(envelope.new_version, new_hash)
            except (CdccaError, RuntimeError, ValueError) as err:
                self._load(current)
                raise DeltaRejectedError(f'probe after the swap failed, restored '
                                         f'v{self.version}: {err}') from err
            if not self.probe_shadow:
                t, steps['probe_ms'] = _lap(t)
            old_version = self.version
            self._previous = (self.version, self.base_hash, current, self._probe_ref)
            self._weights, self._probe_ref = candidate, probs
            self.version, self.base_hash, self.round = (envelope.new_version, new_hash,
                                                        envelope.round)
            swap_ms = (time.perf_counter() - t_swap) * 1e3
        self.applied += 1
        report = ApplyReport(round=envelope.round, old_version=old_version,
                             new_version=envelope.new_version,
                             payload_bytes=len(envelope.payload),
                             num_params=int(delta.values.numel()),
                             apply_ms=(time.perf_counter() - t0) * 1e3, swap_ms=swap_ms,
                             probe_answer=self._probe_text(probs),
                             extra={'steps_ms': steps, 'probe_tv': tv,
                                    'update_ratio': update_ratio,
                                    'probe_mode': 'traced' if self._probe_traced else 'eager',
                                    'probe_shadow': self.probe_shadow,
                                    'probe_token_changed': token_changed})
        if self.coverage is not None:
            self.coverage.snapshot()  # the update covers what went up until now
        # Last: the writer thread wakes up now and competes for the GIL.
        self._persist()
        return report

    def rollback(self) -> int:
        """Restore the adapter held before the last apply; returns the version now in use.

        The version number stays monotonic: the restored weights get a new, higher version so
        the cloud's next delta (which must name this base) is unambiguous.

        Raises:
            DeltaRejectedError: nothing to roll back to.
        """
        with self._apply_lock:
            return self._rollback(self.version + 1)

    def _rollback(self, new_version: int) -> int:
        """Restore the previous adapter as ``new_version`` (callers hold the apply lock)."""
        if self._previous is None:
            raise DeltaRejectedError('nothing to roll back to')
        if self.version >= MAX_VERSION or new_version > MAX_VERSION:
            raise DeltaRejectedError(f'cannot roll back: version {self.version} is the last '
                                     'one')
        _, old_hash, weights, probe_ref = self._previous
        with self.lock:
            self._load(weights)
            self.version = int(new_version)
            self.base_hash = old_hash
            self._weights, self._probe_ref = weights, probe_ref
            self._previous = None
            self._gate = self._make_gate()
        self.rollbacks += 1
        self._persist()
        return self.version

    @property
    def previous_hash(self) -> str | None:
        """Hash of the adapter a rollback would restore (None: nothing to roll back to)."""
        return None if self._previous is None else self._previous[1]

    def apply_rollback(self, order: RollbackEnvelope) -> int:
        """Carry out a signed rollback order from the cloud; returns the version now in use.

        The order is verified like a delta: a key the device trusts for rollback orders
        (pinned, or in the root-signed key list), not expired, for this device, withdrawing
        the version it runs and restoring the weights it held before.

        Raises:
            DeltaRejectedError: the order is forged, expired, for another device, stale or
                replayed (it withdraws a version the device no longer runs), or names weights
                the device did not hold; nothing changes.
        """
        if self.trust is None:
            raise DeltaRejectedError('no cloud key is configured: every order is refused')
        with self._apply_lock:
            try:
                check_rollback(order, self.trust, self.device_id, self.version,
                               self.base_hash, self.previous_hash)
            except DeltaRejectedError:
                self.rejected += 1
                raise
            return self._rollback(order.new_version)

    def _local_rollback(self, version: int, reason: str) -> None:
        """The entropy guard's rollback of ``version`` (skipped if it is no longer in use)."""
        with self._apply_lock:
            if self.version != version or self._previous is None:
                return
            from_hash = self.base_hash
            try:
                new_version = self._rollback(self.version + 1)
            except DeltaRejectedError as err:
                _log.error('local rollback of v%d impossible: %s', version, err)
                return
        event = {'from_version': version, 'from_hash': from_hash, 'version': new_version,
                 'hash': self.base_hash, 'reason': reason}
        self.local_rollbacks.append(event)
        _log.warning('local rollback: %s', reason)

    @property
    def weights(self) -> FlatWeights:
        """The trainable weights in use (this runtime's immutable copy)."""
        return self._weights

    # ------------------------------------------------------------------ persistence
    @property
    def persisted_version(self) -> int | None:
        """The version a restart would come back on now (0: the base model); None when
        nothing is persisted (no ``state_dir``). Lags :attr:`version` while a write is
        pending."""
        return self._writer.persisted_version if self._writer is not None else None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the adapter in use is on disk; False on timeout (or no ``state_dir``
        always True)."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def _persist(self) -> None:
        if self._writer is not None:
            self._writer.submit(AdapterSnapshot(self.device_id, self.version, self.round,
                                          self.base_hash, self._weights))

    def _restore(self) -> bool:
        """Load the persisted adapter, if any; True when one was loaded."""
        if self.state_dir is None:
            return False
        assert self._writer is not None
        self._writer.flush()  # a runtime that used this folder before may still be writing
        path = self.state_dir / WEIGHTS_FILE
        if not path.is_file():
            if (self.state_dir / STATE_FILE).is_file():
                raise ModelError(f'{self.state_dir / STATE_FILE} has no {WEIGHTS_FILE} beside '
                                 'it; move the folder away to start from the base model')
            return False
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework='pt') as f:
                meta = f.metadata() or {}
                weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            if 'version' in meta:
                record: dict[str, Any] = meta
            else:  # an older runtime kept the record in a JSON file beside the weights
                record = json.loads((self.state_dir / STATE_FILE).read_text())
            if wire.state_dict_hash(weights) != record['hash']:
                raise ModelError('persisted adapter does not match its recorded hash')
            if record.get('device_id') != self.device_id:
                raise ModelError(f'persisted adapter belongs to {record.get("device_id")!r}')
            version, round_ = int(record['version']), int(record.get('round', 0))
            if not 0 <= version <= MAX_VERSION:
                raise ModelError(f'persisted version {version} is outside [0, 2**64)')
            self.model.load_trainable_state_dict(weights)
        except (OSError, KeyError, ValueError, SafetensorError, CdccaError) as err:
            raise ModelError(f'cannot restore the adapter persisted in {self.state_dir}: {err}; '
                             'move the folder away to start from the base model') from err
        self.version, self.round = version, round_
        return True

    def status(self) -> dict[str, Any]:
        """Counters and state for diagnostics. ``persisted_version`` is what a restart comes
        back on (-1: no ``state_dir``); it lags ``version`` while a write is pending, and
        ``persist_error`` names the last failed write (empty once a write succeeded)."""
        writer = self._writer
        return {'device_id': self.device_id, 'version': self.version, 'round': self.round,
                'hash': self.base_hash[:16], 'applied': self.applied, 'rejected': self.rejected,
                'can_roll_back': self._previous is not None, 'rollbacks': self.rollbacks,
                'local_rollbacks': len(self.local_rollbacks),
                'base_answers': self.base_answers,
                **({f'coverage.{k}': v for k, v in self.coverage.status().items()}
                   if self.coverage is not None else {}),
                'verifying': self.trust is not None,
                **(self.trust.status() if self.trust is not None else {}),
                'probe': self.probe_mode, 'probe_shadow': self.probe_shadow,
                'persisted_version': (-1 if writer is None or writer.persisted_version is None
                                      else writer.persisted_version),
                'persist_error': writer.error if writer is not None else ''}


def _copy_into(params: list[Tensor], weights: FlatWeights) -> None:
    """Copy ``weights`` into ``params`` (same layout order)."""
    import torch

    with torch.no_grad():
        # One fused copy when torch has it (its optimizers use it), else one per tensor.
        foreach_copy = getattr(torch, '_foreach_copy_', None)
        if foreach_copy is not None:
            foreach_copy(params, weights.tensor_list)
        else:  # pragma: no cover - older torch
            for param, value in zip(params, weights.tensor_list, strict=True):
                param.copy_(value)


def _update_ratio(delta: Tensor, weights: FlatWeights) -> float:
    """||delta|| / ||weights|| (inf when the weights are all zero and the delta is not)."""
    import torch

    num = float(torch.linalg.vector_norm(delta.detach(), dtype=torch.float64))
    den = weights.norm()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _lap(t: float) -> tuple[float, float]:
    """(now, ms since ``t``)."""
    now = time.perf_counter()
    return now, (now - t) * 1e3
