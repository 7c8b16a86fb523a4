"""Lightweight simulated devices driving the cloud's fleet engine (no ROS graph per device).

Each :class:`SimDevice` is what the cloud sees of a robot: uplinked samples at its own rate
from the synthetic world, in its own drift schedule (domains and dwell times of its own),
with its UTS settings (kept tokens per sample, fixed or varying, and a share of audit
samples with every token), packed as the device packs them; and the downlink: every delta
verified by the device's :class:`~cdcca_ros.core.updates.DeltaGate` (signature, version
order, base hash) and taken, rollback orders checked and carried out and reported back.

How a device uplinks (:data:`UPLINKS`):

- ``open`` (the default): a robot answers questions all the time and uplinks at its rate,
  also while its previous round runs; only while a full round's worth of its samples
  (``round.min_samples``) waits that no task has taken (its next round is owed and has not
  started) does it hold what it answers on board (counted as ``held``). So every round
  carries about ``min_samples`` new samples whatever the number of workers (rounds per
  minute compare), and a fleet that produces faster than the workers serve always owes
  them work;
- ``unbounded``: the same without the hold: under saturation the rounds grow (each takes
  everything waiting), so fewer workers make bigger rounds;
- ``closed``: a device uplinks ``min_samples`` samples and sends its next burst only once
  its round came back (what the bench did before: a device produces nothing while its round
  runs or waits, so a saturated fleet owes its workers work only part of the time).

:class:`FleetRun` is one phase: devices, engine, the loop, an optional worker kill, and the
records the bench summarises.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import random
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.fleet.engine import FleetEngine
    from cdcca_ros.models.base import MLLM, VisionSpace


UPLINKS = ('open', 'unbounded', 'closed')
FULL_BURST = -1.0  # FleetRun presend: every device starts with a full first burst sent
HOST = socket.gethostname()


# --- the world's tokens ------------------------------------------------------------------------
@dataclass
class TokenPool:
    """Vision tokens of the world's samples per domain (computed once, shared by devices)."""

    tokens: dict[str, Tensor]
    questions: dict[str, list[str]]
    space: VisionSpace

    @classmethod
    def build(cls, student: MLLM, seed: int, per_domain: int, image_size: int,
              start: int) -> TokenPool:
        import torch

        from cdcca_ros.sim.domains import DRIFTED, SOURCE
        from cdcca_ros.sim.world import World

        world = World(seed)
        tokens, questions = {}, {}
        for domain in (SOURCE, *DRIFTED):
            samples = world.samples(domain, per_domain, image_size, start=start)
            with torch.no_grad():
                tokens[domain] = torch.cat([student.vision_tokens([s.image for s in
                                                                   samples[i:i + 32]])
                                            for i in range(0, len(samples), 32)])
            questions[domain] = [s.question for s in samples]
        return cls(tokens, questions, student.vision_space())

    @property
    def domains(self) -> list[str]:
        return list(self.tokens)


@dataclass
class DeviceProfile:
    """One simulated robot's uplink.

    Attributes:
        device_id: Its id.
        rate: Uplinked samples a second.
        keep: Kept tokens per partial sample; 0: varies per sample (a variance threshold).
        schedule: ``(domain, seconds)`` visits, cycled.
        audit_fraction: Share of uplinks that are audit samples (every token).
        seed: Its random stream.
    """

    device_id: str
    rate: float
    keep: int
    schedule: list[tuple[str, float]]
    audit_fraction: float
    seed: int

    def domain_at(self, t: float) -> str:
        total = sum(s for _, s in self.schedule)
        t = t % total
        for domain, seconds in self.schedule:
            if t < seconds:
                return domain
            t -= seconds
        return self.schedule[-1][0]


def make_profiles(n: int, seed: int, num_tokens: int, rates: tuple[float, float],
                  domains: Sequence[str], audit_fraction: float = 0.1) -> list[DeviceProfile]:
    """``n`` robots: rates uniform in ``rates``, three UTS settings in turn (half the tokens,
    a third, a number that varies), each its own domain order and dwell times (20-90 s)."""
    rng = random.Random(seed)
    keeps = (max(1, num_tokens // 2), max(1, num_tokens // 3), 0)
    out = []
    for i in range(n):
        order = list(domains)
        rng.shuffle(order)
        schedule = [(d, rng.uniform(20.0, 90.0)) for d in order]
        out.append(DeviceProfile(f'robot{i:04d}', rng.uniform(*rates), keeps[i % 3], schedule,
                                 audit_fraction, seed * 100_003 + i))
    return out


# --- one device --------------------------------------------------------------------------------
class SimDevice:
    """A robot as the cloud sees it (see the module docstring)."""

    def __init__(self, profile: DeviceProfile, pool: TokenPool, burst: int, public_key: Any,
                 trainable: dict[str, Tensor], base_hash: str, pack_dtype: str = 'ecq',
                 closed: bool = False) -> None:
        from cdcca_ros.core.updates import DeltaGate

        self.p, self.pool, self.burst, self.closed = profile, pool, int(burst), bool(closed)
        self.rng = random.Random(profile.seed)
        self.public_key, self.trainable = public_key, trainable
        self.gate = DeltaGate(profile.device_id, public_key, 0, base_hash, trainable)
        self.hashes = {0: base_hash}
        self.pack_dtype = pack_dtype
        self.sent = 0                 # samples sent in all
        self.in_burst = 0             # samples of the burst under way
        self.waiting = False          # closed loop: burst complete, its round owed
        self.served = 0               # rounds that came back (any outcome)
        self.held = 0                 # open: answered on board while a round's worth waited
        self.sent_while_running = 0   # uplinked while a round of it ran
        self.counts: Counter[str] = Counter()
        self.seen: set[tuple[int, str]] = set()
        self.next_t = 0.0
        # The UTS ring: recent partial samples whose other tokens a pull may ask for.
        self.ring: OrderedDict[str, tuple[str, int, Tensor]] = OrderedDict()
        self.ring_samples = 256

    @property
    def device_id(self) -> str:
        return self.p.device_id

    def schedule_next(self, now: float) -> None:
        self.next_t = now + self.rng.expovariate(self.p.rate)

    def uplink(self, t: float) -> tuple[Tensor, Tensor | None, str, str, bool]:
        """The next sample: ``(tokens, indices, question, sample id, audit)``, packed and
        unpacked as device and cloud node do."""
        import torch

        from cdcca_ros.core.uts import pack_tokens, unpack_tokens

        domain = self.p.domain_at(t)
        pool = self.pool.tokens[domain]
        row = self.rng.randrange(pool.shape[0])
        n = pool.shape[1]
        audit = self.rng.random() < self.p.audit_fraction
        if audit:
            idx = None
            kept = pool[row]
        else:
            k = self.p.keep or self.rng.randint(2, max(2, n - 2))
            idx = torch.tensor(sorted(self.rng.sample(range(n), k)), dtype=torch.long)
            kept = pool[row][idx]
        tokens = unpack_tokens(pack_tokens(kept, self.pack_dtype))
        sid = f'{self.device_id}-{self.sent}'
        if idx is not None:
            self.ring[sid] = (domain, row, idx)
            while len(self.ring) > self.ring_samples:
                self.ring.popitem(last=False)
        self.sent += 1
        self.in_burst += 1
        if self.closed and self.in_burst >= self.burst:
            self.waiting = True
        return tokens, idx, self.pool.questions[domain][row], sid, audit

    def pulled(self, sample_id: str) -> tuple[Tensor, Tensor] | None:
        """The tokens of a sample that were not sent, packed as uplinked (a pull's answer),
        or None when the ring no longer holds it."""
        import torch

        from cdcca_ros.core.uts import pack_tokens, unpack_tokens

        held = self.ring.pop(sample_id, None)
        if held is None:
            return None
        domain, row, idx = held
        full = self.pool.tokens[domain][row]
        rest = torch.tensor([i for i in range(full.shape[0]) if i not in set(idx.tolist())],
                            dtype=torch.long)
        self.counts['pulls_served'] += 1
        return unpack_tokens(pack_tokens(full[rest], self.pack_dtype)), rest

    def served_now(self, now: float) -> bool:
        """Its round came back; True when that starts its next burst (a closed loop's device:
        its next uplink is scheduled now)."""
        self.served += 1
        self.in_burst = 0
        if not self.closed:
            return False
        self.waiting = False
        self.schedule_next(now)
        return True

    def take_delta(self, envelope: Any) -> str:
        """Verify and take a delta: ``applied``, ``duplicate`` (a version already taken, the
        same delta twice) or ``rejected`` (another reason)."""
        from cdcca_ros.errors import DeltaGateRejection

        key = (envelope.new_version, envelope.new_hash)
        if key in self.seen:
            self.counts['duplicate'] += 1
            return 'duplicate'
        try:
            self.gate.accept(envelope)
        except DeltaGateRejection as err:
            kind = 'duplicate' if err.reason == 'replay' else 'rejected'
            self.counts[kind] += 1
            self.counts[f'rejected:{err.reason}'] += int(kind == 'rejected')
            return kind
        self.gate.commit(envelope.new_version, envelope.new_hash)
        self.seen.add(key)
        self.hashes[envelope.new_version] = envelope.new_hash
        self.counts['applied'] += 1
        return 'applied'

    def take_rollback(self, order: Any) -> tuple[int, str] | None:
        """Check and carry out a rollback order; ``(version, hash)`` to report, or None."""
        from cdcca_ros.core.updates import DeltaGate, check_rollback
        from cdcca_ros.errors import DeltaGateRejection

        previous = self.hashes.get(max((v for v in self.hashes if v < self.gate.version),
                                       default=-1))
        try:
            check_rollback(order, self.public_key, self.device_id, self.gate.version,
                           self.gate.base_hash, previous)
        except DeltaGateRejection:
            self.counts['rollback_rejected'] += 1
            return None
        self.gate = DeltaGate(self.device_id, self.public_key, order.new_version, order.to_hash,
                              self.trainable)
        self.hashes[order.new_version] = order.to_hash
        self.counts['rolled_back'] += 1
        return order.new_version, order.to_hash


# --- one phase ---------------------------------------------------------------------------------
@dataclass
class KillPlan:
    """SIGKILL a worker in the middle of a round once ``after_rounds`` rounds came back: while
    one of its devices is training (the worker's ``running.json`` marker in that device's
    folder says ``round``: state loaded, inbox applied, labels fetched, nothing committed);
    if no such moment is seen by ``1.5 * after_rounds`` rounds, a task well into its time."""

    after_rounds: int
    min_in_round_s: float = 0.3


@dataclass
class PhaseRecord:
    """What one phase measured."""

    name: str
    workers: int
    devices: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    due: list[tuple[float, int, int]] = field(default_factory=list)  # (t, due, busy)
    t0: float = 0.0
    cutoff: float | None = None
    served_at_cutoff: dict[str, int] = field(default_factory=dict)
    end: float = 0.0
    owed_after_drain: int = 0
    samples_sent: int = 0
    samples_lost: int = 0
    samples_held: int = 0       # answered on board while a round's worth waited (open)
    sent_while_running: int = 0
    uplink: str = ''
    device_counts: dict[str, int] = field(default_factory=dict)
    kill: dict[str, Any] = field(default_factory=dict)
    teacher: list[dict[str, Any]] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    driver_cpu_s: float = 0.0
    store_bytes: int = 0
    events: Counter[str] = field(default_factory=Counter)
    actors: dict[str, Any] = field(default_factory=dict)  # pids and torch threads
    cpu: dict[str, Any] = field(default_factory=dict)     # CPU seconds, start to cutoff


class FleetRun:
    """Drives ``devices`` against ``engine`` until every device got ``rounds`` rounds (or
    ``max_s`` passed), then stops uplinking and drains what is owed.

    Args:
        engine: The fleet.
        devices: The simulated robots (closed-loop devices for ``uplink='closed'``).
        rounds: Rounds every device should get.
        max_s: Time cap of the phase (the drain aside).
        kill: Kill a worker mid-round (None: no).
        presend: Share of the first burst each device has sent at the start (uniform per
            device up to this), so rounds are owed from the start; :data:`FULL_BURST`: all
            of it, every device owed a round at the start.
        log: Progress lines.
        uplink: How devices uplink, one of :data:`UPLINKS` (see the module docstring).
    """

    def __init__(self, engine: FleetEngine, devices: list[SimDevice], rounds: int,
                 max_s: float, kill: KillPlan | None = None, presend: float = 1.0,
                 log: Callable[[str], None] = print, uplink: str = 'open') -> None:
        if uplink not in UPLINKS:
            raise ValueError(f'uplink {uplink!r} is not one of {UPLINKS}')
        if any(d.closed != (uplink == 'closed') for d in devices):
            raise ValueError(f'uplink {uplink!r} needs devices with closed={uplink == "closed"}')
        self.engine, self.devices = engine, devices
        self.by_id = {d.device_id: d for d in devices}
        self.index = {d.device_id: i for i, d in enumerate(devices)}
        self.rounds, self.max_s, self.kill, self.presend = rounds, max_s, kill, presend
        self.log, self.uplink = log, uplink

    def holds(self, dev: SimDevice) -> bool:
        """Whether an open-loop device holds its next sample on board: a full round's worth
        of its samples waits that no task has taken."""
        return self.uplink == 'open' and self.engine.waiting(dev.device_id) >= dev.burst

    def run(self, name: str) -> PhaseRecord:
        rec = PhaseRecord(name, len(self.engine.slots), len(self.devices))
        rec.actors = self.engine.actors()
        cpu0 = time.process_time()
        usage0 = self._usage(rec)
        rec.t0 = now = time.monotonic()
        rng = random.Random(len(self.devices))
        for dev in self.devices:  # part of the first burst already sent
            share = 1.0 if self.presend == FULL_BURST else rng.uniform(0.0, self.presend)
            for _ in range(int(round(share * dev.burst))):
                self._send(dev, now)
            if not dev.waiting:
                dev.schedule_next(now)
        heap = [(d.next_t, i) for i, d in enumerate(self.devices) if not d.waiting]
        heapq.heapify(heap)
        last_log = now
        while True:
            now = time.monotonic()
            running = {d for devices, _ in self.engine.in_flight().values() for d in devices}
            while heap and heap[0][0] <= now:
                _, i = heapq.heappop(heap)
                dev = self.devices[i]
                if self.holds(dev):
                    dev.held += 1
                else:
                    self._send(dev, now)
                    dev.sent_while_running += int(dev.device_id in running)
                if not dev.waiting:
                    dev.schedule_next(now)
                    heapq.heappush(heap, (dev.next_t, i))
            wait = max(0.0, min(0.05, (heap[0][0] - now) if heap else 0.05))
            for event in self.engine.poll(timeout=wait):
                i = self._event(event, rec)
                if i is not None:
                    heapq.heappush(heap, (self.devices[i].next_t, i))
            due, busy = self.engine.queue()  # not figures(): this runs tens of times a second
            rec.due.append((time.monotonic() - rec.t0, due, busy))
            self._maybe_kill(rec)
            self._maybe_revive(rec)
            served = [d.served for d in self.devices]
            if rec.cutoff is None and min(served) >= self.rounds:
                rec.cutoff = time.monotonic() - rec.t0
                rec.served_at_cutoff = {d.device_id: d.served for d in self.devices}
                break
            if time.monotonic() - rec.t0 > self.max_s:
                self.log(f'  [{name}] time cap: {min(served)} rounds for the slowest device')
                break
            if time.monotonic() - last_log > 30.0:
                last_log = time.monotonic()
                figures = self.engine.figures()
                self.log(f'  [{name}] {time.monotonic() - rec.t0:.0f} s: '
                         f'{len(rec.rounds)} rounds, served min {min(served)} max '
                         f'{max(served)}, {figures["fleet.due"]} due, '
                         f'{figures["fleet.workers_alive"]} workers')
        usage1 = self._usage(rec)
        rec.cpu = {k: (None if usage0[k] is None or usage1[k] is None
                       else usage1[k] - usage0[k]) for k in usage0}
        rec.cpu.update(wall_s=time.monotonic() - rec.t0, rounds=len(rec.rounds),
                       driver=time.process_time() - cpu0)
        if rec.cutoff is None:
            rec.served_at_cutoff = {d.device_id: d.served for d in self.devices}
        self._drain(rec)
        rec.end = time.monotonic() - rec.t0
        rec.driver_cpu_s = time.process_time() - cpu0
        rec.samples_sent = sum(d.sent for d in self.devices)
        rec.samples_held = sum(d.held for d in self.devices)
        rec.sent_while_running = sum(d.sent_while_running for d in self.devices)
        rec.uplink = self.uplink
        rec.samples_lost = self._samples_lost()
        rec.store_bytes = sum(f.stat().st_size for f in self.engine.store.root.rglob('*')
                              if f.is_file())
        for d in self.devices:
            rec.device_counts.update(d.counts)
        rec.teacher = self.engine.teacher_report(reset=True)
        rec.engine = dict(self.engine.counters)
        return rec

    def _usage(self, rec: PhaseRecord) -> dict[str, float | None]:
        """CPU seconds so far of the phase's workers and teachers (as started: a killed
        worker's are lost, so None) and of the whole machine (Linux ``/proc``; None
        elsewhere)."""
        def of(role: str) -> float | None:
            here = [a['pid'] for a in rec.actors.get(role, []) if a['host'] == HOST]
            used = [process_cpu_s(pid) for pid in here]
            if not here or any(u is None for u in used):
                return None
            return float(sum(u for u in used if u is not None))

        return {'workers': of('workers'), 'teacher': of('teachers'),
                'machine': machine_cpu_s()}

    def _send(self, dev: SimDevice, now: float) -> None:
        space = self.engine.space
        tokens, idx, question, sid, audit = dev.uplink(now - 0.0)
        self.engine.add_sample(dev.device_id, tokens, idx, question, space.num_tokens,
                               space.dim, sid, audit=audit)

    def _event(self, event: Any, rec: PhaseRecord) -> int | None:
        """Handle one engine event; the index of a device that starts a new burst."""
        from cdcca_ros.core.fleet import engine as fleet

        rec.events[type(event).__name__] += 1
        if isinstance(event, fleet.RollbackOrdered):
            dev = self.by_id[event.device_id]
            done = dev.take_rollback(event.order)
            if done is not None:
                self.engine.rolled_back(dev.device_id, *done)
            return None
        if isinstance(event, fleet.PullsWanted):
            dev = self.by_id[event.device_id]
            for sid in event.sample_ids:
                rest = dev.pulled(sid)
                if rest is None:
                    self.engine.pull_unavailable(event.device_id, sid)
                else:
                    self.engine.add_pulled(event.device_id, sid, *rest)
            return None
        if not isinstance(event, fleet.RoundDone | fleet.NoRound):
            if (isinstance(event, fleet.WorkerChanged) and not event.alive and rec.kill
                    and 'detected_t' not in rec.kill):
                rec.kill['detected_t'] = time.monotonic() - rec.t0
            if isinstance(event, fleet.TaskFailed | fleet.WorkerChanged):
                self.log(f'    {type(event).__name__}: {getattr(event, "message", "")[:200]}')
            return None
        dev = self.by_id[event.device_id]
        row = {'device': event.device_id, 'trigger': _rel(event.trigger_t, rec.t0),
               'dispatch': event.dispatch_t - rec.t0, 'done': event.done_t - rec.t0,
               'outcome': 'nothing', 'attempts': 1, 'replayed': False, 'worker': None}
        if isinstance(event, fleet.RoundDone):
            result = event.result
            row.update(outcome=result.outcome, attempts=event.attempts, worker=event.worker,
                       replayed=event.replayed, samples=result.samples,
                       train_s=result.train_s, steps=len(result.losses),
                       bytes=result.stats.nbytes if result.stats else 0,
                       reason=result.decision.reason if result.decision else None)
            if result.envelope is not None:
                row['delta'] = dev.take_delta(result.envelope)
        rec.rounds.append(row)
        return self.index[dev.device_id] if dev.served_now(time.monotonic()) else None

    def _maybe_kill(self, rec: PhaseRecord) -> None:
        plan = self.kill
        if plan is None or rec.kill or len(rec.rounds) < plan.after_rounds:
            return
        now = time.monotonic()
        late = len(rec.rounds) >= 1.5 * plan.after_rounds
        # Mid-round: well into a task, by the tasks' median time so far.
        typical = percentile([r['done'] - r['dispatch'] for r in rec.rounds], 50) or 0.0
        for worker, (devices, since) in sorted(self.engine.in_flight().items()):
            training = self._training(worker, devices)
            if training is None and not (late and now - since >= max(plan.min_in_round_s,
                                                                        0.4 * typical)):
                continue
            pid = self.engine.kill_worker(worker)
            rec.kill = {'t': now - rec.t0, 'worker': worker, 'pid': pid,
                        'devices': list(devices), 'in_round_s': now - since,
                        'training': training, 'rounds_before': len(rec.rounds)}
            self.log(f'  [{rec.name}] SIGKILL worker {worker} (pid {pid}) '
                     f'{now - since:.2f} s into a task of {devices}'
                     + (f', {training} training' if training else ''))
            return

    def _training(self, worker: int, devices: Sequence[str]) -> str | None:
        """The device of ``devices`` that worker ``worker`` is training now, if any."""
        pid = self.engine.slots[worker].pid
        for device_id in devices:
            marker = self.engine.store.device_dir(device_id) / 'running.json'
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            if info.get('phase') == 'round' and info.get('pid') == pid:
                return device_id
        return None

    def _owed(self) -> int:
        """Devices owed a round: a closed loop's device waiting for its round; any device
        whose round is due (or running) in the engine."""
        running = {d for devices, _ in self.engine.in_flight().values() for d in devices}
        return sum(d.waiting or d.device_id in running or self.engine.due(d.device_id)
                   for d in self.devices)

    def _drain(self, rec: PhaseRecord, timeout: float = 600.0) -> None:
        """No more uplink; wait for every owed round (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._owed():
            for event in self.engine.poll(timeout=0.1):
                self._event(event, rec)
            self._maybe_revive(rec)
        rec.owed_after_drain = self._owed()

    def _maybe_revive(self, rec: PhaseRecord) -> None:
        """When the killed worker serves again: after the engine saw it die (a slot still
        marked alive right after the SIGKILL is not back, it is not yet known dead)."""
        if rec.kill and 'alive_t' not in rec.kill and 'detected_t' in rec.kill:
            slot = self.engine.slots[rec.kill['worker']]
            if slot.alive and slot.deaths > 0:
                rec.kill['alive_t'] = time.monotonic() - rec.t0

    def _samples_lost(self) -> int:
        """Samples sent that are neither in their device's memory nor waiting in its inbox."""
        from safetensors import safe_open

        from cdcca_ros.core.fleet.store import SAMPLE

        store = self.engine.store
        lost = 0
        for dev in self.devices:
            have: set[str] = set()
            for path in (store.device_dir(dev.device_id) / 'memory').glob('*.safetensors'):
                with safe_open(str(path), framework='pt') as f:
                    have.add(json.loads((f.metadata() or {})['record'])['sample_id'])
            for entry in store.inbox(dev.device_id):
                if entry.kind == SAMPLE:
                    have.add(str(entry.read()[0].get('sample_id', '')))
            lost += sum(f'{dev.device_id}-{i}' not in have for i in range(dev.sent))
        return lost


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``); None: gone."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def machine_cpu_s() -> float | None:
    """CPU seconds the machine's cores have been busy (every process; ``/proc/stat``)."""
    try:
        with open('/proc/stat', 'rb') as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf('SC_CLK_TCK')


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else t - t0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank), None for no value."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))])
