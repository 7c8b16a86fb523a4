"""The cloud's side of Algorithm 1, per device: collect, pseudo-label, distil, compress, sign.

For every device the cloud keeps (all checkpointed under ``state_dir/<device_id>/`` with atomic
writes, so a restart resumes where it stopped):

- ``view``: exactly the adapter the device holds (base + every decoded delta), its version and
  hash — a delta names this base, and the device refuses any other;
- ``trained``: the cloud's own continuing copy of that device's adapter. Each round starts
  from it, so what compression dropped in earlier rounds (``trained - view``) is part of the
  next delta: that is the error feedback of DWC;
- the samples received since the last round (``pending/``, one safetensors file each).

A round's delta goes out as a compact DWC payload (no tensor index: the device decodes it
against its own trainable set) under the byte budget; when the plain payload is lossy
(relative error above ``refit_min_error``), the kept coordinates are first retrained on the
round's samples through the codec (:mod:`cdcca_ros.core.refit`).

One student module serves every device: its trainable set (LoRA, norms, biases, query tokens)
is loaded with the device's ``trained`` copy before a round. Only adapters are kept per device.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.akd import AKDConfig, AkdSample, AKDTrainer
from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.refit import RefitConfig, RefitResult, akd_task_loss, refit_compress
from cdcca_ros.core.updates import DeltaEnvelope, seal_delta
from cdcca_ros.errors import ConfigError, ModelError, WireError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from torch import Tensor

    from cdcca_ros.models.base import MLLM


RECENT_IDS = 10_000  # sample ids remembered per device for deduplication


@dataclass
class CloudConfig:
    """When rounds start and how deltas are made.

    Attributes:
        min_samples: a round starts when this many samples are pending ...
        max_wait_s: ... or when the oldest pending sample waited this long (and >= 1 pending).
        akd: distillation settings (Eq. 5-6).
        codec: DWC codec name (``fp16``, ``nf4``, ``sparse``).
        codec_params: codec knobs (e.g. ``{'density': 0.05, 'bits': 2}`` for ``sparse``).
        budget_bytes: per-device byte budget of one delta payload; None: unlimited.
        refit: compression-aware refit (:mod:`cdcca_ros.core.refit`); ``refit.steps`` 0
            turns it off.
        refit_min_error: refit only when the plain payload's relative L2 error exceeds this
            (a payload that already carries the delta closely gains nothing from it).
    """

    min_samples: int = 32
    max_wait_s: float = 120.0
    akd: AKDConfig = field(default_factory=AKDConfig)
    codec: str = 'sparse'
    codec_params: dict[str, Any] = field(default_factory=dict)
    budget_bytes: int | None = 65536
    refit: RefitConfig = field(default_factory=RefitConfig)
    refit_min_error: float = 0.2

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


@dataclass
class RoundResult:
    """What one round produced for one device."""

    device_id: str
    round: int
    envelope: DeltaEnvelope
    samples: int
    losses: list[dict[str, float]]
    stats: dwc.CompressStats
    agreement_before: float
    agreement_after: float
    train_s: float
    refit: RefitResult | None = None




class DeviceState:
    """What the cloud keeps for one device (see the module docstring)."""

    def __init__(self, device_id: str, base: dict[str, Tensor], directory: Path | None) -> None:
        self.device_id = device_id
        self.dir = directory
        self.version = 0
        self.round = 0
        self.feedback = dwc.ErrorFeedback(base)
        self.trained = {k: v.detach().clone() for k, v in base.items()}
        self.hash = wire.state_dict_hash(self.feedback.view)
        self.pending: list[AkdSample] = []
        self.pending_files: list[Path] = []
        self.first_pending_t: float | None = None
        self.samples_seen = 0
        self.next_sample_file = 0
        # Sample ids already taken, kept across restarts: the link delivers at least once, so
        # a sample re-delivered after a crash of the cloud must not be trained on twice.
        self.recent_ids: deque[str] = deque(maxlen=RECENT_IDS)

    # ---------------------------------------------------------------- persistence
    def save(self) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / 'trained.safetensors',
                      save({k: v.contiguous() for k, v in self.trained.items()}))
        atomic_write(self.dir / 'feedback.safetensors',
                      save({k: v.contiguous() for k, v in self.feedback.state_dict().items()}))
        record = {'device_id': self.device_id, 'version': self.version, 'round': self.round,
                  'hash': self.hash, 'samples_seen': self.samples_seen,
                  'next_sample_file': self.next_sample_file,
                  'recent_ids': list(self.recent_ids)}
        atomic_write(self.dir / 'state.json', json.dumps(record).encode())

    @classmethod
    def load(cls, device_id: str, base: dict[str, Tensor], directory: Path) -> DeviceState:
        """Resume from ``directory`` when it holds a checkpoint, else start from ``base``."""
        from safetensors.torch import load

        state = cls(device_id, base, directory)
        if not (directory / 'state.json').is_file():
            # No round yet, but samples may have arrived before a restart.
            state._load_pending(directory)
            return state
        try:
            record = json.loads((directory / 'state.json').read_text())
            state.trained = load((directory / 'trained.safetensors').read_bytes())
            state.feedback = dwc.ErrorFeedback.from_state_dict(
                load((directory / 'feedback.safetensors').read_bytes()))
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f'cloud checkpoint of {device_id!r} in {directory} is unreadable: '
                             f'{err}') from err
        if state.feedback.view_hash() != record['hash']:
            raise ModelError(f'cloud checkpoint of {device_id!r}: view hash does not match')
        state.version, state.round = int(record['version']), int(record['round'])
        state.hash = record['hash']
        state.samples_seen = int(record.get('samples_seen', 0))
        state.next_sample_file = int(record.get('next_sample_file', 0))
        state.recent_ids.extend(record.get('recent_ids', []))
        state._load_pending(directory)
        return state

    def _load_pending(self, directory: Path) -> None:
        for path in sorted((directory / 'pending').glob('*.safetensors')):
            self._load_sample(path)
            # Samples added after the last checkpoint: never reuse their file names.
            self.next_sample_file = max(self.next_sample_file, int(path.stem) + 1)

    def add(self, sample: AkdSample, sample_id: str = '') -> bool:
        """Queue a sample (persisted); False when ``sample_id`` was already taken."""
        if sample_id and sample_id in self.recent_ids:
            return False
        if self.dir is not None:
            from safetensors.torch import save

            pending = self.dir / 'pending'
            pending.mkdir(parents=True, exist_ok=True)
            tensors = {'tokens': sample.tokens.contiguous()}
            if sample.indices is not None:
                tensors['indices'] = sample.indices.contiguous()
            path = pending / f'{self.next_sample_file:012d}.safetensors'
            self.next_sample_file += 1
            atomic_write(path, save(tensors, metadata={'question': sample.question,
                                                       'sample_id': sample_id}))
            self.pending_files.append(path)
        self.pending.append(sample)
        if sample_id:
            self.recent_ids.append(sample_id)
        self.samples_seen += 1
        if self.first_pending_t is None:
            self.first_pending_t = time.monotonic()
        return True

    def _load_sample(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            question = meta.get('question', '')
            if meta.get('sample_id'):
                self.recent_ids.append(meta['sample_id'])
            tokens = f.get_tensor('tokens')
            indices = f.get_tensor('indices') if 'indices' in f.keys() else None
        self.pending.append(AkdSample(tokens=tokens, indices=indices, question=question))
        self.pending_files.append(path)
        if self.first_pending_t is None:
            self.first_pending_t = time.monotonic()

    def clear_pending(self) -> None:
        for path in self.pending_files:
            path.unlink(missing_ok=True)
        self.pending, self.pending_files, self.first_pending_t = [], [], None


class CloudRuntime:
    """Teacher + one student module + per-device adapter states.

    Args:
        teacher: the large MLLM (sharing the student's vision-token space).
        student: the device model's base, trainable set configured.
        private_key: Ed25519 key that signs deltas.
        cfg: round and compression settings.
        state_dir: checkpoints; None keeps everything in memory.
    """

    def __init__(self, teacher: MLLM, student: MLLM, private_key: Ed25519PrivateKey,
                 cfg: CloudConfig, state_dir: str | Path | None = None) -> None:
        from cdcca_ros.models.registry import check_vision_space

        check_vision_space(teacher, student)
        self.teacher, self.student, self.key, self.cfg = teacher, student, private_key, cfg
        self.state_dir = Path(state_dir) if state_dir else None
        self.base = student.trainable_state_dict()
        self.base_hash = wire.state_dict_hash(self.base)
        space = student.vision_space()
        self.space = space
        self.devices: dict[str, DeviceState] = {}

    def device(self, device_id: str) -> DeviceState:
        """The state of ``device_id`` (resumed from its checkpoint, or fresh at the base).

        Raises:
            WireError: ``device_id`` is not a valid id (it names a folder of ``state_dir``).
        """
        state = self.devices.get(device_id)
        if state is None:
            wire.check_device_id(device_id)
            directory = self.state_dir / device_id if self.state_dir else None
            state = (DeviceState.load(device_id, self.base, directory) if directory
                     else DeviceState(device_id, self.base, None))
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
            if not folder.is_dir() or not ((folder / 'state.json').is_file()
                                           or any((folder / 'pending').glob('*.safetensors'))):
                continue
            try:
                wire.check_device_id(folder.name)
            except WireError:
                continue  # not a device folder
            self.device(folder.name)
            found.append(folder.name)
        return found

    def add_sample(self, device_id: str, tokens: Tensor, indices: Tensor | None, question: str,
                   num_tokens: int, token_dim: int, sample_id: str = '') -> bool:
        """Queue one uplinked sample; False when ``sample_id`` was already taken (a
        re-delivery after a restart).

        Raises:
            WireError: the tokens do not live in this cloud's vision-token space.
        """
        if token_dim != self.space.dim or num_tokens != self.space.num_tokens:
            raise WireError(f'sample from {device_id!r} has {num_tokens} tokens of dim '
                            f'{token_dim}; this cloud expects {self.space.num_tokens} x '
                            f'{self.space.dim}')
        if indices is not None and (indices.numel() and (int(indices.min()) < 0 or
                                                         int(indices.max()) >= num_tokens)):
            raise WireError(f'sample from {device_id!r} has token indices outside '
                            f'[0, {num_tokens})')
        return self.device(device_id).add(AkdSample(tokens=tokens.float(), indices=indices,
                                                    question=question), sample_id)

    def due(self, device_id: str, now: float | None = None) -> bool:
        """Whether a round should start for ``device_id``."""
        state = self.device(device_id)
        if not state.pending:
            return False
        if len(state.pending) >= self.cfg.min_samples:
            return True
        now = time.monotonic() if now is None else now
        return now - (state.first_pending_t or now) >= self.cfg.max_wait_s

    def _agreement(self, samples: list[AkdSample]) -> float:
        """Share of samples where the student's answer equals the teacher's pseudo-label."""
        if not samples:
            return float('nan')
        hits = 0
        for s in samples:
            answer = self.student.answer_from_tokens(
                s.tokens.unsqueeze(0), None if s.indices is None else s.indices.unsqueeze(0),
                [s.question])[0].text
            hits += int(answer.strip() == (s.answer or '').strip())
        return hits / len(samples)

    def run_round(self, device_id: str, progress: bool = False) -> RoundResult | None:
        """Pseudo-label, distil, compress, sign. Returns None when nothing could be learnt."""
        state = self.device(device_id)
        samples = list(state.pending)
        if not samples:
            return None
        t0 = time.perf_counter()
        self.student.load_trainable_state_dict(state.trained)
        trainer = AKDTrainer(self.teacher, self.student, self.cfg.akd, progress=progress)
        labelled = trainer.label(samples)
        if not labelled:
            state.clear_pending()
            state.save()
            return None
        self.student.torch_model.eval()
        before = self._agreement(labelled)
        losses = trainer.fit(labelled)
        self.student.torch_model.eval()
        after = self._agreement(labelled)
        trained = self.student.trainable_state_dict()
        delta = dwc.compute_delta(trained, state.feedback.view)
        compressed, refitted = self._compress(delta, labelled, trainer, state.feedback.view)
        # The device adds exactly compressed.decoded; the rest stays in trained - view and
        # goes out with the next round's delta (error feedback).
        state.feedback.commit(delta, compressed.decoded)
        new_hash = state.feedback.view_hash()
        envelope = seal_delta(self.key, device_id=device_id, round=state.round + 1,
                              base_version=state.version, base_hash=state.hash,
                              new_version=state.version + 1, new_hash=new_hash,
                              codec=compressed.codec.name, payload=compressed.payload)
        state.trained = trained
        state.version += 1
        state.round += 1
        state.hash = new_hash
        state.clear_pending()
        state.save()
        return RoundResult(device_id=device_id, round=state.round, envelope=envelope,
                           samples=len(labelled), losses=losses, stats=compressed.stats,
                           agreement_before=before, agreement_after=after,
                           train_s=time.perf_counter() - t0, refit=refitted)

    def _compress(self, delta: dict[str, Tensor], labelled: list[AkdSample],
                  trainer: AKDTrainer, view: dict[str, Tensor]
                  ) -> tuple[dwc.Compressed, RefitResult | None]:
        """The payload of a round: compact (the device knows its trainable set), under the
        budget, refitted on the round's samples when the plain payload is too lossy."""
        codec = dwc.get_codec(self.cfg.codec, **self.cfg.codec_params)
        plain = dwc.compress(delta, codec, self.cfg.budget_bytes, self_describing=False)
        if self.cfg.refit.steps == 0 or plain.stats.rel_l2_error <= self.cfg.refit_min_error:
            return plain, None
        result = refit_compress(self.student, labelled, view, delta, codec,
                                self.cfg.budget_bytes, self.cfg.refit,
                                task_loss=akd_task_loss(trainer))
        self.student.torch_model.eval()
        return result.compressed, result
