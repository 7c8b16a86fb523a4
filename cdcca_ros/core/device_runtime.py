"""The device's model runtime: answering, UTS hand-off and hot-apply of deltas (no rclpy).

One :class:`DeviceRuntime` owns the on-device MLLM. Answers and weight swaps take the same lock,
so a delta is swapped in *between* two answers: everything slow (signature check, decoding,
building the candidate weights, the finite check, the hash) happens outside the lock, and only
the in-place load of the trainable tensors and one probe step happen inside it. A candidate
that fails the probe is swapped back out before the lock is released, so no answer ever sees it.

Hot-apply path (see :meth:`DeviceRuntime.apply`): the runtime keeps its own copy of the weights
in use packed in flat buffers (:class:`~cdcca_ros.core.device.weights.FlatWeights`), so Eq. 8
is one add per buffer, the finite check one reduction and the hash one pass over contiguous
bytes; the swap is a direct ``copy_`` into the model's parameters. The runtime is the only
writer of the trainable set.

The probe (:class:`~cdcca_ros.core.device.probe.Probe`) runs one decoding step of a fixed image
and question through the whole trainable path and checks that it gives sane numbers; with the
hash check this proves the swapped weights run, not that the update is *good* (that is the
cloud's job), though ``max_probe_tv`` can bound how far the probe distribution may move in one
update and ``max_update_ratio`` how far the weights may move (a signed delta of random values
that breaks every answer moves them several times further than a trained one).

The adapter in use is persisted (:mod:`cdcca_ros.core.device.persist`: one safetensors file
carrying its version record, written atomically) by a background writer *after*
:meth:`DeviceRuntime.apply` returned: the writer always writes the latest version, in version
order, and :attr:`DeviceRuntime.persisted_version` says what a restart would come back on. A
runtime starting on a folder waits for pending writes to it; pending writes also finish at
interpreter exit, but a crash (or SIGKILL) in the few milliseconds between an apply and its
write restarts on the version before. The previous adapter is kept in memory for
:meth:`DeviceRuntime.rollback`.

The parts live in :mod:`cdcca_ros.core.device`; the names this module had before they moved
(:class:`AnsweredSample`, :class:`FlatWeights`, :func:`write_adapter`, ...) are importable from
it still.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.core.captions.describe import DESCRIBE, is_describe
from cdcca_ros.core.coverage import Coverage, CoverageConfig
from cdcca_ros.core.device.answers import AnsweredSample, format_question, match_choice
from cdcca_ros.core.device.persist import (
    ADAPTER_FORMAT,
    STATE_FILE,
    WEIGHTS_FILE,
    AdapterSnapshot,
    restore_adapter,
    write_adapter,
    writer_for,
)
from cdcca_ros.core.device.probe import (
    PROBE_FLAT_TOLERANCE,
    PROBE_SUM_TOLERANCE,
    Probe,
    shadow_model,
)
from cdcca_ros.core.device.weights import FlatWeights, copy_into, live_parameters, update_ratio
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
)

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from torch import Tensor

    from cdcca_ros.models.base import MLLM, AnswerResult, StepCallback

__all__ = [
    'ADAPTER_FORMAT', 'PROBE_FLAT_TOLERANCE', 'PROBE_SUM_TOLERANCE', 'STATE_FILE',
    'WEIGHTS_FILE', 'AdapterSnapshot', 'AnsweredSample', 'ApplyReport', 'DeviceRuntime',
    'FlatWeights', 'format_question', 'match_choice', 'write_adapter',
]
_log = logging.getLogger(__name__)


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
            out equal (see :class:`~cdcca_ros.core.device.probe.TracedProbe`;
            :attr:`probe_mode` says which runs).
        shadow_probe: probe candidates on a copy of the model that shares its frozen weights
            (:func:`~cdcca_ros.core.device.probe.shadow_model`), so answers wait only for the
            copy into the model, not for the probe; False (or a model that cannot be copied
            so): probe the model itself, under the lock.
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
        self._writer = writer_for(self.state_dir) if self.state_dir else None
        # The weights the model shipped with (what answers outside an update's coverage).
        self._base_weights = FlatWeights.pack(self.model.trainable_state_dict())
        restored = self._restore()
        self._weights = FlatWeights.pack(self.model.trainable_state_dict())
        self.base_hash = self._weights.digest()
        self._params = live_parameters(model, self._weights)
        if self._writer is not None:
            self._writer.persisted_version = self.version if restored else 0
        # The check after a swap (started only when deltas can come: a cloud key).
        self._probe = Probe(model, self._params,
                            (probe_image if probe_image is not None
                             else np.full((64, 64, 3), 128, np.uint8)), probe_question)
        self._gate = self._make_gate()
        if self._gate is not None:
            self._probe.start(self._weights, shadow_probe, trace_probe, self.lock)
        #: Where the adapter answers (None: everywhere) and the model that answers elsewhere.
        self.coverage: Coverage | None = None
        self._base_model: MLLM | None = None
        self.base_answers = 0
        if coverage is not None and self._gate is not None:
            anchors = (None if anchor_tokens is None else
                       np.stack([token_feature(t) for t in anchor_tokens]))
            self.coverage = Coverage(coverage, anchors)
            self._base_model, why = shadow_model(model)
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
        copy_into(self._params, weights)

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
        ratio = update_ratio(delta.values, current)
        if self.max_update_ratio is not None and not ratio <= self.max_update_ratio:
            raise DeltaRejectedError(
                f'{RejectReason.UPDATE_TOO_LARGE.value}: the delta\'s L2 norm is '
                f'{ratio:.3g} of the weights\', more than max_update_ratio='
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
        probe = self._probe
        if probe.shadow:
            # Probe the candidate on the shadow copy while the model keeps answering.
            assert probe.params is not None
            copy_into(probe.params, candidate)
            try:
                probs, tv, token_changed = probe.check(self.max_probe_tv)
            except (CdccaError, RuntimeError, ValueError) as err:
                raise DeltaRejectedError(f'probe of the candidate failed, v{self.version} '
                                         f'stays: {err}') from err
            t, steps['probe_ms'] = _lap(t)
        with self.lock:
            t_swap = t = time.perf_counter()
            self._load(candidate)
            t, steps['swap_ms'] = _lap(t)
            try:
                if not probe.shadow:
                    probs, tv, token_changed = probe.check(self.max_probe_tv)
                self._gate.commit(envelope.new_version, new_hash)
            except (CdccaError, RuntimeError, ValueError) as err:
                self._load(current)
                raise DeltaRejectedError(f'probe after the swap failed, restored '
                                         f'v{self.version}: {err}') from err
            if not probe.shadow:
                t, steps['probe_ms'] = _lap(t)
            old_version = self.version
            self._previous = (self.version, self.base_hash, current, probe.ref)
            self._weights, probe.ref = candidate, probs
            self.version, self.base_hash, self.round = (envelope.new_version, new_hash,
                                                        envelope.round)
            swap_ms = (time.perf_counter() - t_swap) * 1e3
        self.applied += 1
        report = ApplyReport(round=envelope.round, old_version=old_version,
                             new_version=envelope.new_version,
                             payload_bytes=len(envelope.payload),
                             num_params=int(delta.values.numel()),
                             apply_ms=(time.perf_counter() - t0) * 1e3, swap_ms=swap_ms,
                             probe_answer=probe.text(probs),
                             extra={'steps_ms': steps, 'probe_tv': tv,
                                    'update_ratio': ratio,
                                    'probe_mode': 'traced' if probe.last_traced else 'eager',
                                    'probe_shadow': probe.shadow,
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
            self._weights, self._probe.ref = weights, probe_ref
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

    @property
    def probe_image(self) -> np.ndarray:
        """The probe's image (fixed at start)."""
        return self._probe.image

    @property
    def probe_question(self) -> str:
        """The probe's question."""
        return self._probe.question

    @property
    def probe_shadow(self) -> bool:
        """Whether candidates are probed on a shadow copy (answers wait only for the copy)."""
        return self._probe.shadow

    @property
    def probe_mode(self) -> str:
        """``'traced'`` or ``'eager'`` (and why), for diagnostics."""
        return self._probe.mode

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
        restored = restore_adapter(self.state_dir, self.device_id,
                                   self.model.load_trainable_state_dict)
        if restored is None:
            return False
        self.version, self.round = restored
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


def _lap(t: float) -> tuple[float, float]:
    """(now, ms since ``t``)."""
    now = time.perf_counter()
    return now, (now - t) * 1e3
