"""The captioning experiment behind Table 2: the device's captioner on the drifting world.

One :class:`CaptionExperiment` fixes from the seed what every method sees:

* ``rounds`` streams of drifted frames (the drifted domains in turn, world indices from
  :data:`~cdcca_ros.bench.common.BENCH_START`, disjoint between rounds): the device captions
  each frame;
* held-out frames of the source and every drifted domain (from
  :data:`~cdcca_ros.bench.common.EVAL_START`), captioned after every round and scored per
  nocaps-like split (:func:`~cdcca_ros.sim.captions.caption_split`): BLEU-4 and CIDEr-D
  (:mod:`~cdcca_ros.core.captions.metrics`), each split scored in one call, x100 as papers
  print them;
* an anchor set of source frames (from the student's anchor range) that the cloud replays
  beside the uplinked ones, labelled by the shipped student itself (what it must keep doing).

Methods (:class:`CaptionMethod`):

* ``none``: source-only, the shipped student and head;
* ``tent``: entropy minimisation of the student's own captions on the device (no teacher);
* ``cloud``: samples and tokens go up (every sample and token, or UTS stage 1 on the caption's
  entropy, Eq. 2 over all steps, and stage 2's kept tokens, packed as the device packs them),
  the teacher captions what arrived, the cloud distils (:class:`~cdcca_ros.core.captions.
  adapt.CaptionDistiller`, L_CE alone or AKD) on everything uplinked so far plus the anchors,
  the delta of the trainable set against what the device holds is coded with the cloud's
  default DWC codec and the device applies what it decodes (error feedback: the cloud keeps
  training its own copy).

A guarded ``cloud`` method (CD-CCA, the default) keeps the in-domain promise as the VQA path
does (:mod:`~cdcca_ros.core.captions.guard`): every ``gate_every``-th uplinked sample and
``gate_anchors`` anchors are held out of training; each round's candidate, as the device would
run it after DWC, ships only when :func:`~cdcca_ros.core.captions.guard.caption_gate_config`'s
gate accepts it on per-sample CIDEr-D (teacher captions for the device's samples, the shipped
student's own for the anchors); and the device captions a frame with the update only where
:class:`~cdcca_ros.core.coverage.Coverage` (device defaults) says the update was trained, with
the shipped captioner on anchor-like frames. Its scores are the routed captions'.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cdcca_ros.bench.common import BENCH_START, EVAL_START, BenchContext, device_uts_config
from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.captions import SPLITS, CaptionSample, caption_samples
from cdcca_ros.sim.domains import DRIFTED, SOURCE
from cdcca_ros.sim.world import World

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.captions.adapt import CaptionAkdConfig
    from cdcca_ros.core.captions.guard import RoutedCaptioner
    from cdcca_ros.models.caption_head import Captioner

ANCHOR_START = 3_000_000  # the student's anchor range (sim.train_bundled.ANCHOR_START)
COLUMNS: tuple[str, ...] = (*SPLITS, 'all')


@dataclass(frozen=True)
class CaptionPlan:
    """Sizes of the experiment.

    Attributes:
        rounds: Adaptation rounds.
        stream: Frames per round (the drifted domains in turn).
        evals: Held-out frames per domain (source and every drifted domain).
        anchors: Source frames the cloud replays.
        steps: Optimiser steps per round (cloud and TENT).
        uplink_fraction: Share of a round's frames UTS stage 1 selects (top entropy).
        gate_every: A guarded method holds every ``gate_every``-th uplinked sample out of
            training, for the gate.
        gate_anchors: Anchors a guarded method holds out of training, for the gate.
        domains: The drifted domains.
        seed: Seed of the world and the training.
    """

    rounds: int = 2
    stream: int = 128
    evals: int = 40
    anchors: int = 512
    steps: int = 300
    uplink_fraction: float = 0.5
    gate_every: int = 3
    gate_anchors: int = 64
    domains: tuple[str, ...] = DRIFTED
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.rounds, self.stream, self.evals, self.anchors) < 1 or self.steps < 0:
            raise ConfigError(f'CaptionPlan sizes must be >= 1, got {self}')
        if self.gate_every < 2 or not 1 <= self.gate_anchors < self.anchors:
            raise ConfigError(f'CaptionPlan needs gate_every >= 2 and 1 <= gate_anchors < '
                              f'anchors, got {self.gate_every}, {self.gate_anchors}, '
                              f'{self.anchors}')
        if not 0.0 < self.uplink_fraction <= 1.0:
            raise ConfigError(f'uplink_fraction must be in (0, 1], got {self.uplink_fraction}')
        if not self.domains:
            raise ConfigError('CaptionPlan needs at least one drifted domain')


@dataclass(frozen=True)
class CaptionMethod:
    """How the device's captioner changes between rounds."""

    name: str
    update: str = 'none'            # 'none', 'tent' or 'cloud'
    losses: str = 'akd'             # 'akd' or 'ce'
    uts: bool = False               # stage 1 + 2 (else every sample, every token)
    lr_scale: float = 1.0           # times the plan's learning rate
    guarded: bool = False           # gate each round's candidate; route by coverage


SOURCE_ONLY = CaptionMethod('Source-only')
TENT = CaptionMethod('TENT (device, entropy min.)', 'tent')
TENT_SLOW = CaptionMethod('TENT, lr / 10', 'tent', lr_scale=0.1)
CE_ONLY = CaptionMethod('Teacher captions, L_CE only', 'cloud', 'ce')
CDCCA = CaptionMethod('CD-CCA (UTS + AKD + DWC)', 'cloud', 'akd', uts=True, guarded=True)


@dataclass
class CaptionRun:
    """Scores per round (round 0: before any update) and link bytes of one method."""

    method: CaptionMethod
    scores: list[dict[str, dict[str, float]]] = field(default_factory=list)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplinked: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)
    gate: list[dict[str, Any]] = field(default_factory=list)
    routed: list[dict[str, float]] = field(default_factory=list)  # per round and split
    device: Any = field(default=None, repr=False, compare=False)  # the final captioner

    def final(self, split: str = 'all', metric: str = 'cider') -> float:
        return self.scores[-1][split][metric]

    def to_dict(self) -> dict[str, Any]:
        return {'method': self.method.name, 'scores': self.scores,
                'uplink_bytes': self.uplink_bytes, 'downlink_bytes': self.downlink_bytes,
                'uplinked': self.uplinked, 'examples': self.examples, 'gate': self.gate,
                'routed_to_update': self.routed}


def _encode(model: Any, samples: Sequence[CaptionSample]) -> Tensor:
    from cdcca_ros.sim.train_captions import _encode_images

    return _encode_images(model, samples)


class CaptionExperiment:
    """The experiment (see the module docstring); :meth:`run` plays one method."""

    def __init__(self, ctx: BenchContext, plan: CaptionPlan) -> None:
        from cdcca_ros.bench.common import model_image_size

        self.ctx, self.plan = ctx, plan
        self.notes: list[str] = []
        self._trained_heads: dict[str, Any] = {}
        self.teacher = self._captioner('teacher')
        size = model_image_size(self.teacher.model)
        world = World(plan.seed)
        self.evals = [s for d in (SOURCE, *plan.domains)
                      for s in caption_samples(world, d, plan.evals, size, EVAL_START)]
        per = -(-plan.stream // len(plan.domains))
        self.streams = []
        for r in range(plan.rounds):
            start = BENCH_START + r * per
            by_domain = [caption_samples(world, d, per, size, start) for d in plan.domains]
            mixed = [by_domain[j][i] for i in range(per) for j in range(len(plan.domains))]
            self.streams.append(mixed[:plan.stream])
        self.anchors = caption_samples(world, SOURCE, plan.anchors, size, ANCHOR_START)
        self.eval_tokens = _encode(self.teacher.model, self.evals)
        self.stream_tokens = [_encode(self.teacher.model, s) for s in self.streams]
        self.anchor_tokens = _encode(self.teacher.model, self.anchors)

    # ------------------------------------------------------------------ models
    def _captioner(self, which: str) -> Captioner:
        """A fresh model with its head (trained here once, quickly, when the model has
        none)."""
        from pathlib import Path

        from cdcca_ros.models import bundled
        from cdcca_ros.models.caption_head import Captioner, has_head

        spec = self.ctx.models.spec(which)
        model = self.ctx.models.teacher() if which == 'teacher' else self.ctx.models.student()
        path = Path(bundled.resolve(spec))
        if has_head(path):
            return Captioner.load(model, path)
        if which not in self._trained_heads:
            self._trained_heads[which] = self._train_head(which, spec, model)
        return Captioner(model, copy.deepcopy(self._trained_heads[which]))

    def _train_head(self, which: str, spec: str, model: Any) -> Any:
        from cdcca_ros.sim.train_captions import CaptionRecipe, train_head

        recipe = CaptionRecipe.quick(self.plan.seed) if self.ctx.quick else CaptionRecipe(
            seed=self.plan.seed)
        from cdcca_ros.bench.common import model_image_size

        domains = (SOURCE, *self.plan.domains) if which == 'teacher' else (SOURCE,)
        n = recipe.teacher_images if which == 'teacher' else recipe.student_images
        world = World(self.plan.seed)
        train = [s for d in domains
                 for s in caption_samples(world, d, n, model_image_size(model), 0)]
        self.notes.append(f'{which} {spec}: no caption head; trained one here '
                          f'({recipe.steps} steps on {len(train)} frames)')
        return train_head(model, train, recipe)

    def score(self, captioner: Captioner | RoutedCaptioner) -> dict[str, dict[str, float]]:
        """BLEU-4 and CIDEr-D (x100) per split of the held-out frames."""
        from cdcca_ros.sim.train_captions import evaluate_captioner

        result = evaluate_captioner(captioner, self.evals, self.eval_tokens)
        return {k: {'bleu4': 100 * v['bleu4'], 'cider': 100 * v['cider'], 'n': v['n']}
                for k, v in result.items() if k in COLUMNS}

    def akd_config(self, method: CaptionMethod) -> CaptionAkdConfig:
        from cdcca_ros.core.captions.adapt import CaptionAkdConfig

        cfg = CaptionAkdConfig(steps=self.plan.steps, seed=self.plan.seed)
        cfg = replace(cfg, lr=cfg.lr * method.lr_scale)
        return replace(cfg, lambda_query=0.0, lambda_repr=0.0) if method.losses == 'ce' \
            else cfg

    # ------------------------------------------------------------------ rounds
    def _uplink(self, method: CaptionMethod, device: Captioner | RoutedCaptioner,
                tokens: Tensor) -> tuple[list[Tensor], list[Tensor | None], int, list[int]]:
        """What the cloud receives from one round: (decoded tokens, indices, bytes, the
        stream rows sent)."""
        import torch

        from cdcca_ros.core.uts import UtsPipeline, pack_tokens, unpack_tokens, uplink_bytes

        results = device.caption_from_tokens(tokens)
        got_t: list[Tensor] = []
        got_i: list[Tensor | None] = []
        sent: list[int] = []
        total = 0
        if not method.uts:
            cfg = device_uts_config()
            for row in tokens:
                packed = pack_tokens(row, cfg.pack_dtype)
                got_t.append(unpack_tokens(packed).float())
                got_i.append(None)
                total += uplink_bytes(len(packed.data), len(packed.scale), 0)
            return got_t, got_i, total, list(range(len(tokens)))
        cfg = device_uts_config(stage1_mode='top_fraction',
                                stage1_fraction=self.plan.uplink_fraction,
                                stage1_window=len(tokens))
        model = device.model
        pipe = UtsPipeline(cfg, model.mc_token_features, model.vision_space().has_cls)
        # Stage 1 ranks against a window of recent entropies: warm it with the round's own,
        # as on a device that has been captioning this stream a while.
        from cdcca_ros.core.captions.adapt import caption_entropy

        for r in results:
            pipe.selector.offer(caption_entropy(r).mean)
        for i, (row, r) in enumerate(zip(tokens, results)):
            out = pipe.process(r.step_probs, row)
            if out is None:
                continue
            got_t.append(unpack_tokens(out.packed).float())
            got_i.append(out.kept_indices.to(torch.long))
            sent.append(i)
            total += out.uplink_bytes
        return got_t, got_i, total, sent

    def run(self, method: CaptionMethod) -> CaptionRun:
        """Play every round for ``method``; scores after each."""
        from cdcca_ros.core import dwc
        from cdcca_ros.core.captions.adapt import (
            CaptionDistiller,
            head_state,
            load_state,
            tent_fit,
        )

        device = self._captioner('student')
        run = CaptionRun(method)
        run.scores.append(self.score(device))
        if method.update == 'none':
            return self._finish(run, device)
        cfg = self.akd_config(method)
        if method.update == 'tent':
            for r in range(self.plan.rounds):
                tent_fit(device, self.stream_tokens[r], replace(cfg, seed=cfg.seed + r))
                run.scores.append(self.score(device))
            return self._finish(run, device)
        if method.guarded:
            return self._run_guarded(method, device, cfg, run)
        cloud = copy.deepcopy(device)
        distiller = CaptionDistiller(cloud, self.teacher, cfg)
        anchor_labels = [x.text for x in device.caption_from_tokens(self.anchor_tokens)]
        memory_t: list[Tensor] = list(self.anchor_tokens)
        memory_i: list[Tensor | None] = [None] * len(memory_t)
        memory_l: list[str] = list(anchor_labels)
        # anchors too are distilled (L_query, L_repr; their captions the student's own)
        memory_d: list[bool] = [True] * len(memory_t)
        codec = dwc.get_codec('sparse')
        held = head_state(device, cfg)
        for r in range(self.plan.rounds):
            toks, idx, nbytes, _ = self._uplink(method, device, self.stream_tokens[r])
            run.uplink_bytes += nbytes
            run.uplinked += len(toks)
            if toks:
                memory_l += distiller.label(toks, idx)
                memory_t += toks
                memory_i += idx
                memory_d += [True] * len(toks)
            distiller.fit(memory_t, memory_i, memory_l, memory_d)
            trained = head_state(cloud, cfg)
            delta = dwc.compute_delta(trained, held)
            payload = codec.encode(delta)
            run.downlink_bytes += len(payload)
            held = dwc.apply_delta(held, codec.decode(payload))
            load_state(device, held)
            run.scores.append(self.score(device))
        return self._finish(run, device)

    def _run_guarded(self, method: CaptionMethod, device: Captioner, cfg: CaptionAkdConfig,
                     run: CaptionRun) -> CaptionRun:
        """The cloud loop with the gate and the device's coverage routing (module
        docstring); ``device`` has been scored once (round 0)."""
        import numpy as np

        from cdcca_ros.core import dwc
        from cdcca_ros.core.captions.adapt import (
            CaptionDistiller,
            caption_texts,
            head_state,
            load_state,
        )
        from cdcca_ros.core.captions.guard import (
            RoutedCaptioner,
            caption_gate_config,
            caption_scores,
            caption_slice,
        )
        from cdcca_ros.core.coverage import Coverage, CoverageConfig
        from cdcca_ros.core.rounds.gate import ANCHOR, NEW, REPLAY
        from cdcca_ros.core.rounds.memory import token_feature

        plan = self.plan
        base = copy.deepcopy(device)
        cloud = copy.deepcopy(device)
        probe = copy.deepcopy(device)   # runs each candidate as the device would
        distiller = CaptionDistiller(cloud, self.teacher, cfg)
        gate = caption_gate_config()
        anchor_features = np.stack([token_feature(t) for t in self.anchor_tokens])
        noted: list[np.ndarray] = []   # features of what the device sent

        routed = RoutedCaptioner(device, base, Coverage(CoverageConfig(), anchor_features))
        n_train = len(self.anchor_tokens) - plan.gate_anchors
        anchor_labels = [x.text for x in base.caption_from_tokens(self.anchor_tokens)]
        gate_anchor_t = self.anchor_tokens[n_train:]
        gate_anchor_refs = [[c] for c in anchor_labels[n_train:]]
        anchor_base = float(caption_scores(anchor_labels[n_train:], gate_anchor_refs).mean())
        memory_t: list[Tensor] = list(self.anchor_tokens[:n_train])
        memory_i: list[Tensor | None] = [None] * n_train
        memory_l: list[str] = anchor_labels[:n_train]
        pending: list[tuple[Tensor, Tensor | None, str]] = []   # gate samples since a ship
        replay: list[tuple[Tensor, Tensor | None, str]] = []    # older gate samples
        codec = dwc.get_codec('sparse')
        held = head_state(device, cfg)
        for r in range(plan.rounds):
            toks, idx, nbytes, sent = self._uplink(method, routed, self.stream_tokens[r])
            run.uplink_bytes += nbytes
            run.uplinked += len(toks)
            noted += [token_feature(self.stream_tokens[r][row]) for row in sent]
            labels = distiller.label(toks, idx) if toks else []
            for j, (t, i, lab) in enumerate(zip(toks, idx, labels)):
                if j % plan.gate_every == plan.gate_every - 1:
                    pending.append((t, i, lab))
                else:
                    memory_t.append(t)
                    memory_i.append(i)
                    memory_l.append(lab)
            distiller.fit(memory_t, memory_i, memory_l)
            payload = codec.encode(dwc.compute_delta(head_state(cloud, cfg), held))
            candidate = dwc.apply_delta(held, codec.decode(payload))
            load_state(probe, candidate)
            slices: dict[str, Any] = {}
            for name, rows in ((NEW, pending), (REPLAY, replay)):
                if rows:  # the device's own samples: kept tokens, teacher captions
                    t_rows, i_rows = [x[0] for x in rows], [x[1] for x in rows]
                    slices[name] = caption_slice(
                        caption_texts(device, t_rows, i_rows),
                        caption_texts(probe, t_rows, i_rows), [[x[2]] for x in rows])
            # The anchor as the device would caption it: routed by the coverage it holds now
            # and by the one it would hold with the candidate (frames nearest an anchor keep
            # the shipped captioner; those nearest a sent sample get the candidate).
            candidate_coverage = Coverage.trained(CoverageConfig(), anchor_features, noted)
            slices[ANCHOR] = caption_slice(
                [x.text for x in routed.caption_from_tokens(gate_anchor_t)],
                [x.text for x in RoutedCaptioner(probe, base, candidate_coverage)
                 .caption_from_tokens(gate_anchor_t)], gate_anchor_refs)
            decision = gate.decide(slices, anchor_base=anchor_base)
            direct = caption_slice(anchor_labels[n_train:],
                                   [x.text for x in probe.caption_from_tokens(gate_anchor_t)],
                                   gate_anchor_refs)
            run.gate.append({'round': r + 1, 'payload_bytes': len(payload),
                             **decision.to_dict(), 'anchor_unrouted': direct.to_dict(),
                             'anchor_routed_to_update': float(
                                 candidate_coverage.covers_all(
                                     anchor_features[n_train:]).mean())})
            if decision.ship:
                run.downlink_bytes += len(payload)
                held = candidate
                load_state(device, held)
                routed.coverage = candidate_coverage  # frozen when the update is applied
                replay += pending
                pending = []
            mask = routed.routes(self.eval_tokens)
            run.routed.append({c: float(np.mean([m for m, e in zip(mask, self.evals)
                                                 if c in ('all', e.split)] or [0.0]))
                               for c in COLUMNS})
            run.scores.append(self.score(routed))
        return self._finish(run, routed)

    def _finish(self, run: CaptionRun, device: Captioner | RoutedCaptioner) -> CaptionRun:
        run.device = device
        rows = range(0, len(self.evals), max(1, len(self.evals) // 5))
        caps = device.caption_from_tokens(self.eval_tokens[list(rows)])
        run.examples = [{'domain': self.evals[i].domain, 'caption': c.text,
                         'reference': self.evals[i].references[0]} for i, c in zip(rows, caps)]
        return run


def demo_captions(teacher: str, student: str, domains: Sequence[str], seed: int = 0,
                  per_domain: int = 2, quick: bool = False) -> dict[str, Any]:
    """Captions of a few held-out frames before and after one guarded CD-CCA round, for
    ``make demo``: the shipped student's, the adapted (routed) device's, the teacher's and the
    first reference, per frame, with the round's gate verdict and CIDEr per split before and
    after.

    The round is the table2 bench's first CD-CCA round (:meth:`CaptionExperiment.run`, the
    bench's sizes: 128 drifted frames of ``domains``, 512 anchors, 300 steps) scored on 10
    held-out frames per domain (``quick``: seconds).
    """
    import argparse
    import tempfile
    from pathlib import Path

    from cdcca_ros.bench.common import Models

    if quick:
        plan = CaptionPlan(rounds=1, stream=8, evals=max(2, per_domain), anchors=8, steps=3,
                           gate_anchors=3, domains=tuple(domains), seed=seed)
    else:
        plan = CaptionPlan(rounds=1, evals=max(10, per_domain), domains=tuple(domains),
                           seed=seed)
    with tempfile.TemporaryDirectory(prefix='cdcca-demo-captions-') as tmp:
        ctx = BenchContext(args=argparse.Namespace(seed=seed, quick=quick),
                           models=Models(teacher, student, Path(tmp), seed), workdir=Path(tmp))
        exp = CaptionExperiment(ctx, plan)
        shipped = exp._captioner('student')
        run = exp.run(CDCCA)
    rows = [i for d in (SOURCE, *plan.domains)
            for i in [j for j, s in enumerate(exp.evals) if s.domain == d][:per_domain]]
    tokens = exp.eval_tokens[rows]
    before = shipped.caption_from_tokens(tokens)
    after = run.device.caption_from_tokens(tokens)
    # CD-CCA is guarded (a RoutedCaptioner); with no update shipped the shipped one answers
    shipped_any = any(g['ship'] for g in run.gate)
    by_update = run.device.routes(tokens) & shipped_any
    teacher_caps = exp.teacher.caption_from_tokens(tokens)
    frames = [{'domain': exp.evals[i].domain, 'split': exp.evals[i].split,
               'reference': exp.evals[i].references[0], 'before': b.text, 'after': a.text,
               'answered_by': 'update' if u else 'shipped', 'teacher': t.text}
              for i, b, a, u, t in zip(rows, before, after, by_update, teacher_caps)]
    return {'plan': {'rounds': plan.rounds, 'stream': plan.stream, 'steps': plan.steps,
                     'anchors': plan.anchors, 'domains': list(plan.domains), 'seed': seed},
            'gate': [{'round': g['round'], 'ship': g['ship'], 'reason': g['reason']}
                     for g in run.gate],
            'cider_before': {k: round(v['cider'], 1) for k, v in run.scores[0].items()},
            'cider_after': {k: round(v['cider'], 1) for k, v in run.scores[-1].items()},
            'frames': frames}


__all__ = ['CaptionPlan', 'CaptionMethod', 'CaptionRun', 'CaptionExperiment', 'demo_captions',
           'SOURCE_ONLY', 'TENT', 'TENT_SLOW', 'CE_ONLY', 'CDCCA', 'COLUMNS']
