"""The fleet's front: samples in, rounds on a Ray cluster, results out (no rclpy).

:class:`FleetEngine` is what ``cloud_node`` holds with ``backend:=ray``. It offers the
in-process runtime's uplink calls (:meth:`~FleetEngine.add_sample`,
:meth:`~FleetEngine.add_pulled`, :meth:`~FleetEngine.pull_unavailable`,
:meth:`~FleetEngine.rolled_back`: each writes an entry into the device's inbox in the store
and returns at once) and one call the node's worker thread makes in a loop,
:meth:`~FleetEngine.poll`: it starts the rounds that are due on free workers, waits a little
for results, and returns what happened as events (a round's result with its signed delta,
token pulls to ask for, a rollback order, a failure).

On Ray (started when ``address`` is empty, else joined):

- a placement group reserves one bundle per student worker and per teacher replica
  (``PACK``: as few nodes as fit; the bundles survive an actor's death, so a restarted
  actor finds its resources);
- the teacher replicas are async actors running
  :class:`~cdcca_ros.core.fleet.teacher.TeacherBatcher` (``max_restarts=-1``,
  ``max_task_retries=-1``: a teacher request is a pure function, retried after a crash);
- the student workers run :class:`~cdcca_ros.core.fleet.worker.RoundWorker`
  (``max_restarts=-1``, ``max_task_retries=0``: Ray does not retry a round; the engine
  hands the round's ticket to another live worker at once, and the store makes the ticket
  commit once whichever worker runs it). A worker on the engine's own host whose process is
  gone is seen at the next poll, before Ray reports its death (~2 s after a SIGKILL here).

Rounds are due as in the node (``round.min_samples`` pending, or ``round.max_wait_s`` after
the first); the :class:`~cdcca_ros.core.fleet.scheduler.FairScheduler` picks which due
device a free worker serves, with the due devices of its uplink group
(:mod:`~cdcca_ros.core.fleet.grouping`). One task per worker at a time, one per device.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.core.captions.describe import is_describe
from cdcca_ros.core.captions.round import caption_sample_error
from cdcca_ros.core.cloud_runtime import check_sample
from cdcca_ros.core.fleet.grouping import UplinkGroups
from cdcca_ros.core.fleet.scheduler import FairScheduler, task_size
from cdcca_ros.core.fleet.store import ROLLED_BACK, SAMPLE, UNAVAILABLE, DirectoryStore
from cdcca_ros.core.fleet.worker import WorkerSpec, decode_result, key_to_pem
from cdcca_ros.core.trust import Signer
from cdcca_ros.core.wire import check_device_id
from cdcca_ros.errors import ConfigError, ModelLoadError, WireError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.cloud_runtime import CloudConfig
    from cdcca_ros.core.dwc import CompressStats
    from cdcca_ros.core.rounds.gate import GateDecision
    from cdcca_ros.core.updates import DeltaEnvelope, RollbackEnvelope
    from cdcca_ros.models.base import VisionSpace

PING_EVERY_S = 0.5
RECENT_IDS = 10_000


# --- settings ------------------------------------------------------------------------------
@dataclass
class FleetOptions:
    """How the fleet runs on Ray.

    Attributes:
        workers: Student workers (each one student base, any device's adapter).
        teachers: Teacher replicas (one per GPU).
        address: Ray cluster to join (``ray.init`` address); empty: start a local one.
        store: The device store's folder (a path every worker reaches).
        worker_cpus / worker_gpus: Resources of one worker's bundle.
        teacher_cpus / teacher_gpus: Resources of one teacher's bundle.
        max_batch: Most samples in one teacher forward.
        batch_wait_ms: How long a teacher request waits for others to share its forward.
        group_max: Due devices of one uplink group served by one task (1: one device).
        fairness_floor: Smallest weight of a due device (share of an equal share).
        threads: Torch CPU threads of each actor.
        strategy: Placement group strategy (``PACK``, ``SPREAD``, ``STRICT_PACK``,
            ``STRICT_SPREAD``).
    """

    workers: int = 2
    teachers: int = 1
    address: str = ''
    store: str = ''
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    teacher_cpus: float = 1.0
    teacher_gpus: float = 0.0
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    group_max: int = 4
    fairness_floor: float = 0.75
    threads: int = 1
    strategy: str = 'PACK'

    def __post_init__(self) -> None:
        if self.workers < 1 or self.teachers < 1 or self.group_max < 1 or self.threads < 1:
            raise ConfigError(f'fleet workers={self.workers}, teachers={self.teachers}, '
                              f'group_max={self.group_max}, threads={self.threads} must be >= 1')
        if min(self.worker_cpus, self.worker_gpus, self.teacher_cpus, self.teacher_gpus) < 0:
            raise ConfigError('fleet resources must be >= 0')
        if self.strategy not in ('PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'):
            raise ConfigError(f'placement strategy {self.strategy!r} is not PACK, SPREAD, '
                              'STRICT_PACK or STRICT_SPREAD')

    @classmethod
    def from_params(cls, params: dict[str, Any], state_dir: Path) -> FleetOptions:
        """The options a cloud node builds from its ``ray_address`` and ``ray.*`` parameters
        (the store defaults to ``<state_dir>/fleet``)."""
        return cls(workers=params['ray.workers'], teachers=params['ray.teachers'],
                   address=params['ray_address'],
                   store=params['ray.store_dir'] or str(state_dir / 'fleet'),
                   worker_cpus=params['ray.worker_cpus'], worker_gpus=params['ray.worker_gpus'],
                   teacher_cpus=params['ray.teacher_cpus'],
                   teacher_gpus=params['ray.teacher_gpus'], max_batch=params['ray.max_batch'],
                   batch_wait_ms=params['ray.batch_wait_ms'], group_max=params['ray.group_max'],
                   fairness_floor=params['ray.fairness_floor'])


# --- what the node reads -------------------------------------------------------------------
@dataclass
class DeviceView:
    """The cloud's view of a device as of its last finished task (what
    :class:`~cdcca_ros.core.rounds.state.DeviceState` offers the node)."""

    device_id: str
    version: int = 0
    hash: str = ''
    round: int = 0
    last_gate: dict[str, Any] = field(default_factory=dict)
    last_audit: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class FleetRoundResult:
    """A round run by a worker, with the attributes the node publishes from
    (:class:`~cdcca_ros.core.rounds.round.RoundResult`'s; losses: the first and last step)."""

    device_id: str
    round: int
    outcome: str
    envelope: DeltaEnvelope | None
    samples: int
    losses: list[dict[str, float]]
    stats: CompressStats | None
    agreement_before: float
    agreement_after: float
    train_s: float
    decision: GateDecision | None
    pulls: list[str]
    figures: dict[str, Any]

    @property
    def shipped(self) -> bool:
        return self.outcome == 'shipped'

    def summary(self) -> dict[str, Any]:
        return self.figures

    @classmethod
    def from_result(cls, out: dict[str, Any]) -> FleetRoundResult:
        from cdcca_ros.core.dwc import CompressStats
        from cdcca_ros.core.rounds.gate import GateDecision
        from cdcca_ros.core.updates import DeltaEnvelope

        r = out['result']
        decision = (GateDecision(ship=bool(r['decision']['ship']),
                                 reason=str(r['decision']['reason']))
                    if r.get('decision') else None)
        return cls(device_id=out['device_id'], round=int(r['round']), outcome=r['outcome'],
                   envelope=(DeltaEnvelope.decode(out['envelope'])
                             if out.get('envelope') is not None else None),
                   samples=int(r['samples']), losses=list(r.get('losses') or []),
                   stats=CompressStats(**r['stats']) if r.get('stats') else None,
                   agreement_before=_num(r.get('agreement_before')),
                   agreement_after=_num(r.get('agreement_after')),
                   train_s=_num(r.get('train_s')), decision=decision,
                   pulls=list(out.get('pulls') or []), figures=dict(r.get('summary') or {}))


def _num(x: Any) -> float:
    return float('nan') if x is None else float(x)


# --- events ----------------------------------------------------------------------------------
@dataclass
class RoundDone:
    """A device's round finished (shipped or refused)."""

    device_id: str
    result: FleetRoundResult
    trigger_t: float | None
    dispatch_t: float
    done_t: float
    worker: int
    replayed: bool
    attempts: int


@dataclass
class NoRound:
    """A device's task ran but had nothing to learn from (no usable label yet)."""

    device_id: str
    trigger_t: float | None
    dispatch_t: float
    done_t: float


@dataclass
class PullsWanted:
    """Ask the device for the rest of these samples' tokens."""

    device_id: str
    sample_ids: list[str]


@dataclass
class RollbackOrdered:
    """The live audit withdrew the version the device runs: send it this order."""

    device_id: str
    order: RollbackEnvelope
    figures: dict[str, Any]


@dataclass
class Mirrored:
    """A rollback the device reported was applied to its state (``ok``) or could not be."""

    device_id: str
    version: int
    hash: str
    ok: bool


@dataclass
class TaskFailed:
    """A device's task failed (nothing committed; it runs again after a pause)."""

    device_id: str
    message: str


@dataclass
class WorkerChanged:
    """A worker died (its tasks went to others) or is back."""

    worker: int
    alive: bool
    message: str


FleetEvent = (RoundDone | NoRound | PullsWanted | RollbackOrdered | Mirrored | TaskFailed
              | WorkerChanged)


# --- Ray actors (decorated with ray.remote when the engine starts) -----------------------------
class TeacherActor:
    """One teacher replica: :class:`~cdcca_ros.core.fleet.teacher.TeacherBatcher`."""

    def __init__(self, spec: str, quantization: str | None, torch_device: str, max_batch: int,
                 wait_ms: float, threads: int) -> None:
        import torch

        from cdcca_ros.core.fleet.teacher import TeacherBatcher
        from cdcca_ros.models import bundled

        torch.set_num_threads(threads)
        self.batcher = TeacherBatcher(bundled.load(spec, quantization, torch_device),
                                      max_batch=max_batch, wait_ms=wait_ms)

    async def label(self, tokens: Tensor, indices: Tensor | None, questions: list[str],
                    max_new_tokens: int) -> Any:
        return await self.batcher.label(tokens, indices, questions, max_new_tokens)

    async def targets(self, tokens: Tensor, indices: Tensor | None, questions: list[str],
                      answers: list[str]) -> Any:
        return await self.batcher.targets(tokens, indices, questions, answers)

    async def space(self) -> dict[str, Any]:
        return self.batcher.space()

    async def report(self, reset: bool = False) -> dict[str, Any]:
        out = self.batcher.report()
        if reset:
            self.batcher.reset()
        return out

    async def ping(self) -> dict[str, Any]:
        return {'pid': os.getpid(), 'host': socket.gethostname(), 'threads': _threads()}


class WorkerActor:
    """One student worker: :class:`~cdcca_ros.core.fleet.worker.RoundWorker` reaching the
    teacher replicas through :class:`~cdcca_ros.core.fleet.teacher.TeacherProxy`."""

    def __init__(self, spec: WorkerSpec, teachers: list[Any], space: dict[str, Any]) -> None:
        from cdcca_ros.core.fleet.teacher import RayTeacherClient, TeacherProxy
        from cdcca_ros.core.fleet.worker import RoundWorker

        proxy = TeacherProxy(RayTeacherClient(teachers), _space(space))
        self.worker = RoundWorker.from_spec(spec, proxy)

    def run(self, tasks: list[dict[str, Any]], cfg: CloudConfig | None) -> list[dict[str, Any]]:
        if cfg is not None and cfg != self.worker.runtime.cfg:
            self.worker.configure(cfg)
        return self.worker.run(tasks)

    def ping(self) -> dict[str, Any]:
        import ray

        return {'pid': os.getpid(), 'host': socket.gethostname(),
                'restarted': ray.get_runtime_context().was_current_actor_reconstructed,
                'tasks': self.worker.tasks_done, 'threads': _threads()}


def _threads() -> dict[str, Any]:
    """The torch threads of this process (intra-op, inter-op) and its ``OMP_NUM_THREADS``:
    an actor that runs more threads than its bundle's CPUs fights the others for cores."""
    import torch

    return {'intra': torch.get_num_threads(), 'interop': torch.get_num_interop_threads(),
            'omp': os.environ.get('OMP_NUM_THREADS')}


def _space(space: dict[str, Any]) -> VisionSpace:
    from cdcca_ros.models.base import VisionSpace

    return VisionSpace(**{**space, 'grid': tuple(space['grid'])})


# --- the front -------------------------------------------------------------------------------
@dataclass
class _Device:
    device_id: str
    next_number: int = 0
    unapplied: deque[tuple[int, float]] = field(default_factory=deque)  # samples: (n, time)
    base_pending: int = 0          # pending in the memory after the last task
    base_since: float | None = None
    last_done: float = 0.0
    in_flight: str | None = None   # ticket
    taken_upto: int = -1           # last inbox number when its running task was handed out
    failures: int = 0
    paused_until: float = 0.0
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_IDS))
    recent_set: set[str] = field(default_factory=set)
    view: DeviceView | None = None


@dataclass
class _Slot:
    index: int
    handle: Any
    alive: bool = True
    ref: Any = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    dispatched: float = 0.0
    ping_ref: Any = None
    next_ping: float = 0.0
    pid: int = 0
    host: str = ''
    down_since: float | None = None
    deaths: int = 0


class FleetEngine:
    """The front (see the module docstring).

    Args:
        teacher: Teacher spec; ``quantization`` how to load it.
        student: Student spec.
        torch_device: Torch device inside each actor (``cuda:0`` with GPU bundles).
        key: What signs deltas and rollback orders: a
            :class:`~cdcca_ros.core.trust.Signer` (key, time to live, key list to attach) or
            a bare Ed25519 private key.
        cfg: The round settings.
        anchor: The ``guard.anchor`` setting.
        options: How the fleet runs.
        clock: Time source (seconds; :func:`time.monotonic`).

    Raises:
        ModelLoadError: Ray or an actor cannot start (models that do not load, teacher and
            student in different token spaces).
    """

    def __init__(self, teacher: str, student: str, torch_device: str, quantization: str | None,
                 key: Signer | Any, cfg: CloudConfig, anchor: str, options: FleetOptions,
                 clock: Any = time.monotonic) -> None:
        self.options = options
        self._cfg = cfg
        self._clock = clock
        self.store = DirectoryStore(options.store)
        self.groups = UplinkGroups()
        self.scheduler = FairScheduler(floor=options.fairness_floor)
        self._lock = threading.RLock()
        self._devices: dict[str, _Device] = {}
        self._retry: deque[tuple[list[dict[str, Any]], int]] = deque()
        self._attempts: dict[str, int] = {}
        self._delivered: deque[str] = deque(maxlen=RECENT_IDS)
        self._delivered_set: set[str] = set()
        self._trigger: dict[str, float | None] = {}
        self.counters = {'tasks': 0, 'rounds': 0, 'retried': 0, 'replayed': 0,
                         'duplicates_suppressed': 0, 'worker_deaths': 0, 'failed': 0,
                         'samples': 0}
        self._own_ray = False
        self._ray_stop = threading.Event()
        self._ray_owner: threading.Thread | None = None
        self._pg: Any = None
        self.teachers: list[Any] = []
        self.slots: list[_Slot] = []
        self._ctor_args: list[Any] = []
        self._start(teacher, student, torch_device, quantization, Signer.of(key), anchor)
        self.resume()

    # ---------------------------------------------------------------- start / stop
    def _start(self, teacher: str, student: str, torch_device: str, quantization: str | None,
               signer: Signer, anchor: str) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts = self.options
        try:
            if not ray.is_initialized():
                if opts.address:
                    ray.init(address=opts.address, namespace='cdcca', log_to_driver=False)
                else:
                    cpus = math.ceil(opts.workers * opts.worker_cpus
                                     + opts.teachers * opts.teacher_cpus) or 1
                    self._start_local_ray(num_cpus=cpus, include_dashboard=False,
                                          namespace='cdcca', log_to_driver=False)
                self._own_ray = True
            bundles = ([_bundle(opts.worker_cpus, opts.worker_gpus)] * opts.workers
                       + [_bundle(opts.teacher_cpus, opts.teacher_gpus)] * opts.teachers)
            self._pg = placement_group(bundles, strategy=opts.strategy)
            ray.get(self._pg.ready(), timeout=120)

            def where(i: int) -> PlacementGroupSchedulingStrategy:
                return PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)

            teacher_cls = ray.remote(TeacherActor)
            self.teachers = [teacher_cls.options(
                num_cpus=opts.teacher_cpus, num_gpus=opts.teacher_gpus, max_restarts=-1,
                max_task_retries=-1, scheduling_strategy=where(opts.workers + i)).remote(
                    teacher, quantization, torch_device, opts.max_batch, opts.batch_wait_ms,
                    opts.threads) for i in range(opts.teachers)]
            space = ray.get(self.teachers[0].space.remote(), timeout=600)
            self.space = _space(space)
            spec = WorkerSpec(student=student, torch_device=torch_device,
                              key_pem=key_to_pem(signer.private_key), ttl_s=signer.ttl_s,
                              key_list=bytes(signer.key_list), cfg=self._cfg, anchor=anchor,
                              store=str(self.store.root), threads=opts.threads)
            worker_cls = ray.remote(WorkerActor)
            # A restarted actor reruns its constructor with the same arguments: they are put
            # in the object store once and this engine holds them for the actors' lifetime.
            shared = [ray.put(self.teachers), ray.put(space)]
            for i in range(opts.workers):
                spec_i = ray.put(WorkerSpec(**{**spec.__dict__, 'worker_id': f'worker{i}'}))
                self._ctor_args.append(spec_i)
                handle = worker_cls.options(
                    num_cpus=opts.worker_cpus, num_gpus=opts.worker_gpus, max_restarts=-1,
                    max_task_retries=0, scheduling_strategy=where(i)).remote(spec_i, *shared)
                self.slots.append(_Slot(i, handle))
            self._ctor_args += shared
            for slot, info in zip(self.slots, ray.get([s.handle.ping.remote()
                                                       for s in self.slots], timeout=600),
                                  strict=True):
                slot.pid, slot.host = int(info['pid']), str(info['host'])
        except Exception as err:  # noqa: BLE001 - Ray and the actors' constructors raise many
            self.close()
            raise ModelLoadError(f'the fleet on Ray cannot start: {_first_line(err)}') from err

    def _start_local_ray(self, **kwargs: Any) -> None:
        """Start a local cluster from a thread that lives until :meth:`close`: Ray binds its
        head processes to the thread that starts them (``PR_SET_PDEATHSIG`` is per thread),
        and a node loads its models in a thread that ends."""
        import ray

        started = threading.Event()
        failed: list[BaseException] = []

        def own() -> None:
            try:
                ray.init(**kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                failed.append(err)
                started.set()
                return
            started.set()
            self._ray_stop.wait()

        self._ray_stop.clear()
        self._ray_owner = threading.Thread(target=own, name='ray-head', daemon=True)
        self._ray_owner.start()
        started.wait()
        if failed:
            raise failed[0]

    def close(self) -> None:
        """Stop the actors, free the placement group, and stop Ray if this engine started
        it. Committed state stays in the store."""
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is there when an engine exists
            return
        if not ray.is_initialized():
            return
        for handle in [s.handle for s in self.slots] + self.teachers:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        self.slots, self.teachers, self._ctor_args = [], [], []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
            self._pg = None
        if self._own_ray:
            ray.shutdown()
            self._own_ray = False
        self._ray_stop.set()

    def save(self) -> None:
        """Nothing to do: every round commits to the store."""

    def resume(self) -> list[str]:
        """Take up every device the store holds (after a restart: samples in a device's inbox
        are pending again, so its round runs without waiting for a new one); returns their
        ids, as :meth:`CloudRuntime.resume <cdcca_ros.core.cloud_runtime.CloudRuntime.resume>`.
        """
        with self._lock:
            for device_id in self.store.devices():
                self._device(device_id)
            return sorted(self._devices)

    # ---------------------------------------------------------------- settings
    @property
    def cfg(self) -> CloudConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: CloudConfig) -> None:
        self._cfg = cfg  # goes to the workers with their next task

    # ---------------------------------------------------------------- devices
    @property
    def devices(self) -> dict[str, DeviceView]:
        with self._lock:
            return {d: self._view(dev) for d, dev in self._devices.items()}

    def device(self, device_id: str) -> DeviceView:
        """The cloud's view of the device (as of its last task)."""
        with self._lock:
            return self._view(self._device(device_id))

    @staticmethod
    def _view(dev: _Device) -> DeviceView:
        return dev.view or DeviceView(dev.device_id)

    def _device(self, device_id: str) -> _Device:
        dev = self._devices.get(device_id)
        if dev is not None:
            return dev
        check_device_id(device_id)
        dev = _Device(device_id)
        head = self.store.head(device_id)
        dev.next_number = self.store.last_number(device_id) + 1
        for entry in self.store.inbox(device_id, after=head.inbox_upto if head else -1):
            if entry.kind == SAMPLE:
                dev.unapplied.append((entry.number, self._clock()))
        if head is not None:
            out = head.result
            dev.base_pending = int(out.get('pending_after', 0))
            dev.base_since = self._clock() if dev.base_pending else None
            dev.view = _view_of(device_id, out)
        self._devices[device_id] = dev
        return dev

    def status(self, device_id: str) -> dict[str, Any]:
        """Figures for diagnostics (as of the device's last task, pending now)."""
        with self._lock:
            dev = self._device(device_id)
            view = self._view(dev)
            return {**view.status, 'version': view.version, 'round': view.round,
                    'pending': dev.base_pending + len(dev.unapplied),
                    'group': self.groups.group(device_id),
                    'in_flight': dev.in_flight is not None,
                    'weight': round(self.scheduler.weight(device_id), 3)}

    def queue(self) -> tuple[int, int]:
        """Rounds due (not running) and workers busy now: :meth:`figures`' ``fleet.due`` and
        ``fleet.busy`` without the rest (for a caller that asks many times a second)."""
        with self._lock:
            return (len(self._due_devices(self._clock(), ())),
                    sum(s.ref is not None for s in self.slots))

    def figures(self) -> dict[str, Any]:
        """Fleet-wide figures for diagnostics."""
        with self._lock:
            alive = sum(s.alive for s in self.slots)
            due, busy = self.queue()
            return {'fleet.workers_alive': f'{alive}/{len(self.slots)}',
                    'fleet.busy': busy,
                    'fleet.due': due,
                    'fleet.retry_queue': len(self._retry),
                    **{f'fleet.{k}': v for k, v in self.counters.items()},
                    'fleet.groups': ','.join(f'{g}:{n}' for g, n in
                                             self.groups.summary()['groups'].items())}

    # ---------------------------------------------------------------- uplink
    def add_sample(self, device_id: str, tokens: Tensor, indices: Tensor | None, question: str,
                   num_tokens: int, token_dim: int, sample_id: str = '', *,
                   device_answer: str = '', device_version: int = -1, audit: bool = False,
                   label: str | None = None, now: float | None = None) -> bool:
        """Keep one uplinked sample (into the device's inbox); False for a re-delivery.

        Raises:
            WireError: Another token space, a device id that cannot be a folder name, or a
                caption sample (the fleet runs answer rounds only).
        """
        import torch

        check_device_id(device_id)
        check_sample(self.space, device_id, tokens, indices, num_tokens, token_dim)
        if is_describe(question):
            raise WireError(caption_sample_error(
                question, 'backend ray: its teacher service and workers have no caption '
                          'heads; caption rounds run on backend local'))
        full = indices is None or (indices.numel() == num_tokens and bool(
            (indices.long() == torch.arange(num_tokens)).all()))
        with self._lock:
            dev = self._device(device_id)
            if sample_id and sample_id in dev.recent_set:
                return False
            number = dev.next_number
            dev.next_number += 1
            info = {'sample_id': sample_id, 'question': question, 'num_tokens': int(num_tokens),
                    'token_dim': int(token_dim), 'device_answer': device_answer,
                    'device_version': int(device_version), 'audit': bool(audit),
                    'label': label, 'arrived': time.time()}
            self.store.put_sample(device_id, number, tokens, None if full else indices, info)
            dev.unapplied.append((number, self._clock() if now is None else now))
            if sample_id:
                if len(dev.recent) == dev.recent.maxlen:
                    dev.recent_set.discard(dev.recent[0])
                dev.recent.append(sample_id)
                dev.recent_set.add(sample_id)
            self.groups.observe(device_id, int(tokens.shape[0]), full)
            self.counters['samples'] += 1
            self._note_trigger(dev)
        return True

    def add_pulled(self, device_id: str, sample_id: str, tokens: Tensor,
                   indices: Tensor | None) -> bool:
        """The rest of a sample's tokens: queued for the device's next task (True)."""
        check_sample(self.space, device_id, tokens, indices, self.space.num_tokens,
                     self.space.dim)
        with self._lock:
            dev = self._device(device_id)
            number, dev.next_number = dev.next_number, dev.next_number + 1
            self.store.put_pulled(device_id, number, tokens, indices, sample_id)
        return True

    def pull_unavailable(self, device_id: str, sample_id: str) -> None:
        """The device no longer holds a sample's tokens: queued for its next task."""
        with self._lock:
            dev = self._device(device_id)
            number, dev.next_number = dev.next_number, dev.next_number + 1
            self.store.put_control(device_id, number, UNAVAILABLE, {'sample_id': sample_id})

    def rolled_back(self, device_id: str, new_version: int, restored_hash: str) -> bool:
        """A rollback the device reported: queued for its next task (True); whether it could
        be mirrored comes back as a :class:`Mirrored` event."""
        with self._lock:
            dev = self._device(device_id)
            number, dev.next_number = dev.next_number, dev.next_number + 1
            self.store.put_control(device_id, number, ROLLED_BACK,
                                   {'version': int(new_version), 'hash': restored_hash})
            # Its next round must see the report: make it due now if it has samples waiting.
            if dev.view is not None:
                dev.view.version = int(new_version)
                dev.view.hash = restored_hash
        return True

    # ---------------------------------------------------------------- due rounds
    def _trigger_time(self, dev: _Device) -> float | None:
        """When the device's next round became (or becomes) due; None: nothing pending."""
        cfg = self._cfg
        need = cfg.min_samples - dev.base_pending
        if need <= 0:
            return dev.last_done
        if len(dev.unapplied) >= need:
            return dev.unapplied[need - 1][1]
        first = dev.base_since if dev.base_pending else (
            dev.unapplied[0][1] if dev.unapplied else None)
        return None if first is None else first + cfg.max_wait_s

    def _note_trigger(self, dev: _Device) -> None:
        if self._trigger.get(dev.device_id) is None:
            t = self._trigger_time(dev)
            if t is not None and t <= self._clock():
                self._trigger[dev.device_id] = t

    def _due_devices(self, now: float, held: Any) -> list[str]:
        out = []
        for d, dev in self._devices.items():
            if dev.in_flight is not None or d in held or now < dev.paused_until:
                continue
            t = self._trigger_time(dev)
            if t is not None and t <= now:
                if self._trigger.get(d) is None:
                    self._trigger[d] = t
                out.append(d)
        return out

    def waiting(self, device_id: str) -> int:
        """Samples of the device that no task has taken: those pending after its last task,
        or, while a task of it runs, those that arrived after the task was handed out (the
        few that arrive before its worker reads the inbox go with it: they count here until
        it ends)."""
        with self._lock:
            dev = self._device(device_id)
            if dev.in_flight is None:
                return dev.base_pending + len(dev.unapplied)
            return sum(1 for number, _ in dev.unapplied if number > dev.taken_upto)

    def due(self, device_id: str, now: float | None = None) -> bool:
        """Whether the device's round is due (and not running)."""
        with self._lock:
            dev = self._device(device_id)
            t = self._trigger_time(dev)
            now = self._clock() if now is None else now
            return dev.in_flight is None and t is not None and t <= now

    # ---------------------------------------------------------------- the loop
    def poll(self, held: Any = (), timeout: float = 0.0, dispatch: bool = True
             ) -> list[FleetEvent]:
        """Start due rounds on free workers, wait up to ``timeout`` seconds for results,
        and return what happened. ``held``: devices whose rounds must wait (a rollback order
        out). ``dispatch`` False: start nothing, only collect the rounds in flight (the node
        deactivated or unloading)."""
        import ray

        events: list[FleetEvent] = []
        with self._lock:
            if dispatch:
                self._dispatch(held)
            refs = [s.ref for s in self.slots if s.ref is not None]
            refs += [s.ping_ref for s in self.slots if s.ping_ref is not None]
        if refs:
            ray.wait(refs, num_returns=1, timeout=timeout)
        elif timeout > 0:
            time.sleep(min(timeout, PING_EVERY_S))
        with self._lock:
            for slot in self.slots:
                events += self._collect(slot)
            self._ping_dead()
            if dispatch:
                self._dispatch(held)
        return events

    def _dispatch(self, held: Any) -> None:
        now = self._clock()
        for slot in self.slots:
            if not slot.alive or slot.ref is not None:
                continue
            if self._retry:
                tasks, _ = self._retry.popleft()
                self.counters['retried'] += len(tasks)
            else:
                due = self._due_devices(now, held)
                free = sum(1 for s in self.slots if s.alive and s.ref is None)
                ids = self.scheduler.pick(due, self.groups.groups(),
                                          task_size(len(due), free, self.options.group_max))
                if not ids:
                    break
                tasks = []
                for d in ids:
                    ticket = f'{d}:{uuid.uuid4().hex[:16]}'
                    self._devices[d].in_flight = ticket
                    self._devices[d].taken_upto = self._devices[d].next_number - 1
                    tasks.append({'device_id': d, 'ticket': ticket,
                                  'trigger': self._trigger.get(d), 'dispatched': now})
            for task in tasks:
                self._attempts[task['ticket']] = self._attempts.get(task['ticket'], 0) + 1
            slot.ref = slot.handle.run.remote([{'device_id': t['device_id'],
                                                'ticket': t['ticket']} for t in tasks],
                                              self._cfg)
            slot.tasks, slot.dispatched = tasks, now
            self.counters['tasks'] += 1

    def _collect(self, slot: _Slot) -> list[FleetEvent]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if slot.ref is None:
            return []
        if _process_gone(slot.pid, slot.host):
            # Seen here before Ray reports it (Ray takes ~2 s): the task's answer can no
            # longer come; Ray's error for it is never read.
            return self._died(slot, f'process {slot.pid} is gone')
        try:
            results = ray.get(slot.ref, timeout=0)
        except GetTimeoutError:
            return []
        except RayActorError as err:
            return self._died(slot, _first_line(err))
        except Exception as err:  # noqa: BLE001 - the task itself raised: a bug, not a crash
            tasks, slot.ref, slot.tasks = slot.tasks, None, []
            return [self._failed(t, f'task raised: {_first_line(err)}') for t in tasks]
        tasks, slot.ref, slot.tasks = slot.tasks, None, []
        events: list[FleetEvent] = []
        by_ticket = {t['ticket']: t for t in tasks}
        for out in results:
            task = by_ticket.get(out.get('ticket', ''))
            if task is None:
                continue
            events += self._finished(task, out, slot.index)
        return events

    def _died(self, slot: _Slot, why: str) -> list[FleetEvent]:
        """The worker died (or is unreachable): its tasks go to the others first; the store
        makes each ticket commit once, whichever worker runs it."""
        tasks, slot.ref, slot.tasks = slot.tasks, None, []
        slot.alive, slot.down_since, slot.next_ping = False, self._clock(), 0.0
        slot.deaths += 1
        self.counters['worker_deaths'] += 1
        self._retry.append((tasks, slot.index))
        return [WorkerChanged(slot.index, False, f'worker {slot.index} died with {len(tasks)} '
                                                 f'task(s), handed on: {why}')]

    def _failed(self, task: dict[str, Any], message: str) -> TaskFailed:
        dev = self._devices[task['device_id']]
        dev.in_flight = None
        dev.failures += 1
        dev.paused_until = self._clock() + min(60.0, 2.0 ** dev.failures)
        self.counters['failed'] += 1
        return TaskFailed(task['device_id'], message)

    def _finished(self, task: dict[str, Any], out: dict[str, Any], worker: int
                  ) -> list[FleetEvent]:
        if 'error' in out:
            return [self._failed(task, out['error'])]
        out = decode_result(out)
        device_id, ticket = task['device_id'], task['ticket']
        dev = self._devices[device_id]
        now = self._clock()
        if dev.in_flight == ticket:
            dev.in_flight = None
        dev.failures = 0
        if ticket in self._delivered_set:  # a second answer for one ticket: never twice
            self.counters['duplicates_suppressed'] += 1
            return []
        if len(self._delivered) == self._delivered.maxlen:
            self._delivered_set.discard(self._delivered[0])
        self._delivered.append(ticket)
        self._delivered_set.add(ticket)
        self.counters['replayed'] += int(bool(out.get('replayed')))
        upto = int(out.get('inbox_upto', -1))
        while dev.unapplied and dev.unapplied[0][0] <= upto:
            dev.unapplied.popleft()
        dev.base_pending = int(out.get('pending_after', 0))
        dev.base_since = now if dev.base_pending else None
        dev.last_done = now
        trigger = task.get('trigger')
        self._trigger[device_id] = None
        self._note_trigger(dev)
        dev.view = _view_of(device_id, out)
        events: list[FleetEvent] = []
        for m in out.get('mirrors') or []:
            events.append(Mirrored(device_id, int(m['version']), str(m['hash']), bool(m['ok'])))
        if out.get('pulls'):
            events.append(PullsWanted(device_id, list(out['pulls'])))
        if out.get('rollback') is not None:
            from cdcca_ros.core.updates import RollbackEnvelope

            events.append(RollbackOrdered(device_id, RollbackEnvelope(**out['rollback']),
                                          dict(out.get('audit') or {})))
        r = out.get('result')
        self.scheduler.finished(device_id, out['outcome'],
                                None if r is None else r.get('agreement_before'))
        if r is not None:
            self.counters['rounds'] += 1
            events.append(RoundDone(device_id, FleetRoundResult.from_result(out), trigger,
                                    task['dispatched'], now, worker, bool(out.get('replayed')),
                                    self._attempts.pop(ticket, 1)))
        else:
            self._attempts.pop(ticket, None)
            if out.get('rollback') is None:
                events.append(NoRound(device_id, trigger, task['dispatched'], now))
        return events

    def _ping_dead(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        now = self._clock()
        for slot in self.slots:
            if slot.alive:
                continue
            if slot.ping_ref is not None:
                try:
                    info = ray.get(slot.ping_ref, timeout=0)
                except GetTimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - still restarting
                    slot.ping_ref = None
                    slot.next_ping = now + PING_EVERY_S
                    continue
                slot.ping_ref, slot.alive = None, True
                slot.pid, slot.host = int(info['pid']), str(info['host'])
                continue
            if now >= slot.next_ping:
                slot.ping_ref = slot.handle.ping.remote()

    # ---------------------------------------------------------------- operations
    def wait_workers(self, timeout: float = 120.0) -> bool:
        """Block until every worker is alive (after a kill); False on timeout."""
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            with self._lock:
                self._ping_dead()
                if all(s.alive for s in self.slots):
                    return True
            time.sleep(0.1)
        return False

    def kill_worker(self, index: int) -> int:
        """SIGKILL worker ``index``'s process (on this machine; for fault tests and the
        bench). Returns the pid killed.

        Raises:
            ConfigError: The worker runs on another host or is not up.
        """
        with self._lock:
            slot = self.slots[index]
            if slot.host != socket.gethostname() or not slot.pid:
                raise ConfigError(f'worker {index} runs on {slot.host!r}, not here')
            pid = slot.pid
        os.kill(pid, signal.SIGKILL)
        return pid

    def teacher_report(self, reset: bool = False, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Each teacher replica's batching figures (blocking)."""
        import ray

        return ray.get([t.report.remote(reset) for t in self.teachers], timeout=timeout)

    def actors(self, timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
        """Each live worker's and teacher's process (``pid``, ``host``) and torch threads
        (``threads``, see :func:`_threads`); blocking."""
        import ray

        workers = [s.handle for s in self.slots if s.alive]
        infos = ray.get([h.ping.remote() for h in workers + self.teachers], timeout=timeout)
        keep = ('pid', 'host', 'threads')
        infos = [{k: i[k] for k in keep} for i in infos]
        return {'workers': infos[:len(workers)], 'teachers': infos[len(workers):]}

    def in_flight(self) -> dict[int, tuple[list[str], float]]:
        """Worker -> (devices of its running task, when it was handed the task)."""
        with self._lock:
            return {s.index: ([t['device_id'] for t in s.tasks], s.dispatched)
                    for s in self.slots if s.ref is not None}


def _process_gone(pid: int, host: str) -> bool:
    """Whether process ``pid`` of ``host`` is known to be gone: on this host only, no such
    process or a zombie (killed, not yet reaped). Another host's worker: False (Ray's
    report counts)."""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: it exists
        return False
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            state = f.read().rsplit(b')', 1)[1].split()[:1]
    except (OSError, IndexError):
        return False
    return state in ([b'Z'], [b'X'])


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    bundle = {'CPU': float(cpus)}
    if gpus:
        bundle['GPU'] = float(gpus)
    return bundle


def _view_of(device_id: str, out: dict[str, Any]) -> DeviceView:
    v = out.get('view') or {}
    return DeviceView(device_id, version=int(v.get('version', 0)), hash=str(v.get('hash', '')),
                      round=int(v.get('round', 0)), last_gate=dict(v.get('last_gate') or {}),
                      last_audit=dict(v.get('last_audit') or {}),
                      counters=dict(v.get('counters') or {}),
                      status=dict(out.get('status') or {}))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0] if text else ""}'[:300]
