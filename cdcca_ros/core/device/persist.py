"""The adapter in use on disk: one safetensors file carrying its version record (no rclpy).

:func:`write_adapter` writes it atomically, :class:`AdapterWriter` off the apply path (one
daemon thread per folder, the latest version first and in version order; pending writes finish
at interpreter exit) and :func:`restore_adapter` reads it back, checked, on a restart.
"""
from __future__ import annotations

import atexit
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core import wire
from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.updates import MAX_VERSION
from cdcca_ros.errors import CdccaError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.device.weights import FlatWeights

WEIGHTS_FILE = 'adapter.safetensors'
STATE_FILE = 'adapter.json'  # the version record of older runtimes (read when restoring)
ADAPTER_FORMAT = 'cdcca-adapter-v1'
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSnapshot:
    """One adapter version to persist (what :func:`write_adapter` writes)."""

    device_id: str
    version: int
    round: int
    hash: str
    weights: FlatWeights


class AdapterWriter:
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


_WRITERS: dict[Path, AdapterWriter] = {}
_WRITERS_LOCK = threading.Lock()


def writer_for(directory: Path) -> AdapterWriter:
    """The one writer of a folder (runtimes on the same folder share it)."""
    key = directory.resolve()
    with _WRITERS_LOCK:
        if key not in _WRITERS:
            _WRITERS[key] = AdapterWriter(directory)
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


def restore_adapter(directory: Path, device_id: str,
                    load: Callable[[dict[str, Tensor]], None]) -> tuple[int, int] | None:
    """Read the adapter persisted in ``directory``, check it and hand its tensors to ``load``.

    Args:
        directory: The folder :func:`write_adapter` writes to.
        device_id: The device the adapter must belong to.
        load: Takes the adapter's tensors (the model's ``load_trainable_state_dict``).

    Returns:
        The adapter's (version, round); None when nothing is persisted in ``directory``.

    Raises:
        ModelError: The adapter cannot be restored: unreadable, its hash differs from its
            record, another device's, its version out of range, ``load`` refused it, or only
            an older runtime's record lies there without its weights.
    """
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / STATE_FILE).is_file():
            raise ModelError(f'{directory / STATE_FILE} has no {WEIGHTS_FILE} beside '
                             'it; move the folder away to start from the base model')
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if 'version' in meta:
            record: dict[str, Any] = meta
        else:  # an older runtime kept the record in a JSON file beside the weights
            record = json.loads((directory / STATE_FILE).read_text())
        if wire.state_dict_hash(weights) != record['hash']:
            raise ModelError('persisted adapter does not match its recorded hash')
        if record.get('device_id') != device_id:
            raise ModelError(f'persisted adapter belongs to {record.get("device_id")!r}')
        version, round_ = int(record['version']), int(record.get('round', 0))
        if not 0 <= version <= MAX_VERSION:
            raise ModelError(f'persisted version {version} is outside [0, 2**64)')
        load(weights)
    except (OSError, KeyError, ValueError, SafetensorError, CdccaError) as err:
        raise ModelError(f'cannot restore the adapter persisted in {directory}: {err}; '
                         'move the folder away to start from the base model') from err
    return version, round_
