"""Compression-aware refit of a DWC delta: prune, retrain, quantize (Deep Compression).

A delta squeezed to ~1 bit per parameter keeps a small support of coarse values; sent as
is, it loses most of what the round taught. The cloud still holds the round's samples, so it
can retrain what it sends:

1. Importance: the diagonal empirical Fisher ``F`` of the training loss at the uncompressed
   weights (mean squared gradients over a few batches). Dropping coordinate ``i`` costs about
   ``F_i * delta_i**2 / 2`` of loss, so the codec ranks coordinates by ``|delta| * sqrt(F)``.
2. Select: :func:`~cdcca_ros.core.dwc.compress` under the byte budget with that importance;
   its non-zero coordinates are the support.
3. Retrain: only the support (gradients masked), with straight-through quantization: every
   step runs the student at ``view + decode(encode(latent))`` (the codec itself at the
   knobs step 2 chose) and applies the gradient to the continuous ``latent``. The objective
   is ``task_weight * task_loss`` (the AKD loss of the round, Eq. 6) plus
   ``match_weight * match``, where ``match`` is the distance of the student's query outputs
   and fused answer-position states to those of the *uncompressed* student (AKD's own
   alignment, with the uncompressed delta as the teacher): it anchors the refit to what the
   uncompressed delta does instead of letting it drift on a few hundred pseudo-labels.
4. Quantize: ``compress`` the latent again under the same budget. The result replaces the
   step-2 payload only if it lowers the refit objective on the round's samples.

Everything runs on a copy of the round's state: the student's trainable weights are put back
as they were. Pure logic (no rclpy); models are reached through the
:class:`~cdcca_ros.models.base.MLLM` contract.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cdcca_ros.core import dwc
from cdcca_ros.core.akd import group_samples, random_batches, stack_samples
from cdcca_ros.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.core.akd import AkdSample, AKDTrainer
    from cdcca_ros.models.base import MLLM, TrainOutputs

# (tokens [B, K, D], indices [B, K] or None, questions, answers) -> scalar loss with a graph
# through the student's trainable parameters.
TaskLoss = Callable[[Tensor, 'Tensor | None', list[str], list[str]], Tensor]


@dataclass
class RefitConfig:
    """Refit settings.

    Attributes:
        steps: Optimiser steps (0 disables the refit; the Fisher selection still applies).
        lr: Adam learning rate, decayed to 0 on a cosine over the steps.
        batch_size: Samples per step.
        task_weight: Weight of the task loss (the round's AKD objective), >= 0.
        match_weight: Weight of the match to the uncompressed student, >= 0.
        fisher_batches: Batches whose squared gradients make the importance; 0: ``|delta|``.
        grad_clip: Max gradient norm of the latent; None disables clipping.
        train_mode: Student in train mode (dropout) during the steps, as AKD trains.
        scope: Selection scope of a ``sparse`` codec during the refit (None: the codec's
            own). Fisher scores are in loss units, comparable across tensors, so
            ``'global'`` spends the budget where the loss is (measured: about twice the gain
            kept at 1 bit per parameter than per-tensor selection).
        seed: Batch order and dropout (the global RNG is left untouched).
    """

    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 16
    task_weight: float = 1.0
    match_weight: float = 1.0
    fisher_batches: int = 8
    grad_clip: float | None = 1.0
    train_mode: bool = True
    scope: str | None = 'global'
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scope is not None and self.scope not in dwc.SPARSE_SCOPES:
            raise ConfigError(f'RefitConfig.scope must be None or one of {dwc.SPARSE_SCOPES}, '
                              f'got {self.scope!r}')
        if self.steps < 0:
            raise ConfigError(f'RefitConfig.steps must be >= 0, got {self.steps}')
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f'RefitConfig.lr must be finite and > 0, got {self.lr}')
        if self.batch_size < 1:
            raise ConfigError(f'RefitConfig.batch_size must be >= 1, got {self.batch_size}')
        for name in ('task_weight', 'match_weight'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f'RefitConfig.{name} must be finite and >= 0, got {value}')
        if self.task_weight == self.match_weight == 0:
            raise ConfigError('RefitConfig: task_weight and match_weight are both 0')
        if self.fisher_batches < 0:
            raise ConfigError(f'RefitConfig.fisher_batches must be >= 0, got '
                              f'{self.fisher_batches}')
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip)
                                               and self.grad_clip > 0):
            raise ConfigError(f'RefitConfig.grad_clip must be None or > 0, got '
                              f'{self.grad_clip}')


@dataclass
class RefitResult:
    """What a refit produced.

    Attributes:
        compressed: What goes on the wire (the refit payload, or ``initial`` when the refit
            did not lower the objective).
        initial: The Fisher-selected payload under the same budget, before any retraining.
        objective_before: Refit objective of ``initial.decoded`` on the samples (eval mode).
        objective_after: The same for the refit payload.
        used: Whether ``compressed`` is the refit payload.
        history: Training objective per step (at the quantized weights, train mode).
        seconds: Wall time of the whole refit (Fisher, steps, encodes, evaluations).
    """

    compressed: dwc.Compressed
    initial: dwc.Compressed
    objective_before: float
    objective_after: float
    used: bool
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def akd_task_loss(trainer: AKDTrainer) -> TaskLoss:
    """The round's AKD objective (Eq. 6, ``L_total``) as a refit task loss."""

    def loss(tokens: Tensor, indices: Tensor | None, questions: list[str],
             answers: list[str]) -> Tensor:
        return trainer.losses(tokens, indices, questions, answers)['total']

    return loss


def match_loss(out: TrainOutputs, target: TrainOutputs) -> Tensor:
    """MSE of the query outputs plus MSE of the fused states on real answer positions.

    Raises:
        ModelError: The two forward passes do not line up.
    """
    if out.query.shape != target.query.shape or out.fused.shape != target.fused.shape:
        raise ModelError(f'refit match: outputs {tuple(out.query.shape)}/'
                         f'{tuple(out.fused.shape)} differ from the uncompressed student\'s '
                         f'{tuple(target.query.shape)}/{tuple(target.fused.shape)}')
    query = (out.query.float() - target.query.detach().float()).pow(2).mean()
    real = target.answer_mask.to(torch.bool)
    picked = out.fused.float()[real] - target.fused.detach().float()[real]
    fused = picked.pow(2).mean() if picked.numel() else out.fused.float().sum() * 0.0
    return query + fused


# --- batches ---------------------------------------------------------------------------------
Batch = tuple[Tensor, 'Tensor | None', list[str], list[str]]


def _stack(samples: Sequence[AkdSample]) -> Batch:
    return (*stack_samples(samples), [s.answer or '' for s in samples])


def _batches(samples: Sequence[AkdSample], size: int, gen: torch.Generator
             ) -> Iterator[Batch]:
    """Endless random batches within stackable groups (as AKD draws them)."""
    for batch in random_batches(samples, size, gen):
        yield _stack(batch)


def _all_batches(samples: Sequence[AkdSample], size: int) -> list[Batch]:
    return [_stack([samples[i] for i in g[a:a + size]])
            for g in group_samples(samples) for a in range(0, len(g), size)]


# --- the refit ---------------------------------------------------------------------------------
class _Student:
    """The student's trainable parameters by name, and writes of ``view + delta`` into them."""

    def __init__(self, student: MLLM, view: Mapping[str, Tensor]) -> None:
        self.model = student
        named = dict(student.torch_model.named_parameters())
        missing = [k for k in view if k not in named]
        if missing:
            raise ModelError(f'refit: the student has no parameters {missing[:5]} of the '
                             'trainable set')
        self.params = {k: named[k] for k in view}
        # As dwc.apply_delta: the sum in promote(dtype, float32), then a cast.
        self.view = {k: v.detach().to(self.params[k].device,
                                      torch.promote_types(self.params[k].dtype, torch.float32))
                     for k, v in view.items()}

    @torch.no_grad()
    def write(self, delta: Mapping[str, Tensor]) -> None:
        for k, p in self.params.items():
            v = self.view[k]
            p.copy_((v + delta[k].to(v.device, v.dtype)).to(p.dtype))

    def grads(self) -> dict[str, Tensor | None]:
        return {k: p.grad for k, p in self.params.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def fisher_importance(student: MLLM, view: Mapping[str, Tensor], delta: Mapping[str, Tensor],
                      samples: Sequence[AkdSample], loss: TaskLoss | None, *,
                      batches: int = 8, batch_size: int = 16, seed: int = 0
                      ) -> dict[str, Tensor]:
    """``sqrt`` of the diagonal empirical Fisher at ``view + delta`` (eval mode).

    Args:
        student: The student (its trainable weights are put back afterwards).
        view: What the device holds.
        delta: The uncompressed delta.
        samples: Labelled samples.
        loss: The task loss; None: the student's cross-entropy on the labels.
        batches: Batches averaged.
        batch_size: Samples per batch.
        seed: Batch order.

    Returns:
        Non-negative float32 tensors shaped like ``delta`` (what :meth:`Codec.encode` takes
        as importance).
    """
    handle = _Student(student, view)
    saved = student.trainable_state_dict()
    was_training = student.torch_model.training
    acc = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in delta.items()}
    gen = torch.Generator().manual_seed(seed)
    stream = _batches(samples, batch_size, gen)
    try:
        handle.write(delta)
        student.torch_model.eval()
        for _ in range(batches):
            tokens, indices, questions, answers = next(stream)
            handle.zero_grad()
            value = (loss(tokens, indices, questions, answers) if loss is not None else
                     student.forward_train(tokens, indices, questions, answers).loss)
            value.backward()
            for k, g in handle.grads().items():
                if g is not None:
                    acc[k] += g.detach().to('cpu', torch.float32).pow(2)
    finally:
        handle.zero_grad()
        student.load_trainable_state_dict(saved)
        student.torch_model.train(was_training)
    return {k: (a / max(1, batches)).sqrt() for k, a in acc.items()}


def _check_samples(samples: Sequence[AkdSample]) -> None:
    if not samples:
        raise ModelError('refit needs at least one labelled sample')
    if any(s.answer is None for s in samples):
        raise ModelError('refit needs labelled samples (AKDTrainer.label fills the answers)')


def refit_compress(student: MLLM, samples: Sequence[AkdSample], view: Mapping[str, Tensor],
                   delta: Mapping[str, Tensor], codec: dwc.Codec, budget_bytes: int | None,
                   cfg: RefitConfig, *, task_loss: TaskLoss | None = None,
                   self_describing: bool = False) -> RefitResult:
    """Select by Fisher importance, retrain the support through the codec, compress again.

    Args:
        student: The student model (trainable set configured); its trainable weights are
            restored before returning.
        samples: The round's labelled samples.
        view: What the device holds (the delta's base).
        delta: The uncompressed delta (``trained - view``).
        codec: The codec and its knobs (the upper end of the budget search).
        budget_bytes: Payload limit; None: the codec's own setting.
        cfg: Refit settings.
        task_loss: The round's training objective (see :func:`akd_task_loss`); None: only the
            match to the uncompressed student (``task_weight`` is then ignored).
        self_describing: Payload mode (the cloud sends compact payloads).

    Returns:
        The payload to send and what the refit did.

    Raises:
        ModelError: No labelled sample, the student lacks part of the trainable set, or the
            objective is not finite.
        ConfigError: No task loss and ``match_weight`` 0.
        PayloadTooLargeError: Nothing fits the budget.
        CodecError: The delta cannot be encoded.
    """
    _check_samples(samples)
    t0 = time.perf_counter()
    if cfg.scope is not None and isinstance(codec, dwc.SparseCodec):
        codec = dwc.SparseCodec(density=codec.density, bits=codec.bits, scope=cfg.scope)
    task_weight = cfg.task_weight if task_loss is not None else 0.0
    match_weight = cfg.match_weight
    if task_weight == match_weight == 0:
        raise ConfigError('refit without a task loss needs match_weight > 0')
    importance = (fisher_importance(student, view, delta, samples, task_loss,
                                    batches=cfg.fisher_batches, batch_size=cfg.batch_size,
                                    seed=cfg.seed)
                  if cfg.fisher_batches else None)
    initial = dwc.compress(delta, codec, budget_bytes, importance=importance,
                           self_describing=self_describing)
    handle = _Student(student, view)
    saved = student.trainable_state_dict()
    was_training = student.torch_model.training

    def objective(batch: Batch, current: Mapping[str, Tensor]) -> Tensor:
        tokens, indices, questions, answers = batch
        total = torch.zeros(())
        if match_weight:
            with torch.no_grad():
                handle.write(delta)
                mode = student.torch_model.training
                student.torch_model.eval()
                target = student.forward_train(tokens, indices, questions, answers)
                student.torch_model.train(mode)
        handle.write(current)
        if match_weight:
            out = student.forward_train(tokens, indices, questions, answers)
            total = total + match_weight * match_loss(out, target)
        if task_weight:
            assert task_loss is not None
            total = total + task_weight * task_loss(tokens, indices, questions, answers)
        return total

    def evaluate(current: Mapping[str, Tensor]) -> float:
        student.torch_model.eval()
        batches = _all_batches(samples, cfg.batch_size)
        total = 0.0
        with torch.no_grad():
            for batch in batches:
                total += float(objective(batch, current)) * batch[0].shape[0]
        return total / len(samples)

    history: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            before = evaluate(initial.decoded)
            if cfg.steps == 0:
                return RefitResult(initial, initial, before, before, False, [],
                                   time.perf_counter() - t0)
            chosen = initial.codec
            masks = {k: (v != 0) for k, v in initial.decoded.items()}
            latent = [torch.nn.Parameter(torch.where(masks[k], delta[k].float(),
                                                     torch.zeros(())))
                      for k in delta]
            names = list(delta)
            optimizer = torch.optim.Adam(latent, lr=cfg.lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
            stream = _batches(samples, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
            for _ in range(cfg.steps):
                current = {k: p.detach() for k, p in zip(names, latent, strict=True)}
                # Straight-through: the forward sees exactly what the device would decode.
                quantized = chosen.decode(
                    chosen.encode(current, importance=importance, self_describing=False),
                    spec=current)
                student.torch_model.train(cfg.train_mode)
                handle.zero_grad()
                value = objective(next(stream), quantized)
                if not torch.isfinite(value):
                    raise ModelError(f'refit step {len(history)}: non-finite objective')
                value.backward()
                grads = handle.grads()
                for k, p in zip(names, latent, strict=True):
                    g = grads[k]
                    p.grad = (torch.zeros_like(p) if g is None
                              else g.detach().to('cpu', torch.float32) * masks[k])
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(latent, cfg.grad_clip)
                optimizer.step()
                schedule.step()
                history.append(float(value.detach()))
            final_delta = {k: p.detach().clone() for k, p in zip(names, latent, strict=True)}
            refit = dwc.compress(final_delta, codec, budget_bytes, importance=importance,
                                 self_describing=self_describing)
            after = evaluate(refit.decoded)
    finally:
        handle.zero_grad()
        student.load_trainable_state_dict(saved)
        student.torch_model.train(was_training)
    # Stats against the uncompressed delta (not the latent the payload was made from).
    stats = dwc.CompressStats(
        codec=refit.stats.codec, nbytes=refit.stats.nbytes, num_params=refit.stats.num_params,
        bits_per_param=refit.stats.bits_per_param,
        rel_l2_error=dwc.rel_l2_error(delta, refit.decoded),
        nonzero_fraction=refit.stats.nonzero_fraction,
        encode_ms=(time.perf_counter() - t0) * 1000.0)
    refit = dwc.Compressed(refit.payload, refit.decoded, refit.codec, stats)
    used = after < before
    return RefitResult(refit if used else initial, initial, before, after, used, history,
                       time.perf_counter() - t0)
