"""Device state every worker reaches: a directory on shared storage (no rclpy, no Ray).

Under ``root/<device_id>/``:

- ``inbox/<n>-<kind>``: what arrived for the device since its last task, numbered by the
  front in arrival order: uplinked samples (``sample``, safetensors), the rest of a sample's
  tokens (``pulled``), word that a sample is gone (``unavailable``) and rollbacks the device
  reported (``rolled_back``, JSON). The front is the only writer; the task that commits them
  removes them.
- ``memory/``: the replay memory's records
  (:class:`~cdcca_ros.core.rounds.memory.Memory`, one file each), written only by the task that
  holds the device.
- ``gen-<g>-<attempt>/``: one checkpoint of the device's
  :class:`~cdcca_ros.core.rounds.state.DeviceState` (``state.json``, the view and trained copy,
  projectors, ``history/``; ``memory`` links to ``../memory``). Every task writes a new one, so
  the committed generation is never touched by a task that may still die.
- ``commits/<g>.json``: the commit of generation ``g``: the round's ticket, its result (the
  signed delta or rollback order included) and the last inbox entry it consumed. It is
  created with :func:`os.link` of a finished temporary file, which fails when the name
  exists: of two tasks that ran the same generation (a worker believed dead, and the retry),
  exactly one commits. The device's state is its highest commit.

Exactly once: a round runs under a ticket; a task that finds its ticket already committed
returns the committed result instead of running again, so a retry after a worker died
before *or after* its commit yields one delta. A task that dies before committing leaves
the committed generation as it was: its inbox entries are still there for the retry (the
records it may have added to the memory carry their sample ids, and are taken once).

On object storage (S3, GCS) the same layout works with two changes: a task downloads the
committed generation and the memory records it lacks to local disk and uploads its new
generation before committing, and the commit is a conditional PUT that fails when the object
exists (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) in place of :func:`os.link`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.wire import check_device_id
from cdcca_ros.errors import ConfigError, WireError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

COMMIT_FORMAT = 'cdcca-fleet-commit-v1'
ENTRY_FORMAT = 'cdcca-fleet-inbox-v1'
SAMPLE, PULLED, UNAVAILABLE, ROLLED_BACK = 'sample', 'pulled', 'unavailable', 'rolled_back'
KINDS = (SAMPLE, PULLED, UNAVAILABLE, ROLLED_BACK)
_TENSOR_KINDS = (SAMPLE, PULLED)
KEEP_COMMITS = 8  # commits kept per device (the newest decides; older ones for a human)
_ENTRY = re.compile(r'(\d{16})-([a-z_]+)')
_COMMIT = re.compile(r'(\d{12})\.json')


@dataclass
class InboxEntry:
    """One inbox file (not read yet)."""

    number: int
    kind: str
    path: Path

    def read(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(metadata, tensors)`` of the entry.

        Raises:
            WireError: The file is not an entry this store wrote.
        """
        from safetensors import SafetensorError, safe_open

        try:
            if self.kind in _TENSOR_KINDS:
                with safe_open(str(self.path), framework='pt') as f:
                    meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            else:
                meta, tensors = json.loads(self.path.read_text()), {}
            if meta.get('format') != ENTRY_FORMAT:
                raise ValueError(f'format {meta.get("format")!r}')
            info = json.loads(meta['entry']) if 'entry' in meta and isinstance(
                meta['entry'], str) else meta['entry']
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise WireError(f'inbox entry {self.path} is unreadable: {err}') from err
        return info, tensors


@dataclass
class Commit:
    """The commit of one generation of a device's state.

    Attributes:
        device_id: The device.
        gen: The generation (1, 2, ...; 0 is "never committed").
        ticket: The round ticket that produced it.
        state_dir: Folder of its checkpoint, relative to the device's folder.
        inbox_upto: The last inbox entry it consumed (-1: none).
        result: What the task returned (JSON-ready; bytes as base64 strings).
        time: Wall-clock time of the commit.
        worker: Who committed it (host and pid), for a human.
    """

    device_id: str
    gen: int
    ticket: str
    state_dir: str
    inbox_upto: int
    result: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    worker: str = ''

    def to_bytes(self) -> bytes:
        return json.dumps({'format': COMMIT_FORMAT, **asdict(self)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Commit:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: Not a commit.
        """
        record = json.loads(data)
        if record.pop('format', None) != COMMIT_FORMAT:
            raise ValueError('not a fleet commit')
        return cls(**record)


class DirectoryStore:
    """The store on a directory every worker mounts at the same path (see the module
    docstring).

    Args:
        root: The folder (created when missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f'fleet store {self.root} cannot be created: {err}') from err

    # ---------------------------------------------------------------- layout
    def device_dir(self, device_id: str) -> Path:
        return self.root / check_device_id(device_id)

    def devices(self) -> list[str]:
        """Devices with anything in the store."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _is_device_id(p.name))

    # ---------------------------------------------------------------- the inbox (front)
    def put_sample(self, device_id: str, number: int, tokens: Tensor, indices: Tensor | None,
                   info: dict[str, Any]) -> Path:
        """Write one uplinked sample (tokens as float16, as the memory keeps them)."""
        import torch
        from safetensors.torch import save

        tensors = {'tokens': tokens.detach().to(torch.float16).contiguous()}
        if indices is not None:
            tensors['indices'] = indices.detach().long().contiguous()
        data = save(tensors, metadata={'format': ENTRY_FORMAT, 'entry': json.dumps(info)})
        return self._put(device_id, number, SAMPLE, data)

    def put_pulled(self, device_id: str, number: int, tokens: Tensor, indices: Tensor | None,
                   sample_id: str) -> Path:
        """Write the rest of a sample's tokens (a pull's answer)."""
        import torch
        from safetensors.torch import save

        tensors = {'tokens': tokens.detach().to(torch.float16).contiguous()}
        if indices is not None:
            tensors['indices'] = indices.detach().long().contiguous()
        data = save(tensors, metadata={'format': ENTRY_FORMAT,
                                       'entry': json.dumps({'sample_id': sample_id})})
        return self._put(device_id, number, PULLED, data)

    def put_control(self, device_id: str, number: int, kind: str, info: dict[str, Any]
                    ) -> Path:
        """Write a control entry (``unavailable`` or ``rolled_back``)."""
        if kind not in (UNAVAILABLE, ROLLED_BACK):
            raise ConfigError(f'control entry kind {kind!r} is not {UNAVAILABLE} or '
                              f'{ROLLED_BACK}')
        data = json.dumps({'format': ENTRY_FORMAT, 'entry': info}).encode()
        return self._put(device_id, number, kind, data)

    def _put(self, device_id: str, number: int, kind: str, data: bytes) -> Path:
        inbox = self.device_dir(device_id) / 'inbox'
        inbox.mkdir(parents=True, exist_ok=True)
        path = inbox / f'{number:016d}-{kind}'
        atomic_write(path, data)
        return path

    def inbox(self, device_id: str, after: int = -1) -> list[InboxEntry]:
        """Inbox entries numbered above ``after``, in order."""
        inbox = self.device_dir(device_id) / 'inbox'
        if not inbox.is_dir():
            return []
        out = []
        for path in inbox.iterdir():
            m = _ENTRY.fullmatch(path.name)
            if m and m.group(2) in KINDS and int(m.group(1)) > after:
                out.append(InboxEntry(int(m.group(1)), m.group(2), path))
        return sorted(out, key=lambda e: e.number)

    def last_number(self, device_id: str) -> int:
        """The highest inbox number ever used for the device (-1: none): the front numbers
        new entries after it, across its own restarts."""
        head = self.head(device_id)
        entries = self.inbox(device_id)
        return max([head.inbox_upto if head else -1] + [e.number for e in entries])

    # ---------------------------------------------------------------- generations (worker)
    def head(self, device_id: str) -> Commit | None:
        """The device's newest commit (None: never committed).

        Raises:
            WireError: The newest commit file does not parse.
        """
        commits = self._commits(device_id)
        if not commits:
            return None
        return self._read_commit(commits[-1][1])

    def find(self, device_id: str, ticket: str) -> Commit | None:
        """The kept commit made by ``ticket``, if any (newest first)."""
        for _, path in reversed(self._commits(device_id)):
            commit = self._read_commit(path)
            if commit.ticket == ticket:
                return commit
        return None

    def _commits(self, device_id: str) -> list[tuple[int, Path]]:
        folder = self.device_dir(device_id) / 'commits'
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir()
                 if (m := _COMMIT.fullmatch(p.name))]
        return sorted(found)

    @staticmethod
    def _read_commit(path: Path) -> Commit:
        try:
            return Commit.from_bytes(path.read_bytes())
        except (OSError, ValueError, TypeError) as err:
            raise WireError(f'fleet commit {path} is unreadable: {err}') from err

    def state_dir(self, commit: Commit | None) -> Path | None:
        """The checkpoint folder of a commit (None for none)."""
        if commit is None:
            return None
        return self.device_dir(commit.device_id) / commit.state_dir

    def prepare(self, device_id: str, head: Commit | None) -> Path:
        """A fresh folder for the next generation: the kept history hard-linked from the
        committed one (never modified in place: writes replace files), ``memory`` linked to
        the device's memory."""
        device = self.device_dir(device_id)
        (device / 'memory').mkdir(parents=True, exist_ok=True)
        gen = (head.gen if head else 0) + 1
        new = device / f'gen-{gen:012d}-{uuid.uuid4().hex[:8]}'
        new.mkdir()
        (new / 'memory').symlink_to(Path('..') / 'memory')
        old = self.state_dir(head)
        if old is not None and (old / 'history').is_dir():
            (new / 'history').mkdir()
            for path in (old / 'history').iterdir():
                if path.suffix == '.safetensors':
                    os.link(path, new / 'history' / path.name)
        return new

    def commit(self, commit: Commit) -> bool:
        """Create ``commits/<gen>.json`` unless it exists. False: another task committed this
        generation first (this one's work is to be dropped)."""
        folder = self.device_dir(commit.device_id) / 'commits'
        folder.mkdir(parents=True, exist_ok=True)
        commit.time = commit.time or time.time()
        final = folder / f'{commit.gen:012d}.json'
        tmp = folder / f'.{commit.gen:012d}.{uuid.uuid4().hex}.tmp'
        with open(tmp, 'wb') as f:
            f.write(commit.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # atomic, and fails when the name exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(folder)
        return True

    def clean(self, device_id: str, head: Commit) -> None:
        """After ``head`` committed: drop the inbox entries it consumed, generations other
        than it and the one before, commits beyond :data:`KEEP_COMMITS`, and temporary files
        of tasks that died."""
        device = self.device_dir(device_id)
        for entry in self.inbox(device_id):
            if entry.number <= head.inbox_upto:
                entry.path.unlink(missing_ok=True)
        commits = self._commits(device_id)
        keep_dirs = {head.state_dir}
        for _, path in commits[-2:]:
            try:
                keep_dirs.add(self._read_commit(path).state_dir)
            except WireError:
                pass
        for path in device.glob('gen-*'):
            if path.name not in keep_dirs and not path.name.startswith(f'gen-{head.gen + 1:012d}'):
                shutil.rmtree(path, ignore_errors=True)
        for _, path in commits[:-KEEP_COMMITS]:
            path.unlink(missing_ok=True)
        for folder in (device / 'commits', device / 'inbox', device / 'memory'):
            if folder.is_dir():
                for tmp in folder.glob('.*.tmp'):
                    if time.time() - tmp.stat().st_mtime > 60.0:
                        tmp.unlink(missing_ok=True)


def _is_device_id(name: str) -> bool:
    try:
        check_device_id(name)
    except WireError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    """Make a new name in ``path`` durable (POSIX: fsync the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
