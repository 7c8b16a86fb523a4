"""One round's training: AKD on a mixture of new, replayed and anchor samples (no rclpy).

Every step draws ``batch_size`` records: a share ``mix_new`` from the round's new training
samples, ``mix_anchor`` from the anchor set and the rest from the replay memory (clusters
drawn evenly, see :meth:`~cdcca_ros.core.rounds.memory.Memory.balanced_sampler`). Records
that cannot be stacked together (different numbers of kept tokens) go through the models in
separate groups whose losses are weighted by their share of the batch, so one step is one
optimiser update on the whole draw. Replayed records carry the teacher's AKD targets, so
replay costs no teacher forward.

The learning rate warms up over the first 5% of ``max_steps`` and follows a cosine to zero.
Every ``eval_every`` steps from ``min_steps`` on, the student's teacher-forced loss on the
held-out ``val`` slices is measured -- the mean of each slice's mean (the new data, older
replay, the anchor set count alike, so old data cannot drown what the round is for); the
best weights so far are kept and training stops after ``patience`` evaluations without
improvement. The round ends on the best weights (never on the untrained ones: deciding
whether the round helps at all is the gate's job, on other held-out samples).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cdcca_ros.core.akd import AKDConfig, AKDTrainer, TeacherBatch, split_targets, stack_targets
from cdcca_ros.core.rounds.memory import Record, TeacherTargets
from cdcca_ros.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.models.base import MLLM

WARMUP = 0.05


@dataclass
class TrainConfig:
    """How long and on what a round trains.

    Attributes:
        max_steps: Most optimiser steps in one round.
        min_steps: Fewest steps before early stopping may end the round.
        eval_every: Steps between two validation losses.
        patience: Validations without improvement that end the round.
        mix_new: Share of each batch drawn from the round's new samples (while there is
            replay; see :meth:`RoundTrainer.plan`).
        data_epochs: Times each labelled record (new or replayed) is drawn in a round: sets
            the round's length within ``[min_steps, max_steps]``.
        mix_anchor: Share drawn from the anchor set (the rest: replay); more when there is
            too little data to fill a batch without repeating it.
        val_max: Validation records used at most (the newest).
        anchor_loss: ``'kd'``: anchor samples train on the KL divergence from the base
            student's own answer distributions (its behaviour distilled back, margins
            included); ``'ce'``: on L_CE of its answers only; ``'akd'``: on the full Eq. 6
            like every other sample.
        l2sp: Weight of ``sum (theta - theta_base)^2 / 2`` over the trainable set (L2-SP: a
            pull toward the weights the student shipped with); 0: none.
    """

    max_steps: int = 300
    min_steps: int = 120
    eval_every: int = 25
    patience: int = 2
    mix_new: float = 0.4
    data_epochs: float = 8.0
    mix_anchor: float = 0.3
    val_max: int = 256
    anchor_loss: str = 'kd'
    l2sp: float = 0.01

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ConfigError(f'max_steps={self.max_steps}, eval_every={self.eval_every} and '
                              f'patience={self.patience} must be >= 1')
        if not 0 <= self.min_steps <= self.max_steps:
            raise ConfigError(f'min_steps={self.min_steps} must be in [0, max_steps]')
        for name in ('mix_new', 'mix_anchor'):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f'{name} must be in [0, 1], got {value}')
        if not (math.isfinite(self.data_epochs) and self.data_epochs > 0):
            raise ConfigError(f'data_epochs must be > 0, got {self.data_epochs}')
        if self.mix_anchor >= 1.0:
            raise ConfigError('mix_anchor must be < 1: some of each batch is data')
        if self.mix_new + self.mix_anchor > 1.0:
            raise ConfigError(f'mix_new + mix_anchor = {self.mix_new + self.mix_anchor} > 1')
        if self.val_max < 1:
            raise ConfigError(f'val_max must be >= 1, got {self.val_max}')
        if self.anchor_loss not in ('kd', 'ce', 'akd'):
            raise ConfigError(f'anchor_loss must be kd, ce or akd, got {self.anchor_loss!r}')
        if not (math.isfinite(self.l2sp) and self.l2sp >= 0):
            raise ConfigError(f'l2sp must be finite and >= 0, got {self.l2sp}')


@dataclass
class TrainResult:
    """What a round's training did."""

    steps: int
    best_step: int
    val_first: float
    val_best: float
    losses: list[dict[str, float]]
    stopped_early: bool

    def to_dict(self) -> dict[str, Any]:
        return {'steps': self.steps, 'best_step': self.best_step,
                'val_first': self.val_first, 'val_best': self.val_best,
                'stopped_early': self.stopped_early,
                'loss_first': self.losses[0] if self.losses else None,
                'loss_last': self.losses[-1] if self.losses else None}


def _group_key(r: Record) -> tuple[int, bool]:
    return (r.num_kept, r.indices is None)


def _stack(records: Sequence[Record]) -> tuple[Tensor, Tensor | None, list[str], list[str]]:
    tokens = torch.stack([r.tokens.float() for r in records])
    indices = (None if records[0].indices is None
               else torch.stack([r.indices.long() for r in records]))
    return tokens, indices, [r.question for r in records], [str(r.label) for r in records]


def grouped(records: Sequence[Record]) -> list[list[Record]]:
    """``records`` split into stackable groups (first-seen order)."""
    groups: dict[tuple[int, bool], list[Record]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    return list(groups.values())


def fill_targets(trainer: AKDTrainer, records: Sequence[Record], batch_size: int = 32) -> int:
    """Compute and attach the teacher's AKD targets where a labelled record lacks them.

    Returns:
        How many records got targets.
    """
    todo = [r for r in records if r.usable and r.targets is None]
    for group in grouped(todo):
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            tokens, indices, questions, answers = _stack(part)
            out = trainer.teacher_outputs(tokens, indices, questions, answers)
            for r, (q, f) in zip(part, split_targets(out), strict=True):
                r.targets = TeacherTargets(query=q, fused=f)
    return len(todo)


def _kd_loss(out: Any, records: Sequence[Record]) -> Tensor:
    """Mean over answer positions of ``KL(p_base || p_student)`` on the base's top entries
    (renormalised), for records that carry :attr:`Record.soft`."""
    from cdcca_ros.core.rounds.anchor import answer_logits

    terms = []
    for logits, r in zip(answer_logits(out.logits, out.answer_mask), records, strict=True):
        if r.soft is None:
            continue
        ids, probs = r.soft
        n = min(int(ids.shape[0]), int(logits.shape[0]))
        logp = logits[:n].float().log_softmax(dim=-1).gather(1, ids[:n].to(logits.device))
        p = probs[:n].float().to(logits.device)
        p = p / p.sum(dim=-1, keepdim=True)
        terms.append((p * (p.clamp_min(1e-12).log() - logp)).sum(dim=-1))
    if not terms:
        return out.logits.float().sum() * 0.0
    return torch.cat(terms).mean()


def _targets(records: Sequence[Record]) -> TeacherBatch | None:
    if any(r.targets is None for r in records):
        return None
    return stack_targets([(r.targets.query, r.targets.fused) for r in records])  # type: ignore[union-attr]


class RoundTrainer:
    """Trains the student's trainable set for one device's round.

    Args:
        teacher: The teacher (never updated).
        student: The student, loaded with the device's trained copy.
        akd: Loss weights, learning rate, batch size, seed (``akd.steps`` is not used:
            ``train.max_steps`` is).
        train: Steps, mixture and early stopping.
        projectors: The device's projector state from its previous rounds (None: new).
    """

    def __init__(self, teacher: MLLM, student: MLLM, akd: AKDConfig, train: TrainConfig,
                 projectors: dict[str, Tensor] | None = None,
                 base: dict[str, Tensor] | None = None) -> None:
        self.akd = AKDTrainer(teacher, student, akd, progress=False)
        self.student = student
        self.cfg = train
        self._projector_state = projectors
        self._gen = torch.Generator().manual_seed(akd.seed)
        self._base = base if train.l2sp > 0 else None
        self.anchor_ids: set[str] = set()

    # ---------------------------------------------------------------- projectors
    def _ensure_projectors(self, sample: Record) -> None:
        if self.akd.query_projector is not None:
            return
        # One tiny forward builds them with the right widths, then the saved state loads.
        tokens, indices, questions, answers = _stack([sample])
        self.akd.losses(tokens, indices, questions, answers, _targets([sample]))
        if self._projector_state:
            self.projector_modules().load_state_dict(self._projector_state)

    def projector_modules(self) -> torch.nn.ModuleDict:
        assert self.akd.query_projector is not None and self.akd.repr_projector is not None
        return torch.nn.ModuleDict({'query': self.akd.query_projector,
                                    'repr': self.akd.repr_projector})

    def projector_state(self) -> dict[str, Tensor]:
        """The projectors' weights (kept per device between rounds)."""
        if self.akd.query_projector is None:
            return dict(self._projector_state or {})
        return {k: v.detach().clone() for k, v in self.projector_modules().state_dict().items()}

    # ---------------------------------------------------------------- losses
    def batch_losses(self, records: Sequence[Record]) -> dict[str, Tensor]:
        """Eq. 6 over ``records`` (groups weighted by size), student side with gradients;
        anchor records on L_CE alone when ``anchor_loss`` says so; plus L2-SP."""
        total: dict[str, Tensor] = {}
        n = len(records)
        ce_only = self.cfg.anchor_loss in ('ce', 'kd')
        anchors = [r for r in records if r.sample_id in self.anchor_ids] if ce_only else []
        others = [r for r in records if r.sample_id not in self.anchor_ids] if ce_only else list(
            records)
        for group in grouped(others):
            tokens, indices, questions, answers = _stack(group)
            out = self.akd.losses(tokens, indices, questions, answers, _targets(group))
            for key, value in out.items():
                total[key] = total.get(key, 0.0) + value * (len(group) / n)
        for group in grouped(anchors):
            tokens, indices, questions, answers = _stack(group)
            out = self.student.forward_train(tokens, indices, questions, answers)
            if self.cfg.anchor_loss == 'kd':
                loss = _kd_loss(out, group) * (len(group) / n)
                total['kd'] = total.get('kd', 0.0) + loss
            else:
                loss = out.loss.float() * (len(group) / n)
                total['ce'] = total.get('ce', 0.0) + loss
            total['total'] = total.get('total', 0.0) + self.akd.cfg.lambda_ce * loss
        if self._base is not None:
            live = self.student.trainable_parameters()
            reg = sum(((live[k] - self._base[k]) ** 2).sum() for k in live) * 0.5
            total['l2sp'] = reg
            total['total'] = total['total'] + self.cfg.l2sp * reg
        for key in ('query', 'repr'):
            total.setdefault(key, torch.zeros(()))
        return total

    def val_loss(self, slices: Sequence[Sequence[Record]]) -> float:
        """Mean over the non-empty ``slices`` of the student's mean teacher-forced CE."""
        losses = [self._slice_loss(records) for records in slices if records]
        return float(sum(losses) / len(losses)) if losses else math.nan

    def _slice_loss(self, records: Sequence[Record]) -> float:
        """Mean teacher-forced CE of the student on ``records`` (eval mode, no gradient)."""
        if not records:
            return math.nan
        model = self.student.torch_model
        was = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for group in grouped(records):
                    for start in range(0, len(group), 64):
                        part = group[start:start + 64]
                        tokens, indices, questions, answers = _stack(part)
                        out = self.student.forward_train(tokens, indices, questions, answers)
                        total += float(out.loss) * len(part)
                        count += len(part)
        finally:
            model.train(was)
        return total / count

    # ---------------------------------------------------------------- the loop
    def plan(self, new: Sequence[Record], replay_size: int) -> tuple[int, float, float]:
        """``(steps, new draws a step, replay draws a step)`` of a round.

        Every labelled record (new or replayed) is drawn about ``data_epochs`` times in the
        round: the round runs ``data_epochs * records / data slots`` steps, within
        ``[min_steps, max_steps]``, and when that floor would repeat a handful of records
        too often, fewer of each batch's slots take data (the anchor set takes the rest).
        New records get their ``mix_new`` share of the data slots while there is replay.
        """
        size = self.akd.cfg.batch_size
        data = len(new) + replay_size
        slots = size * (1.0 - self.cfg.mix_anchor) if data else 0.0
        if not data:
            return self.cfg.min_steps or 1, 0.0, 0.0
        steps = math.ceil(self.cfg.data_epochs * data / slots)
        steps = max(self.cfg.min_steps, min(self.cfg.max_steps, steps), 1)
        per_step = min(slots, self.cfg.data_epochs * data / steps)
        if not replay_size:
            return steps, per_step, 0.0
        if not new:
            return steps, 0.0, per_step
        new_rate = min(per_step * self.cfg.mix_new / (1.0 - self.cfg.mix_anchor),
                       self.cfg.data_epochs * len(new) / steps)
        return steps, new_rate, per_step - new_rate

    def _draws(self, new: Sequence[Record], replay: Iterator[Record] | None,
               anchor: Sequence[Record], new_rate: float, replay_rate: float
               ) -> Callable[[], list[Record]]:
        size = self.akd.cfg.batch_size
        carry = {'new': 0.0, 'replay': 0.0}

        def pick(pool: Sequence[Record], k: int) -> list[Record]:
            idx = torch.randint(len(pool), (k,), generator=self._gen)
            return [pool[int(i)] for i in idx]

        def take(key: str, rate: float) -> int:
            carry[key] += rate
            n = int(carry[key])
            carry[key] -= n
            return n

        def draw() -> list[Record]:
            n_new = take('new', new_rate) if new else 0
            n_replay = take('replay', replay_rate) if replay is not None else 0
            out = pick(new, n_new) if n_new else []
            if n_replay and replay is not None:
                out += [next(replay) for _ in range(n_replay)]
            rest = size - len(out)
            if anchor and rest > 0:
                out += pick(anchor, rest)
            return out or pick(list(new) or list(anchor), size)
        return draw

    def fit(self, new: Sequence[Record], replay: Iterator[Record] | None,
            anchor: Sequence[Record], val: Sequence[Sequence[Record]],
            replay_size: int = 0) -> TrainResult:
        """Train on the mixture; end on the best validation weights.

        Args:
            new: The round's new labelled training records.
            replay: Endless draws from the memory's labelled training records (None: none).
            anchor: The anchor set's training records.
            val: Held-out slices for early stopping (e.g. new data, older data, anchor).
            replay_size: How many records ``replay`` draws from.

        Raises:
            ModelError: Nothing to train on, or a non-finite loss.
        """
        if not new and replay is None and not anchor:
            raise ModelError('a round needs at least one labelled record to train on')
        self.anchor_ids = {r.sample_id for r in anchor}
        steps, new_rate, replay_rate = self.plan(new, replay_size)
        draw = self._draws(new, replay, anchor, new_rate, replay_rate)
        first = draw()
        self._ensure_projectors(first[0])
        model = self.student.torch_model
        params = ([p for p in model.parameters() if p.requires_grad]
                  + list(self.projector_modules().parameters()))
        optimizer = torch.optim.AdamW(params, lr=self.akd.cfg.lr,
                                      weight_decay=self.akd.cfg.weight_decay)
        warm = max(1, int(WARMUP * steps))

        def lr_at(step: int) -> float:
            return min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / steps))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        val = [list(v)[-self.cfg.val_max:] for v in val if v]
        val_first = self.val_loss(val)
        best_val = math.inf
        best_state = self._snapshot()
        best_step, bad, history = 0, 0, []
        stopped = False
        step = 0
        batch = first
        for step in range(1, steps + 1):
            model.train(self.akd.cfg.train_mode)
            try:
                out = self.batch_losses(batch)
            finally:
                model.eval()
            if not torch.isfinite(out['total']):
                raise ModelError(f'round step {step}: non-finite loss '
                                 f'{ {k: float(v) for k, v in out.items()} }')
            optimizer.zero_grad(set_to_none=True)
            out['total'].backward()
            if self.akd.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.akd.cfg.grad_clip)
            optimizer.step()
            schedule.step()
            history.append({k: float(v.detach()) for k, v in out.items()})
            if step >= self.cfg.min_steps and (step % self.cfg.eval_every == 0
                                               or step == steps):
                loss = self.val_loss(val) if val else -float(step)
                if not val or loss < best_val:
                    best_val, best_step, bad = loss, step, 0
                    best_state = self._snapshot()
                else:
                    bad += 1
                    if bad >= self.cfg.patience and step >= self.cfg.min_steps:
                        stopped = True
                        break
            batch = draw()
        self._restore(best_state)
        return TrainResult(steps=step, best_step=best_step, val_first=val_first,
                           val_best=best_val if val else math.nan, losses=history,
                           stopped_early=stopped)

    def _snapshot(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.student.trainable_state_dict(), self.projector_state()

    def _restore(self, state: tuple[dict[str, Tensor], dict[str, Tensor]]) -> None:
        self.student.load_trainable_state_dict(state[0])
        if state[1] and self.akd.query_projector is not None:
            self.projector_modules().load_state_dict(state[1])
