"""The cloud's side of Algorithm 1 for every device: collect, then run guarded rounds.

:class:`CloudRuntime` holds the teacher, one student module and, per device, a
:class:`~cdcca_ros.core.rounds.state.DeviceState` (the exact adapter the device holds, the
cloud's continuing trained copy, the replay memory, versions; checkpointed under
``state_dir/<device_id>/``). Uplinked samples go into the device's memory as they arrive
(:meth:`CloudRuntime.add_sample`); a round starts when enough arrived or the oldest waited
long enough (:meth:`CloudRuntime.due`) and is run by
:class:`~cdcca_ros.core.rounds.round.RoundRunner`: label, train on new + replay + anchor,
compress against the device's view, gate, sign. Between rounds the live audit may order a
signed rollback (:meth:`CloudRuntime.audit`), and samples whose labels the teacher could
not make from the kept tokens wait for the rest of their tokens
(:meth:`CloudRuntime.pull_requests`, :meth:`CloudRuntime.add_pulled`).

Caption samples (their question a ``describe`` question) go into the device's caption memory
instead, and run caption rounds of their own (:meth:`CloudRuntime.caption_due`,
:meth:`CloudRuntime.run_caption_round`, :mod:`cdcca_ros.core.captions.round`) when the cloud
has caption heads beside teacher and student; without them such samples are refused.

One student module serves every device: its trainable set (LoRA, norms, biases, query tokens,
the vision-side adapter) is loaded with the device's trained copy before a round. Only
adapters are kept per device.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.akd import AKDConfig
from cdcca_ros.core.captions.describe import is_describe
from cdcca_ros.core.captions.round import (
    CaptionRoundConfig,
    CaptionRoundRunner,
    caption_sample_error,
)
from cdcca_ros.core.refit import RefitConfig
from cdcca_ros.core.rounds.anchor import anchor_records
from cdcca_ros.core.rounds.config import GuardConfig
from cdcca_ros.core.rounds.extra_questions import (
    MAX_EXTRA_QUESTIONS,
    QuestionSource,
    derive,
    derived_id,
    question_source,
)
from cdcca_ros.core.rounds.memory import Record, audit_split, split_of
from cdcca_ros.core.rounds.round import AuditResult, RoundResult, RoundRunner
from cdcca_ros.core.rounds.state import DeviceState
from cdcca_ros.errors import ConfigError, WireError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from torch import Tensor

    from cdcca_ros.models.base import MLLM, VisionSpace

__all__ = ['CloudConfig', 'CloudRuntime', 'DeviceState', 'RoundResult', 'AuditResult',
           'check_sample']


@dataclass
class CloudConfig:
    """When rounds start and how they run.

    Attributes:
        min_samples: a round starts when this many samples are pending ...
        max_wait_s: ... or when the oldest pending sample waited this long (and >= 1 pending).
        akd: distillation settings (Eq. 5-6): loss weights, learning rate, batch size.
        codec: DWC codec name (``fp16``, ``nf4``, ``sparse``).
        codec_params: codec knobs (e.g. ``{'density': 0.05, 'bits': 2}`` for ``sparse``).
        budget_bytes: per-device byte budget of one delta payload; None: unlimited.
        refit: compression-aware refit (:mod:`cdcca_ros.core.refit`); ``refit.steps`` 0
            turns it off.
        refit_min_error: refit only when the plain payload's relative L2 error exceeds this.
        guard: the guarded round (memory, anchor, gate, audit, labels);
            :meth:`GuardConfig.plain` is the paper's round.
        captions: when caption rounds start and how they train.
    """

    min_samples: int = 64
    max_wait_s: float = 120.0
    akd: AKDConfig = field(default_factory=AKDConfig)
    codec: str = 'sparse'
    codec_params: dict[str, Any] = field(default_factory=dict)
    budget_bytes: int | None = 65536
    refit: RefitConfig = field(default_factory=RefitConfig)
    refit_min_error: float = 0.2
    guard: GuardConfig = field(default_factory=GuardConfig)
    captions: CaptionRoundConfig = field(default_factory=CaptionRoundConfig)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CloudConfig:
        """The settings a cloud node builds from its parameters (``round.*``, ``akd.*``,
        ``dwc.*``, ``guard.*``; every one present: the node's table gives the defaults)."""
        return cls(min_samples=params['round.min_samples'],
                   max_wait_s=params['round.max_wait_s'], akd=AKDConfig.from_params(params),
                   codec=params['dwc.codec'], budget_bytes=params['dwc.budget_bytes'],
                   refit=RefitConfig(steps=params['dwc.refit_steps']),
                   refit_min_error=params['dwc.refit_min_error'],
                   guard=GuardConfig.from_params(params),
                   captions=CaptionRoundConfig.from_params(params))

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise ConfigError(f'min_samples must be >= 1, got {self.min_samples}')
        if not self.max_wait_s > 0:
            raise ConfigError(f'max_wait_s must be > 0, got {self.max_wait_s}')
        if self.codec not in dwc.codec_names():
            raise ConfigError(f'unknown codec {self.codec!r}; known: {dwc.codec_names()}')
        if self.budget_bytes is not None and self.budget_bytes < 64:
            raise ConfigError(f'budget_bytes must be >= 64, got {self.budget_bytes}')
        if not self.refit_min_error >= 0:
            raise ConfigError(f'refit_min_error must be >= 0, got {self.refit_min_error}')


def check_sample(space: VisionSpace, device_id: str, tokens: Tensor, indices: Tensor | None,
                 num_tokens: int, token_dim: int) -> None:
    """Check that an uplinked sample lives in ``space``.

    Raises:
        WireError: Another token space, tokens not ``[K, D]``, or indices out of range.
    """
    if token_dim != space.dim or num_tokens != space.num_tokens:
        raise WireError(f'sample from {device_id!r} has {num_tokens} tokens of dim '
                        f'{token_dim}; this cloud expects {space.num_tokens} x {space.dim}')
    if tokens.dim() != 2 or tokens.shape[1] != token_dim:
        raise WireError(f'sample from {device_id!r}: tokens {tuple(tokens.shape)} are not '
                        f'[K, {token_dim}]')
    if indices is not None and (indices.numel() != tokens.shape[0] or (
            indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_tokens))):
        raise WireError(f'sample from {device_id!r} has token indices outside '
                        f'[0, {num_tokens}) or not one per token')


class CloudRuntime:
    """Teacher + one student module + per-device states.

    Args:
        teacher: the large MLLM (sharing the student's vision-token space).
        student: the device model's base, trainable set configured.
        private_key: Ed25519 key that signs deltas and rollback orders.
        cfg: round settings.
        state_dir: checkpoints; None keeps everything in memory.
        anchor: the anchor set file (see :mod:`cdcca_ros.core.rounds.anchor`); None: none.
        teacher_head, student_head: the caption heads beside teacher and student
            (:mod:`cdcca_ros.models.caption_head`); with both (and ``cfg.captions.enabled``)
            the cloud runs caption rounds, else it refuses caption samples.
    """

    def __init__(self, teacher: MLLM, student: MLLM, private_key: Ed25519PrivateKey,
                 cfg: CloudConfig, state_dir: str | Path | None = None,
                 anchor: str | Path | None = None, teacher_head: Any = None,
                 student_head: Any = None) -> None:
        from cdcca_ros.models.registry import check_vision_space

        check_vision_space(teacher, student)
        self.teacher, self.student, self.key = teacher, student, private_key
        self._cfg = cfg
        self.state_dir = Path(state_dir) if state_dir else None
        self.base = student.trainable_state_dict()
        self.base_hash = wire.state_dict_hash(self.base)
        self.space = student.vision_space()
        self.devices: dict[str, DeviceState] = {}
        guard = cfg.guard
        records = []
        if anchor is not None and guard.enabled:
            records = anchor_records(Path(anchor), student, guard.val_fraction,
                                     guard.anchor_gate_fraction, cfg.akd.max_new_tokens,
                                     limit=guard.anchor_limit)
        self.anchor = records
        self.runner = RoundRunner(teacher, student, private_key, cfg.akd, guard, cfg.codec,
                                  cfg.codec_params, cfg.budget_bytes, cfg.refit,
                                  cfg.refit_min_error, anchor=records)
        #: The caption rounds (None: this cloud refuses caption samples).
        self.captions: CaptionRoundRunner | None = None
        if cfg.captions.enabled and teacher_head is not None and student_head is not None:
            self.captions = CaptionRoundRunner(self.runner, teacher_head, student_head,
                                               cfg.captions, guard.anchor_gate_fraction)

    @property
    def cfg(self) -> CloudConfig:
        """The settings; setting them applies from the next round (the anchor set and the
        memory bounds of devices already loaded stay as they were)."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: CloudConfig) -> None:
        self._cfg = cfg
        self.runner.configure(cfg.akd, cfg.guard, cfg.codec, cfg.codec_params,
                              cfg.budget_bytes, cfg.refit, cfg.refit_min_error)
        if self.captions is not None:
            self.captions.cfg = cfg.captions  # (its anchor frames stay as they were)

    @property
    def _questions(self) -> QuestionSource | None:
        return question_source(self.cfg.guard.question_source)

    def device(self, device_id: str) -> DeviceState:
        """The state of ``device_id`` (resumed from its checkpoint, or fresh at the base).

        Raises:
            WireError: ``device_id`` is not a valid id (it names a folder of ``state_dir``).
        """
        state = self.devices.get(device_id)
        if state is None:
            wire.check_device_id(device_id)
            state = self.load_device(device_id,
                                     self.state_dir / device_id if self.state_dir else None)
        return state

    def load_device(self, device_id: str, directory: Path | None) -> DeviceState:
        """Load ``device_id``'s state from ``directory`` (a checkpoint folder; one without a
        checkpoint: fresh at the base; None: fresh, in memory only) and hold it in place of
        any held (the fleet's workers load a device's committed generation this way).

        Raises:
            WireError: ``device_id`` is not a valid id.
            ModelError: The checkpoint is unreadable.
        """
        wire.check_device_id(device_id)
        guard = self.cfg.guard
        kwargs = {'memory_bytes': guard.memory_bytes, 'clusters': guard.clusters,
                  'seed': self.cfg.akd.seed}
        state = (DeviceState.load(device_id, self.base, directory, **kwargs) if directory
                 else DeviceState(device_id, self.base, None, **kwargs))
        self.devices[device_id] = state
        return state

    def resume(self) -> list[str]:
        """Load every device checkpointed under ``state_dir`` (after a restart: samples that
        arrived before it are pending again, so their round runs without waiting for a new
        one); returns their ids.

        Raises:
            ModelError: A checkpoint is unreadable.
        """
        if self.state_dir is None or not self.state_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.state_dir.iterdir()):
            if not folder.is_dir() or not (
                    (folder / 'state.json').is_file()
                    or any((folder / 'memory').glob('*.safetensors'))
                    or any((folder / 'captions').glob('*.safetensors'))):
                continue
            try:
                wire.check_device_id(folder.name)
            except WireError:
                continue  # not a device folder
            self.device(folder.name)
            found.append(folder.name)
        return found

    def _check(self, device_id: str, tokens: Tensor, indices: Tensor | None,
               num_tokens: int, token_dim: int) -> None:
        check_sample(self.space, device_id, tokens, indices, num_tokens, token_dim)

    def add_sample(self, device_id: str, tokens: Tensor, indices: Tensor | None, question: str,
                   num_tokens: int, token_dim: int, sample_id: str = '', *,
                   device_answer: str = '', device_version: int = -1, audit: bool = False,
                   label: str | None = None, now: float | None = None,
                   answer: Callable[[str], str | None] | None = None) -> bool:
        """Keep one uplinked sample; False when ``sample_id`` was already taken (a
        re-delivery after a restart).

        ``label`` gives the sample's answer instead of the teacher's (true labels: the
        oracle of the benchmarks) and ``answer`` the true answer of any other question about
        the frame (the questions the cloud derives, ``guard.extra_questions``; without it a
        labelled sample gets none); ``now`` is the arrival time on :func:`time.monotonic`'s
        clock (a simulation passes its own).

        A training-split sample also brings up to ``guard.extra_questions`` questions the
        cloud asks of the same tokens, a gate-split one up to ``guard.gate_questions``
        (:mod:`cdcca_ros.core.rounds.extra_questions`).

        A sample whose question asks for a caption (:func:`~cdcca_ros.core.captions.describe.
        is_describe`) goes to the device's caption memory (train or gate split; never an
        audit sample, never pulled).

        Raises:
            WireError: the tokens do not live in this cloud's vision-token space, or a caption
                sample reaches a cloud without caption rounds.
        """
        import torch

        self._check(device_id, tokens, indices, num_tokens, token_dim)
        caption = is_describe(question)
        if caption and self.captions is None:
            raise WireError(caption_sample_error(question))
        state = self.device(device_id)
        if sample_id and (sample_id in state.recent_ids or sample_id in state.memory
                          or sample_id in state.captions):
            return False
        memory = state.captions if caption else state.memory
        sid = sample_id or f'{device_id}-cloud-{"c" if caption else ""}{memory.next_seq}'
        guard = self.cfg.guard
        if indices is not None and indices.numel() == num_tokens and bool(
                (indices.long() == torch.arange(num_tokens)).all()):
            indices = None  # all tokens in order
        if caption:
            audit = False  # the audit watches answers
            split = split_of(sid, 0.0, guard.gate_fraction) if guard.enabled else 'train'
        else:
            split = (audit_split(sid, guard.audit_gate_fraction) if audit and guard.enabled
                     else split_of(sid, guard.val_fraction, guard.gate_fraction))
        record = Record(sample_id=sid, seq=memory.next_seq,
                        tokens=tokens.detach().to(torch.float16),
                        indices=None if indices is None else indices.detach().long(),
                        question=question, split=split, device_answer=device_answer,
                        device_version=int(device_version), audit=bool(audit))
        if label is not None:
            record.label, record.labelled, record.confidence = label or None, True, 1.0
            record.label_tokens = int(tokens.shape[0])
        memory.add(record)
        if ((guard.extra_questions or guard.gate_questions) and not caption and guard.enabled
                and (label is None or answer is not None)):
            for extra in derive(record, self._questions, guard.extra_questions,
                                memory.next_seq, answer, gate=guard.gate_questions):
                memory.add(extra)
                state.counters['derived_questions'] += 1
        state.recent_ids.append(sid)
        state.samples_seen += 1
        arrived = time.monotonic() if now is None else now
        if caption:
            state.counters['caption_samples'] += 1
            if state.caption_first_pending_t is None:
                state.caption_first_pending_t = arrived
            return True
        if audit:
            state.counters['audit_samples'] += 1
        if state.first_pending_t is None:
            state.first_pending_t = arrived
        return True

    def label(self, device_id: str) -> list[str]:
        """Label what arrived for ``device_id``; the sample ids whose remaining tokens the
        cloud asks the device for."""
        return self.runner.label(self.device(device_id))

    def pull_requests(self, device_id: str) -> list[str]:
        """Sample ids waiting for the rest of their tokens."""
        return [r.sample_id for r in self.device(device_id).memory.select()
                if r.pull == 'requested']

    def add_pulled(self, device_id: str, sample_id: str, tokens: Tensor,
                   indices: Tensor | None) -> bool:
        """Merge the tokens a device sent for a pull; False when the sample is unknown or
        was not asked for. The sample is labelled again, from every token, next round.

        Raises:
            WireError: the tokens do not fit the sample.
        """
        import torch

        state = self.device(device_id)
        record = state.memory.get(sample_id)
        if record is None or record.pull != 'requested':
            return False
        self._check(device_id, tokens, indices, self.space.num_tokens, self.space.dim)
        full = torch.zeros(self.space.num_tokens, self.space.dim, dtype=torch.float16)
        have = torch.zeros(self.space.num_tokens, dtype=torch.bool)
        old_idx = (torch.arange(self.space.num_tokens) if record.indices is None
                   else record.indices.long())
        full[old_idx] = record.tokens.to(torch.float16)
        have[old_idx] = True
        new_idx = torch.arange(self.space.num_tokens) if indices is None else indices.long()
        full[new_idx] = tokens.detach().to(torch.float16)
        have[new_idx] = True
        kept = torch.nonzero(have).flatten()
        record.tokens = full[kept]
        record.indices = None if bool(have.all()) else kept
        record.labelled, record.label, record.targets, record.pull = False, None, None, 'done'
        state.memory.update(record)
        # Its derived questions (those still in memory) are asked again of every token.
        for j in range(MAX_EXTRA_QUESTIONS):
            child = state.memory.get(derived_id(sample_id, j))
            if child is not None:
                child.tokens, child.indices = record.tokens, record.indices
                child.labelled, child.label, child.targets = False, None, None
                state.memory.update(child)
        state.counters['pulled'] += 1
        return True

    def pull_unavailable(self, device_id: str, sample_id: str) -> None:
        """The device no longer holds a sample's tokens: use the first label (or drop it)."""
        state = self.device(device_id)
        record = state.memory.get(sample_id)
        if record is None or record.pull != 'requested':
            return
        record.pull = 'unavailable'
        if not self.cfg.guard.labels.trusted(record):
            record.label = None
        state.counters['pulls_unavailable'] += 1
        state.memory.update(record)

    def due(self, device_id: str, now: float | None = None) -> bool:
        """Whether a round should start for ``device_id``."""
        state = self.device(device_id)
        pending = state.pending()
        if not pending:
            return False
        if pending >= self.cfg.min_samples:
            return True
        now = time.monotonic() if now is None else now
        return now - (state.first_pending_t or now) >= self.cfg.max_wait_s

    def caption_due(self, device_id: str, now: float | None = None) -> bool:
        """Whether a caption round should start for ``device_id``."""
        if self.captions is None:
            return False
        state = self.device(device_id)
        pending = state.caption_pending()
        if not pending:
            return False
        cfg = self.cfg.captions
        if pending >= cfg.min_samples:
            return True
        now = time.monotonic() if now is None else now
        return now - (state.caption_first_pending_t or now) >= cfg.max_wait_s

    def run_caption_round(self, device_id: str) -> RoundResult | None:
        """Label the caption samples with the teacher's captions, distil, compress, gate on
        CIDEr-D, sign (:mod:`cdcca_ros.core.captions.round`). None when no caption sample can
        train; a refused round returns a result without an envelope.

        Raises:
            ConfigError: This cloud runs no caption rounds.
        """
        if self.captions is None:
            raise ConfigError('this cloud runs no caption rounds (no caption heads)')
        return self.captions.run(self.device(device_id), self.cfg.guard, self.cfg.akd)

    def run_round(self, device_id: str, progress: bool = False) -> RoundResult | None:
        """Label, train, compress, gate, sign. Returns None when nothing could be learnt;
        a refused round returns a result without an envelope."""
        del progress
        return self.runner.run(self.device(device_id))

    def audit(self, device_id: str) -> AuditResult | None:
        """The live audit of the version ``device_id`` runs; its ``rollback`` (signed) is set
        when that version must be withdrawn. Call :meth:`rolled_back` once it is sent."""
        return self.runner.audit(self.device(device_id))

    def rolled_back(self, device_id: str, new_version: int, restored_hash: str) -> bool:
        """Mirror a rollback the device carried out (ordered by the audit, or its own entropy
        guard): the view returns to the kept version with ``restored_hash`` under
        ``new_version``, and training restarts from it. A report whose version this cloud
        has just used for a delta (the device rolled back on its own meanwhile and refused it)
        is adopted too: the next delta names the device's real base. False when the weights
        are unknown or the report is older than what the cloud holds.
        """
        state = self.device(device_id)
        found = state.view_of_hash(restored_hash)
        if found is None or new_version < state.version:
            return False
        if new_version == state.version and restored_hash == state.hash:
            return True  # already mirrored
        # new_version == state.version with another hash: the device rolled back on its own
        # while this cloud shipped that version; the device refused the delta and holds the
        # restored weights under that number. The device is right about what it holds.
        _, view = found
        state.feedback = dwc.ErrorFeedback(view)
        state.trained = {k: v.clone() for k, v in view.items()}
        state.version, state.hash = int(new_version), restored_hash
        state.remember(state.version, restored_hash, view)
        state.ship_seq = state.memory.next_seq
        state.refusals = 0
        state.counters['rollbacks'] += 1
        state.save()
        return True

    def save(self) -> None:
        """Checkpoint every device's state (the memory persists record by record)."""
        for state in list(self.devices.values()):
            state.save()

    def status(self, device_id: str) -> dict[str, Any]:
        """Figures for diagnostics."""
        state = self.device(device_id)
        out = {'version': state.version, 'round': state.round, 'pending': state.pending(),
               **state.counters, 'memory_bytes': state.memory.nbytes,
               'memory_records': len(state.memory)}
        if self.captions is not None:
            out.update(caption_pending=state.caption_pending(),
                       caption_records=len(state.captions))
        return out
