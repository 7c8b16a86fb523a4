"""What the cloud keeps per device between rounds, checkpointed atomically (no rclpy).

Under ``<state_dir>/<device_id>/``:

- ``state.json``: version, round, hash of what the device holds, counters, where the
  ``new`` slice of the gate starts (``ship_seq``), consecutive refusals, audit figures;
- ``feedback.safetensors``: the device's exact view (base + every decoded delta) and the
  compression residual (error feedback, :class:`~cdcca_ros.core.dwc.ErrorFeedback`);
- ``trained.safetensors``: the cloud's continuing trained copy (a refused candidate keeps
  training from here);
- ``projectors.safetensors``: AKD's projectors (phi of Eq. 5) of this device;
- ``history/<version>.safetensors``: the views of the last few shipped versions (what a
  rollback restores, what the audit compares against);
- ``memory/``: the replay memory (:class:`~cdcca_ros.core.rounds.memory.Memory`);
- ``captions/``: the caption samples, kept apart from the answers' (same record format; the
  caption round of :mod:`cdcca_ros.core.captions.round` reads them).

Every file is written with :func:`~cdcca_ros.core.atomic.atomic_write` and ``state.json``
last, so a crash between two writes restarts on a consistent older state.
"""
from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.rounds.memory import Memory
from cdcca_ros.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

RECENT_IDS = 10_000  # sample ids remembered per device for deduplication
HISTORY = 4          # shipped versions whose views are kept


def _save_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, str] | None = None
                  ) -> None:
    from safetensors.torch import save

    atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    return load(path.read_bytes())


class DeviceState:
    """One device's state (see the module docstring).

    Args:
        device_id: The device.
        base: The trainable state every device starts from.
        directory: Checkpoint folder; None keeps everything in memory.
        memory_bytes: Bound of the replay memory.
        clusters: Largest number of memory clusters.
        seed: Seed of clustering and sampling.
    """

    def __init__(self, device_id: str, base: dict[str, Tensor], directory: Path | None,
                 memory_bytes: int = 64 << 20, clusters: int = 6, seed: int = 0) -> None:
        self.device_id = device_id
        self.dir = directory
        self.version = 0
        self.round = 0
        self.feedback = dwc.ErrorFeedback(base)
        self.trained = {k: v.detach().clone() for k, v in base.items()}
        self.projectors: dict[str, Tensor] = {}
        self.hash = wire.state_dict_hash(self.feedback.view)
        self.memory = Memory(memory_bytes, directory / 'memory' if directory else None,
                             clusters=clusters, seed=seed)
        #: Caption samples (``describe`` questions): never in an answer round.
        self.captions = Memory(memory_bytes, directory / 'captions' if directory else None,
                               clusters=1, seed=seed)
        self.caption_round_seq = 0   # caption records from here on: the next caption round's
        self.caption_ship_seq = 0    # caption gate's 'new' slice: caption records from here on
        self.caption_first_pending_t: float | None = None
        self.ship_seq = 0            # gate's 'new' slice: records from here on
        # Records from here on are this round's: all of them before any round ran (a memory
        # found on disk without a checkpoint holds samples of a round that never ran).
        self.round_seq = 0
        self.refusals = 0            # consecutive refused candidates
        self.first_pending_t: float | None = None
        self.samples_seen = 0
        self.counters: dict[str, int] = {'shipped': 0, 'refused': 0, 'rollbacks': 0,
                                         'resets': 0, 'pulls_requested': 0, 'pulled': 0,
                                         'pulls_unavailable': 0, 'audit_samples': 0,
                                         'caption_samples': 0, 'caption_shipped': 0,
                                         'caption_refused': 0, 'derived_questions': 0,
                                         'derived_student_sure': 0}
        self.last_gate: dict[str, Any] = {}
        self.last_caption_gate: dict[str, Any] = {}
        self.last_audit: dict[str, Any] = {}
        # Views of shipped versions: version -> (hash, weights), newest last.
        self.history: dict[int, tuple[str, dict[str, Tensor]]] = {
            0: (self.hash, {k: v.detach().clone() for k, v in base.items()})}
        # Sample ids already taken, kept across restarts: the link delivers at least once, so
        # a sample re-delivered after a crash of the cloud must not be trained on twice.
        self.recent_ids: deque[str] = deque(maxlen=RECENT_IDS)

    # ---------------------------------------------------------------- versions
    def remember(self, version: int, digest: str, view: dict[str, Tensor]) -> None:
        """Keep the view of a shipped version (the oldest beyond :data:`HISTORY` go)."""
        self.history[version] = (digest, {k: v.detach().clone() for k, v in view.items()})
        for old in sorted(self.history)[:-HISTORY]:
            del self.history[old]
            if self.dir is not None:
                (self.dir / 'history' / f'{old}.safetensors').unlink(missing_ok=True)
        if self.dir is not None:
            (self.dir / 'history').mkdir(parents=True, exist_ok=True)
            _save_tensors(self.dir / 'history' / f'{version}.safetensors', view,
                          {'hash': digest, 'version': str(version)})

    def previous(self) -> tuple[int, str, dict[str, Tensor]] | None:
        """The shipped version before the current one, if still kept."""
        older = [v for v in sorted(self.history) if v < self.version and
                 self.history[v][0] != self.hash]
        if not older:
            return None
        v = older[-1]
        return v, self.history[v][0], self.history[v][1]

    def view_of_hash(self, digest: str) -> tuple[int, dict[str, Tensor]] | None:
        """A kept view with this hash (newest first)."""
        for v in sorted(self.history, reverse=True):
            if self.history[v][0] == digest:
                return v, self.history[v][1]
        return None

    # ---------------------------------------------------------------- persistence
    def save(self) -> None:
        """Checkpoint everything but the memory (which persists record by record)."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _save_tensors(self.dir / 'trained.safetensors', self.trained)
        _save_tensors(self.dir / 'feedback.safetensors', self.feedback.state_dict())
        if self.projectors:
            _save_tensors(self.dir / 'projectors.safetensors', self.projectors)
        record = {'device_id': self.device_id, 'version': self.version, 'round': self.round,
                  'hash': self.hash, 'samples_seen': self.samples_seen,
                  'ship_seq': self.ship_seq, 'round_seq': self.round_seq,
                  'refusals': self.refusals, 'counters': self.counters,
                  'last_gate': self.last_gate, 'last_audit': self.last_audit,
                  'caption_round_seq': self.caption_round_seq,
                  'caption_ship_seq': self.caption_ship_seq,
                  'last_caption_gate': self.last_caption_gate,
                  'history': {str(v): h for v, (h, _) in self.history.items()},
                  'recent_ids': list(self.recent_ids)}
        atomic_write(self.dir / 'state.json', json.dumps(record).encode())

    @classmethod
    def load(cls, device_id: str, base: dict[str, Tensor], directory: Path,
             **kwargs: Any) -> DeviceState:
        """Resume from ``directory`` when it holds a checkpoint, else start from ``base``.

        Raises:
            ModelError: The checkpoint is unreadable or inconsistent.
        """
        state = cls(device_id, base, directory, **kwargs)
        if not (directory / 'state.json').is_file():
            return state
        try:
            record = json.loads((directory / 'state.json').read_text())
            state.trained = _load_tensors(directory / 'trained.safetensors')
            state.feedback = dwc.ErrorFeedback.from_state_dict(
                _load_tensors(directory / 'feedback.safetensors'))
            if (directory / 'projectors.safetensors').is_file():
                state.projectors = _load_tensors(directory / 'projectors.safetensors')
            history = {}
            for v, digest in record.get('history', {}).items():
                path = directory / 'history' / f'{v}.safetensors'
                if path.is_file():
                    history[int(v)] = (digest, _load_tensors(path))
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f'cloud checkpoint of {device_id!r} in {directory} is unreadable: '
                             f'{err}') from err
        if state.feedback.view_hash() != record['hash']:
            raise ModelError(f'cloud checkpoint of {device_id!r}: view hash does not match')
        state.version, state.round = int(record['version']), int(record['round'])
        state.hash = record['hash']
        state.samples_seen = int(record.get('samples_seen', 0))
        state.ship_seq = int(record.get('ship_seq', 0))
        state.round_seq = int(record.get('round_seq', 0))
        # Sequence numbers never go back: the memory may hold none of the records the round
        # counters passed (the plain round keeps none), and a new sample numbered below
        # round_seq would never count as pending.
        state.memory.next_seq = max(state.memory.next_seq, state.round_seq, state.ship_seq)
        state.refusals = int(record.get('refusals', 0))
        state.caption_round_seq = int(record.get('caption_round_seq', 0))
        state.caption_ship_seq = int(record.get('caption_ship_seq', 0))
        state.captions.next_seq = max(state.captions.next_seq, state.caption_round_seq,
                                      state.caption_ship_seq)
        state.last_caption_gate = record.get('last_caption_gate', {})
        state.counters.update(record.get('counters', {}))
        state.last_gate = record.get('last_gate', {})
        state.last_audit = record.get('last_audit', {})
        if history:
            state.history = history
        state.recent_ids.extend(record.get('recent_ids', []))
        if state.pending():
            state.first_pending_t = time.monotonic()
        if state.caption_pending():
            state.caption_first_pending_t = time.monotonic()
        return state

    # ---------------------------------------------------------------- pending samples
    def pending(self) -> int:
        """Samples the device sent since the last round started (``round.min_samples``
        counts these: the questions the cloud derives from them are not counted, or a round
        would start on a quarter of the frames at ``guard.extra_questions`` 4)."""
        return sum(1 for r in self.memory.records.values()
                   if r.seq >= self.round_seq and not r.parent)

    def caption_pending(self) -> int:
        """Caption records that arrived since the last caption round started."""
        return sum(1 for r in self.captions.records.values() if r.seq >= self.caption_round_seq)
