"""The device's model runtime: answering, UTS hand-off and hot-apply of deltas (no rclpy).

One :class:`DeviceRuntime` owns the on-device MLLM. Answers and weight swaps take the same lock,
so a delta is swapped in *between* two answers: everything slow (signature check, decoding,
building the candidate weights, the finite check) happens outside the lock, and only the
in-place load of the trainable tensors and one probe answer happen inside it. A candidate that
fails the probe is swapped back out before the lock is released, so no answer ever sees it.

The adapter in use is persisted (safetensors + a JSON record, written atomically) so a restart
comes back on it; the previous adapter is kept in memory for :meth:`rollback`.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.updates import DeltaEnvelope, DeltaGate, RejectReason
from cdcca_ros.core.uts import answer_entropy
from cdcca_ros.errors import CdccaError, DeltaRejectedError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from torch import Tensor

    from cdcca_ros.models.base import MLLM, AnswerResult

STATE_FILE = 'adapter.json'
WEIGHTS_FILE = 'adapter.safetensors'


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


@dataclass
class ApplyReport:
    """What one hot-apply did."""

    round: int
    old_version: int
    new_version: int
    payload_bytes: int
    num_params: int
    apply_ms: float          # verify + decode + build + swap + probe
    swap_ms: float           # time the answer lock was held
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




class DeviceRuntime:
    """The on-device model behind a lock, with verified hot-apply and rollback.

    Args:
        model: the on-device MLLM (its trainable set already configured).
        device_id: this device's id (deltas name it).
        public_key: the cloud's Ed25519 key; None refuses every delta.
        state_dir: where the adapter in use is persisted; None: not persisted.
        probe_image: image for the probe answer after a swap (default: mid-grey).
        probe_question: question for the probe answer.
        max_new_tokens: longest answer.
    """

    def __init__(self, model: MLLM, device_id: str, public_key: Ed25519PublicKey | None = None,
                 state_dir: str | Path | None = None, probe_image: np.ndarray | None = None,
                 probe_question: str = 'what color is the object?', max_new_tokens: int = 6
                 ) -> None:
        self.model = model
        self.device_id = device_id
        self.public_key = public_key
        self.state_dir = Path(state_dir) if state_dir else None
        self.probe_image = (probe_image if probe_image is not None
                            else np.full((64, 64, 3), 128, np.uint8))
        self.probe_question = probe_question
        self.max_new_tokens = max_new_tokens
        self.lock = threading.RLock()
        self.version = 0
        self.round = 0
        self._previous: tuple[int, str, dict[str, Tensor]] | None = None
        self.rejected = 0
        self.applied = 0
        self._restore()
        self.base_hash = wire.state_dict_hash(self.model.trainable_state_dict())
        self._gate = self._make_gate()

    # ------------------------------------------------------------------ answering
    def answer(self, image: np.ndarray, question: str, choices: Sequence[str] = ()
               ) -> AnsweredSample:
        """Answer ``question`` about ``image`` (RGB uint8), keeping the vision tokens for UTS."""
        prompt = format_question(question, choices)
        with self.lock:
            t0 = time.perf_counter()
            tokens = self.model.vision_tokens([image])
            result: AnswerResult = self.model.answer_from_tokens(
                tokens, None, [prompt], max_new_tokens=self.max_new_tokens)[0]
            latency = (time.perf_counter() - t0) * 1e3
            version = self.version
        stats = answer_entropy(result.step_probs)
        probs = np.asarray(result.token_probs, dtype=np.float64)
        confidence = float(np.exp(np.log(np.clip(probs, 1e-12, 1.0)).mean())) if probs.size \
            else 0.0
        return AnsweredSample(
            question=question, text=result.text, choice_index=match_choice(result.text, choices),
            confidence=confidence, entropy_mean=float(stats.mean), entropy_max=float(stats.max),
            step_probs=result.step_probs, tokens=tokens[0].detach(), version=version,
            latency_ms=latency)

    def mc_token_features(self, tokens: Tensor, p: float, num_masks: int) -> Tensor:
        """UTS stage 2 features through the device model, under the model lock."""
        with self.lock:
            return self.model.mc_token_features(tokens, p, num_masks)

    # ------------------------------------------------------------------ updates
    def _make_gate(self) -> DeltaGate | None:
        if self.public_key is None:
            return None
        return DeltaGate(self.device_id, self.public_key, self.version, self.base_hash,
                         self.model.trainable_state_dict())

    def apply(self, envelope: DeltaEnvelope) -> ApplyReport:
        """Verify, decode, apply on a copy, swap in between two answers, probe, commit.

        Raises:
            DeltaRejectedError: refused or failed; the model and version are unchanged.
        """
        t0 = time.perf_counter()
        try:
            return self._apply(envelope, t0)
        except DeltaRejectedError:
            self.rejected += 1
            raise

    def _apply(self, envelope: DeltaEnvelope, t0: float) -> ApplyReport:
        if self._gate is None:
            raise DeltaRejectedError('no cloud public key is configured: every delta is refused')
        delta = self._gate.accept(envelope)  # signature, device, version, base, finite, shapes
        current = self.model.trainable_state_dict()
        candidate = dwc.apply_delta(current, delta)
        for name, t in candidate.items():
            if t.numel() and not bool(t.isfinite().all()):
                raise DeltaRejectedError(f'applying the delta makes {name!r} non-finite')
        new_hash = wire.state_dict_hash(candidate)
        if new_hash != envelope.new_hash:
            raise DeltaRejectedError(
                f'{RejectReason.HASH_MISMATCH.value}: weights after applying hash to '
                f'{new_hash[:12]}, the cloud computed {envelope.new_hash[:12]}')
        with self.lock:
            t_swap = time.perf_counter()
            self.model.load_trainable_state_dict(candidate)
            try:
                probe = self.model.answer([self.probe_image], [self.probe_question],
                                          max_new_tokens=self.max_new_tokens)[0]
                if not np.isfinite(probe.step_probs).all():
                    raise ModelError('probe answer produced non-finite probabilities')
            except (CdccaError, RuntimeError, ValueError) as err:
                self.model.load_trainable_state_dict(current)
                raise DeltaRejectedError(f'probe answer failed after the swap, restored '
                                         f'v{self.version}: {err}') from err
            self._gate.commit(envelope.new_version, new_hash)
            old_version = self.version
            self._previous = (self.version, self.base_hash, current)
            self.version, self.base_hash, self.round = (envelope.new_version, new_hash,
                                                        envelope.round)
            swap_ms = (time.perf_counter() - t_swap) * 1e3
        self.applied += 1
        self._persist(candidate)
        return ApplyReport(round=envelope.round, old_version=old_version,
                           new_version=envelope.new_version, payload_bytes=len(envelope.payload),
                           num_params=dwc.num_params(delta),
                           apply_ms=(time.perf_counter() - t0) * 1e3, swap_ms=swap_ms,
                           probe_answer=probe.text)

    def rollback(self) -> int:
        """Restore the adapter held before the last apply; returns the version now in use.

        The version number stays monotonic: the restored weights get a new, higher version so
        the cloud's next delta (which must name this base) is unambiguous.

        Raises:
            DeltaRejectedError: nothing to roll back to.
        """
        if self._previous is None:
            raise DeltaRejectedError('nothing to roll back to')
        _, _, weights = self._previous
        with self.lock:
            self.model.load_trainable_state_dict(weights)
            self.version += 1
            self.base_hash = wire.state_dict_hash(weights)
            self._previous = None
            self._gate = self._make_gate()
        self._persist(weights)
        return self.version

    # ------------------------------------------------------------------ persistence
    def _persist(self, weights: dict[str, Tensor]) -> None:
        if self.state_dir is None:
            return
        from safetensors.torch import save

        self.state_dir.mkdir(parents=True, exist_ok=True)
        blob = save({k: v.detach().contiguous().cpu() for k, v in weights.items()})
        atomic_write(self.state_dir / WEIGHTS_FILE, blob)
        record = {'device_id': self.device_id, 'version': self.version, 'round': self.round,
                  'hash': self.base_hash}
        atomic_write(self.state_dir / STATE_FILE, json.dumps(record).encode())

    def _restore(self) -> None:
        if self.state_dir is None or not (self.state_dir / STATE_FILE).is_file():
            return
        from safetensors.torch import load

        try:
            record = json.loads((self.state_dir / STATE_FILE).read_text())
            weights = load((self.state_dir / WEIGHTS_FILE).read_bytes())
            if wire.state_dict_hash(weights) != record['hash']:
                raise ModelError('persisted adapter does not match its recorded hash')
            if record.get('device_id') != self.device_id:
                raise ModelError(f'persisted adapter belongs to {record.get("device_id")!r}')
            self.model.load_trainable_state_dict(weights)
        except (OSError, KeyError, ValueError, CdccaError) as err:
            raise ModelError(f'cannot restore the adapter persisted in {self.state_dir}: {err}; '
                             'move the folder away to start from the base model') from err
        self.version, self.round = int(record['version']), int(record.get('round', 0))

    def status(self) -> dict[str, Any]:
        return {'device_id': self.device_id, 'version': self.version, 'round': self.round,
                'hash': self.base_hash[:16], 'applied': self.applied, 'rejected': self.rejected,
                'can_roll_back': self._previous is not None,
                'verifying': self.public_key is not None}

