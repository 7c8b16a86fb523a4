"""One device's round, start to end: label, train, compress, gate, sign (no rclpy).

:class:`RoundRunner` is the one home of a cloud round:

1. **Label** what arrived (:meth:`RoundRunner.label`): the teacher answers every new record
   from its tokens, with its confidence. A label made from a subset of the tokens that the
   teacher is unsure of asks the device for the rest (a *pull*; the record waits); a label
   below ``labels.min_confidence`` is not used. The teacher's AKD targets are kept with the
   record, so replaying it costs no teacher forward.
2. **Train** (:class:`~cdcca_ros.core.rounds.trainer.RoundTrainer`) from the device's
   trained copy on the round's new samples mixed with the replay memory and the anchor set,
   with early stopping on held-out samples.
3. **Compress** the delta against the exact view of the device (DWC, error feedback, the
   refit when the plain payload is lossy).
4. **Gate** (:class:`~cdcca_ros.core.rounds.gate.GateConfig`): the candidate as the device
   would run it against the adapter it holds, on held-out new data, older replay clusters
   and the anchor set. Refused: nothing is sent, the trained copy keeps training next round
   (after ``reset_after_refusals`` refusals in a row it restarts from the device's view).
5. **Sign** and commit the shipped delta.

Before each round the **live audit** (:meth:`RoundRunner.audit`) compares the version the
device runs with the one before it on the audit samples that arrived since it shipped; a
version significantly worse gets a signed rollback order.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cdcca_ros.core import dwc
from cdcca_ros.core.akd import AKDConfig, AKDTrainer
from cdcca_ros.core.coverage import Coverage
from cdcca_ros.core.refit import RefitConfig, RefitResult, akd_task_loss, refit_compress
from cdcca_ros.core.rounds.config import GuardConfig
from cdcca_ros.core.rounds.gate import ANCHOR, DEVICE, NEW, REPLAY, GateDecision
from cdcca_ros.core.rounds.memory import Record
from cdcca_ros.core.rounds.stats import Paired, PairedCounts, PairedScores
from cdcca_ros.core.rounds.trainer import RoundTrainer, TrainResult, fill_targets, grouped
from cdcca_ros.core.updates import (
    DeltaEnvelope,
    RollbackEnvelope,
    seal_delta,
    seal_rollback,
)
from cdcca_ros.core.uts import answer_confidence

ANCHOR_CACHE = 8  # trainable sets whose anchor answers a runner keeps

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from torch import Tensor

    from cdcca_ros.core.rounds.state import DeviceState
    from cdcca_ros.models.base import MLLM

SHIPPED, REFUSED, NOTHING = 'shipped', 'refused', 'nothing'
EVAL_BATCH = 64


def normalise(text: str | None) -> str:
    """Answers compare case- and space-insensitively."""
    return ' '.join((text or '').lower().split())


def frames(records: Sequence[Record]) -> int:
    """How many frames ``records`` ask about (a derived question shares its parent's)."""
    return len({r.parent or r.sample_id for r in records})


def paired(records: Sequence[Record], old: np.ndarray, new: np.ndarray) -> Paired:
    """The gate's comparison of two adapters on ``records`` (right/wrong per record).

    One question per frame: :class:`PairedCounts` (McNemar). With derived questions
    (``guard.gate_questions``) each frame is one sample scoring its share of right answers,
    compared by the sign test over frames (:class:`PairedScores`): a frame's questions share
    its tokens and are not independent, so the test counts frames, each carrying more
    evidence than one answer.
    """
    if not any(r.parent for r in records):
        return PairedCounts.of(old, new)
    keys = [r.parent or r.sample_id for r in records]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    frame = np.array([index[k] for k in keys])
    size = np.bincount(frame)
    return PairedScores.of(np.bincount(frame, weights=np.asarray(old, float)) / size,
                           np.bincount(frame, weights=np.asarray(new, float)) / size)


@dataclass
class RoundResult:
    """What one round did for one device.

    ``envelope`` is the signed delta when the round shipped one, None when it was refused.
    """

    device_id: str
    round: int
    outcome: str
    envelope: DeltaEnvelope | None
    samples: int
    losses: list[dict[str, float]]
    stats: dwc.CompressStats | None
    agreement_before: float
    agreement_after: float
    train_s: float
    decision: GateDecision | None = None
    train: TrainResult | None = None
    refit: RefitResult | None = None
    pulls: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    #: ``'vqa'`` (answers; agreement = share of teacher labels answered) or ``'caption'``
    #: (:mod:`cdcca_ros.core.captions.round`; agreement = mean CIDEr-D points against the
    #: teacher's captions).
    task: str = 'vqa'

    @property
    def shipped(self) -> bool:
        return self.outcome == SHIPPED

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (status messages, bench records)."""
        return {'device_id': self.device_id, 'round': self.round, 'outcome': self.outcome,
                'task': self.task, 'metric': 'cider' if self.task == 'caption' else 'accuracy',
                'samples': self.samples, 'train_s': round(self.train_s, 3),
                'agreement_before': self.agreement_before,
                'agreement_after': self.agreement_after,
                'bytes': self.stats.nbytes if self.stats else 0,
                'gate': self.decision.to_dict() if self.decision else None,
                'train': self.train.to_dict() if self.train else None,
                'pulls': len(self.pulls), 'memory': self.memory}


@dataclass
class AuditResult:
    """The live audit's verdict on the version a device runs."""

    version: int
    previous: int | None
    counts: PairedCounts | None
    device_agreement: float | None
    rollback: RollbackEnvelope | None = None
    reason: str = ''

    def to_dict(self) -> dict[str, Any]:
        return {'version': self.version, 'previous': self.previous,
                'counts': self.counts.to_dict() if self.counts else None,
                'device_agreement': self.device_agreement,
                'rollback': self.rollback is not None, 'reason': self.reason}


class RoundRunner:
    """Runs rounds for any device on one teacher and one student module.

    Args:
        teacher: The teacher.
        student: The student module (its trainable set is loaded per device and round).
        key: Signs deltas and rollback orders.
        akd: Loss weights, learning rate, batch size, label generation.
        guard: The guard's settings.
        codec: DWC codec name; ``codec_params`` its knobs; ``budget_bytes`` the byte budget.
        refit: Compression-aware refit; ``refit_min_error`` when it runs.
        anchor: The anchor set's records (labelled, split).
    """

    def __init__(self, teacher: MLLM, student: MLLM, key: Ed25519PrivateKey, akd: AKDConfig,
                 guard: GuardConfig, codec: str, codec_params: dict[str, Any],
                 budget_bytes: int | None, refit: RefitConfig, refit_min_error: float,
                 anchor: Sequence[Record] = ()) -> None:
        self.teacher, self.student, self.key = teacher, student, key
        self.configure(akd, guard, codec, codec_params, budget_bytes, refit, refit_min_error)
        self.anchor = list(anchor)
        self._labeller = AKDTrainer(teacher, student, akd, progress=False)
        self.base = student.trainable_state_dict()
        self._gate_anchor = [r for r in self.anchor if r.split == 'gate' and r.usable]
        # Per-sample answers right of a trainable set (by its hash) on the anchor's gate share:
        # the gate asks them of the device's version every round, and that version changes
        # only when a round ships (most devices run the base: one entry serves them all).
        self._anchor_right: dict[str, np.ndarray] = {}
        #: The base student's accuracy on the anchor's gate share (1.0 with its own answers).
        self.anchor_base = (float(self.anchor_correct(self.base).mean())
                            if self._gate_anchor else None)

    def configure(self, akd: AKDConfig, guard: GuardConfig, codec: str,
                  codec_params: dict[str, Any], budget_bytes: int | None, refit: RefitConfig,
                  refit_min_error: float) -> None:
        """Change the settings (from the next round on)."""
        self.akd, self.guard = akd, guard
        self.codec_name, self.codec_params, self.budget_bytes = codec, codec_params, budget_bytes
        self.refit_cfg, self.refit_min_error = refit, refit_min_error
        if hasattr(self, '_labeller'):
            self._labeller.cfg = akd

    # ---------------------------------------------------------------- answers
    def answers(self, model: MLLM, records: Sequence[Record]) -> list[str]:
        """Greedy answers of ``model`` to ``records`` (eval mode), in order."""
        return [res.text.strip() for res in self._results(model, records)]

    def scored_answers(self, model: MLLM, records: Sequence[Record]
                       ) -> list[tuple[str, float]]:
        """Greedy answers of ``model`` to ``records`` with their confidence (the geometric
        mean of the answer tokens' probabilities), in order."""
        return [(res.text.strip(), answer_confidence(res.token_probs))
                for res in self._results(model, records)]

    def _results(self, model: MLLM, records: Sequence[Record]) -> list[Any]:
        """``model.answer_from_tokens`` results for ``records`` (eval mode, no grad), in
        order, batched per stackable group."""
        out: dict[int, Any] = {}
        was = model.torch_model.training
        model.torch_model.eval()
        try:
            with torch.no_grad():
                for group in grouped(records):
                    for start in range(0, len(group), EVAL_BATCH):
                        part = group[start:start + EVAL_BATCH]
                        tokens = torch.stack([r.tokens.float() for r in part])
                        indices = (None if part[0].indices is None
                                   else torch.stack([r.indices.long() for r in part]))
                        results = model.answer_from_tokens(
                            tokens, indices, [r.question for r in part],
                            max_new_tokens=self.akd.max_new_tokens)
                        out.update({id(r): res
                                    for r, res in zip(part, results, strict=True)})
        finally:
            model.torch_model.train(was)
        return [out[id(r)] for r in records]

    def correct(self, weights: dict[str, Tensor], records: Sequence[Record]) -> np.ndarray:
        """Per record: does the student with ``weights`` answer its label?"""
        self.student.load_trainable_state_dict(weights)
        answers = self.answers(self.student, records)
        return np.array([normalise(a) == normalise(r.label)
                         for a, r in zip(answers, records, strict=True)], dtype=bool)

    def anchor_correct(self, weights: dict[str, Tensor]) -> np.ndarray:
        """:meth:`correct` on the anchor's gate share, kept per trainable set (by hash, the
        last ``ANCHOR_CACHE`` sets): greedy answers of the same weights do not change."""
        from cdcca_ros.core.wire import state_dict_hash

        key = state_dict_hash(weights)
        right = self._anchor_right.pop(key, None)
        if right is None:
            right = self.correct(weights, self._gate_anchor)
        self._anchor_right[key] = right  # the newest last
        while len(self._anchor_right) > ANCHOR_CACHE:
            self._anchor_right.pop(next(iter(self._anchor_right)))
        return right

    # ---------------------------------------------------------------- 1. labels
    def label(self, state: DeviceState) -> list[str]:
        """Label every record the teacher has not seen; returns the ids to pull.

        Records waiting for a pull longer than ``labels.pull_wait_rounds`` rounds fall back to
        their first label (or are dropped when it is too unsure).
        """
        cfg = self.guard.labels
        todo = state.memory.unlabelled()
        pulls: list[str] = []
        unsure: list[Record] = []  # partial samples the teacher is unsure of: pull candidates
        partial_labelled = 0
        for group in grouped(todo):
            for start in range(0, len(group), EVAL_BATCH):
                part = group[start:start + EVAL_BATCH]
                tokens = torch.stack([r.tokens.float() for r in part])
                indices = (None if part[0].indices is None
                           else torch.stack([r.indices.long() for r in part]))
                scored = self._labeller.pseudo_label_scored(tokens, indices,
                                                            [r.question for r in part])
                for r, (text, conf) in zip(part, scored, strict=True):
                    r.labelled, r.confidence = True, float(conf)
                    r.label_tokens = r.num_kept
                    r.label = text or None
                    r.targets = None
                    # A derived question is never pulled itself (its parent's pull reaches
                    # it) and does not grow the pull budget.
                    partial = r.indices is not None and not r.parent
                    partial_labelled += int(partial)
                    if (partial and cfg.pull_below > 0 and conf < cfg.pull_below
                            and r.pull == '' and self.guard.enabled):
                        unsure.append(r)
        # The least confident first, at most pull_fraction of the partial samples labelled:
        # the pulls' bytes stay a bounded share of the uplink.
        unsure.sort(key=lambda r: r.confidence)
        budget = math.ceil(cfg.pull_fraction * partial_labelled)
        for i, r in enumerate(unsure):
            if i < budget:
                r.pull, r.pull_round = 'requested', state.round
                pulls.append(r.sample_id)
        for r in todo:
            if r.pull != 'requested' and not cfg.trusted(r):
                r.label = None
        self._skip_what_the_student_knows(state, todo)
        for r in todo:
            state.memory.update(r)
        # Pulls that never came back: fall back on the first label.
        for r in state.memory.select():
            if r.pull == 'requested' and r.sample_id not in pulls:
                waited = state.round - r.pull_round
                if waited >= cfg.pull_wait_rounds:
                    r.pull = 'unavailable'
                    if not cfg.trusted(r):
                        r.label = None
                    state.counters['pulls_unavailable'] += 1
                    state.memory.update(r)
        state.counters['pulls_requested'] += len(pulls)
        return pulls

    def _skip_what_the_student_knows(self, state: DeviceState, records: Sequence[Record]
                                     ) -> None:
        """Drop the labels of derived training questions the device's student already
        answers with confidence >= ``labels.derived_student_below`` (UTS's sample test, put
        to the cloud's own questions): the device sends a frame because it is unsure of
        *its* question, not of every other one, and a confident answer is mostly right
        where the shift does not touch it, so a teacher error there only teaches a wrong
        answer."""
        below = self.guard.labels.derived_student_below
        asked = [r for r in records if r.parent and r.split == 'train' and r.label]
        if not (below > 0 and asked):
            return
        self.student.load_trainable_state_dict(state.feedback.view)
        for r, (_, conf) in zip(asked, self.scored_answers(self.student, asked), strict=True):
            if conf >= below:
                r.label = None
                state.counters['derived_student_sure'] += 1

    @staticmethod
    def trainable(r: Record) -> bool:
        return r.usable and r.pull != 'requested'

    # ---------------------------------------------------------------- the audit
    def audit(self, state: DeviceState) -> AuditResult | None:
        """Compare the device's version with the one before on audit samples since it
        shipped; order a rollback when it is significantly worse."""
        cfg = self.guard.audit
        if not (self.guard.enabled and cfg.enabled) or state.version == 0:
            return None
        prev = state.previous()
        records = [r for r in state.memory.select('gate', audit=True, since_seq=state.ship_seq)
                   if self.trainable(r)]
        agreement = (float(np.mean([normalise(r.device_answer) == normalise(r.label)
                                    for r in records if r.device_version == state.version]))
                     if any(r.device_version == state.version for r in records) else None)
        if prev is None or len(records) < cfg.min_samples:
            result = AuditResult(state.version, prev[0] if prev else None, None, agreement,
                                 reason=f'{len(records)} audit samples since v{state.version}')
            state.last_audit = result.to_dict()
            return result
        old = self.correct(prev[2], records)
        new = self.correct(state.feedback.view, records)
        counts = PairedCounts.of(old, new)
        result = AuditResult(state.version, prev[0], counts, agreement)
        if counts.p_worse() < cfg.alpha and -counts.gain >= cfg.min_drop:
            result.reason = (f'v{state.version} answers {-counts.gain:.1f} points worse than '
                             f'v{prev[0]} on {counts.n} audit samples (p={counts.p_worse():.4f})')
            result.rollback = seal_rollback(
                self.key, device_id=state.device_id, from_version=state.version,
                from_hash=state.hash, to_hash=prev[1], new_version=state.version + 1,
                reason=result.reason)
        else:
            result.reason = (f'v{state.version} vs v{prev[0]}: {counts.gain:+.1f} points on '
                             f'{counts.n} audit samples')
        state.last_audit = result.to_dict()
        return result

    # ---------------------------------------------------------------- 2-5. the round
    def run(self, state: DeviceState) -> RoundResult | None:
        """One round for ``state``'s device (call :meth:`label` first or not: it runs it).

        Returns None when there is nothing usable to learn from.
        """
        t0 = time.perf_counter()
        pulls = self.label(state)
        new_records = [r for r in state.memory.select(since_seq=state.round_seq)]
        new_train = [r for r in new_records if r.split == 'train' and self.trainable(r)]
        guard = self.guard
        state.round_seq = state.memory.next_seq
        state.first_pending_t = None
        if not guard.enabled:
            # The plain round: this round's samples only, then forgotten.
            if not new_train:
                state.memory.clear()
                return None
            replay_pool: list[Record] = []
            anchor_train: list[Record] = []
            val: list[list[Record]] = []
        else:
            state.memory.recluster()
            replay_pool = [r for r in state.memory.select('train') if self.trainable(r)
                           and r.seq < (new_train[0].seq if new_train else state.round_seq)]
            anchor_train = [r for r in self.anchor if r.split == 'train' and r.usable]
            held = [r for r in state.memory.select('val') if self.trainable(r)]
            val = [[r for r in held if r.seq >= state.ship_seq],
                   [r for r in held if r.seq < state.ship_seq],
                   [r for r in self.anchor if r.split == 'val' and r.usable]]
            if not new_train and not replay_pool:
                state.save()
                return None
        trainer = RoundTrainer(self.teacher, self.student, self.akd, guard.train,
                               projectors=state.projectors or None, base=self.base)
        needs_targets = new_train + replay_pool
        if guard.train.anchor_loss == 'akd':
            needs_targets += anchor_train
        fill_targets(trainer.akd, needs_targets)
        self.student.load_trainable_state_dict(state.trained)
        before = self._agreement(new_train)
        replay = state.memory.balanced_sampler(replay_pool) if replay_pool else None
        train = trainer.fit(new_train, replay, anchor_train, val, replay_size=len(replay_pool))
        after = self._agreement(new_train)
        trained = self.student.trainable_state_dict()
        state.projectors = trainer.projector_state()
        delta = dwc.compute_delta(trained, state.feedback.view)
        compressed, refitted = self._compress(delta, new_train or replay_pool, trainer.akd,
                                              state.feedback.view)
        state.round += 1
        decision = None
        if guard.gate.enabled and guard.enabled:
            candidate = dwc.apply_delta(state.feedback.view, compressed.decoded)
            decision = guard.gate.decide(self._slices(state, state.feedback.view, candidate),
                                         anchor_base=self.anchor_base)
            state.last_gate = decision.to_dict()
        self.student.load_trainable_state_dict(trained)

        def result(outcome: str, envelope: DeltaEnvelope | None) -> RoundResult:
            return RoundResult(device_id=state.device_id, round=state.round, outcome=outcome,
                               envelope=envelope, samples=len(new_train), losses=train.losses,
                               stats=compressed.stats, agreement_before=before,
                               agreement_after=after, train_s=time.perf_counter() - t0,
                               decision=decision, train=train, refit=refitted, pulls=pulls,
                               memory=state.memory.summary())

        if decision is not None and not decision.ship:
            state.counters['refused'] += 1
            # Only a copy that harms (a slice falls) counts toward the reset; one whose gain
            # is not significant yet keeps training: more held-out data will tell.
            state.refusals = state.refusals + 1 if decision.harmful else state.refusals
            if state.refusals >= guard.reset_after_refusals:
                # Keep what the device holds; forget the copy that keeps failing.
                trained = {k: v.clone() for k, v in state.feedback.view.items()}
                state.refusals = 0
                state.counters['resets'] += 1
            state.trained = trained
            state.save()
            return result(REFUSED, None)
        envelope = self.ship(state, delta, compressed)
        state.trained = trained
        state.refusals = 0
        state.counters['shipped'] += 1
        if not guard.enabled:
            state.memory.clear()
        state.save()
        return result(SHIPPED, envelope)

    # ---------------------------------------------------------------- pieces
    def ship(self, state: DeviceState, delta: dict[str, Tensor], compressed: dwc.Compressed
             ) -> DeltaEnvelope:
        """Commit a candidate the gate accepted and seal its delta (any round: answers or
        captions): the device's view moves by exactly ``compressed.decoded``, the rest of
        ``delta`` stays for the next delta (error feedback), and the new version is
        remembered; the ``new`` slice and the audit start again from here."""
        state.feedback.commit(delta, compressed.decoded)
        new_hash = state.feedback.view_hash()
        envelope = seal_delta(self.key, device_id=state.device_id, round=state.round,
                              base_version=state.version, base_hash=state.hash,
                              new_version=state.version + 1, new_hash=new_hash,
                              codec=compressed.codec.name, payload=compressed.payload)
        state.version += 1
        state.hash = new_hash
        state.remember(state.version, new_hash, state.feedback.view)
        state.ship_seq = state.memory.next_seq
        return envelope

    def compress_plain(self, delta: dict[str, Tensor]) -> dwc.Compressed:
        """``delta`` in the round's codec under its byte budget, compact (the device knows its
        trainable set), without the refit."""
        codec = dwc.get_codec(self.codec_name, **self.codec_params)
        return dwc.compress(delta, codec, self.budget_bytes, self_describing=False)

    def _agreement(self, records: Sequence[Record]) -> float:
        """Share of ``records`` the student (as loaded) answers as labelled."""
        if not records:
            return float('nan')
        answers = self.answers(self.student, records)
        return float(np.mean([normalise(a) == normalise(r.label)
                              for a, r in zip(answers, records, strict=True)]))

    def _slices(self, state: DeviceState, current: dict[str, Tensor],
                candidate: dict[str, Tensor]) -> dict[str, Paired]:
        """Paired right/wrong counts of ``current`` vs ``candidate`` on every gate slice;
        per frame (:func:`paired`) where the slice holds derived questions
        (``guard.gate_questions``)."""
        gate = self.guard.gate
        held = [r for r in state.memory.select('gate') if self.trainable(r)]
        new = [r for r in held if r.seq >= state.ship_seq][-gate.max_new:]
        old = [r for r in held if r.seq < state.ship_seq]
        slices: dict[str, list[Record]] = {NEW: new}
        clusters = state.memory.clusters_of(old)
        pooled: list[Record] = []
        for c, members in sorted(clusters.items()):
            if frames(members) >= gate.min_slice:
                slices[f'{REPLAY}/{c}'] = members
            else:
                pooled += members
        if pooled:
            slices[f'{REPLAY}/small'] = pooled
        device = [r for members in slices.values() for r in members]  # new and replay
        if self._gate_anchor:
            slices[ANCHOR] = self._gate_anchor
        everything = [r for members in slices.values() for r in members]
        if not everything:
            return {NEW: PairedCounts(0, 0, 0, 0, 0)}
        cur, cand = self.routed_correct(state, current, candidate, everything)
        out: dict[str, Paired] = {}
        start = 0
        for name, members in slices.items():
            stop = start + len(members)
            out[name] = paired(members, cur[start:stop], cand[start:stop])
            start = stop
        if device:  # new and replay come first
            out[DEVICE] = paired(device, cur[:len(device)], cand[:len(device)])
        # The new data per cluster too (new comes first in `everything`): a gain on the whole
        # must not hide a scene that falls (an update learnt on one shift breaking another
        # that went up in the same stretch).
        position = {id(r): i for i, r in enumerate(new)}
        clusters = state.memory.clusters_of(new) if gate.new_clusters else {}
        for c, members in sorted(clusters.items()):
            if frames(members) >= gate.min_slice and len(members) < len(new):
                idx = np.array([position[id(r)] for r in members])
                out[f'{NEW}/{c}'] = paired(members, cur[idx], cand[idx])
        return out

    def routed_correct(self, state: DeviceState, current: dict[str, Tensor],
                        candidate: dict[str, Tensor], records: Sequence[Record]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Per record: right with ``current`` and with ``candidate`` *as the device answers
        a fresh frame like it* (``guard.routing``): a covered frame by the adapter, any other
        by the shipped student (``self.base``), whose answer is then the same for both."""
        covered = self.covered(state, records)
        cur, cand = np.zeros(len(records), bool), np.zeros(len(records), bool)
        # The anchor's gate share is answered by a version once (anchor_correct keeps it).
        where = {id(r): k for k, r in enumerate(self._gate_anchor)}
        anchor = np.array([id(r) in where for r in records], dtype=bool)
        inside, outside = np.flatnonzero(covered), np.flatnonzero(~covered)

        def known(weights: dict[str, Tensor], idx: np.ndarray) -> np.ndarray:
            return self.anchor_correct(weights)[[where[id(records[i])] for i in idx]]

        def answer(weights: dict[str, Tensor], idx: np.ndarray) -> np.ndarray:
            return self.correct(weights, [records[i] for i in idx])

        if len(inside):
            cand[inside] = answer(candidate, inside)
            rest, kept = inside[~anchor[inside]], inside[anchor[inside]]
            if len(rest):
                cur[rest] = answer(current, rest)
            if len(kept):
                cur[kept] = known(current, kept)
        if len(outside):
            rest, kept = outside[~anchor[outside]], outside[anchor[outside]]
            if len(rest):
                cur[rest] = cand[rest] = answer(self.base, rest)
            if len(kept):
                cur[kept] = cand[kept] = known(self.base, kept)
        return cur, cand

    def covered(self, state: DeviceState, records: Sequence[Record]) -> np.ndarray:
        """Which of ``records`` the device would answer with the adapter once the candidate
        is applied: its coverage then holds everything it uplinked and the anchor set (the
        device notes every sample it sends, held-out ones included, so each record is tested
        without its own point: a fresh frame drawn like it)."""
        if self.guard.routing is None or not records:
            return np.ones(len(records), dtype=bool)
        anchors = (np.stack([r.feature for r in self.anchor]) if self.anchor else None)
        noted = [r.feature for r in state.memory.select() if not r.parent]
        noted += [r.feature for r in state.captions.select()]  # the device notes captions too
        coverage = Coverage.trained(self.guard.routing, anchors, noted)
        return coverage.covers_all(np.stack([r.feature for r in records]), exclude_self=True)

    def _compress(self, delta: dict[str, Tensor], records: Sequence[Record],
                  trainer: AKDTrainer, view: dict[str, Tensor]
                  ) -> tuple[dwc.Compressed, RefitResult | None]:
        """The payload of a round: compact (the device knows its trainable set), under the
        budget, refitted on the round's samples when the plain payload is too lossy."""
        plain = self.compress_plain(delta)
        if self.refit_cfg.steps == 0 or plain.stats.rel_l2_error <= self.refit_min_error:
            return plain, None
        samples = [r.to_akd() for r in records if r.usable]
        codec = dwc.get_codec(self.codec_name, **self.codec_params)
        result = refit_compress(self.student, samples, view, delta, codec, self.budget_bytes,
                                self.refit_cfg, task_loss=akd_task_loss(trainer))
        self.student.torch_model.eval()
        return result.compressed, result
