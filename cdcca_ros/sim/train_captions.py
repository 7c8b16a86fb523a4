"""Train the bundled models' caption heads, after and apart from their VQA weights.

``python -m cdcca_ros.sim.train_captions`` (run by ``make models`` after the VQA recipe of
:mod:`cdcca_ros.sim.train_bundled`) loads the bundled teacher and student as they are, and
trains one :mod:`caption head <cdcca_ros.models.caption_head>` for each on reference captions
of the world (:mod:`cdcca_ros.sim.captions`): the teacher's on every domain, the student's on
the source domain only, as their VQA training was. Model weights are only read, so answers stay
bit-identical; each head is written beside its model (``caption_head.safetensors``,
``caption_head.json``) and the held-out scores into ``captions.json``.

The images are the VQA recipe's own (training range, held-out evaluation range), so a caption
and a question can be about the same image, as COCO captions and VQAv2 share theirs.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.core.captions.metrics import score_captions
from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.captions import (
    SPLITS,
    CaptionSample,
    caption_samples,
    caption_vocabulary,
)
from cdcca_ros.sim.domains import SOURCE
from cdcca_ros.sim.train_bundled import DEFAULT_OUT as DEFAULT_DIR
from cdcca_ros.sim.train_bundled import DOMAINS, EVAL_START, TRAIN_START
from cdcca_ros.sim.world import World

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.models.base import MLLM
    from cdcca_ros.models.caption_head import Captioner

SCORES_FILE = 'captions.json'
HEAD_SEED = 19
"""The heads' seed is this plus the world's: apart from every seed the VQA recipe uses."""


@dataclass(frozen=True)
class CaptionRecipe:
    """How the caption heads are trained.

    Attributes:
        seed: Seed of the heads' weights and of the batch order (not the world's: the images
            are the VQA recipe's, ``world_seed``).
        world_seed: Seed of the world the images come from.
        image_size: Side of the square images (the bundled models' 48 px).
        teacher_images: Training images per domain for the teacher's head.
        student_images: Source training images for the student's head.
        eval_images: Held-out images per domain for the scores.
        steps: Optimiser steps per head.
        batch_size: Captions per step.
        lr: Peak AdamW learning rate (linear warm-up, cosine decay).
        hidden: Width of the heads.
        layers: Decoder layers of the heads.
    """

    seed: int = HEAD_SEED
    world_seed: int = 0
    image_size: int = 48
    teacher_images: int = 1200
    student_images: int = 3000
    eval_images: int = 100
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    hidden: int = 64
    layers: int = 2

    def __post_init__(self) -> None:
        for name in ('teacher_images', 'student_images', 'eval_images', 'steps', 'batch_size',
                     'hidden', 'layers', 'image_size'):
            if getattr(self, name) < 1:
                raise ConfigError(f'CaptionRecipe.{name} must be >= 1, got '
                                  f'{getattr(self, name)}')
        if not self.lr > 0:
            raise ConfigError(f'CaptionRecipe.lr must be > 0, got {self.lr}')

    @classmethod
    def quick(cls, seed: int = HEAD_SEED) -> CaptionRecipe:
        """A few-second recipe for tests (heads that learn little)."""
        return cls(seed=seed, teacher_images=16, student_images=32, eval_images=6, steps=20,
                   batch_size=16)


def head_words() -> tuple[str, ...]:
    """The heads' vocabulary: the caption grammar's words and the kept punctuation."""
    from cdcca_ros.models.caption_head import PUNCTUATION

    return tuple(caption_vocabulary()) + PUNCTUATION


def _encode_images(model: MLLM, samples: Sequence[CaptionSample], batch: int = 256) -> Tensor:
    import torch

    parts = [model.vision_tokens([s.image for s in samples[i:i + batch]])
             for i in range(0, len(samples), batch)]
    return torch.cat(parts)


def _features(model: MLLM, tokens: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    import torch

    vis, query = [], []
    for i in range(0, len(tokens), batch):
        vis.append(model.adapted_tokens(tokens[i:i + batch]).float())
        query.append(model.query_features(tokens[i:i + batch]).float())
    return torch.cat(vis), torch.cat(query)


def train_head(model: MLLM, samples: Sequence[CaptionSample], recipe: CaptionRecipe,
               tokens: Tensor | None = None, progress: bool = False) -> Any:
    """A caption head for ``model`` trained on ``samples`` (teacher forcing, one random
    reference per sample and step).

    Args:
        model: The MLLM (read only).
        samples: Training samples.
        recipe: Sizes, steps, seed.
        tokens: The samples' vision tokens, when already computed.
        progress: Print the loss every 250 steps.
    """
    import torch
    from torch.nn import functional as F

    from cdcca_ros.models.caption_head import (
        PAD,
        CaptionHeadConfig,
        build_head,
        encode_caption,
    )

    if not samples:
        raise ConfigError('train_head needs at least one sample')
    tokens = _encode_images(model, samples) if tokens is None else tokens
    vis, query = _features(model, tokens)
    cfg = CaptionHeadConfig(words=head_words(), token_dim=vis.shape[2], query_dim=query.shape[2],
                            hidden=recipe.hidden, layers=recipe.layers, seed=recipe.seed)
    head = build_head(cfg)
    refs = [[encode_caption(cfg, r) for r in s.references] for s in samples]
    rng = np.random.default_rng([recipe.seed, 0xCA9])
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=0.01)
    warm = max(1, recipe.steps // 20)
    head.train()
    for step in range(recipe.steps):
        lr = recipe.lr * min(1.0, (step + 1) / warm) * 0.5 * (
            1 + np.cos(np.pi * step / recipe.steps))
        for group in opt.param_groups:
            group['lr'] = lr
        rows = rng.integers(0, len(samples), size=recipe.batch_size)
        seqs = [refs[r][int(rng.integers(0, len(refs[r])))] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width + 1), PAD, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, 0] = 1  # BOS
            ids[i, 1:len(seq) + 1] = torch.tensor(seq)
        idx = torch.as_tensor(rows)
        memory = head.memory(vis[idx], query[idx])
        logits = head(memory, ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        if progress and (step % 250 == 0 or step == recipe.steps - 1):
            print(f'  step {step:5d}  loss {float(loss.detach()):.3f}', flush=True)
    head.eval()
    return head


def evaluate_captioner(captioner: Captioner, samples: Sequence[CaptionSample],
                       tokens: Tensor | None = None, batch: int = 128) -> dict[str, Any]:
    """BLEU-4 and CIDEr-D per split (``in``, ``near``, ``out``) and over all samples.

    Each split is scored in one call (its own document frequencies, as nocaps scores its
    splits). Returns ``{split: {'bleu4', 'cider', 'n'}}`` plus ``'examples'`` (a few
    captions beside their first reference).
    """
    if not samples:
        raise ConfigError('evaluate_captioner needs at least one sample')
    tokens = _encode_images(captioner.model, samples) if tokens is None else tokens
    captions: list[str] = []
    for i in range(0, len(samples), batch):
        captions += [r.text for r in captioner.caption_from_tokens(tokens[i:i + batch])]
    out: dict[str, Any] = {}
    for split in (*SPLITS, 'all'):
        rows = [i for i, s in enumerate(samples) if split in ('all', s.split)]
        if not rows:
            continue
        scores = score_captions({i: samples[i].references for i in rows},
                                {i: captions[i] for i in rows})
        out[split] = {**scores, 'n': len(rows)}
    out['examples'] = [{'domain': samples[i].domain, 'index': samples[i].index,
                        'caption': captions[i],
                        'reference': samples[i].references[0]}
                       for i in range(0, len(samples), max(1, len(samples) // 5))]
    return out


def train_captions(models_dir: str | Path = DEFAULT_DIR, recipe: CaptionRecipe | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train and save both heads; return (and write) the held-out scores."""
    import torch

    from cdcca_ros.models import bundled
    from cdcca_ros.models.caption_head import Captioner, save_head

    recipe = recipe or CaptionRecipe()
    models_dir = Path(models_dir)
    world = World(recipe.world_seed)
    t_all = time.perf_counter()
    teacher = bundled.load(str(models_dir / 'teacher'))
    student = bundled.load(str(models_dir / 'student'))
    evals = [s for d in DOMAINS
             for s in caption_samples(world, d, recipe.eval_images, recipe.image_size,
                                      EVAL_START)]
    eval_tokens = _encode_images(teacher, evals)  # the ViT is shared: same tokens for both
    record: dict[str, Any] = {'recipe': asdict(recipe), 'scores': {}, 'timings_s': {}}
    plans = (('teacher', teacher, DOMAINS, recipe.teacher_images),
             ('student', student, (SOURCE,), recipe.student_images))
    with torch.random.fork_rng():
        for name, model, domains, n in plans:
            t0 = time.perf_counter()
            train = [s for d in domains
                     for s in caption_samples(world, d, n, recipe.image_size, TRAIN_START)]
            if progress:
                print(f'{name}: caption head on {len(train)} images of {", ".join(domains)}',
                      flush=True)
            head = train_head(model, train, recipe, progress=progress)
            save_head(head, models_dir / name)
            record['scores'][name] = evaluate_captioner(Captioner(model, head), evals,
                                                        eval_tokens)
            record['timings_s'][name] = round(time.perf_counter() - t0, 1)
    record['timings_s']['total'] = round(time.perf_counter() - t_all, 1)
    (models_dir / SCORES_FILE).write_text(json.dumps(record, indent=1) + '\n')
    return record


def format_scores(record: dict[str, Any]) -> str:
    """A markdown table of BLEU-4 and CIDEr (x100, as papers print them) per split."""
    splits = [s for s in (*SPLITS, 'all') if s in next(iter(record['scores'].values()))]
    head = '| model | ' + ' | '.join(f'{s} B4 | {s} C' for s in splits) + ' |'
    lines = [head, '| --- |' + ' --- |' * (2 * len(splits))]
    for name, scores in record['scores'].items():
        cells = [f'{100 * scores[s]["bleu4"]:.1f} | {100 * scores[s]["cider"]:.1f}'
                 for s in splits]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m cdcca_ros.sim.train_captions [--out DIR] [--seed N] [--quick]``.

    Takes the arguments of :mod:`cdcca_ros.sim.train_bundled` (``make models ARGS=...`` passes
    the same to both): ``--seed`` is the world's seed there and here; the heads' own seed is
    :data:`HEAD_SEED` plus it.
    """
    import os

    parser = argparse.ArgumentParser(
        prog='python -m cdcca_ros.sim.train_captions',
        description='Train the bundled teacher and student caption heads (model weights '
                    'untouched) and write their held-out BLEU-4 / CIDEr.')
    parser.add_argument('--out', default=str(DEFAULT_DIR),
                        help='directory holding teacher/ and student/ (default: the bundled)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the world, as train_bundled\'s (default 0); the heads '
                             f'use {HEAD_SEED} + it')
    parser.add_argument('--steps', type=int, default=None, help='optimiser steps per head')
    parser.add_argument('--quick', action='store_true', help='tiny recipe (seconds)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    args = parser.parse_args(argv)
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import torch

    torch.set_num_threads(args.threads)
    recipe = (CaptionRecipe.quick(HEAD_SEED + args.seed) if args.quick
              else CaptionRecipe(seed=HEAD_SEED + args.seed))
    recipe = CaptionRecipe(**{**asdict(recipe), 'world_seed': args.seed,
                              **({'steps': args.steps} if args.steps else {})})
    record = train_captions(args.out, recipe)
    print(format_scores(record))
    print(f'({recipe.eval_images} held-out images per domain; total '
          f'{record["timings_s"]["total"]} s)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
