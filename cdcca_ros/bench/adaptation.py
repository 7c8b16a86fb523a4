"""The adaptation experiment behind Tables 1, 3 and 4: the device model on the drifting world.

One experiment (:class:`Experiment`) fixes, from the seed, what every method sees. Every
drifted domain is its own adaptation task (a device trained on the source whose camera now sees
that domain; the paper's VQAv2 -> A-OKVQA has one source and one target):

* ``rounds`` streams of the domain (Algorithm 1's cycles), ``stream_per_domain`` samples each,
  disjoint between rounds (world indices from :data:`~cdcca_ros.bench.common.BENCH_START`);
* held-out samples of the domain, scored after every round, and of the source, scored after
  the last round (forgetting), from the evaluation range
  (:data:`~cdcca_ros.bench.common.EVAL_START`).

A method's accuracy after round ``r`` is the mean over the tasks; link bytes are summed.

A :class:`Method` says how the device model changes between rounds:

* ``none``: source-only, the model as shipped;
* ``tent``: TENT-style entropy minimisation on the device, no teacher, no link
  (:func:`tent_step`): the same trainable set minimises the entropy of the student's own answer
  distribution on the round's stream;
* ``cloud``: the device answers the stream through :class:`DeviceRuntime`; the samples it
  uplinks (every sample, or UTS stage 1's; all tokens, or stage 2's kept tokens, UTS or random)
  go to a :class:`CloudRuntime`, which pseudo-labels with the teacher, distils (AKD with
  ``L_query + L_repr + L_CE``, or ``L_CE`` alone), compresses the delta with the cloud's default
  codec and budget and signs it; the device verifies and hot-applies it. Everything but the
  choice of samples, tokens and losses is the cloud and device nodes' default.

Scoring, as the paper's Tables: DA is VQA accuracy of the greedy answer
(:func:`~cdcca_ros.sim.scoring.vqa_accuracy`); MC is multiple choice, the choice whose first
answer token the model rates most likely at the first answer step (the four options ranked by
the model, as a likelihood-scored A-OKVQA MC; the bundled models never saw the options in a
prompt). Both are percentages; gains are percentage points.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.bench.common import (
    BENCH_START,
    EVAL_START,
    BenchContext,
    cloud_token_basis,
    device_params,
    device_uplink,
    fmt,
    model_image_size,
)
from cdcca_ros.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor

    from cdcca_ros.models.base import MLLM
    from cdcca_ros.sim.world import Sample

UPDATES = ('none', 'tent', 'cloud')
LOSSES = ('akd', 'ce')
STAGE2 = ('none', 'uts', 'random')
METRICS = ('da', 'mc')
EVAL_BATCH = 50
IMAGE_SIZE = 64  # frame side when the model does not say which size it takes
DEVICE_ID = 'robot1'


# --- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes of one experiment (all seeded).

    Attributes:
        seed: World, model and batch seed.
        rounds: Cycles of Algorithm 1.
        stream_per_domain: Samples the device answers per round of each domain's task.
        eval_per_domain: Held-out samples per domain scored after every round.
        akd_steps: Optimiser steps per round (AKD, L_CE-only and TENT alike).
        batch_size: Samples per step.
        domains: The drifted domains.
        eval_source: Also score the source domain (forgetting); not part of the means.
    """

    seed: int
    rounds: int
    stream_per_domain: int
    eval_per_domain: int
    akd_steps: int
    batch_size: int
    domains: tuple[str, ...]
    eval_source: bool = True

    def __post_init__(self) -> None:
        for name in ('rounds', 'stream_per_domain', 'eval_per_domain', 'akd_steps',
                     'batch_size'):
            if getattr(self, name) < 1:
                raise ConfigError(f'Plan.{name} must be >= 1, got {getattr(self, name)}')
        if self.seed < 0:
            raise ConfigError(f'Plan.seed must be >= 0, got {self.seed}')
        if not self.domains:
            raise ConfigError('Plan.domains is empty')

    @property
    def stream_size(self) -> int:
        """Samples the device answers per round, over all the tasks."""
        return self.stream_per_domain * len(self.domains)

    def describe(self) -> str:
        """One line for the notes."""
        return (f'seed {self.seed}; one adaptation task per drifted domain '
                f'({", ".join(self.domains)}), each {self.rounds} rounds of a stream of '
                f'{self.stream_per_domain} samples of that domain; accuracy on '
                f'{self.eval_per_domain} held-out samples of the domain after each round (the '
                f'source\'s after the last), mean over the tasks; {self.akd_steps} optimiser '
                f'steps of '
                f'{self.batch_size} samples per round; frames rendered at the models\' input '
                'size (the same scenes as at the camera\'s 640x480)')


def add_plan_arguments(parser: argparse.ArgumentParser, rounds: int, stream: int,
                       evals: int) -> None:
    """The experiment's size arguments (defaults of the full run; ``--quick`` shrinks them)."""
    parser.add_argument('--rounds', type=int, default=None,
                        help=f'rounds (default {rounds}, quick 2)')
    parser.add_argument('--stream-per-domain', type=int, default=None,
                        help=f'stream samples per drifted domain and round (default {stream}, '
                             'quick 2)')
    parser.add_argument('--eval-per-domain', type=int, default=None,
                        help=f'held-out samples per domain (default {evals}, quick 3)')
    parser.add_argument('--akd-steps', type=int, default=None,
                        help='optimiser steps per round (default: cloud node table; quick 2)')
    parser.add_argument('--domains', default=None,
                        help='comma-separated drifted domains (default: '
                             'cdcca_ros.sim.domains.DRIFTED, quick its first two)')
    parser.add_argument('--plugin', action='append', default=[], metavar='MODULE|FILE.py',
                        help='import a module or Python file first (it may register shifts '
                             'and domains and add them to DRIFTED)')


def plan_from_args(ctx: BenchContext, rounds: int, stream: int, evals: int) -> Plan:
    """The plan of a run: the arguments, else the quick or full defaults."""
    from cdcca_ros.bench.common import load_plugin
    from cdcca_ros.nodes.tables import defaults
    from cdcca_ros.sim import domains as domain_registry

    cloud = defaults('cloud_node')
    a = ctx.args
    q = ctx.quick
    for plugin in getattr(a, 'plugin', None) or []:
        load_plugin(plugin)
    drifted = tuple(domain_registry.DRIFTED)
    if getattr(a, 'domains', None):
        drifted = tuple(d.strip() for d in a.domains.split(',') if d.strip())
        for d in drifted:
            domain_registry.get_domain(d)  # unknown: a clear error naming the registered ones
    elif q:
        drifted = drifted[:2]
    return Plan(seed=ctx.seed, rounds=a.rounds or (2 if q else rounds),
                stream_per_domain=a.stream_per_domain or (2 if q else stream),
                eval_per_domain=a.eval_per_domain or (3 if q else evals),
                akd_steps=a.akd_steps or (2 if q else int(cloud['akd.steps'])),
                batch_size=4 if q else int(cloud['akd.batch_size']),
                # Quick: two of the drifted domains (seconds; every code path still runs).
                domains=drifted)


# --- methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """How the device model changes between rounds.

    Attributes:
        name: Row label.
        update: ``'none'``, ``'tent'`` or ``'cloud'``.
        losses: Cloud only: ``'akd'`` (Eq. 6, the cloud's lambdas) or ``'ce'`` (L_CE alone).
        stage1: Cloud only: uplink only the samples UTS stage 1 selects (else every sample).
        stage2: Cloud only: ``'none'`` (all tokens), ``'uts'`` (Eq. 3-4) or ``'random'``
            (as many tokens, chosen at random).
        keep_ratio: Stage-2 keep ratio; None: the device's default.
        lr_scale: TENT only: its learning rate as a multiple of the cloud's AKD rate.
        labels: Cloud only: ``'teacher'`` pseudo-labels or ``'truth'`` (the oracle).
        guarded: Cloud only: the guarded round (the default); False: the paper's round.
        gate: Cloud only, guarded: the update gate and the live audit.
    """

    name: str
    update: str
    losses: str = 'akd'
    stage1: bool = False
    stage2: str = 'none'
    keep_ratio: float | None = None
    lr_scale: float = 1.0
    labels: str = 'teacher'
    guarded: bool = True
    gate: bool = True

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ConfigError(f'Method {self.name!r}: update must be one of {UPDATES}, '
                              f'got {self.update!r}')
        if self.losses not in LOSSES:
            raise ConfigError(f'Method {self.name!r}: losses must be one of {LOSSES}, '
                              f'got {self.losses!r}')
        if self.stage2 not in STAGE2:
            raise ConfigError(f'Method {self.name!r}: stage2 must be one of {STAGE2}, '
                              f'got {self.stage2!r}')
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f'Method {self.name!r}: keep_ratio must be in (0, 1], '
                              f'got {self.keep_ratio}')
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0.0):
            raise ConfigError(f'Method {self.name!r}: lr_scale must be > 0, '
                              f'got {self.lr_scale}')


SOURCE_ONLY = Method('Source-only', 'none')
TENT = Method('TENT (device, entropy min.)', 'tent')
# TENT is sensitive to its step size (entropy minimisation can collapse the answers); a tenth of
# the cloud's rate is run beside it and the better of the two is the baseline.
TENT_SLOW = Method('TENT, lr / 10', 'tent', lr_scale=0.1)
CE_FT = Method('Teacher pseudo-labels, L_CE only', 'cloud', losses='ce')
CDCCA = Method('CD-CCA (UTS + AKD + DWC), guarded', 'cloud', losses='akd', stage1=True,
               stage2='uts')
CDCCA_UNGATED = Method('CD-CCA, paper round (ungated)', 'cloud', losses='akd', stage1=True,
                       stage2='uts', guarded=False, gate=False)
ORACLE = Method('Oracle (true labels, every sample)', 'cloud', losses='akd', labels='truth',
                gate=False)


# --- records ----------------------------------------------------------------------------------
@dataclass
class RoundRecord:
    """What one round did and what the device scores after it.

    Attributes:
        round: 1-based round (0: before any update).
        accuracy: ``{domain: {'da': %, 'mc': %}}`` on the held-out samples.
        offered: Stream samples the device answered.
        uplinked: Samples sent to the cloud.
        uplink_bytes: Token payload bytes sent (packed codes + scales + kept indices).
        kept_tokens: Mean tokens per uplinked sample.
        downlink_bytes: Delta payload bytes sent back (0: no delta).
        delta_bits_per_param: Bits per trainable value of the delta (None: no delta).
        trained_samples: Samples with a non-empty pseudo-label the cloud trained on.
        loss_first: Losses of the first step of the round.
        loss_last: Losses of the last step of the round.
        agreement_before: Cloud only: share of the round's samples where the student's
            answer equals the teacher's pseudo-label before the round's training ...
        agreement_after: ... and after it (how well the trainable set fits the labels).
        label_accuracy: Cloud only: VQA accuracy (%) of the labels the cloud trains on (the
            teacher's answers from what was uplinked, pulls included), against the truth.
        train_s: Wall time of the update (cloud round or device adaptation).
        outcome: Cloud only: ``shipped`` or ``refused`` (the update gate), '' otherwise.
    """

    round: int
    accuracy: dict[str, dict[str, float]]
    offered: int = 0
    uplinked: int = 0
    uplink_bytes: int = 0
    kept_tokens: float | None = None
    downlink_bytes: int = 0
    delta_bits_per_param: float | None = None
    trained_samples: int = 0
    loss_first: dict[str, float] | None = None
    loss_last: dict[str, float] | None = None
    agreement_before: float | None = None
    agreement_after: float | None = None
    label_accuracy: float | None = None
    train_s: float = 0.0
    outcome: str = ''


def drifted_mean(accuracy: Mapping[str, Mapping[str, float]], domains: Sequence[str],
                 metric: str) -> float:
    """Mean of ``metric`` over the drifted ``domains``."""
    return float(np.mean([accuracy[d][metric] for d in domains]))


@dataclass
class MethodRun:
    """A method's rounds (``rounds[0]`` is the shared state before any update)."""

    method: Method
    rounds: list[RoundRecord]
    domains: tuple[str, ...]
    wall_s: float = 0.0
    final_scores: Scores = field(default_factory=dict)

    def mean(self, r: int, metric: str) -> float:
        """Drifted-domain mean of ``metric`` after round ``r`` (0: before any update)."""
        return drifted_mean(self.rounds[r].accuracy, self.domains, metric)

    def final(self, metric: str) -> float:
        """Drifted-domain mean of ``metric`` after the last round."""
        return self.mean(len(self.rounds) - 1, metric)

    def over_rounds(self, metric: str) -> float:
        """Mean over rounds 1.. of the drifted-domain means (the paper's ``All`` column)."""
        return float(np.mean([self.mean(r, metric) for r in range(1, len(self.rounds))]))

    def uplink_bytes(self) -> int:
        """Token bytes sent over all rounds."""
        return sum(r.uplink_bytes for r in self.rounds)

    def downlink_bytes(self) -> int:
        """Delta bytes sent over all rounds."""
        return sum(r.downlink_bytes for r in self.rounds)

    def uplinked(self) -> int:
        """Samples sent over all rounds."""
        return sum(r.uplinked for r in self.rounds)

    def label_accuracy(self) -> float | None:
        """Pseudo-label accuracy (%) over every uplinked sample of every round."""
        rounds = [r for r in self.rounds if r.label_accuracy is not None]
        n = sum(r.uplinked for r in rounds)
        return (sum(r.label_accuracy * r.uplinked for r in rounds) / n  # type: ignore[operator]
                if n else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {'method': asdict(self.method), 'wall_s': round(self.wall_s, 2),
                'label_accuracy': self.label_accuracy(),
                'final': {m: self.final(m) for m in METRICS},
                'over_rounds': {m: self.over_rounds(m) for m in METRICS},
                'per_round_mean': {m: [self.mean(r, m) for r in range(len(self.rounds))]
                                   for m in METRICS},
                'uplink_bytes': self.uplink_bytes(), 'downlink_bytes': self.downlink_bytes(),
                'uplinked': self.uplinked(),
                'rounds': [asdict(r) for r in self.rounds]}


# --- scoring ------------------------------------------------------------------------------------
def choice_token_ids(model: MLLM, choices: Sequence[str]) -> list[int] | None:
    """The first token id of each answer choice as the model tokenises an answer, or None
    when two choices start with the same token (the first step could not tell them apart)."""
    ids = []
    for choice in choices:
        tokens = model.tokenizer(' ' + choice, add_special_tokens=False)['input_ids']
        if not tokens:
            return None
        ids.append(int(tokens[0]))
    return ids if len(set(ids)) == len(ids) else None


def score(model: MLLM, tokens: Tensor, samples: Sequence[Sample],
          max_new_tokens: int) -> dict[str, np.ndarray]:
    """Per-sample DA and MC scores (percent) of ``model`` on ``samples`` from their tokens.

    MC picks the choice whose first token has the highest probability at the first answer
    step; when the choices share a first token, the greedy answer's text is matched instead.

    Returns:
        ``{'da': [n], 'mc': [n]}`` float arrays in [0, 100].
    """
    from cdcca_ros.sim.scoring import mc_accuracy, vqa_accuracy

    da: list[float] = []
    mc: list[float] = []
    ids_of: dict[tuple[str, ...], list[int] | None] = {}
    for start in range(0, len(samples), EVAL_BATCH):
        part = samples[start:start + EVAL_BATCH]
        results = model.answer_from_tokens(tokens[start:start + len(part)], None,
                                           [s.question for s in part],
                                           max_new_tokens=max_new_tokens)
        for r, s in zip(results, part, strict=True):
            da.append(100.0 * vqa_accuracy(r.text, s.answers))
            if s.choices not in ids_of:
                ids_of[s.choices] = choice_token_ids(model, s.choices)
            ids = ids_of[s.choices]
            if ids is None:
                hit = mc_accuracy(r.text, s.choices, s.answer_index)
            else:
                hit = float(int(np.argmax(r.step_probs[0][ids])) == s.answer_index)
            mc.append(100.0 * hit)
    return {'da': np.asarray(da), 'mc': np.asarray(mc)}


def score_as_answered(answerer: Any, tokens: Tensor, samples: Sequence[Sample],
                      max_new_tokens: int) -> dict[str, np.ndarray]:
    """:func:`score` of what answers on the device: a :class:`DeviceRuntime` answers each frame
    with the update where its coverage says so and with the shipped model elsewhere
    (:meth:`DeviceRuntime.routes`); a model answers everything itself."""
    routes = getattr(answerer, 'routes', None)
    if routes is None:
        answerer.torch_model.eval()
        return score(answerer, tokens, samples, max_new_tokens)
    mask, adapted, shipped = routes(tokens)
    out = {'da': np.zeros(len(samples)), 'mc': np.zeros(len(samples))}
    for model, rows in ((adapted, np.flatnonzero(mask)), (shipped, np.flatnonzero(~mask))):
        if not len(rows):
            continue
        model.torch_model.eval()
        part = score(model, tokens[rows], [samples[int(i)] for i in rows], max_new_tokens)
        for key in out:
            out[key][rows] = part[key]
    return out


Scores = dict[str, dict[str, np.ndarray]]
"""Per-sample scores: ``{domain: {'da': [n], 'mc': [n]}}``."""


def means(scores: Scores) -> dict[str, dict[str, float]]:
    """``{domain: {metric: mean %}}`` of per-sample scores."""
    return {d: {m: float(v.mean()) if v.size else math.nan for m, v in per.items()}
            for d, per in scores.items()}


def paired_gain_interval(a: Scores, b: Scores, domains: Sequence[str], metric: str,
                         seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% paired bootstrap interval of ``mean(a) - mean(b)`` (drifted-domain mean).

    Both were scored on the same held-out samples, so the samples are resampled jointly
    (within each domain): the interval reflects which samples happened to be drawn.
    """
    rng = np.random.default_rng(seed)
    diffs = np.zeros(resamples)
    for d in domains:
        delta = a[d][metric] - b[d][metric]
        idx = rng.integers(0, delta.size, size=(resamples, delta.size))
        diffs += delta[idx].mean(axis=1)
    diffs /= len(domains)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


# --- TENT ------------------------------------------------------------------------------------
def answer_logits(logits: Tensor, answer_mask: Tensor) -> list[Tensor]:
    """Per row, the ``[a, V]`` logits that predict its ``a`` answer tokens (eos included).

    The model layer pads on the left, so every row ends at the last position and its answer
    tokens are predicted from positions ``S - a - 1 .. S - 2`` (as ``TrainOutputs.fused``).
    """
    seq = logits.shape[1]
    out = []
    for b, length in enumerate(answer_mask.sum(dim=1).tolist()):
        out.append(logits[b, seq - int(length) - 1:seq - 1])
    return out


def tent_loss(model: MLLM, tokens: Tensor, questions: Sequence[str],
              max_new_tokens: int) -> Tensor:
    """Mean entropy of the model's answer distribution over its own greedy answers' steps.

    The answers are generated first (no gradient), then teacher-forced, so the entropy is that
    of every step the model takes when it answers (Eq. 2's distributions), differentiable.
    """
    import torch

    with torch.no_grad():
        answers = [r.text for r in model.answer_from_tokens(tokens, None, list(questions),
                                                            max_new_tokens=max_new_tokens)]
    out = model.forward_train(tokens, None, list(questions), answers)
    entropies = []
    for rows in answer_logits(out.logits, out.answer_mask):
        logp = rows.float().log_softmax(dim=-1)
        entropies.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(entropies).mean()


def tent_step(model: MLLM, optimizer: torch.optim.Optimizer, tokens: Tensor,
              questions: Sequence[str], max_new_tokens: int, grad_clip: float | None
              ) -> float:
    """One TENT step (dropout off, as the model answers); returns the entropy before it."""
    import torch

    model.torch_model.eval()
    loss = tent_loss(model, tokens, questions, max_new_tokens)
    if not torch.isfinite(loss):
        raise ConfigError(f'TENT: non-finite entropy {float(loss)}')
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group['params']]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


# --- the experiment ---------------------------------------------------------------------------
def random_features(seed: int) -> Callable[[Tensor, float, int], Tensor]:
    """A stand-in for ``mc_token_features`` whose variance ranks tokens at random.

    UTS stage 2 then keeps exactly as many tokens as with the model's features (same keep
    ratio, CLS kept alike), but chosen at random: Table 4's random sampling at equal bytes.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def features(tokens: Tensor, p: float, num_masks: int) -> Tensor:
        return torch.rand((num_masks, tokens.shape[0], tokens.shape[1], 1), generator=gen)

    return features


class Experiment:
    """The streams, the held-out sets and the teacher shared by every method of a bench.

    Every drifted domain is its own adaptation task, as the paper's VQAv2 -> A-OKVQA: a device
    whose camera now sees that domain, its own cloud state, ``rounds`` streams of the domain's
    samples, and the domain's held-out samples scored after each round. A method's accuracy
    after round ``r`` is the mean over the tasks; bytes are summed over them.

    Args:
        ctx: The bench context (models, seed).
        plan: The sizes.
        progress: Print a line per task.
    """

    def __init__(self, ctx: BenchContext, plan: Plan, progress: bool = True) -> None:
        from cdcca_ros.nodes.tables import defaults
        from cdcca_ros.sim.domains import SOURCE
        from cdcca_ros.sim.world import World

        self.ctx = ctx
        self.plan = plan
        self.progress = progress
        self.device_params = device_params()
        self.cloud_params = defaults('cloud_node')
        if ctx.quick:  # every code path, in seconds
            self.cloud_params.update({'guard.max_steps': 4, 'guard.min_steps': 2,
                                      'guard.anchor': 'none'})
        self.max_new_tokens = int(self.device_params['max_new_tokens'])
        world = World(plan.seed)
        # The frames are rendered at the size the model takes (it would resize a camera
        # frame to it): the same scenes, without the cost of 640x480 renders and resizes.
        self.image_size = model_image_size(ctx.models.student(), IMAGE_SIZE)
        n = plan.stream_per_domain
        # streams[domain][round]: disjoint runs of the domain's sample sequence.
        self.streams: dict[str, list[list[Sample]]] = {
            d: [world.samples(d, n, self.image_size, start=BENCH_START + r * n)
                for r in range(plan.rounds)] for d in plan.domains}
        self.source = SOURCE if plan.eval_source else None
        self.eval_domains = tuple(plan.domains) + ((SOURCE,) if plan.eval_source else ())
        self.eval_sets = {d: world.samples(d, plan.eval_per_domain, self.image_size,
                                           start=EVAL_START) for d in self.eval_domains}
        self._teacher: MLLM | None = None
        self._eval_tokens: dict[str, Tensor] | None = None
        self._baseline: Scores | None = None
        self._keys: tuple[Any, Any] | None = None

    # ---- shared pieces ----
    @property
    def teacher(self) -> MLLM:
        """The teacher (loaded once; never updated)."""
        if self._teacher is None:
            self._teacher = self.ctx.models.teacher()
        return self._teacher

    def _eval_tokens_of(self, model: MLLM) -> dict[str, Tensor]:
        # The vision encoder is frozen and shared (configure_trainable never trains it), so
        # the held-out tokens are computed once for every model and round.
        import torch

        if self._eval_tokens is None:
            with torch.no_grad():
                self._eval_tokens = {
                    d: torch.cat([model.vision_tokens([s.image for s in
                                                       samples[i:i + EVAL_BATCH]])
                                  for i in range(0, len(samples), EVAL_BATCH)])
                    for d, samples in self.eval_sets.items()}
        return self._eval_tokens

    def evaluate(self, answerer: Any, domains: Sequence[str] | None = None) -> Scores:
        """Per-sample DA/MC on the held-out samples of ``domains`` (all) of a model, or of a
        :class:`DeviceRuntime` as it answers (see :func:`score_as_answered`)."""
        tokens = self._eval_tokens_of(getattr(answerer, 'model', answerer))
        return {d: score_as_answered(answerer, tokens[d], self.eval_sets[d],
                                     self.max_new_tokens)
                for d in (domains or self.eval_domains)}

    def baseline(self) -> Scores:
        """Scores of the shipped student (round 0 of every method)."""
        if self._baseline is None:
            self._baseline = self.evaluate(self.ctx.models.student())
        return self._baseline

    def teacher_accuracy(self) -> dict[str, dict[str, float]]:
        """Accuracy of the teacher on the same held-out samples (the reference ceiling)."""
        return means(self.evaluate(self.teacher))

    def provenance(self) -> dict[str, Any]:
        """Seed, sizes, models and scoring, for a bench's JSON detail."""
        return Provenance(self.plan, self.ctx.models.describe(),
                          {'image_size': self.image_size}).to_dict()

    def _akd_config(self, losses: str) -> Any:
        from cdcca_ros.core.akd import AKDConfig

        p = self.cloud_params
        lq, lr_ = ((p['akd.lambda_query'], p['akd.lambda_repr']) if losses == 'akd'
                   else (0.0, 0.0))
        return AKDConfig.from_params(p, lambda_query=lq, lambda_repr=lr_,
                                     steps=self.plan.akd_steps,
                                     batch_size=self.plan.batch_size, seed=self.plan.seed)

    def _log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    # ---- methods ----
    def run(self, method: Method) -> MethodRun:
        """Run ``method`` on every task; the global torch RNG is seeded before each."""
        import torch

        t0 = time.perf_counter()
        base = self.baseline()
        start = RoundRecord(round=0, accuracy=means(base))
        if method.update == 'none':
            # The shipped model never changes: every round scores as round 0.
            rounds = [start] + [RoundRecord(
                round=r + 1, accuracy=start.accuracy,
                offered=sum(len(self.streams[d][r]) for d in self.plan.domains))
                for r in range(self.plan.rounds)]
            final = base
        else:
            tasks: dict[str, list[tuple[RoundRecord, Scores]]] = {}
            with torch.random.fork_rng(devices=[]):
                for d in self.plan.domains:
                    torch.manual_seed(self.plan.seed)
                    tasks[d] = (self._run_tent(method, d) if method.update == 'tent'
                                else self._run_cloud(method, d))
                    self._log(f'    {method.name} on {d}: DA ' + ' -> '.join(
                        f'{x.accuracy[d]["da"]:.1f}' for x, _ in tasks[d])
                        + f' (from {start.accuracy[d]["da"]:.1f})')
            rounds = [start] + [self._merge(r, tasks) for r in range(self.plan.rounds)]
            final = {d: tasks[d][-1][1][d] for d in self.plan.domains}
        run = MethodRun(method=method, rounds=rounds, domains=self.plan.domains,
                        wall_s=time.perf_counter() - t0, final_scores=final)
        self._log(f'  {method.name}: final DA {run.final("da"):.1f}  MC {run.final("mc"):.1f} '
                  f'({run.wall_s:.0f} s)')
        return run

    def _merge(self, r: int, tasks: Mapping[str, list[tuple[RoundRecord, Scores]]]
               ) -> RoundRecord:
        """Round ``r`` of every task as one record: each domain's accuracy from its own task,
        the source's (after the last round) averaged over the tasks, bytes summed."""
        recs = [tasks[d][r][0] for d in self.plan.domains]
        acc = {d: tasks[d][r][0].accuracy[d] for d in self.plan.domains}
        if self.source is not None and all(self.source in x.accuracy for x in recs):
            acc[self.source] = {m: float(np.mean([x.accuracy[self.source][m] for x in recs]))
                                for m in METRICS}
        kept = [(x.kept_tokens, x.uplinked) for x in recs if x.kept_tokens is not None]

        def avg(values: list[float | None]) -> float | None:
            got = [v for v in values if v is not None]
            return float(np.mean(got)) if got else None

        return RoundRecord(
            round=r + 1, accuracy=acc, offered=sum(x.offered for x in recs),
            uplinked=sum(x.uplinked for x in recs),
            uplink_bytes=sum(x.uplink_bytes for x in recs),
            kept_tokens=(sum(k * n for k, n in kept) / max(1, sum(n for _, n in kept))
                         if kept else None),
            downlink_bytes=sum(x.downlink_bytes for x in recs),
            delta_bits_per_param=avg([x.delta_bits_per_param for x in recs]),
            trained_samples=sum(x.trained_samples for x in recs),
            loss_first={d: tasks[d][r][0].loss_first for d in self.plan.domains},
            loss_last={d: tasks[d][r][0].loss_last for d in self.plan.domains},
            agreement_before=avg([x.agreement_before for x in recs]),
            agreement_after=avg([x.agreement_after for x in recs]),
            label_accuracy=(sum((x.label_accuracy or 0.0) * x.uplinked for x in recs)
                            / max(1, sum(x.uplinked for x in recs))
                            if any(x.label_accuracy is not None for x in recs) else None),
            train_s=sum(x.train_s for x in recs))

    def _scored(self, model: Any, domain: str, last: bool) -> tuple[dict[str, Any], Scores]:
        """The task's domain scores (and the source's after the last round)."""
        domains = [domain] + ([self.source] if last and self.source else [])
        scores = self.evaluate(model, domains)
        return means(scores), scores

    def _run_tent(self, method: Method, domain: str) -> list[tuple[RoundRecord, Scores]]:
        import torch

        model = self.ctx.models.student()
        params = [p for p in model.torch_model.parameters() if p.requires_grad]
        p = self.cloud_params
        # The cloud's optimiser, steps and batch, so TENT gets the same budget as AKD.
        optimizer = torch.optim.AdamW(params, lr=p['akd.lr'] * method.lr_scale)
        gen = torch.Generator().manual_seed(self.plan.seed)
        out = []
        for r, stream in enumerate(self.streams[domain]):
            t0 = time.perf_counter()
            with torch.no_grad():
                tokens = torch.cat([model.vision_tokens([s.image for s in
                                                         stream[i:i + EVAL_BATCH]])
                                    for i in range(0, len(stream), EVAL_BATCH)])
            questions = [s.question for s in stream]
            entropies = []
            for _ in range(self.plan.akd_steps):
                pick = torch.randperm(len(stream), generator=gen)[:self.plan.batch_size]
                entropies.append(tent_step(model, optimizer, tokens[pick],
                                           [questions[int(i)] for i in pick],
                                           self.max_new_tokens, 1.0))
            train_s = time.perf_counter() - t0
            acc, scores = self._scored(model, domain, r == len(self.streams[domain]) - 1)
            out.append((RoundRecord(round=r + 1, accuracy=acc, offered=len(stream),
                                    loss_first={'entropy': entropies[0]},
                                    loss_last={'entropy': entropies[-1]}, train_s=train_s),
                        scores))
        return out

    def _keypair(self) -> tuple[Any, Any]:
        from cdcca_ros.core.wire import generate_keypair

        if self._keys is None:
            self._keys = generate_keypair()
        return self._keys

    def _run_cloud(self, method: Method, domain: str) -> list[tuple[RoundRecord, Scores]]:
        """The device answers each round's stream, uplinks what the method says, and at the
        end of the stream the cloud runs its round (with the guard's audit, token pulls and
        gate unless the method says otherwise) and the device applies what ships."""
        from cdcca_ros.bench.robot import DEVICE_ID as ROBOT
        from cdcca_ros.bench.robot import Robot
        from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
        from cdcca_ros.core.coverage import CoverageConfig, anchor_tokens_of
        from cdcca_ros.core.device_runtime import DeviceRuntime
        from cdcca_ros.core.entropy_guard import EntropyGuardConfig
        from cdcca_ros.core.rounds.anchor import resolve_anchor
        from cdcca_ros.core.rounds.config import GuardConfig
        from cdcca_ros.core.uts import TokenRing
        from cdcca_ros.models import bundled

        private, public = self._keypair()
        d = self.device_params
        cfg = CloudConfig.from_params(self.cloud_params)
        cfg.min_samples = 1
        cfg.akd = self._akd_config(method.losses)
        if not method.guarded:
            cfg.guard = GuardConfig.plain(self.plan.akd_steps)
        elif not method.gate:
            cfg.guard = cfg.guard.with_(gate=cfg.guard.gate.__class__(enabled=False),
                                        audit=cfg.guard.audit.__class__(enabled=False))
        anchor = (resolve_anchor(cfg.guard.anchor, bundled.resolve(self.ctx.models.spec(
            'student'))) if cfg.guard.enabled else None)
        cloud = CloudRuntime(self.teacher, self.ctx.models.student(), private, cfg,
                             anchor=anchor)
        guard = EntropyGuardConfig.from_params(d) if method.guarded else None
        device = DeviceRuntime(self.ctx.models.student(), ROBOT, public,
                               max_new_tokens=self.max_new_tokens, entropy_guard=guard,
                               coverage=(CoverageConfig.from_params(d) if method.guarded
                                         else None),
                               anchor_tokens=anchor_tokens_of(bundled.resolve(
                                   self.ctx.models.spec('student'))))
        space = device.model.vision_space()
        overrides: dict[str, Any] = {'audit_seed': self.plan.seed}
        if method.keep_ratio is not None:
            overrides['keep_ratio'] = method.keep_ratio
        if not method.stage1:
            # top_fraction 1.0 passes every sample (nothing ranks above the newcomer).
            overrides.update(stage1_mode='top_fraction', stage1_fraction=1.0)
        if not method.guarded or method.stage2 == 'none':
            overrides['audit_fraction'] = 0.0
        features = (random_features(self.plan.seed) if method.stage2 == 'random'
                    else device.mc_token_features)
        student_spec = self.ctx.models.spec('student')
        pipeline = device_uplink(student_spec, space, features, params=d, **overrides)
        uplink = ('uts' if method.stage2 != 'none' else 'stage1' if method.stage1 else 'all')
        robot = Robot(device, pipeline, TokenRing(int(d['uts.ring_samples'])), cloud,
                      uplink=uplink, basis=cloud_token_basis(student_spec, space))
        out = []
        t = 0
        for r, stream in enumerate(self.streams[domain]):
            before = dict(robot.counts)
            hits = len(robot.label_hits)
            for s in stream:
                t += 1
                robot.answer(s, f'{domain}-{t}', now=float(t), truth=method.labels == 'truth')
            t0 = time.perf_counter()
            events = robot.round()
            result = next((res for _, res in events if res is not None), None)
            delta = {k: robot.counts[k] - before[k] for k in robot.counts}
            kept = [rec.num_kept for rec in cloud.device(ROBOT).memory.select()
                    if rec.sample_id.startswith(f'{domain}-')][-max(1, delta['uplinked']):]
            new_hits = robot.label_hits[hits:]
            record = RoundRecord(round=r + 1, accuracy={}, offered=len(stream),
                                 uplinked=delta['uplinked'],
                                 uplink_bytes=delta['uplink_bytes'] + delta['pull_bytes'],
                                 kept_tokens=float(np.mean(kept)) if kept else None,
                                 label_accuracy=(100.0 * float(np.mean(new_hits))
                                                 if new_hits else None))
            if result is not None:
                record.downlink_bytes = delta['downlink_bytes']
                record.delta_bits_per_param = (result.stats.bits_per_param
                                               if result.shipped and result.stats else None)
                record.trained_samples = result.samples
                record.loss_first = result.losses[0] if result.losses else None
                record.loss_last = result.losses[-1] if result.losses else None
                record.agreement_before = result.agreement_before
                record.agreement_after = result.agreement_after
                record.outcome = result.outcome
            record.train_s = time.perf_counter() - t0
            record.accuracy, scores = self._scored(device, domain,
                                                   r == len(self.streams[domain]) - 1)
            out.append((record, scores))
        return out


# --- presentation -----------------------------------------------------------------------------
def pct(value: float | None) -> str:
    """A percentage cell with two decimals, as the paper prints them."""
    return '-' if value is None or not math.isfinite(value) else f'{value:.2f}'


def signed(value: float | None) -> str:
    """A gain cell: ``+1.23`` / ``-0.45``."""
    return '-' if value is None or not math.isfinite(value) else f'{value:+.2f}'


def kib(nbytes: float | None) -> str:
    """Bytes as a short human string."""
    if nbytes is None:
        return '-'
    for unit, size in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
        if nbytes >= size:
            return f'{nbytes / size:.2f} {unit}'
    return f'{nbytes:.0f} B'


def plot_path(ctx: BenchContext, name: str) -> Path:
    """Where a bench's figure goes: beside its JSON record."""
    return Path(ctx.args.out).with_name(f'{name}.png')


def save_figure(fig: Any, path: Path) -> None:
    """Write a small PNG (low dpi: the report is committed) and close the figure."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned)."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ['| ' + ' | '.join(headers) + ' |',
             '|' + '|'.join([':---'] + ['---:'] * (len(headers) - 1)) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in cells]
    return '\n'.join(lines)


@dataclass
class Provenance:
    """Seed, sizes and models of a run, for every table's notes."""

    plan: Plan
    models: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {'plan': asdict(self.plan), 'models': self.models, **self.extra,
                'scoring': {'da': 'VQA accuracy of the greedy answer (min(#refs/3, 1)), %',
                            'mc': 'choice with the highest first-step probability of its '
                                  'first token, %'},
                'stream_start': BENCH_START,
                'eval_start': EVAL_START}
