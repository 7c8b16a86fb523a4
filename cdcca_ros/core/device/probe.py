"""The probe: is a swapped-in adapter sane? (no rclpy).

The probe runs the probe image's vision tokens (computed once when the vision encoder is
frozen: :func:`vision_frozen`) through the whole trainable path -- Q-Former / projector and the
language model with the new weights -- for one decoding step, and checks that the step
distribution is finite, sums to 1 and is not flat (all logits equal: what a LayerNorm whose
variance overflowed gives); it runs in ``torch.inference_mode`` (this model is never trained on
the device). Together with the hash check (the weights are bit-identical to what the cloud
computed) this proves the swapped weights run and give sane numbers; it does not judge whether
the update is *good* (that is the cloud's job), though ``max_tv`` can bound how far the probe
distribution may move in one update.

:class:`Probe` runs on a shadow copy of the model that shares its frozen weights
(:func:`shadow_model`) where it can, so answers need not wait for it, and as a ``torch.jit``
trace (:class:`TracedProbe`) where that checks out equal to the eager probe.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.core.device.weights import live_parameters
from cdcca_ros.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.device.weights import FlatWeights
    from cdcca_ros.models.base import MLLM

PROBE_SUM_TOLERANCE = 1e-3
PROBE_FLAT_TOLERANCE = 1e-7
_log = logging.getLogger(__name__)


def vision_frozen(model: MLLM, trainable: Sequence[str]) -> bool:
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


def shadow_model(model: MLLM) -> tuple[MLLM | None, str]:
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


class TracedProbe:
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
              eager: Any) -> tuple[TracedProbe | None, str]:
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


class Probe:
    """One decoding step of a fixed image and question through the trainable path, checked.

    Until :meth:`start` it runs eagerly on the model it was given; :meth:`start` caches the
    vision tokens (frozen encoder), moves it onto a shadow copy and traces it where it can, and
    takes the reference distribution that :meth:`check` measures the next one against.

    Args:
        model: The runtime's model.
        params: Its trainable parameters in the weights' layout order (None: not exposed, the
            probe then runs on the model itself).
        image: The probe image (RGB uint8).
        question: The probe question.

    Attributes:
        model: What the probe runs on: a shadow copy of the runtime's model, or the model.
        params: ``model``'s trainable parameters in layout order (None: not exposed).
        tokens: The probe image's cached vision tokens (None: recomputed for every probe).
        traced: The traced probe (None: eager).
        last_traced: Whether the last probe ran the trace.
        shadow: Whether ``model`` is a shadow copy.
        mode: ``'traced'`` or ``'eager'`` (and why), for diagnostics.
        ref: The step distribution of the weights in use (None: not taken yet).
    """

    def __init__(self, model: MLLM, params: list[Tensor] | None, image: np.ndarray,
                 question: str) -> None:
        self.model = model
        self.params = params
        self.image = image
        self.question = question
        self.tokens: Tensor | None = None
        self.ref: np.ndarray | None = None
        self.traced: TracedProbe | None = None
        self.last_traced = False
        self.shadow = False
        self.mode = 'eager (no cloud key: nothing to probe)'

    def start(self, weights: FlatWeights, shadow: bool, trace: bool,
              lock: threading.RLock) -> None:
        """Cache the tokens, take the shadow copy and the trace where asked and possible, then
        the reference distribution.

        Args:
            weights: The weights in use (their layout places the shadow's parameters).
            shadow: Probe a shadow copy sharing the frozen weights (see :func:`shadow_model`).
            trace: Trace the probe when the trace checks out equal (:class:`TracedProbe`).
            lock: The runtime's model lock, held while tracing.

        Raises:
            ModelError: The reference probe failed.
        """
        model = self.model
        if vision_frozen(model, weights.layout.names):
            self.tokens = model.vision_tokens([self.image])
        if shadow and self.params is not None:
            copy, why = shadow_model(model)
            copy_params = live_parameters(copy, weights) if copy is not None else None
            if copy is not None and copy_params is not None:
                self.model, self.params = copy, copy_params
                self.shadow = True
            else:
                _log.warning('probing the model itself: %s', why or 'no shadow parameters')
        self.mode = 'eager'
        if trace and self.tokens is not None and self.params is not None:
            with lock:
                self.traced, why = TracedProbe.build(self.model, self.tokens, self.question,
                                                     self.params, self.eager)
            self.mode = 'traced' if self.traced is not None else f'eager ({why})'
            if self.traced is None:
                _log.warning('probe runs eagerly: %s', why)
        self.ref = self.run()

    def run(self) -> np.ndarray:
        """The probe's first answer step through the whole trainable path, checked.

        The cached vision tokens skip the frozen encoder; Q-Former / projector and every
        language-model layer run with the weights in place, in one decoder pass
        (:meth:`~cdcca_ros.models.base.MLLM.next_token_probs`). Runs under the runtime's
        model lock.

        Returns:
            The step distribution ``[V]`` (float32).

        Raises:
            ModelError: The step distribution is not finite, does not sum to 1 or is flat.
        """
        import torch

        traced = self.traced
        self.last_traced = (traced is not None and self.params is not None
                            and traced.usable(self.params))
        dist = traced() if self.last_traced else self.eager()
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

    def check(self, max_tv: float | None) -> tuple[np.ndarray, float, bool]:
        """:meth:`run`, then its shift from :attr:`ref`: (probs, total variation, top token
        changed).

        Args:
            max_tv: The largest total variation allowed (the runtime's ``max_probe_tv``);
                None: no bound.

        Raises:
            ModelError: the probe failed, or moved more than ``max_tv``.
        """
        probs = self.run()
        ref = self.ref
        tv = (0.5 * float(np.abs(probs - ref).sum())
              if ref is not None and probs.shape == ref.shape else float('nan'))
        token_changed = bool(ref is not None and int(np.argmax(probs)) != int(np.argmax(ref)))
        if max_tv is not None and not tv <= max_tv:
            raise ModelError(f'probe distribution moved by {tv:.3f} (total variation), more '
                             f'than max_probe_tv={max_tv}')
        return probs, tv, token_changed

    def eager(self) -> Tensor:
        """The probe's step distribution ``[1, V]`` through the model's own forward."""
        import torch

        model = self.model
        tokens = self.tokens
        if tokens is None:
            tokens = model.vision_tokens([self.image])
        with torch.inference_mode():
            return model.next_token_probs(tokens, None, [self.question])

    def text(self, probs: np.ndarray) -> str:
        """The probe's most likely first token as text (for reports; the shadow copy shares
        the model's tokenizer)."""
        tokenizer = getattr(self.model, 'tokenizer', None)
        top = int(np.argmax(probs))
        try:
            return str(tokenizer.decode([top], skip_special_tokens=True)).strip()
        except Exception:  # noqa: BLE001 - a report string; never fail an apply on it
            return f'<token {top}>'
