"""Adapting a captioner: caption entropy (UTS stage 1), AKD on teacher captions, caption TENT.

* :func:`caption_entropy`: Eq. 2 over a whole generated caption: the entropy of every step's
  distribution (the step that chose the end included), averaged (``mean``) and at its largest
  (``max``), the statistics :func:`~cdcca_ros.core.uts.answer_entropy` gives a short answer.
* :class:`CaptionDistiller`: AKD (paper Eq. 5-6) for captions on the cloud. The teacher's
  greedy captions of the uplinked tokens are the pseudo-labels; the student learns, on the same
  (kept) tokens, ``lambda_query L_query + lambda_repr L_repr + lambda_ce L_ce`` with L_query the
  distance of its projected bridge features (Q-Former queries) to the teacher's (Eq. 5), L_repr
  the distance of its caption decoder's hidden states to the teacher's at every word of the
  pseudo-label (padding masked), and L_ce the cross-entropy of the pseudo-label. ``L_ce only``
  is the same with the other two weights 0. The trainable set is the caption head and, with
  ``train_model``, the model's own trainable set (LoRA, token adapter, ...: whatever
  :meth:`MLLM.configure_trainable` chose).
* :func:`tent_fit`: TENT for captions on the device: the same trainable set minimises the mean
  step entropy of the student's own greedy captions, teacher-forced on them; no teacher.

Models are reached through :class:`~cdcca_ros.models.caption_head.Captioner`; no rclpy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cdcca_ros.core.akd import QueryProjector, query_loss, repr_loss
from cdcca_ros.core.uts import EntropyStats, answer_entropy
from cdcca_ros.errors import ConfigError
from cdcca_ros.models.caption_head import BOS, PAD, encode_caption

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import AnswerResult
    from cdcca_ros.models.caption_head import Captioner


def caption_entropy(result: AnswerResult) -> EntropyStats:
    """Eq. 2 over every step of a generated caption (see the module docstring)."""
    return answer_entropy(result.step_probs)


@dataclass(frozen=True)
class CaptionAkdConfig:
    """Settings of :class:`CaptionDistiller` and :func:`tent_fit`.

    Attributes:
        lambda_query: Weight of L_query (>= 0).
        lambda_repr: Weight of L_repr (>= 0).
        lambda_ce: Weight of L_ce (>= 0); one weight at least is > 0.
        lr: AdamW learning rate.
        steps: Optimiser steps per fit.
        batch_size: Samples per step.
        grad_clip: Largest global gradient norm.
        seed: Seed of the projectors and of the batch order.
        train_model: Train the model's trainable set (the adapter a delta carries).
        train_head: Train the caption head too (one of the two at least). Off by default:
            on the bundled pair, training the adapter alone with anchors gained as much on
            drifted frames and kept the source's captions (training the head as well lost
            ~50 CIDEr points in-domain).
    """

    lambda_query: float = 1.0
    lambda_repr: float = 1.0
    lambda_ce: float = 1.0
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 16
    grad_clip: float = 1.0
    seed: int = 0
    train_model: bool = True
    train_head: bool = False

    def __post_init__(self) -> None:
        weights = (self.lambda_query, self.lambda_repr, self.lambda_ce)
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
            raise ConfigError(f'CaptionAkdConfig weights must be finite, >= 0 and not all 0, '
                              f'got {weights}')
        if not self.lr > 0 or self.steps < 0 or self.batch_size < 1 or not self.grad_clip > 0:
            raise ConfigError(f'CaptionAkdConfig: lr, grad_clip > 0, steps >= 0, batch_size '
                              f'>= 1 needed, got {self}')
        if not (self.train_model or self.train_head):
            raise ConfigError('CaptionAkdConfig: train_model and train_head are both false')


def _trainable(student: Captioner, cfg: CaptionAkdConfig) -> list[nn.Parameter]:
    params = list(student.head.parameters()) if cfg.train_head else []
    if cfg.train_model:
        params += [p for p in student.model.torch_model.parameters() if p.requires_grad]
    return params


def _padded(rows: Sequence[Sequence[int]]) -> Tensor:
    """``[B, 1 + T]``: BOS, the ids, PAD after."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width + 1), PAD, dtype=torch.long)
    ids[:, 0] = BOS
    for i, row in enumerate(rows):
        ids[i, 1:len(row) + 1] = torch.tensor(list(row), dtype=torch.long)
    return ids


def _groups(tokens: Sequence[Tensor], indices: Sequence[Tensor | None]
            ) -> dict[tuple[int, bool], list[int]]:
    """Sample rows by their number of kept tokens and whether they carry indices (a batch
    stacks alike rows)."""
    out: dict[tuple[int, bool], list[int]] = {}
    for i, (t, idx) in enumerate(zip(tokens, indices)):
        out.setdefault((int(t.shape[0]), idx is None), []).append(i)
    return out


def _stack(tokens: Sequence[Tensor], indices: Sequence[Tensor | None], rows: Sequence[int]
           ) -> tuple[Tensor, Tensor | None]:
    t = torch.stack([tokens[r] for r in rows])
    if indices[rows[0]] is None:
        return t, None
    return t, torch.stack([indices[r] for r in rows])  # type: ignore[misc]


def caption_texts(captioner: Captioner, tokens: Sequence[Tensor],
                  indices: Sequence[Tensor | None]) -> list[str]:
    """Greedy captions of samples of different kept-token counts (``tokens[i]`` ``[K_i, D]``,
    ``indices[i]`` ``[K_i]`` or None for all tokens), alike samples batched."""
    out: list[str] = [''] * len(tokens)
    for rows in _groups(tokens, indices).values():
        t, idx = _stack(tokens, indices, rows)
        for r, res in zip(rows, captioner.caption_from_tokens(t, idx)):
            out[r] = res.text
    return out


class CaptionDistiller:
    """AKD of a student captioner on a teacher captioner's captions (module docstring).

    Args:
        student: Trained in place (its head, and its model's trainable set with
            ``cfg.train_model``).
        teacher: Labels the samples and gives L_query / L_repr targets (read only).
        cfg: Weights, optimiser, steps.
    """

    def __init__(self, student: Captioner, teacher: Captioner, cfg: CaptionAkdConfig) -> None:
        self.student, self.teacher, self.cfg = student, teacher, cfg
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)
        try:
            self.query_proj = QueryProjector(self._query_dim(student), self._query_dim(teacher))
            # Two heads trained apart share no hidden basis: a learnt map (identity at start),
            # even between equal widths, unlike ReprProjector's identity for equal widths.
            self.repr_proj = QueryProjector(student.config.hidden, teacher.config.hidden)
        finally:
            torch.random.set_rng_state(gen_state)
        params = _trainable(student, cfg)
        params += list(self.query_proj.parameters()) + list(self.repr_proj.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    @staticmethod
    def _query_dim(captioner: Captioner) -> int:
        if not captioner.config.query_dim:
            raise ConfigError('caption AKD needs heads that read the bridge features')
        return captioner.config.query_dim

    def label(self, tokens: Sequence[Tensor], indices: Sequence[Tensor | None]) -> list[str]:
        """The teacher's greedy captions of each sample's (kept) tokens."""
        return caption_texts(self.teacher, tokens, indices)

    def _loss(self, t: Tensor, idx: Tensor | None, ids: Tensor, distill: Tensor
              ) -> dict[str, Tensor]:
        """Eq. 6 on one batch; L_query and L_repr only on the rows where ``distill``."""
        cfg = self.cfg
        s_memory, s_query = self.student.memory(t, idx, grad=True)
        s_hidden = self.student.head.hidden(s_memory, ids[:, :-1])
        logits = self.student.head.out(s_hidden)
        target = ids[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                             ignore_index=PAD)
        q = r = ce * 0.0
        rows = distill.nonzero()[:, 0]
        if (cfg.lambda_query or cfg.lambda_repr) and rows.numel():
            t_rows = t[rows]
            with torch.no_grad():
                t_memory, t_query = self.teacher.memory(
                    t_rows, None if idx is None else idx[rows])
                t_hidden = self.teacher.head.hidden(t_memory, ids[rows, :-1])
            if cfg.lambda_query and s_query is not None and t_query is not None:
                q = query_loss(t_query, self.query_proj(s_query[rows].float()))
            if cfg.lambda_repr:
                r = repr_loss(t_hidden, self.repr_proj(s_hidden[rows]), target[rows] != PAD)
        total = cfg.lambda_query * q + cfg.lambda_repr * r + cfg.lambda_ce * ce
        return {'total': total, 'query': q, 'repr': r, 'ce': ce}

    def fit(self, tokens: Sequence[Tensor], indices: Sequence[Tensor | None],
            captions: Sequence[str], distill: Sequence[bool] | None = None
            ) -> dict[str, float]:
        """``cfg.steps`` steps on the samples (``tokens[i]`` ``[K_i, D]``, ``indices[i]``
        ``[K_i]`` or None for all tokens) and their labels.

        Args:
            tokens: Per sample, its (kept) vision tokens.
            indices: Per sample, the kept tokens' indices, or None for all tokens.
            captions: Per sample, the caption to learn (the teacher's, or for an anchor what
                the student must keep saying).
            distill: Per sample, whether L_query and L_repr pull it towards the teacher
                (default: all; False: L_ce alone). The table2 bench leaves them on for the
                source anchors too: with them off, the in-domain CIDEr fell further (seed 0:
                414 vs 437 after round 1, source-only 490).

        Returns:
            Mean of each loss (``total``, ``query``, ``repr``, ``ce``) over the steps.
        """
        flags = torch.ones(len(tokens), dtype=torch.bool) if distill is None \
            else torch.tensor(list(distill), dtype=torch.bool)
        if not (len(tokens) == len(indices) == len(captions) == len(flags)) or not tokens:
            raise ConfigError(f'CaptionDistiller.fit needs as many tokens, indices and '
                              f'captions (> 0), got {len(tokens)}, {len(indices)}, '
                              f'{len(captions)}')
        ids = [encode_caption(self.student.config, c) for c in captions]
        groups = list(_groups(tokens, indices).values())
        gen = torch.Generator().manual_seed(self.cfg.seed)
        sums: dict[str, float] = {}
        model = self.student.model.torch_model
        was = (model.training, self.student.head.training)
        model.train(self.cfg.train_model)
        self.student.head.train()
        try:
            for _ in range(self.cfg.steps):
                g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
                pick = torch.randint(len(g), (min(self.cfg.batch_size, len(g)),),
                                     generator=gen)
                rows = [g[int(i)] for i in pick]
                t, idx = _stack(tokens, indices, rows)
                losses = self._loss(t, idx, _padded([ids[r] for r in rows]), flags[rows])
                self.optimizer.zero_grad(set_to_none=True)
                losses['total'].backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
                self.optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
        finally:
            model.train(was[0])
            self.student.head.train(was[1])
        return {k: v / max(1, self.cfg.steps) for k, v in sums.items()}


def tent_fit(student: Captioner, tokens: Tensor, cfg: CaptionAkdConfig) -> float:
    """TENT on the device: minimise the mean step entropy of the student's own greedy
    captions of ``tokens`` ``[S, N, D]`` (teacher-forced on them); returns the mean loss."""
    if tokens.shape[0] < 1:
        raise ConfigError('tent_fit needs at least one sample')
    own = [r.token_ids for r in student.caption_from_tokens(tokens)]
    params = _trainable(student, cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = student.model.torch_model
    was = (model.training, student.head.training)
    model.train(cfg.train_model)
    student.head.train()
    total = 0.0
    try:
        for _ in range(cfg.steps):
            rows = torch.randint(tokens.shape[0], (min(cfg.batch_size, tokens.shape[0]),),
                                 generator=gen).tolist()
            ids = _padded([own[r] + [2] for r in rows])  # + EOS: the stop step counts (Eq. 2)
            memory, _ = student.memory(tokens[rows], None, grad=True)
            logits = student.head(memory, ids[:, :-1]).float()
            ent = torch.special.entr(logits.softmax(-1)).sum(-1)
            mask = (ids[:, 1:] != PAD).float()
            loss = (ent * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach())
    finally:
        model.train(was[0])
        student.head.train(was[1])
    return total / max(1, cfg.steps)


def head_state(captioner: Captioner, cfg: CaptionAkdConfig) -> dict[str, Any]:
    """What adaptation with ``cfg`` changes, by name (``head.*`` and ``model.*``, the model's
    trainable set): the state a delta is computed against."""
    out: dict[str, Any] = {}
    if cfg.train_head:
        out.update({f'head.{k}': v.detach().clone()
                    for k, v in captioner.head.state_dict().items()})
    if cfg.train_model:
        out.update({f'model.{k}': v.detach().clone()
                    for k, v in captioner.model.trainable_state_dict().items()})
    return out


def load_state(captioner: Captioner, state: dict[str, Tensor]) -> None:
    """Load a :func:`head_state`-shaped state into ``captioner`` (head and/or model)."""
    head = {k[5:]: v for k, v in state.items() if k.startswith('head.')}
    model = {k[6:]: v for k, v in state.items() if k.startswith('model.')}
    if head:
        captioner.head.load_state_dict(head)
    if model:
        captioner.model.load_trainable_state_dict(model)


__all__ = ['caption_entropy', 'caption_texts', 'CaptionAkdConfig', 'CaptionDistiller',
           'tent_fit', 'head_state', 'load_state']
