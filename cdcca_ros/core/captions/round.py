"""The cloud's caption round for one device: the paper's second task on the robot (no rclpy).

A device sends a caption sample up like an answer sample. UTS stage 1 runs on the entropy of
the whole caption (Eq. 2 over every step), and stage 2 picks the kept tokens. The sample's
question is a ``describe`` question (:func:`~cdcca_ros.core.captions.describe.is_describe`).
That is how the cloud tells it from an answer sample, with no new message field. The cloud keeps
it in the device's caption memory (:attr:`~cdcca_ros.core.rounds.state.DeviceState.captions`),
never in the answers' memory.

When enough caption samples arrived (``min_samples``, or the first waited ``max_wait_s``),
:class:`CaptionRoundRunner` runs one caption round. It uses the pieces the ``table2`` bench
uses (:mod:`~cdcca_ros.core.captions.adapt`, :mod:`~cdcca_ros.core.captions.guard`) and the
answer round's compression and commit (:class:`~cdcca_ros.core.rounds.round.RoundRunner`):

1. **Label.** The pseudo-labels are the teacher's greedy captions of each sample's kept tokens.
2. **Train.** :class:`~cdcca_ros.core.captions.adapt.CaptionDistiller` runs AKD (Eq. 5-6 for
   captions) from the adapter the device holds. It trains on every train-split caption sample
   kept, plus the caption anchors: frames of the student's anchor set, labelled with the
   shipped student's own captions. What trains is the model's trainable set, the adapter every
   delta carries (LoRA on the Q-Former, the token adapter, ...). The caption heads stay as
   shipped. So the delta is an ordinary one, and the device verifies and hot-applies it like
   any other.
3. **Compress** the delta against the device's exact view (the rounds' DWC codec and budget;
   no refit, whose task loss is the answers').
4. **Gate.** The candidate is judged as the device would run it, on a caption metric
   (:func:`~cdcca_ros.core.captions.guard.caption_gate_config`: per-sample CIDEr-D, sign test).
   The slices:

   * ``new``: gate-split caption samples since the last caption update, referenced by the
     teacher's captions;
   * ``replay``: the older gate-split caption samples, referenced the same way;
   * ``anchor``: the caption anchors held out of training, referenced by the shipped student's
     own captions. Each is captioned as the device would caption a fresh frame like it, with
     the answer gate's routing (``guard.gate_routed``,
     :meth:`~cdcca_ros.core.rounds.round.RoundRunner.covered`): the update where the frame
     would be covered, the shipped captioner (the anchor's own caption) elsewhere.

   The same adapter also answers questions. So a candidate the caption gate accepts must also
   pass the answers' anchor slice, routed the same way, under the answer gate's anchor rule
   (:meth:`~cdcca_ros.core.rounds.gate.GateConfig.anchor_harm`); it is reported as
   ``answer_anchor``.
5. **Sign** and commit the shipped delta, as a new version. The answers' continuing trained
   copy takes the caption change too, so the next answer delta does not undo it.

A refused candidate changes nothing: the caption memory stays, and the next caption round
trains again from what the device holds.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cdcca_ros.core import dwc
from cdcca_ros.core.captions.adapt import CaptionAkdConfig, CaptionDistiller, caption_texts
from cdcca_ros.core.captions.describe import DESCRIBE
from cdcca_ros.core.captions.guard import caption_gate_config, caption_scores, caption_slice
from cdcca_ros.core.rounds.gate import ANCHOR, NEW, REPLAY, GateDecision
from cdcca_ros.core.rounds.memory import Record, split_of
from cdcca_ros.core.rounds.round import REFUSED, SHIPPED, RoundResult
from cdcca_ros.core.rounds.stats import PairedCounts
from cdcca_ros.errors import ConfigError
from cdcca_ros.models.caption_head import Captioner

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.akd import AKDConfig
    from cdcca_ros.core.rounds.config import GuardConfig
    from cdcca_ros.core.rounds.round import RoundRunner
    from cdcca_ros.core.rounds.state import DeviceState

ANSWER_ANCHOR = 'answer_anchor'
"""The gate slice of the answers' anchor, checked on every caption candidate."""


@dataclass
class CaptionRoundConfig:
    """When caption rounds run and how they train.

    Attributes:
        enabled: Run caption rounds (the cloud needs caption heads beside teacher and
            student); False: caption samples are refused.
        min_samples: A caption round starts when this many caption samples are pending ...
        max_wait_s: ... or when the oldest pending one waited this long (and >= 1 pending).
        steps: Optimiser steps of a caption round.
        lr: Its learning rate.
        min_gain: The caption gate's smallest gain on ``new`` (CIDEr points).
        anchor_frames: Frames of the anchor set used as caption anchors (0: none).
    """

    enabled: bool = True
    min_samples: int = 48
    max_wait_s: float = 300.0
    steps: int = 100
    lr: float = 1e-3
    min_gain: float = 5.0
    anchor_frames: int = 128

    def __post_init__(self) -> None:
        if self.min_samples < 1 or self.steps < 1 or self.anchor_frames < 0:
            raise ConfigError(f'captions: min_samples={self.min_samples} and steps='
                              f'{self.steps} must be >= 1, anchor_frames='
                              f'{self.anchor_frames} >= 0')
        if not (self.max_wait_s > 0 and self.lr > 0):
            raise ConfigError(f'captions: max_wait_s={self.max_wait_s} and lr={self.lr} must '
                              'be > 0')
        if not (math.isfinite(self.min_gain) and self.min_gain >= 0):
            raise ConfigError(f'captions: min_gain must be finite and >= 0, got '
                              f'{self.min_gain}')

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CaptionRoundConfig:
        """The settings a cloud node builds from its ``captions.*`` parameters."""
        return cls(enabled=params['captions.enabled'],
                   min_samples=params['captions.min_samples'],
                   max_wait_s=params['captions.max_wait_s'], steps=params['captions.steps'],
                   lr=params['captions.lr'], min_gain=params['captions.min_gain'],
                   anchor_frames=params['captions.anchor_frames'])

    def akd_config(self, akd: AKDConfig, seed: int) -> CaptionAkdConfig:
        """The distiller's settings: the answer rounds' loss weights and batch size (Eq. 6),
        this config's steps and learning rate; the model's trainable set trains, the heads
        stay."""
        return CaptionAkdConfig(lambda_query=akd.lambda_query, lambda_repr=akd.lambda_repr,
                                lambda_ce=akd.lambda_ce, lr=self.lr, steps=self.steps,
                                batch_size=akd.batch_size, grad_clip=akd.grad_clip or 1.0,
                                seed=seed, train_model=True, train_head=False)


def _key(tokens: Tensor) -> bytes:
    """A frame's identity: the digest of its float16 tokens."""
    return hashlib.sha256(tokens.detach().cpu().half().numpy().tobytes()).digest()


def _unique_frames(records: Sequence[Record], limit: int) -> list[Tensor]:
    """The distinct token matrices of ``records`` (first seen first), at most ``limit``."""
    seen: set[bytes] = set()
    out: list[Tensor] = []
    for r in records:
        if len(out) >= limit:
            break
        key = _key(r.tokens)
        if key not in seen:
            seen.add(key)
            out.append(r.tokens)
    return out


class CaptionRoundRunner:
    """Runs caption rounds for any device (module docstring), beside an answer round runner.

    Args:
        runner: The answer rounds' runner: teacher and student modules, the signing key, the
            codec, the answers' anchor set and gate.
        teacher_head: The teacher's caption head.
        student_head: The student's caption head (as shipped to the devices).
        cfg: The caption rounds' settings.
        anchor_gate_fraction: Share of the caption anchors held out for the gate.
    """

    def __init__(self, runner: RoundRunner, teacher_head: Any, student_head: Any,
                 cfg: CaptionRoundConfig, anchor_gate_fraction: float = 0.3) -> None:
        self.runner, self.cfg = runner, cfg
        self.teacher = Captioner(runner.teacher, teacher_head)
        self.student = Captioner(runner.student, student_head)
        frames = _unique_frames(runner.anchor, cfg.anchor_frames)
        labels = self._captions(runner.base, frames, [None] * len(frames))
        #: Caption anchors: the shipped student's own captions of anchor frames.
        self.anchors = [
            Record(sample_id=f'caption-anchor-{i}', seq=-1, tokens=t, indices=None,
                   question=DESCRIBE, split=split_of(f'caption-anchor-{i}', 0.0,
                                                     anchor_gate_fraction),
                   label=lab or None, confidence=1.0, label_tokens=int(t.shape[0]),
                   labelled=True)
            for i, (t, lab) in enumerate(zip(frames, labels, strict=True))]
        held = [a for a in self.anchors if a.split == 'gate' and a.usable]
        #: The shipped student's mean CIDEr-D on the held-out anchors (against its own words).
        self.anchor_base = (float(caption_scores([a.label or '' for a in held],
                                                 [[a.label or ''] for a in held]).mean())
                            if held else None)

    # ---------------------------------------------------------------- pieces
    def _captions(self, weights: dict[str, Tensor], tokens: Sequence[Tensor],
                  indices: Sequence[Tensor | None]) -> list[str]:
        """The student's captions with ``weights`` (eval mode)."""
        if not tokens:
            return []
        model = self.runner.student
        model.load_trainable_state_dict(weights)
        was = model.torch_model.training
        model.torch_model.eval()
        try:
            return caption_texts(self.student, [t.float() for t in tokens], list(indices))
        finally:
            model.torch_model.train(was)

    def _of(self, weights: dict[str, Tensor], records: Sequence[Record]) -> list[str]:
        return self._captions(weights, [r.tokens for r in records], [r.indices for r in records])

    @staticmethod
    def _cider(captions: Sequence[str], records: Sequence[Record]) -> float:
        """Mean CIDEr-D points (x100) of ``captions`` against the records' labels."""
        if not records:
            return math.nan
        return 100.0 * float(caption_scores(captions, [[r.label or ''] for r in records])
                             .mean())

    def label(self, state: DeviceState) -> int:
        """Caption every caption record not labelled yet with the teacher (its kept tokens);
        returns how many."""
        todo = state.captions.unlabelled()
        if not todo:
            return 0
        was = self.runner.teacher.torch_model.training
        self.runner.teacher.torch_model.eval()
        try:
            texts = caption_texts(self.teacher, [r.tokens.float() for r in todo],
                                  [r.indices for r in todo])
        finally:
            self.runner.teacher.torch_model.train(was)
        for r, text in zip(todo, texts, strict=True):
            r.labelled, r.label, r.label_tokens = True, text or None, r.num_kept
            state.captions.update(r)
        return len(todo)

    # ---------------------------------------------------------------- the round
    def run(self, state: DeviceState, guard: GuardConfig, akd: AKDConfig
            ) -> RoundResult | None:
        """One caption round for ``state``'s device; None when no caption sample can train.

        Args:
            state: The device's state (its caption memory, its view, its versions).
            guard: The guarded round's settings (gate on or off, its alpha, the answers'
                anchor rule; off: the paper's round, every candidate ships).
            akd: The answer rounds' AKD settings (loss weights, batch size, seed).
        """
        t0 = time.perf_counter()
        self.label(state)
        memory = state.captions
        new = memory.select(since_seq=state.caption_round_seq)
        state.caption_round_seq = memory.next_seq
        state.caption_first_pending_t = None
        new_train = [r for r in new if r.split == 'train' and r.usable]
        train = ([r for r in memory.select('train') if r.usable] if guard.enabled
                 else new_train)
        if not train:
            if not guard.enabled:
                memory.clear()
            state.save()
            return None
        rows = train + ([a for a in self.anchors if a.split == 'train' and a.usable]
                        if guard.enabled else [])
        view = state.feedback.view
        before = self._cider(self._of(view, new_train), new_train)
        self.runner.student.load_trainable_state_dict(view)
        distiller = CaptionDistiller(self.student, self.teacher,
                                     self.cfg.akd_config(akd, akd.seed + state.round))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(akd.seed + state.round)  # dropout draws: a round is seeded
            losses = distiller.fit([r.tokens.float() for r in rows],
                                   [r.indices for r in rows], [r.label or '' for r in rows])
        trained = self.runner.student.trainable_state_dict()
        after = self._cider(self._of(trained, new_train), new_train)
        delta = dwc.compute_delta(trained, view)
        compressed = self.runner.compress_plain(delta)
        candidate = dwc.apply_delta(view, compressed.decoded)
        state.round += 1
        decision = self.decide(state, guard, view, candidate)
        state.last_caption_gate = decision.to_dict()

        def result(outcome: str, envelope: Any) -> RoundResult:
            return RoundResult(device_id=state.device_id, round=state.round, outcome=outcome,
                               envelope=envelope, samples=len(new_train), losses=[losses],
                               stats=compressed.stats, agreement_before=before,
                               agreement_after=after, train_s=time.perf_counter() - t0,
                               decision=decision, memory=memory.summary(), task='caption')

        if not decision.ship:
            state.counters['caption_refused'] += 1
            state.save()
            return result(REFUSED, None)
        envelope = self.runner.ship(state, delta, compressed)
        # The answers' continuing copy takes the whole caption change (what compression
        # dropped goes out with the next delta: error feedback), so no later answer delta
        # takes it back.
        state.trained = dwc.apply_delta(state.trained, delta)
        state.caption_ship_seq = memory.next_seq
        state.counters['caption_shipped'] += 1
        if not guard.enabled:
            memory.clear()
        state.save()
        return result(SHIPPED, envelope)

    def decide(self, state: DeviceState, guard: GuardConfig, view: dict[str, Tensor],
               candidate: dict[str, Tensor]) -> GateDecision:
        """The gate's verdict on ``candidate`` against ``view`` (module docstring, step 4)."""
        gate = caption_gate_config(enabled=guard.enabled and guard.gate.enabled,
                                   alpha=guard.gate.alpha, min_gain=self.cfg.min_gain)
        if not gate.enabled:
            return gate.decide({})
        held = [r for r in state.captions.select('gate') if r.usable]
        parts = {NEW: [r for r in held if r.seq >= state.caption_ship_seq][-gate.max_new:],
                 REPLAY: [r for r in held if r.seq < state.caption_ship_seq]}
        everything = [r for members in parts.values() for r in members]
        old, new = self._of(view, everything), self._of(candidate, everything)
        slices: dict[str, Any] = {}
        start = 0
        for name, members in parts.items():
            stop = start + len(members)
            if members:
                slices[name] = caption_slice(old[start:stop], new[start:stop],
                                             [[r.label or ''] for r in members])
            start = stop
        anchor = [a for a in self.anchors if a.split == 'gate' and a.usable]
        if anchor:
            # Routed as the device would caption a fresh frame like each: the shipped
            # captioner (the anchor's label) where the update would not cover it.
            routed = self.runner.covered(state, anchor)
            labels = [a.label or '' for a in anchor]
            pick = [a for a, r in zip(anchor, routed, strict=True) if r]
            old_a, new_a = dict(zip(map(id, pick), self._of(view, pick), strict=True)), dict(
                zip(map(id, pick), self._of(candidate, pick), strict=True))
            slices[ANCHOR] = caption_slice(
                [old_a.get(id(a), lab) for a, lab in zip(anchor, labels, strict=True)],
                [new_a.get(id(a), lab) for a, lab in zip(anchor, labels, strict=True)],
                [[lab] for lab in labels])
        decision = gate.decide(slices, anchor_base=self.anchor_base)
        answers = [r for r in self.runner.anchor if r.split == 'gate' and r.usable]
        if decision.ship and answers:
            counts = PairedCounts.of(*self.runner.routed_correct(state, view, candidate,
                                                                 answers))
            decision.slices[ANSWER_ANCHOR] = counts
            harm = guard.gate.anchor_harm(counts, self.runner.anchor_base)
            if harm:
                return GateDecision(False, f'answers: {harm}', decision.slices, harmful=True)
        return decision


def caption_sample_error(question: str, why: str = 'captions.enabled is false, or teacher '
                         'and student have no caption_head') -> str:
    """Why a cloud without caption rounds refuses the caption sample asked ``question``."""
    return (f'a caption sample (question {question[:40]!r}) but this cloud runs no caption '
            f'rounds ({why}): set the device\'s uts.captions false, or give the cloud caption '
            'rounds')


__all__ = ['ANSWER_ANCHOR', 'CaptionRoundConfig', 'CaptionRoundRunner', 'caption_sample_error']
