"""A student worker: one student base, any device's round, state from the store (no rclpy).

A worker holds one student module and a :class:`~cdcca_ros.core.cloud_runtime.CloudRuntime`
whose teacher is the shared service (:class:`~cdcca_ros.core.fleet.teacher.TeacherProxy`).
A *task* names a device and a round ticket. The worker

1. returns the committed result when the ticket already committed (a retry of a round
   whose worker died after its commit: no second delta);
2. loads the device's committed state and memory from the store
   (:mod:`~cdcca_ros.core.fleet.store`) into a new generation folder, and applies its inbox
   in arrival order (samples, pulled tokens, pull misses, reported rollbacks) exactly as the
   in-process runtime would (:meth:`CloudRuntime.add_sample` and friends);
3. labels the new samples and fills their AKD targets; the devices of one task do this
   together, so the teacher service merges their requests;
4. runs the live audit, then the guarded round
   (:meth:`~cdcca_ros.core.rounds.round.RoundRunner.run`, unchanged) unless the audit orders a
   rollback;
5. commits the generation with the result (signed delta or rollback order inside) and
   cleans what the commit made obsolete.

Only the device's trainable set is swapped into the student for its round (the base is
never copied per device); the state object is dropped after the task.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.core.fleet.store import (
    PULLED,
    ROLLED_BACK,
    SAMPLE,
    UNAVAILABLE,
    Commit,
    DirectoryStore,
)
from cdcca_ros.core.trust import Signer
from cdcca_ros.errors import CdccaError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
    from cdcca_ros.core.rounds.round import AuditResult, RoundResult
    from cdcca_ros.core.rounds.state import DeviceState
    from cdcca_ros.models.base import MLLM

ROUND, NOTHING, ROLLBACK = 'round', 'nothing', 'rollback'


@dataclass
class WorkerSpec:
    """What a worker process needs to start (plain values: it travels to the worker).

    Attributes:
        student: Student spec (directory, hub id, ``bundled:student``).
        torch_device: Torch device of the student.
        key_pem: The Ed25519 signing key (PKCS#8 PEM).
        ttl_s: Seconds a signed delta or rollback order stays valid.
        key_list: The root-signed key list the deltas carry (empty: none).
        cfg: The round settings.
        anchor: The cloud's ``guard.anchor`` (resolved on the worker).
        store: The store's folder (the same path on every node).
        threads: Torch CPU threads.
        worker_id: Name in logs and commits.
    """

    student: str
    torch_device: str
    key_pem: bytes
    cfg: CloudConfig
    anchor: str
    store: str
    threads: int = 1
    worker_id: str = 'worker'
    ttl_s: int = Signer.ttl_s
    key_list: bytes = b''


def private_key_from_pem(pem: bytes) -> Any:
    """The Ed25519 private key in ``pem``.

    Raises:
        ConfigError: Not a PEM Ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f'signing key does not load: {err}') from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f'signing key is a {type(key).__name__}, not Ed25519')
    return key


def key_to_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class _Open:
    """A device's task between loading and committing."""

    task: dict[str, Any]
    head: Commit | None
    state: DeviceState
    new_dir: Path
    upto: int
    applied: dict[str, int]
    mirrors: list[dict[str, Any]]
    t0: float
    pulls: list[str] | None = None
    label_s: float = 0.0


class RoundWorker:
    """Runs device tasks (see the module docstring).

    Args:
        student: The student base (trainable set configured, base weights loaded).
        teacher: The teacher: a :class:`~cdcca_ros.core.fleet.teacher.TeacherProxy` (or a
            model in this process).
        key: Signs deltas and rollback orders (a :class:`~cdcca_ros.core.trust.Signer` or a
            bare private key).
        cfg: The round settings.
        store: The device store.
        anchor: The anchor set file (None: none).
        worker_id: Name in commits and results.
    """

    def __init__(self, student: MLLM, teacher: Any, key: Any, cfg: CloudConfig,
                 store: DirectoryStore, anchor: Path | None = None,
                 worker_id: str = 'worker') -> None:
        from cdcca_ros.core.akd import AKDTrainer
        from cdcca_ros.core.cloud_runtime import CloudRuntime

        self.runtime: CloudRuntime = CloudRuntime(teacher, student, key, cfg, state_dir=None,
                                                  anchor=anchor)
        self._targets = AKDTrainer(teacher, student, cfg.akd, progress=False)
        self.store = store
        self.worker_id = f'{worker_id}@{socket.gethostname()}:{os.getpid()}'
        self.tasks_done = 0

    @classmethod
    def from_spec(cls, spec: WorkerSpec, teacher: Any) -> RoundWorker:
        """Load the student named by ``spec`` and build the worker around ``teacher``."""
        import torch

        from cdcca_ros.core.rounds.anchor import resolve_anchor
        from cdcca_ros.models import bundled

        torch.set_num_threads(max(1, int(spec.threads)))
        student = bundled.load(spec.student, None, spec.torch_device)
        anchor = (resolve_anchor(spec.anchor, bundled.resolve(spec.student))
                  if spec.cfg.guard.enabled else None)
        signer = Signer(private_key_from_pem(spec.key_pem), ttl_s=spec.ttl_s,
                        key_list=spec.key_list)
        return cls(student, teacher, signer, spec.cfg,
                   DirectoryStore(spec.store), anchor=anchor, worker_id=spec.worker_id)

    def configure(self, cfg: CloudConfig) -> None:
        """New round settings (from the next task)."""
        self.runtime.cfg = cfg
        self._targets.cfg = cfg.akd

    # ---------------------------------------------------------------- tasks
    def run(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the tasks (``{'device_id', 'ticket'}`` each) and return one result each, in
        order: the round's (or the committed one for a ticket already committed), or
        ``{'error': ...}`` when that device's task failed (nothing committed for it)."""
        results: dict[int, dict[str, Any]] = {}
        opened: list[tuple[int, _Open]] = []
        for i, task in enumerate(tasks):
            try:
                item = self._open(task)
            except (CdccaError, OSError, RuntimeError, ValueError) as err:
                results[i] = _error(task, f'cannot load: {err}')
                continue
            if isinstance(item, dict):
                results[i] = item
            else:
                opened.append((i, item))
        if opened:
            self._prepare_together([o for _, o in opened])
        for i, item in opened:
            try:
                results[i] = self._finish(item)
            except (CdccaError, OSError, RuntimeError, ValueError) as err:
                results[i] = _error(item.task, f'round failed: {err}')
            finally:
                self.runtime.devices.pop(item.task['device_id'], None)
        self.tasks_done += len(tasks)
        return [results[i] for i in range(len(tasks))]

    def _open(self, task: dict[str, Any]) -> _Open | dict[str, Any]:
        t0 = time.time()
        device_id, ticket = task['device_id'], task['ticket']
        store = self.store
        head = store.head(device_id)
        if head is not None:
            done = head if head.ticket == ticket else store.find(device_id, ticket)
            if done is not None:  # committed by a worker that died before answering
                return {**decode_result(done.result), 'replayed': True}
        new_dir = store.prepare(device_id, head)
        state = self.runtime.load_device(device_id, store.state_dir(head) or new_dir)
        state.dir = new_dir  # every write of this task goes to the new generation
        item = _Open(task, head, state, new_dir, head.inbox_upto if head else -1,
                     {'samples': 0, 'duplicates': 0, 'pulled': 0, 'unavailable': 0,
                      'rolled_back': 0, 'unreadable': 0, 'rejected': 0}, [], t0)
        self._apply_inbox(item)
        self._mark(device_id, ticket, 'opened')
        return item

    def _apply_inbox(self, item: _Open) -> None:
        device_id = item.task['device_id']
        rt = self.runtime
        for entry in self.store.inbox(device_id, after=item.upto):
            item.upto = entry.number
            try:
                info, tensors = entry.read()
                if entry.kind == SAMPLE:
                    # A re-delivery of a sample the memory or the recent ids hold: refused
                    # by the runtime (False), counted.
                    fresh = rt.add_sample(device_id, tensors['tokens'], tensors.get('indices'),
                                          str(info['question']), int(info['num_tokens']),
                                          int(info['token_dim']),
                                          str(info.get('sample_id', '')),
                                          device_answer=str(info.get('device_answer', '')),
                                          device_version=int(info.get('device_version', -1)),
                                          audit=bool(info.get('audit', False)),
                                          label=info.get('label'))
                    item.applied['samples' if fresh else 'duplicates'] += 1
                elif entry.kind == PULLED:
                    merged = rt.add_pulled(device_id, str(info['sample_id']),
                                           tensors['tokens'], tensors.get('indices'))
                    item.applied['pulled'] += int(merged)
                elif entry.kind == UNAVAILABLE:
                    rt.pull_unavailable(device_id, str(info['sample_id']))
                    item.applied['unavailable'] += 1
                elif entry.kind == ROLLED_BACK:
                    ok = rt.rolled_back(device_id, int(info['version']), str(info['hash']))
                    item.applied['rolled_back'] += 1
                    item.mirrors.append({'version': int(info['version']),
                                         'hash': str(info['hash']), 'ok': bool(ok)})
            except (CdccaError, KeyError, TypeError, ValueError):
                # A file the front wrote badly, or tokens the runtime refuses: counted,
                # consumed (it would fail the same way every time), never trained on.
                item.applied['unreadable' if entry.kind == SAMPLE else 'rejected'] += 1

    def _prepare_together(self, items: list[_Open]) -> None:
        """Labels (with the pulls they ask for) and AKD targets of every opened device. With
        the teacher service, the devices' samples go out together first, one request per
        stackable shape (the service merges them further with other workers' requests); each
        device's round then finds its answers and targets fetched."""
        from cdcca_ros.core.rounds.trainer import fill_targets

        teacher = self.runtime.teacher
        together = len(items) > 1 and hasattr(teacher, 'prefetch_labels')
        t0 = time.perf_counter()
        if together:
            teacher.prefetch_labels(
                [(r.tokens, r.indices, r.question) for item in items
                 for r in item.state.memory.unlabelled()], self.runtime.cfg.akd.max_new_tokens)
        needs: list[list[Any]] = []
        for item in items:
            item.pulls = self.runtime.label(item.task['device_id'])
            needs.append([r for r in item.state.memory.select('train')
                          if r.usable and r.pull != 'requested' and r.targets is None])
        if together:
            teacher.prefetch_targets([(r.tokens, r.indices, r.question, str(r.label))
                                      for records in needs for r in records])
        for item, records in zip(items, needs, strict=True):
            fill_targets(self._targets, records)
            for r in records:
                item.state.memory.update(r)  # the targets persist with the record
        for item in items:
            item.label_s = (time.perf_counter() - t0) / len(items)

    def _finish(self, item: _Open) -> dict[str, Any]:
        device_id, ticket = item.task['device_id'], item.task['ticket']
        rt, state = self.runtime, item.state
        self._mark(device_id, ticket, 'round')
        t_round = time.perf_counter()
        audit = rt.audit(device_id)
        result: RoundResult | None = None
        outcome = NOTHING
        if audit is not None and audit.rollback is not None:
            outcome = ROLLBACK
        else:
            result = rt.run_round(device_id)
            if result is not None:
                outcome = result.outcome
        state.save()
        round_s = time.perf_counter() - t_round
        gen = (item.head.gen if item.head else 0) + 1
        pulls = list(dict.fromkeys((item.pulls or []) + (result.pulls if result else [])))
        out = encode_result(device_id, ticket, gen, outcome, state, result, audit, pulls,
                            item.mirrors, rt.status(device_id))
        out.update(inbox_upto=item.upto, applied=item.applied, worker=self.worker_id,
                   replayed=False)
        out['timing'] = {'started': item.t0, 'label_s': round(item.label_s, 4),
                         'round_s': round(round_s, 4)}
        t_commit = time.perf_counter()
        commit = Commit(device_id=device_id, gen=gen, ticket=ticket,
                        state_dir=item.new_dir.name, inbox_upto=item.upto, result=out,
                        worker=self.worker_id)
        if not self.store.commit(commit):
            # Another task committed this generation (a worker thought dead came back):
            # ours is dropped; its result stands if it was this ticket.
            other = self.store.find(device_id, ticket)
            if other is not None:
                return {**decode_result(other.result), 'replayed': True}
            return _error(item.task, f'generation {gen} of {device_id!r} was committed by '
                                     'another task')
        self.store.clean(device_id, commit)
        (self.store.device_dir(device_id) / 'running.json').unlink(missing_ok=True)
        out['timing'].update(commit_s=round(time.perf_counter() - t_commit, 4),
                             total_s=round(time.time() - item.t0, 4), finished=time.time())
        return decode_result(json.loads(json.dumps(out)))

    def _mark(self, device_id: str, ticket: str, phase: str) -> None:
        """``<device>/running.json``: who holds the device, in which phase (for a human and
        for the fault tests)."""
        record = {'worker': self.worker_id, 'pid': os.getpid(), 'ticket': ticket,
                  'phase': phase, 'since': time.time()}
        atomic_write(self.store.device_dir(device_id) / 'running.json',
                     json.dumps(record).encode())


# --- results -------------------------------------------------------------------------------
def _error(task: dict[str, Any], message: str) -> dict[str, Any]:
    return {'device_id': task['device_id'], 'ticket': task['ticket'], 'error': message}


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def encode_result(device_id: str, ticket: str, gen: int, outcome: str, state: DeviceState,
                  result: RoundResult | None, audit: AuditResult | None, pulls: list[str],
                  mirrors: list[dict[str, Any]], status: dict[str, Any]) -> dict[str, Any]:
    """A task's result as JSON-ready values (bytes as base64: it goes into the commit)."""
    out: dict[str, Any] = {
        'device_id': device_id, 'ticket': ticket, 'gen': gen, 'outcome': outcome,
        'pulls': pulls, 'mirrors': mirrors, 'status': status,
        'pending_after': state.pending(),
        'view': {'version': state.version, 'hash': state.hash, 'round': state.round,
                 'last_gate': state.last_gate, 'last_audit': state.last_audit,
                 'counters': dict(state.counters)},
        'audit': audit.to_dict() if audit is not None else None,
        'rollback': None, 'envelope': None, 'result': None}
    if audit is not None and audit.rollback is not None:
        order = asdict(audit.rollback)
        order['signature'] = _b64(order['signature'])
        out['rollback'] = order
    if result is not None:
        losses = result.losses
        out['result'] = {
            'round': result.round, 'outcome': result.outcome, 'samples': result.samples,
            'losses': [losses[0], losses[-1]] if losses else [],
            'steps': len(losses), 'stats': asdict(result.stats) if result.stats else None,
            'agreement_before': result.agreement_before,
            'agreement_after': result.agreement_after, 'train_s': result.train_s,
            'decision': ({'ship': result.decision.ship, 'reason': result.decision.reason}
                         if result.decision is not None else None),
            'summary': result.summary()}
        if result.envelope is not None:
            out['envelope'] = _b64(result.envelope.encode())
    return out


def decode_result(out: dict[str, Any]) -> dict[str, Any]:
    """Inverse of the base64 step of :func:`encode_result` (envelope and signature bytes)."""
    out = dict(out)
    if out.get('envelope') is not None and isinstance(out['envelope'], str):
        out['envelope'] = base64.b64decode(out['envelope'])
    if out.get('rollback') is not None:
        order = dict(out['rollback'])
        if isinstance(order.get('signature'), str):
            order['signature'] = base64.b64decode(order['signature'])
        out['rollback'] = order
    return out
