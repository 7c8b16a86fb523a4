"""Adapter-based Knowledge Distillation (AKD), paper Sec. 3.3, Eq. 5-6.

The teacher labels the uplinked samples (pseudo-labels), then the student's trainable set
(LoRA adapters etc., chosen by ``MLLM.configure_trainable``) and two small projectors learn
to minimise

    L_total = lambda_query L_query + lambda_repr L_repr + lambda_ce L_ce      (Eq. 6)

with L_query the query alignment of Eq. 5, L_repr the alignment of the fused LM hidden
states on answer positions (padding masked out) and L_ce the student's cross-entropy on
the teacher's pseudo-labels. Models are reached only through the
:class:`cdcca_ros.models.base.MLLM` contract (tensors in, tensors out).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cdcca_ros.core.uts import answer_confidence
from cdcca_ros.errors import ConfigError, ModelError
from cdcca_ros.models.base import MLLM, TrainOutputs

LOSS_KEYS = ('total', 'query', 'repr', 'ce')


# --- projectors (phi of Eq. 5) ---------------------------------------------------------------
class QueryProjector(nn.Module):
    """phi of Eq. 5: a linear map from the student's query width to the teacher's.

    With equal widths it starts as the identity, so the first L_query is the plain
    feature distance rather than the distance to a random projection.
    """

    def __init__(self, c_student: int, c_teacher: int) -> None:
        """Build ``nn.Linear(c_student, c_teacher)``.

        Raises:
            ConfigError: A width is not positive.
        """
        super().__init__()
        if c_student <= 0 or c_teacher <= 0:
            raise ConfigError(f'{type(self).__name__} widths must be > 0, got '
                              f'c_student={c_student}, c_teacher={c_teacher}')
        self.c_student = c_student
        self.c_teacher = c_teacher
        self.linear = nn.Linear(c_student, c_teacher)
        if c_student == c_teacher:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(c_teacher))
                self.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[..., c_student]`` to ``[..., c_teacher]``."""
        return self.linear(x)


class ReprProjector(nn.Module):
    """The same for the fused representations: linear when widths differ, else identity."""

    def __init__(self, h_student: int, h_teacher: int) -> None:
        """Build the map ``h_student -> h_teacher`` (no parameters when equal).

        Raises:
            ConfigError: A width is not positive.
        """
        super().__init__()
        if h_student <= 0 or h_teacher <= 0:
            raise ConfigError(f'{type(self).__name__} widths must be > 0, got '
                              f'h_student={h_student}, h_teacher={h_teacher}')
        self.h_student = h_student
        self.h_teacher = h_teacher
        self.linear = nn.Linear(h_student, h_teacher) if h_student != h_teacher else None

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[..., h_student]`` to ``[..., h_teacher]``."""
        return x if self.linear is None else self.linear(x)


# --- losses --------------------------------------------------------------------------------
def query_loss(q_teacher: Tensor, q_student_projected: Tensor) -> Tensor:
    """Eq. 5: ``||Q_t - phi(Q_s)||^2 / (B L C)``.

    Args:
        q_teacher: ``[B, L, C]`` teacher queries (no gradient needed).
        q_student_projected: ``[B, L, C]`` projected student queries.

    Raises:
        ValueError: Shapes differ or are not 3-D.
    """
    if q_teacher.dim() != 3 or q_teacher.shape != q_student_projected.shape:
        raise ValueError(f'query_loss needs two [B, L, C] tensors of one shape, got '
                         f'{tuple(q_teacher.shape)} and {tuple(q_student_projected.shape)}')
    diff = q_student_projected.float() - q_teacher.detach().float()
    return diff.pow(2).sum() / q_teacher.numel()


def repr_loss(h_teacher: Tensor, h_student_projected: Tensor, mask: Tensor) -> Tensor:
    """MSE of fused representations over real answer positions only.

    ``sum_{b,a: mask} ||h_t - h_s||^2 / (n_real * H)``; 0 (with a gradient path, no NaN)
    when no position is real.

    Args:
        h_teacher: ``[B, A, H]`` teacher LM hidden states at answer positions.
        h_student_projected: ``[B, A, H]`` projected student states.
        mask: ``[B, A]`` bool, True on real answer positions.

    Raises:
        ValueError: Inconsistent shapes.
    """
    if h_teacher.dim() != 3 or h_teacher.shape != h_student_projected.shape:
        raise ValueError(f'repr_loss needs two [B, A, H] tensors of one shape, got '
                         f'{tuple(h_teacher.shape)} and {tuple(h_student_projected.shape)}')
    if tuple(mask.shape) != tuple(h_teacher.shape[:2]):
        raise ValueError(f'repr_loss mask must be [B, A] = {tuple(h_teacher.shape[:2])}, '
                         f'got {tuple(mask.shape)}')
    real = mask.to(device=h_student_projected.device, dtype=torch.bool)
    diff = h_student_projected.float() - h_teacher.detach().float()
    # Select rather than multiply: padded positions may hold anything (even inf/NaN).
    picked = diff[real]
    if picked.numel() == 0:
        return h_student_projected.float().sum() * 0.0
    return picked.pow(2).sum() / picked.numel()


# --- configuration --------------------------------------------------------------------------
@dataclass
class AKDConfig:
    """AKD settings.

    Attributes:
        lambda_query: Weight of L_query (>= 0).
        lambda_repr: Weight of L_repr (>= 0).
        lambda_ce: Weight of L_ce (>= 0); at least one weight is > 0.
        lr: AdamW learning rate (> 0).
        steps: Optimiser steps per :meth:`AKDTrainer.fit` call (>= 0).
        batch_size: Samples per step (>= 1).
        grad_clip: Max global gradient norm; None disables clipping.
        seed: Seed of the projector init and the batch sampling.
        weight_decay: AdamW weight decay (>= 0).
        max_new_tokens: Generation limit of the teacher's pseudo-labels (>= 1).
        train_mode: Put the student in train mode (dropout) during the steps.
        min_label_confidence: Drop pseudo-labels whose teacher confidence (geometric mean of
            the answer tokens' probabilities) is below this, in [0, 1); 0 keeps every label.
            The teacher sees only the uplinked tokens, so some of its answers are guesses:
            confidence thresholding (as in FixMatch) keeps the student off most of them.
    """

    lambda_query: float = 1.0
    lambda_repr: float = 1.0
    lambda_ce: float = 1.0
    lr: float = 1e-4
    steps: int = 20
    batch_size: int = 8
    grad_clip: float | None = 1.0
    seed: int = 0
    weight_decay: float = 0.0
    max_new_tokens: int = 6
    train_mode: bool = True
    min_label_confidence: float = 0.0

    def __post_init__(self) -> None:
        for name in ('lambda_query', 'lambda_repr', 'lambda_ce'):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0.0:
                raise ConfigError(f'AKDConfig.{name} must be finite and >= 0, got {value}')
        if self.lambda_query == self.lambda_repr == self.lambda_ce == 0.0:
            raise ConfigError('AKDConfig: lambda_query, lambda_repr and lambda_ce are all 0; '
                              'at least one loss must be weighted')
        if not math.isfinite(self.lr) or self.lr <= 0.0:
            raise ConfigError(f'AKDConfig.lr must be finite and > 0, got {self.lr}')
        if self.steps < 0:
            raise ConfigError(f'AKDConfig.steps must be >= 0, got {self.steps}')
        if self.batch_size < 1:
            raise ConfigError(f'AKDConfig.batch_size must be >= 1, got {self.batch_size}')
        if self.grad_clip is not None and (not math.isfinite(self.grad_clip)
                                           or self.grad_clip <= 0.0):
            raise ConfigError(f'AKDConfig.grad_clip must be None or > 0, got {self.grad_clip}')
        if self.weight_decay < 0.0:
            raise ConfigError(f'AKDConfig.weight_decay must be >= 0, got {self.weight_decay}')
        if self.max_new_tokens < 1:
            raise ConfigError(
                f'AKDConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}')
        if not 0.0 <= self.min_label_confidence < 1.0:
            raise ConfigError(f'AKDConfig.min_label_confidence must be in [0, 1), '
                              f'got {self.min_label_confidence}')

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> AKDConfig:
        """The config a cloud node builds from its ``akd.*`` parameters (see
        :mod:`cdcca_ros.nodes.tables`), then ``overrides`` (field names)."""
        fields = {name: params[f'akd.{name}'] for name in (
            'lambda_query', 'lambda_repr', 'lambda_ce', 'lr', 'steps', 'batch_size',
            'min_label_confidence') if f'akd.{name}' in params}
        fields.update(overrides)
        return cls(**fields)

    def combine(self, query: Tensor, repr_: Tensor, ce: Tensor) -> Tensor:
        """Eq. 6: the weighted sum of the three losses."""
        return self.lambda_query * query + self.lambda_repr * repr_ + self.lambda_ce * ce


@dataclass
class TeacherBatch:
    """The part of a teacher's :class:`~cdcca_ros.models.base.TrainOutputs` AKD reads.

    Attributes:
        query: ``[B, L, C]`` teacher query features.
        fused: ``[B, A, H]`` teacher LM states at the answer positions (zero padded).
        answer_mask: ``[B, A]`` bool, True on real answer positions.
    """

    query: Tensor
    fused: Tensor
    answer_mask: Tensor


def stack_targets(items: Sequence[tuple[Tensor, Tensor]]) -> TeacherBatch:
    """Stack per-sample ``(query [L, C], fused [A_i, H])`` into a :class:`TeacherBatch`
    (answers padded at the end to the longest, as the models pad ``fused``)."""
    queries = torch.stack([q.float() for q, _ in items])
    longest = max(int(f.shape[0]) for _, f in items)
    width = int(items[0][1].shape[1])
    fused = torch.zeros(len(items), longest, width)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, (_, f) in enumerate(items):
        fused[i, :f.shape[0]] = f.float()
        mask[i, :f.shape[0]] = True
    return TeacherBatch(query=queries, fused=fused, answer_mask=mask)


def split_targets(out: TrainOutputs | TeacherBatch) -> list[tuple[Tensor, Tensor]]:
    """Per-sample ``(query [L, C], fused [A_i, H])`` float16 copies of a teacher batch
    (inverse of :func:`stack_targets`), for a replay memory to keep."""
    items = []
    for b in range(out.query.shape[0]):
        length = int(out.answer_mask[b].sum())
        items.append((out.query[b].detach().to('cpu', torch.float16).clone(),
                      out.fused[b, :length].detach().to('cpu', torch.float16).clone()))
    return items


# --- samples ---------------------------------------------------------------------------------
@dataclass
class AkdSample:
    """One uplinked sample as the cloud sees it.

    Attributes:
        tokens: ``[K, D]`` kept vision tokens.
        indices: ``[K]`` int64 positions of the kept tokens in ``0..N-1``; None: all ``N``.
        question: The question asked on the device.
        answer: Teacher pseudo-label; None until :meth:`AKDTrainer.label` fills it.
    """

    tokens: Tensor
    indices: Tensor | None
    question: str
    answer: str | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f'AkdSample.tokens must be [K, D], got {tuple(self.tokens.shape)}')
        if self.indices is not None and tuple(self.indices.shape) != (self.tokens.shape[0],):
            raise ValueError(f'AkdSample.indices must be [K] = [{self.tokens.shape[0]}], '
                             f'got {tuple(self.indices.shape)}')

    def group_key(self) -> tuple[int, int, bool]:
        """Samples with equal keys can be stacked into one batch."""
        return (int(self.tokens.shape[0]), int(self.tokens.shape[1]), self.indices is None)


def stack_samples(samples: Sequence[AkdSample]) -> tuple[Tensor, Tensor | None, list[str]]:
    """Stack samples of one group into ``tokens [B, K, D]``, ``indices [B, K]``, questions."""
    tokens = torch.stack([s.tokens for s in samples])
    indices = (None if samples[0].indices is None
               else torch.stack([s.indices.to(torch.long) for s in samples]))
    return tokens, indices, [s.question for s in samples]


def group_samples(samples: Sequence[AkdSample]) -> list[list[int]]:
    """Indices of ``samples`` grouped by :meth:`AkdSample.group_key`, in first-seen order."""
    groups: dict[tuple[int, int, bool], list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[sample.group_key()].append(i)
    return list(groups.values())


def random_batches(samples: Sequence[AkdSample], size: int, gen: torch.Generator
                   ) -> Iterator[list[AkdSample]]:
    """Endless random batches: a stackable group picked with probability by its size, then up
    to ``size`` of its samples without repeats (``gen`` drives both draws)."""
    groups = group_samples(samples)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    while True:
        group = groups[int(torch.multinomial(sizes, 1, generator=gen))]
        perm = torch.randperm(len(group), generator=gen)
        yield [samples[group[int(i)]] for i in perm[:size]]


def _device_of(model: MLLM) -> torch.device:
    """Device of a model's first parameter (CPU for a model without parameters)."""
    param = next(iter(model.torch_model.parameters()), None)
    return param.device if param is not None else torch.device('cpu')


# --- the trainer -------------------------------------------------------------------------------
class AKDTrainer:
    """Distil a teacher into a student's trainable set on uplinked samples.

    The projectors are built on the first forward (the widths come from the models'
    outputs) and kept, with the optimiser, across :meth:`fit` calls (rounds).

    Attributes:
        teacher: The teacher model (never updated).
        student: The student; its parameters with ``requires_grad`` are trained.
        cfg: The settings.
        query_projector: phi of Eq. 5 (None before the first forward).
        repr_projector: Projector of the fused states (None before the first forward).
    """

    def __init__(self, teacher: MLLM, student: MLLM, cfg: AKDConfig,
                 progress: bool = True) -> None:
        """Set up the trainer.

        Args:
            teacher: Model following the MLLM contract.
            student: Model following the contract, ``configure_trainable`` already called.
            cfg: The settings.
            progress: Show a tqdm progress bar during :meth:`fit`.

        Raises:
            ModelError: The student has no trainable parameter.
        """
        self.teacher = teacher
        self.student = student
        self.cfg = cfg
        self.progress = progress
        self._student_params = [p for p in student.torch_model.parameters() if p.requires_grad]
        if not self._student_params:
            raise ModelError(f'student {student.family} has no trainable parameter; '
                             'call configure_trainable() first')
        self.query_projector: QueryProjector | None = None
        self.repr_projector: ReprProjector | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._batch_rng = torch.Generator().manual_seed(cfg.seed)
        self.steps_done = 0
        self.dropped_unsure = 0  # pseudo-labels below min_label_confidence in the last label()

    # ---- pseudo-labels ----
    def pseudo_label(self, tokens: Tensor, indices: Tensor | None,
                     questions: Sequence[str]) -> list[str]:
        """Teacher answers (greedy, eval mode) used as the student's targets.

        Args:
            tokens: ``[B, K, D]`` vision tokens.
            indices: ``[B, K]`` kept positions, or None for all tokens.
            questions: One question per row.
        """
        return [text for text, _ in self.pseudo_label_scored(tokens, indices, questions)]

    def pseudo_label_scored(self, tokens: Tensor, indices: Tensor | None,
                            questions: Sequence[str]) -> list[tuple[str, float]]:
        """Teacher answers with their confidence: the geometric mean of the probabilities
        of the answer's tokens (0.0 for an empty answer). Arguments as :meth:`pseudo_label`."""
        model = self.teacher.torch_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = _device_of(self.teacher)
                results = self.teacher.answer_from_tokens(
                    tokens.to(device), None if indices is None else indices.to(device),
                    list(questions), max_new_tokens=self.cfg.max_new_tokens)
        finally:
            model.train(was_training)
        return [(r.text.strip(), answer_confidence(r.token_probs)) for r in results]

    def label(self, samples: Sequence[AkdSample]) -> list[AkdSample]:
        """Fill missing answers with teacher pseudo-labels; drop the unusable ones.

        Samples are labelled in batches of ``cfg.batch_size`` within stackable groups.
        An empty pseudo-label gives no answer position to learn from, and one the teacher is
        less sure of than ``cfg.min_label_confidence`` is likely wrong: both are dropped
        (counted in :attr:`dropped_unsure`). Samples that came with an answer are kept as is.
        """
        answers: dict[int, str] = {i: s.answer for i, s in enumerate(samples)
                                   if s.answer is not None}
        unsure: set[int] = set()
        for group in group_samples(samples):
            todo = [i for i in group if i not in answers]
            for start in range(0, len(todo), self.cfg.batch_size):
                chunk = todo[start:start + self.cfg.batch_size]
                tokens, indices, questions = stack_samples([samples[i] for i in chunk])
                scored = self.pseudo_label_scored(tokens, indices, questions)
                if len(scored) != len(chunk):
                    raise ModelError(f'teacher {self.teacher.family} returned {len(scored)} '
                                     f'answers for {len(chunk)} questions')
                for i, (text, confidence) in zip(chunk, scored, strict=True):
                    answers[i] = text
                    if text and confidence < self.cfg.min_label_confidence:
                        unsure.add(i)
        self.dropped_unsure = len(unsure)
        return [AkdSample(s.tokens, s.indices, s.question, answers[i])
                for i, s in enumerate(samples) if answers[i].strip() and i not in unsure]

    # ---- losses ----
    def _build_projectors(self, t_out: TrainOutputs, s_out: TrainOutputs) -> None:
        """Create the projectors from the output widths (seeded, global RNG untouched)."""
        device = s_out.query.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.query_projector = QueryProjector(
                int(s_out.query.shape[-1]), int(t_out.query.shape[-1])).to(device)
            self.repr_projector = ReprProjector(
                int(s_out.fused.shape[-1]), int(t_out.fused.shape[-1])).to(device)

    def teacher_outputs(self, tokens: Tensor, indices: Tensor | None,
                        questions: Sequence[str], answers: Sequence[str]) -> TrainOutputs:
        """The teacher's teacher-forced pass on one batch (eval mode, no gradient)."""
        t_dev = _device_of(self.teacher)
        idx_t = None if indices is None else indices.to(t_dev)
        t_model = self.teacher.torch_model
        was_training = t_model.training
        t_model.eval()
        try:
            with torch.no_grad():
                return self.teacher.forward_train(tokens.to(t_dev), idx_t, list(questions),
                                                  list(answers))
        finally:
            t_model.train(was_training)

    def losses(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
               answers: Sequence[str], targets: TeacherBatch | None = None
               ) -> dict[str, Tensor]:
        """Forward teacher (no grad) and student on one batch and compute Eq. 5-6.

        Args:
            targets: The teacher's outputs for this batch when they are already known (a
                replayed sample keeps them); None runs the teacher.

        Returns:
            ``{'total', 'query', 'repr', 'ce'}`` scalar tensors (student side has grads).

        Raises:
            ModelError: Teacher and student outputs cannot be aligned.
        """
        s_dev = _device_of(self.student)
        idx_s = None if indices is None else indices.to(s_dev)
        t_out = (targets if targets is not None
                 else self.teacher_outputs(tokens, indices, questions, answers))
        s_out = self.student.forward_train(tokens.to(s_dev), idx_s, list(questions),
                                           list(answers))
        if t_out.query.shape[:2] != s_out.query.shape[:2]:
            raise ModelError(f'teacher queries {tuple(t_out.query.shape)} and student queries '
                             f'{tuple(s_out.query.shape)} differ in batch or length')
        if t_out.fused.shape[:2] != s_out.fused.shape[:2]:
            raise ModelError(f'teacher fused {tuple(t_out.fused.shape)} and student fused '
                             f'{tuple(s_out.fused.shape)} differ in batch or answer length '
                             '(do both models tokenise answers alike?)')
        if self.query_projector is None or self.repr_projector is None:
            self._build_projectors(t_out, s_out)
        assert self.query_projector is not None and self.repr_projector is not None
        q_t = t_out.query.to(s_dev, torch.float32)
        h_t = t_out.fused.to(s_dev, torch.float32)
        mask = t_out.answer_mask.to(s_dev, torch.bool) & s_out.answer_mask.to(torch.bool)
        l_query = query_loss(q_t, self.query_projector(s_out.query.float()))
        l_repr = repr_loss(h_t, self.repr_projector(s_out.fused.float()), mask)
        l_ce = s_out.loss.float()
        return {'total': self.cfg.combine(l_query, l_repr, l_ce), 'query': l_query,
                'repr': l_repr, 'ce': l_ce}

    # ---- optimisation ----
    def _get_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            assert self.query_projector is not None and self.repr_projector is not None
            params = (self._student_params + list(self.query_projector.parameters())
                      + list(self.repr_projector.parameters()))
            self._optimizer = torch.optim.AdamW(params, lr=self.cfg.lr,
                                                weight_decay=self.cfg.weight_decay)
        return self._optimizer

    def step(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
             answers: Sequence[str]) -> dict[str, float]:
        """One optimiser step on one batch; returns the losses before the step.

        Raises:
            ModelError: The loss is not finite (nothing is updated).
        """
        model = self.student.torch_model
        was_training = model.training
        model.train(self.cfg.train_mode)
        try:
            out = self.losses(tokens, indices, questions, answers)
            if not torch.isfinite(out['total']):
                raise ModelError(f'AKD step {self.steps_done}: non-finite loss '
                                 f'{ {k: float(v) for k, v in out.items()} }')
            optimizer = self._get_optimizer()
            optimizer.zero_grad(set_to_none=True)
            out['total'].backward()
            if self.cfg.grad_clip is not None:
                params = [p for group in optimizer.param_groups for p in group['params']]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            optimizer.step()
        finally:
            model.train(was_training)
        self.steps_done += 1
        return {k: float(v.detach()) for k, v in out.items()}

    def _batches(self, samples: Sequence[AkdSample]) -> Iterator[list[AkdSample]]:
        return random_batches(samples, self.cfg.batch_size, self._batch_rng)

    def fit(self, samples: Sequence[AkdSample]) -> list[dict[str, float]]:
        """Pseudo-label what is unlabelled, then run ``cfg.steps`` optimiser steps.

        Returns:
            One ``{'total', 'query', 'repr', 'ce'}`` dict per step (empty when no sample
            has a non-empty label or ``cfg.steps`` is 0).
        """
        labelled = self.label(samples)
        if not labelled or self.cfg.steps == 0:
            return []
        history = []
        batches = self._batches(labelled)
        for _ in tqdm(range(self.cfg.steps), desc='AKD', disable=not self.progress,
                      leave=False):
            batch = next(batches)
            tokens, indices, questions = stack_samples(batch)
            history.append(self.step(tokens, indices, questions, [s.answer for s in batch]))
        return history

    def evaluate(self, samples: Sequence[AkdSample]) -> dict[str, float]:
        """Losses over labelled ``samples`` (student in eval mode, no update).

        Batch losses are averaged weighted by batch size.

        Raises:
            ValueError: A sample has no answer.
        """
        if any(s.answer is None for s in samples):
            raise ValueError('evaluate() needs labelled samples; call label() first')
        model = self.student.torch_model
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        count = 0
        try:
            with torch.no_grad():
                for group in group_samples(samples):
                    for start in range(0, len(group), self.cfg.batch_size):
                        batch = [samples[i] for i in group[start:start + self.cfg.batch_size]]
                        tokens, indices, questions = stack_samples(batch)
                        out = self.losses(tokens, indices, questions,
                                          [s.answer for s in batch])  # type: ignore[misc]
                        for key in LOSS_KEYS:
                            sums[key] += float(out[key]) * len(batch)
                        count += len(batch)
        finally:
            model.train(was_training)
        return {k: v / count for k, v in sums.items()} if count else dict.fromkeys(LOSS_KEYS,
                                                                                    0.0)
