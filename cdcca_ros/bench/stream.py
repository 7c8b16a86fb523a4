"""A device on a long drifting stream with a cloud beside it, simulated without ROS.

What the ``continual`` bench (and the tests) run: the camera's schedule of domain visits
(with revisits), the device answering every sample through
:class:`~cdcca_ros.core.device_runtime.DeviceRuntime` and UTS as its node does, the uplink of
what UTS (or a baseline) selects into a :class:`~cdcca_ros.core.cloud_runtime.CloudRuntime`,
rounds triggered as the cloud node triggers them (``round.min_samples`` pending, or
``round.max_wait_s`` after the first, on a simulated clock of ``rate`` answers a second),
token pulls answered from the device's ring, deltas hot-applied, rollback orders carried
out, and after every round every domain's held-out accuracy.

A :class:`Method` is one row: how samples are chosen and sent, which labels and losses the
cloud uses and whether its round is guarded.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.bench.common import cloud_token_basis
from cdcca_ros.bench.robot import DEVICE_ID, UPLINKS, Robot
from cdcca_ros.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.cloud_runtime import CloudRuntime
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models.base import MLLM
    from cdcca_ros.sim.world import Sample

LABELS = ('teacher', 'truth')
UPDATES = ('none', 'tent', 'cloud')
DEFAULT_SCHEDULE = ('source:200,fog:300,night:300,source:200,clutter:300,fog:200,novel:300,'
                    'night:200,source:200,clutter:200,novel:200,fog:200')
"""12 visits, every drifted domain visited at least twice, the source three times."""


# --- the schedule -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Visit:
    """``samples`` answered samples of ``domain`` in a row."""

    domain: str
    samples: int


def parse_schedule(text: str) -> list[Visit]:
    """``'source:200,fog:300,...'`` -> visits (domains must be registered).

    Raises:
        ConfigError: Malformed text, unknown domain, a visit without samples.
    """
    from cdcca_ros.sim.domains import get_domain

    visits = []
    for item in text.split(','):
        name, sep, count = item.strip().partition(':')
        if not sep or not name:
            raise ConfigError(f'schedule item {item!r} is not domain:samples')
        try:
            n = int(count)
        except ValueError as err:
            raise ConfigError(f'schedule item {item!r}: {count!r} is not a number') from err
        if n < 1:
            raise ConfigError(f'schedule item {item!r}: needs at least one sample')
        get_domain(name.strip())
        visits.append(Visit(name.strip(), n))
    if not visits:
        raise ConfigError('empty schedule')
    return visits


# --- methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the continual bench.

    Attributes:
        name: Row label.
        update: ``'none'`` (never changes), ``'tent'`` (entropy minimisation on the device) or
            ``'cloud'``.
        uplink: ``'uts'`` (UTS stage 1 + 2 at the device's defaults) or ``'all'`` (every
            sample with every token).
        labels: ``'teacher'`` (pseudo-labels) or ``'truth'`` (the oracle).
        losses: ``'akd'`` (Eq. 6) or ``'ce'`` (L_CE alone).
        guarded: The cloud's guarded round (else the paper's plain round).
        gate: The update gate (guarded rounds only).
        audit_fraction: Device audit stream (uts uplink only); None: the device default.
        pulls: Token pulls (guarded, uts uplink).
        entropy_guard: The device's local entropy guard.
    """

    name: str
    update: str
    uplink: str = 'uts'
    labels: str = 'teacher'
    losses: str = 'akd'
    guarded: bool = True
    gate: bool = True
    audit_fraction: float | None = None
    pulls: bool = True
    entropy_guard: bool = True

    def __post_init__(self) -> None:
        if self.update not in UPDATES or self.uplink not in UPLINKS or self.labels not in LABELS:
            raise ConfigError(f'method {self.name!r}: bad update/uplink/labels')
        if self.losses not in ('akd', 'ce'):
            raise ConfigError(f'method {self.name!r}: losses must be akd or ce')


SOURCE_ONLY = Method('Source-only', 'none')
TENT = Method('TENT (device, entropy min.)', 'tent')
CE_ONLY = Method('L_CE-only (every sample, all tokens)', 'cloud', uplink='all', losses='ce',
                 audit_fraction=0.0, pulls=False)
UNGATED = Method('CD-CCA ungated (paper round)', 'cloud', guarded=False, gate=False,
                 audit_fraction=0.0, pulls=False, entropy_guard=False)
GUARDED = Method('CD-CCA guarded (default)', 'cloud')
ORACLE = Method('Oracle (true labels, every sample)', 'cloud', uplink='all', labels='truth',
                gate=False, audit_fraction=0.0, pulls=False)
METHODS = {'source_only': SOURCE_ONLY, 'tent': TENT, 'ce_only': CE_ONLY, 'ungated': UNGATED,
           'guarded': GUARDED, 'oracle': ORACLE}


# --- records ----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Accuracy of every domain at one moment of the stream.

    Attributes:
        t: Samples answered so far.
        visit: Index of the visit under way.
        event: ``start``, ``shipped``, ``refused``, ``rollback``, ``local_rollback``,
            ``tent`` or ``end``.
        version: Adapter version the device runs.
        accuracy: ``{domain: {'da': %, 'mc': %}}``.
    """

    t: int
    visit: int
    event: str
    version: int
    accuracy: dict[str, dict[str, float]]


@dataclass
class RunRecord:
    """One method on one seed's stream."""

    method: str
    seed: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    uplink_bytes: int = 0
    pull_bytes: int = 0
    downlink_bytes: int = 0
    uplinked: int = 0
    audit_samples: int = 0
    answered: int = 0
    refused: int = 0
    shipped: int = 0
    rollbacks: int = 0
    local_rollbacks: int = 0
    label_accuracy: float | None = None
    derived_label_accuracy: float | None = None
    wall_s: float = 0.0
    final_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def final(self) -> dict[str, dict[str, float]]:
        return self.checkpoints[-1].accuracy

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != 'final_scores'}
        return out


# --- the simulation ---------------------------------------------------------------------------
class ContinualStream:
    """One seed's stream, held-out sets and teacher, shared by every method.

    Args:
        models: The bench's models (``student()`` / ``teacher()`` give fresh copies).
        seed: World seed.
        visits: The schedule.
        eval_per_domain: Held-out samples per domain.
        rate: Answers a second (the simulated clock that drives ``round.max_wait_s``).
        cloud_params: The cloud node's parameter values (defaults + overrides).
        device_params: The device node's parameter values.
        progress: Print a line per round.
    """

    def __init__(self, models: Any, seed: int, visits: Sequence[Visit], eval_per_domain: int,
                 rate: float, cloud_params: dict[str, Any], device_params: dict[str, Any],
                 progress: bool = True) -> None:
        from cdcca_ros.bench.common import BENCH_START, EVAL_START, model_image_size
        from cdcca_ros.sim.domains import SOURCE
        from cdcca_ros.sim.world import World

        if rate <= 0 or eval_per_domain < 1:
            raise ConfigError(f'rate={rate} and eval_per_domain={eval_per_domain} must be > 0')
        self.models, self.seed, self.visits = models, seed, list(visits)
        self.rate, self.progress = rate, progress
        self.cloud_params, self.device_params = cloud_params, device_params
        self.max_new_tokens = int(device_params['max_new_tokens'])
        world = World(seed)
        student = models.student()
        self.image_size = model_image_size(student, 64)
        offsets: dict[str, int] = {}
        self.stream: list[tuple[int, Sample]] = []
        for i, visit in enumerate(self.visits):
            start = BENCH_START + offsets.get(visit.domain, 0)
            offsets[visit.domain] = offsets.get(visit.domain, 0) + visit.samples
            self.stream += [(i, s) for s in world.samples(visit.domain, visit.samples,
                                                         self.image_size, start=start)]
        self.domains = [SOURCE] + sorted({v.domain for v in self.visits} - {SOURCE})
        self.drifted = [d for d in self.domains if d != SOURCE]
        self.eval_sets = {d: world.samples(d, eval_per_domain, self.image_size,
                                           start=EVAL_START) for d in self.domains}
        self._eval_tokens = self._tokens_of(student, {d: [s.image for s in v]
                                                      for d, v in self.eval_sets.items()})
        self._teacher: MLLM | None = None
        self._keys: tuple[Any, Any] | None = None

    # ---------------------------------------------------------------- shared pieces
    @staticmethod
    def _tokens_of(model: MLLM, images: dict[str, list[np.ndarray]]) -> dict[str, Tensor]:
        import torch

        with torch.no_grad():
            return {d: torch.cat([model.vision_tokens(v[i:i + 50])
                                  for i in range(0, len(v), 50)]) for d, v in images.items()}

    @property
    def teacher(self) -> MLLM:
        if self._teacher is None:
            self._teacher = self.models.teacher()
        return self._teacher

    def keys(self) -> tuple[Any, Any]:
        from cdcca_ros.core.wire import generate_keypair

        if self._keys is None:
            self._keys = generate_keypair()
        return self._keys

    def evaluate(self, answerer: Any) -> dict[str, dict[str, np.ndarray]]:
        """Per-sample DA/MC on every domain's held-out samples of a model, or of a device as
        it answers (the update where its coverage says so, the shipped model elsewhere)."""
        from cdcca_ros.bench.adaptation import score_as_answered

        return {d: score_as_answered(answerer, self._eval_tokens[d], self.eval_sets[d],
                                     self.max_new_tokens) for d in self.domains}

    @staticmethod
    def means(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
        return {d: {m: float(v.mean()) for m, v in per.items()} for d, per in scores.items()}

    def teacher_accuracy(self) -> dict[str, dict[str, float]]:
        return self.means(self.evaluate(self.teacher))

    # ---------------------------------------------------------------- one method
    def run(self, method: Method) -> RunRecord:
        """Run ``method`` over the whole stream (global torch RNG seeded first)."""
        import torch

        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if method.update == 'none':
                record = RunRecord(method.name, self.seed)
                scores = self.evaluate(self.models.student())
                for event, t in (('start', 0), ('end', len(self.stream))):
                    record.checkpoints.append(Checkpoint(t, 0, event, 0, self.means(scores)))
                record.answered = len(self.stream)
                record.final_scores = scores
            elif method.update == 'tent':
                record = self._run_tent(method)
            else:
                record = self._run_cloud(method)
        record.wall_s = time.perf_counter() - t0
        self._log(f'  {method.name}: final ' + ', '.join(
            f'{d} {a["da"]:.1f}' for d, a in record.final().items()) +
            f' ({record.wall_s:.0f} s)')
        return record

    def _log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def _checkpoint(self, record: RunRecord, model: Any, t: int, visit: int, event: str,
                    version: int) -> dict[str, dict[str, np.ndarray]]:
        scores = self.evaluate(model)
        record.checkpoints.append(Checkpoint(t, visit, event, version, self.means(scores)))
        return scores

    # ---------------------------------------------------------------- TENT
    def _run_tent(self, method: Method) -> RunRecord:
        """Entropy minimisation on the device, as many steps per ``min_samples`` answers as
        a cloud round trains (the cloud's optimiser and batch), at a tenth of its rate."""
        import torch

        from cdcca_ros.bench.adaptation import tent_step

        record = RunRecord(method.name, self.seed)
        model = self.models.student()
        params = [p for p in model.torch_model.parameters() if p.requires_grad]
        p = self.cloud_params
        optimizer = torch.optim.AdamW(params, lr=p['akd.lr'] * 0.1)
        gen = torch.Generator().manual_seed(self.seed)
        every, steps = int(p['round.min_samples']) * 2, int(p['akd.steps'])
        scores = self._checkpoint(record, model, 0, 0, 'start', 0)
        window: list[tuple[Tensor, str]] = []
        for t, (visit, sample) in enumerate(self.stream, start=1):
            with torch.no_grad():
                tokens = model.vision_tokens([sample.image])[0]
            window.append((tokens, sample.question))
            if len(window) >= every:
                for _ in range(steps):
                    pick = torch.randperm(len(window), generator=gen)[:int(p['akd.batch_size'])]
                    tent_step(model, optimizer, torch.stack([window[int(i)][0] for i in pick]),
                              [window[int(i)][1] for i in pick], self.max_new_tokens, 1.0)
                window.clear()
                scores = self._checkpoint(record, model, t, visit, 'tent', 0)
        record.answered = len(self.stream)
        if record.checkpoints[-1].t != len(self.stream):
            scores = self._checkpoint(record, model, len(self.stream), self.stream[-1][0], 'end',
                                      0)
        record.final_scores = scores
        return record

    # ---------------------------------------------------------------- the cloud
    def make_cloud(self, method: Method) -> CloudRuntime:
        """The cloud a method's rows run (the cloud node's defaults, with the method's
        uplink, labels, losses and guard)."""
        from cdcca_ros.core.akd import AKDConfig
        from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
        from cdcca_ros.core.rounds.anchor import resolve_anchor
        from cdcca_ros.core.rounds.config import GuardConfig

        private, _ = self.keys()
        p = dict(self.cloud_params)
        cfg = CloudConfig.from_params(p)
        overrides: dict[str, Any] = {'seed': self.seed}
        if method.losses == 'ce':
            overrides.update(lambda_query=0.0, lambda_repr=0.0)
        cfg.akd = AKDConfig.from_params(p, **overrides)
        if not method.guarded:
            cfg.guard = GuardConfig.plain(int(p['akd.steps']))
        elif not method.gate:
            cfg.guard = cfg.guard.with_(gate=cfg.guard.gate.__class__(enabled=False),
                                        audit=cfg.guard.audit.__class__(enabled=False))
        if not method.pulls:
            cfg.guard = cfg.guard.with_(labels=replace(cfg.guard.labels, pull_below=0.0))
        student_dir = self.models.spec('student')
        from cdcca_ros.models import bundled

        anchor = (resolve_anchor(cfg.guard.anchor, bundled.resolve(student_dir))
                  if cfg.guard.enabled else None)
        return CloudRuntime(self.teacher, self.models.student(), private, cfg, anchor=anchor)

    def make_device(self, method: Method) -> tuple[DeviceRuntime, Any, Any]:
        """The device runtime, its UTS pipeline and its token ring."""
        from cdcca_ros.bench.common import device_uplink
        from cdcca_ros.core.coverage import CoverageConfig, anchor_tokens_of
        from cdcca_ros.core.device_runtime import DeviceRuntime
        from cdcca_ros.core.entropy_guard import EntropyGuardConfig
        from cdcca_ros.core.uts import TokenRing
        from cdcca_ros.models import bundled

        _, public = self.keys()
        d = self.device_params
        guard = EntropyGuardConfig.from_params(d) if method.entropy_guard else None
        student_dir = bundled.resolve(self.models.spec('student'))
        device = DeviceRuntime(self.models.student(), DEVICE_ID, public,
                               max_new_tokens=self.max_new_tokens, entropy_guard=guard,
                               coverage=(CoverageConfig.from_params(d) if method.guarded
                                         else None),
                               anchor_tokens=anchor_tokens_of(student_dir))
        overrides: dict[str, Any] = {'audit_seed': self.seed}
        if method.audit_fraction is not None:
            overrides['audit_fraction'] = method.audit_fraction
        space = device.model.vision_space()
        pipeline = device_uplink(self.models.spec('student'), space, device.mc_token_features,
                                 params=d, **overrides)
        ring = TokenRing(max_samples=int(d['uts.ring_samples']))
        return device, pipeline, ring

    def _run_cloud(self, method: Method) -> RunRecord:
        record = RunRecord(method.name, self.seed)
        cloud = self.make_cloud(method)
        device, pipeline, ring = self.make_device(method)
        robot = Robot(device, pipeline, ring, cloud, uplink=method.uplink,
                      basis=cloud_token_basis(self.models.spec('student'),
                                              device.model.vision_space()))
        scores = self._checkpoint(record, device, 0, 0, 'start', 0)
        for t, (visit, sample) in enumerate(self.stream, start=1):
            now = t / self.rate
            for event in robot.answer(sample, f'{DEVICE_ID}-{t}', now,
                                      truth=method.labels == 'truth'):
                scores = self._checkpoint(record, device, t, visit, event,
                                          device.version)
            last = t == len(self.stream)
            if not (cloud.due(DEVICE_ID, now=now) or (last and cloud.device(DEVICE_ID).pending())):
                continue
            for event, result in robot.round():
                scores = self._checkpoint(record, device, t, visit, event, device.version)
                if result is None:
                    continue
                info = result.summary()
                info.update(t=t, visit=visit, domain=self.visits[visit].domain)
                record.rounds.append(info)
                domain = self.visits[visit].domain
                self._log(f'    [{method.name}] t={t} {domain}: {event} v{device.version} '
                          f'({result.samples} new, '
                          f'{(result.decision.reason if result.decision else "")[:70]}) '
                          f'{domain} DA {record.checkpoints[-1].accuracy[domain]["da"]:.1f}')
        if record.checkpoints[-1].t != len(self.stream):
            scores = self._checkpoint(record, device, len(self.stream),
                                      self.stream[-1][0], 'end', device.version)
        robot.fill(record)
        record.answered = len(self.stream)
        record.final_scores = scores
        return record

def drifted_mean(accuracy: dict[str, dict[str, float]], drifted: Sequence[str],
                 metric: str = 'da') -> float:
    return float(np.mean([accuracy[d][metric] for d in drifted]))


def worst_regression(record: RunRecord, reference: dict[str, dict[str, float]]) -> float:
    """Largest fall of any domain below ``reference`` (source-only) at any checkpoint, points
    (0 when none falls below)."""
    worst = 0.0
    for cp in record.checkpoints:
        for d, acc in cp.accuracy.items():
            worst = max(worst, reference[d]['da'] - acc['da'])
    return worst


def worst_round_drop(record: RunRecord) -> float:
    """Largest fall of any domain from one checkpoint to the next, points."""
    worst = 0.0
    for a, b in zip(record.checkpoints, record.checkpoints[1:], strict=False):
        for d in a.accuracy:
            worst = max(worst, a.accuracy[d]['da'] - b.accuracy[d]['da'])
    return worst


def paired_interval(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]],
                    domains: Sequence[str], seed: int, resamples: int = 2000
                    ) -> tuple[float, float]:
    """95% paired bootstrap interval of the drifted-mean DA difference ``a - b``."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(resamples)
    for d in domains:
        delta = a[d]['da'] - b[d]['da']
        idx = rng.integers(0, delta.size, size=(resamples, delta.size))
        diffs += delta[idx].mean(axis=1)
    diffs /= len(domains)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


Progress = Callable[[str], None]
