"""The recipe that trains the bundled teacher and student on the drifting synthetic world.

``python -m cdcca_ros.sim.train_bundled [--out DIR] [--seed N] [--quick]`` (``make models``)
writes ``teacher/``, ``student/`` and ``accuracy.json`` into ``DIR`` (default: the package's
``assets/models``). Both models are BLIP-2s built through the model layer
(:func:`cdcca_ros.models.build_tiny`) and saved with :meth:`MLLM.save`, so they load with
``load_model(dir)`` and answer through ``answer()``/``answer_from_tokens()`` like any other.

A tiny BLIP-2 trained end to end from scratch learns colour fast but shape slowly, and the
language model binds question words to image content only after a long plateau. What makes
it fast and stable here, stage by stage:

1. **Vision (shared).** 48 px images in 16 px patches: the 3x3 patch grid is the world's 3x3
   scene grid, so one object lies in one patch and its shape is a local pattern. The ViT
   (0.02 init) is trained alone with linear probes: per patch, the kind and colour of the
   object covering most of it and the patch's own cell (keeps positions in the tokens); on
   CLS, the number of objects. It sees clean images of every object category (domains
   ``source`` and ``novel``) but none of the imaging shifts (fog, night, clutter), like a
   pretrained encoder that meets conditions it was not tuned for; then it is frozen and
   shared by both models (same weights, same vision-token space).
2. **Teacher bridge.** The Q-Former, projection and OPT language model learn to answer on
   every domain from cached vision tokens, one question of each type per image (balanced),
   AdamW with warm-up and cosine decay, the best checkpoint on held-out validation kept.
   Two auxiliary probes break the binding plateau (:func:`train_bridge`): each query
   describes one fixed subject (a colour or a kind, :data:`SLOTS`), and after the language
   model's first layer each subject word of the question holds what its query says.
3. **Student bridge.** Half the Q-Former layers and a narrower language model over the same
   ViT, trained the same way on the source domain only. Its trainable set (LoRA on the
   language model and on the Q-Former's query/key/value, norms, biases, query tokens) is
   configured before saving, so the cloud can adapt it with AKD.

The student does well on the source and poorly under drift; the teacher does well on every
domain; and distilling the teacher into the student's trainable set on a few hundred
drifted samples recovers much of the gap. ``accuracy.json`` records all three (accuracy on
held-out samples of every domain, and the before/after of :func:`adaptation_check`) with
the seed and the sample ranges they were measured on.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.domains import DRIFTED, SOURCE
from cdcca_ros.sim.questions import QTYPES, ask, vocabulary
from cdcca_ros.sim.render import render
from cdcca_ros.sim.scene import COLORS, KINDS, MAX_OBJECTS, Background, Scene
from cdcca_ros.sim.world import World

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from cdcca_ros.models.base import MLLM, TrainableConfig

DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'assets' / 'models'
ACCURACY_FILE = 'accuracy.json'
DOMAINS: tuple[str, ...] = (SOURCE,) + DRIFTED

# Index ranges of the World's per-domain sample sequences: training, validation (checkpoint
# choice) and test (the recorded table) never overlap.
TRAIN_START = 0
VAL_START = 500_000
EVAL_START = 1_000_000

SLOTS: tuple[str, ...] = tuple(COLORS) + KINDS
"""What each of the first query tokens is trained to describe (see :func:`slot_targets`)."""

STUDENT_LORA_TARGETS: tuple[str, ...] = (
    'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2', 'query', 'key', 'value', 'dense',
    'language_projection')
"""LoRA on the OPT language model, on the Q-Former's self- and cross-attention and feed-forward
layers, and on the projection between them."""

STUDENT_VISION_ADAPTER = 128
"""Hidden width of the student's vision-side adapter (a residual MLP on every vision token).

Measured with true labels on every drifted domain (the ceiling of what a trainable set can
learn, 300 samples a domain, 1000 steps): LoRA on attention + LM MLP, norms, biases, query
tokens gained +20.7 DA on the drifted mean; adding LoRA on the Q-Former's feed-forward layers
and the projection, and this adapter, +25.4; training the (tied) word embeddings too, +26.5
(+33.9 with 600 samples a domain, 2000 steps): the novel domain's new colours and kinds are
words the source-only student never answered with."""

ANCHOR_SAMPLES = 1024
"""Source-domain samples shipped with the student as its anchor set."""

ANCHOR_START = 3_000_000
"""First sample index of the anchor set: the student's own (source) distribution, but not its
training samples (which it may have memorised: a change that hurts the source can leave
them right), nor the validation, test or benchmark ranges."""


# --- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptSpec:
    """The adaptability check: AKD of the student on teacher pseudo-labels of one domain.

    Attributes:
        domain: The drifted domain.
        samples: Uplinked samples (tokens + question, no answer) the cloud distils on.
        steps: AKD optimiser steps.
        batch_size: Samples per step.
        lr: AdamW learning rate of the trainable set.
        eval_images: Held-out images per domain for the before/after accuracy.
    """

    domain: str = 'night'
    samples: int = 300
    steps: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    eval_images: int = 200

    def __post_init__(self) -> None:
        if self.domain not in DRIFTED:
            raise ConfigError(f'AdaptSpec.domain must be one of {DRIFTED}, got {self.domain!r}')
        if min(self.samples, self.steps, self.batch_size, self.eval_images) < 1 or self.lr <= 0:
            raise ConfigError(f'AdaptSpec numbers must be positive, got {self}')


@dataclass(frozen=True)
class BridgeSizes:
    """Sizes of the part above the shared ViT (Q-Former, projection, OPT)."""

    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    num_query_tokens: int = len(SLOTS)
    dropout: float = 0.05

    def __post_init__(self) -> None:
        for name in ('qformer_hidden', 'qformer_layers', 'qformer_heads', 'lm_hidden',
                     'lm_layers', 'lm_heads', 'num_query_tokens'):
            if getattr(self, name) < 1:
                raise ConfigError(f'BridgeSizes.{name} must be >= 1, got {getattr(self, name)}')
        if self.num_query_tokens < len(SLOTS):
            raise ConfigError(f'BridgeSizes.num_query_tokens={self.num_query_tokens} must be >= '
                              f'{len(SLOTS)} (one query per slot: {SLOTS})')
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f'BridgeSizes.dropout must be in [0, 1), got {self.dropout}')


@dataclass(frozen=True)
class StageConfig:
    """One optimisation stage: AdamW, linear warm-up then cosine decay."""

    epochs: float
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    final_lr_fraction: float = 0.05
    grad_clip: float = 1.0
    evals: int = 8

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ConfigError(f'StageConfig.epochs must be > 0, got {self.epochs}')
        if self.batch_size < 1 or self.evals < 1:
            raise ConfigError(f'StageConfig batch_size={self.batch_size} and '
                              f'evals={self.evals} must be >= 1')
        if not (self.lr > 0 and 0.0 <= self.warmup < 1.0
                and 0.0 <= self.final_lr_fraction <= 1.0):
            raise ConfigError(f'StageConfig lr={self.lr}, warmup={self.warmup}, '
                              f'final_lr_fraction={self.final_lr_fraction} out of range')

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of ``step`` (0-based) out of ``total``."""
        warm = max(1, int(self.warmup * total))
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        floor = self.final_lr_fraction
        return self.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the bundled models (the seed included).

    Attributes:
        seed: Seed of the world, the initialisations and the batch order.
        image_size: Side of the square training images.
        patch_size: ViT patch side.
        vision_hidden: ViT width.
        vision_layers: ViT depth.
        vision_heads: ViT attention heads.
        teacher: Teacher bridge sizes.
        student: Student bridge sizes (half the Q-Former, smaller LM).
        teacher_images: Training images per domain for the vision stage and the teacher.
        student_images: Source-domain training images for the student.
        val_images: Validation images per domain (checkpoint choice).
        eval_images: Test images per domain for the recorded accuracy table.
        vision: Vision-stage optimisation.
        teacher_stage: Teacher-bridge optimisation.
        student_stage: Student-bridge optimisation.
        per_domain_heads: One set of vision-stage heads per domain.
        vision_domains: Domains the shared ViT is trained on (see the module docstring).
        slot_weight: Weight of the query-slot probe (see :func:`train_bridge`).
        read_weight: Weight of the word-reads-its-slot probe (see :func:`train_bridge`).
        lora_r: Rank of the student's LoRA.
        lora_alpha: LoRA scaling numerator.
        adapt: Settings of the adaptability check recorded in ``accuracy.json``.
        adapt_domains: Drifted domains the check runs on (empty: none).
    """

    seed: int = 0
    image_size: int = 48
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    teacher: BridgeSizes = field(default_factory=lambda: BridgeSizes(
        qformer_hidden=64, qformer_layers=2, qformer_heads=4, lm_hidden=64, lm_layers=2,
        lm_heads=4))
    student: BridgeSizes = field(default_factory=lambda: BridgeSizes(
        qformer_hidden=48, qformer_layers=1, qformer_heads=4, lm_hidden=48, lm_layers=2,
        lm_heads=4))
    teacher_images: int = 2000
    student_images: int = 3000
    val_images: int = 100
    eval_images: int = 200
    vision: StageConfig = field(default_factory=lambda: StageConfig(epochs=8, lr=3e-3))
    teacher_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=3, lr=3e-3))
    student_stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, lr=3e-3))
    per_domain_heads: bool = True
    vision_domains: tuple[str, ...] = (SOURCE, 'novel')
    slot_weight: float = 1.0
    read_weight: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    adapt: AdaptSpec = field(default_factory=lambda: AdaptSpec())
    adapt_domains: tuple[str, ...] = DRIFTED

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f'Recipe.seed must be >= 0, got {self.seed}')
        if self.image_size % self.patch_size:
            raise ConfigError(f'Recipe.image_size={self.image_size} must be a multiple of '
                              f'patch_size={self.patch_size}')
        for name in ('teacher_images', 'student_images', 'val_images', 'eval_images'):
            if getattr(self, name) < 1:
                raise ConfigError(f'Recipe.{name} must be >= 1, got {getattr(self, name)}')
        unknown = [d for d in (*self.vision_domains, *self.adapt_domains) if d not in DOMAINS]
        if unknown or not self.vision_domains:
            raise ConfigError(f'Recipe: domains {unknown} are not in {DOMAINS} (and '
                              f'vision_domains={self.vision_domains} must not be empty)')
        if self.teacher.num_query_tokens != self.student.num_query_tokens:
            raise ConfigError(
                f'Recipe: teacher num_query_tokens={self.teacher.num_query_tokens} and student '
                f'num_query_tokens={self.student.num_query_tokens} differ (AKD aligns them)')

    @classmethod
    def quick(cls, seed: int = 0) -> Recipe:
        """A few-minute smoke run: same stages, far less data (accuracy well below target)."""
        return cls(seed=seed, teacher_images=300, student_images=400, val_images=30,
                   eval_images=40, vision=StageConfig(epochs=2, lr=3e-3, evals=2),
                   teacher_stage=StageConfig(epochs=1, lr=3e-3, evals=2),
                   student_stage=StageConfig(epochs=1, lr=3e-3, evals=2),
                   adapt=AdaptSpec(samples=64, steps=10, eval_images=40),
                   adapt_domains=('night',))

    def trainable_config(self) -> TrainableConfig:
        """The student's saved trainable set (what AKD adapts on the cloud)."""
        from cdcca_ros.models.base import TrainableConfig

        return TrainableConfig(lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                               lora_targets=STUDENT_LORA_TARGETS, train_embeddings=True,
                               vision_adapter=STUDENT_VISION_ADAPTER)


# --- data --------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Rendered images of one or more domains with their scenes."""

    images: np.ndarray          # [N, H, W, 3] uint8
    scenes: list[Scene]
    domains: np.ndarray         # [N] int domain index into DOMAINS
    indices: np.ndarray         # [N] sample index within the domain


@dataclass
class QuestionSet:
    """Questions about the images of an :class:`ImageSet` (several per image)."""

    image: np.ndarray           # [M] int row of the image set
    questions: list[str]
    answers: list[str]
    references: list[tuple[str, ...]]
    qtypes: list[str]


def render_images(world: World, domains: Sequence[str], n: int, start: int, image_size: int,
                  desc: str, progress: bool = True) -> ImageSet:
    """``n`` images of every domain in ``domains`` (samples ``start .. start + n - 1``)."""
    from tqdm import tqdm

    images, scenes, doms, idx = [], [], [], []
    bar = tqdm(total=n * len(domains), desc=desc, disable=not progress, leave=False)
    for name in domains:
        for i in range(start, start + n):
            sample = world.sample(name, i, image_size)
            images.append(sample.image)
            scenes.append(sample.scene)
            doms.append(DOMAINS.index(name) if name in DOMAINS else -1)
            idx.append(i)
            bar.update()
    bar.close()
    return ImageSet(images=np.stack(images), scenes=scenes, domains=np.asarray(doms),
                    indices=np.asarray(idx))


def ask_all(images: ImageSet, seed: int, per_type: int = 1) -> QuestionSet:
    """``per_type`` questions of every type about every image (balanced types)."""
    rng = np.random.default_rng([seed, 0x515])
    rows, questions, answers, refs, qtypes = [], [], [], [], []
    for row, scene in enumerate(images.scenes):
        for qtype in QTYPES:
            for _ in range(per_type):
                q = ask(scene, rng, qtype)
                rows.append(row)
                questions.append(q.text)
                answers.append(q.answer)
                refs.append(q.answers)
                qtypes.append(q.qtype)
    return QuestionSet(image=np.asarray(rows), questions=questions, answers=answers,
                       references=refs, qtypes=qtypes)


def patch_targets(scenes: Sequence[Scene], grid: int, image_size: int,
                  min_cover: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch labels: kind (0 none, 1.. KINDS) and colour (0 none, 1.. COLORS).

    A patch is labelled with the object that covers most of it when that object covers at
    least ``min_cover`` of its pixels: boundary patches, which see the outline, are labelled
    too. Each object is rendered alone on black (the world's own renderer) to get its mask.
    """
    kinds = np.zeros((len(scenes), grid * grid), dtype=np.int64)
    colors = np.zeros((len(scenes), grid * grid), dtype=np.int64)
    color_names = list(COLORS)
    side = image_size // grid
    black = Background(color=(0, 0, 0), pattern_color=(0, 0, 0))
    for i, scene in enumerate(scenes):
        best = np.full(grid * grid, min_cover)
        for obj in scene.objects:
            alone = render(Scene(objects=(obj,), background=black), image_size)
            mask = (alone.max(axis=2) > 48).astype(np.float32)
            cover = mask.reshape(grid, side, grid, side).mean(axis=(1, 3)).reshape(-1)
            won = cover >= best
            best[won] = cover[won]
            kinds[i, won] = KINDS.index(obj.kind) + 1
            colors[i, won] = color_names.index(obj.color) + 1
    return kinds, colors


# --- stage 1: the vision encoder ---------------------------------------------------------------
class _AuxHeads:
    """Linear probes of the vision stage (a set per domain, or one shared set)."""

    def __init__(self, dim: int, sets: int, patches: int) -> None:
        from torch import nn

        self.kind = nn.ModuleList(nn.Linear(dim, 1 + len(KINDS)) for _ in range(sets))
        self.color = nn.ModuleList(nn.Linear(dim, 1 + len(COLORS)) for _ in range(sets))
        self.count = nn.ModuleList(nn.Linear(dim, MAX_OBJECTS) for _ in range(sets))
        # Where each patch is: nothing above needs it, so without this probe the tokens lose
        # their (tiny, 0.02-initialised) position embeddings and 'where is ...?' is unanswerable.
        self.cell = nn.Linear(dim, patches)
        self.modules = nn.ModuleList([self.kind, self.color, self.count, self.cell])

    def loss(self, hidden: Tensor, head: Tensor, kinds: Tensor, colors: Tensor,
             counts: Tensor) -> tuple[Tensor, dict[str, tuple[int, int]]]:
        """Mean cross-entropy of the three probes and ``(hits, scored)`` per probe.

        Hits are counted on object patches only for kind and colour (most patches are empty
        background), on every image for the count.
        """
        import torch
        from torch.nn import functional as F

        cell_logits = self.cell(hidden[:, 1:])
        cells = torch.arange(cell_logits.shape[1]).expand(cell_logits.shape[:2])
        total = F.cross_entropy(cell_logits.flatten(0, 1), cells.flatten()) * hidden.shape[0]
        hits = {'kind': [0, 0], 'color': [0, 0], 'count': [0, 0],
                'cell': [int((cell_logits.argmax(-1) == cells).sum()), cells.numel()]}
        for h in torch.unique(head).tolist():
            rows = head == h
            patches, cls = hidden[rows, 1:], hidden[rows, 0]
            for name, layer, target, x in (('kind', self.kind[h], kinds[rows], patches),
                                           ('color', self.color[h], colors[rows], patches),
                                           ('count', self.count[h], counts[rows], cls)):
                logits = layer(x)
                keep = target > 0 if name != 'count' else torch.ones_like(target, dtype=bool)
                if name == 'kind':
                    # Only object patches: background ones would drown the shape signal.
                    ce = (F.cross_entropy(logits[keep], target[keep]) if bool(keep.any())
                          else logits.sum() * 0.0)
                else:
                    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         target.reshape(-1))
                total = total + ce * int(rows.sum())
                hits[name][0] += int(((logits.argmax(-1) == target) & keep).sum())
                hits[name][1] += int(keep.sum())
        return total / hidden.shape[0], {k: (v[0], v[1]) for k, v in hits.items()}


def _normalizer(model: MLLM) -> tuple[Tensor, Tensor]:
    import torch

    proc = model.image_processor
    mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def _pixels(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised ``[B, 3, H, W]``, as the image processor does
    at the training resolution (its resize is the identity there)."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def train_vision(model: MLLM, train: ImageSet, val: ImageSet, recipe: Recipe,
                 progress: bool = True) -> dict[str, float]:
    """Stage 1: train ``model``'s ViT with linear heads on patch/scene attributes.

    Returns:
        The validation hit rates (object patches' kind and colour, object count).
    """
    import torch
    from tqdm import tqdm

    cfg = recipe.vision
    vit = model.torch_model.vision_model
    grid = recipe.image_size // recipe.patch_size
    sets = len(DOMAINS) if recipe.per_domain_heads else 1
    torch.manual_seed(recipe.seed + 11)
    heads = _AuxHeads(vit.config.hidden_size, sets, grid * grid)
    mean, std = _normalizer(model)

    def tensors(data: ImageSet) -> tuple[Tensor, ...]:
        kinds, colors = patch_targets(data.scenes, grid, recipe.image_size)
        counts = np.asarray([len(s.objects) - 1 for s in data.scenes])
        head = data.domains if recipe.per_domain_heads else np.zeros_like(data.domains)
        return (torch.from_numpy(data.images), torch.from_numpy(kinds),
                torch.from_numpy(colors), torch.from_numpy(counts), torch.from_numpy(head))

    keep = [DOMAINS.index(d) for d in recipe.vision_domains]
    train, val = (_subset_images(d, np.flatnonzero(np.isin(d.domains, keep)))
                  for d in (train, val))
    tr, va = tensors(train), tensors(val)
    params = list(vit.parameters()) + list(heads.modules.parameters())
    for p in vit.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train.images)
    per_epoch = max(1, n // cfg.batch_size)
    total = max(1, int(cfg.epochs * per_epoch))
    gen = torch.Generator().manual_seed(recipe.seed + 12)
    eval_every = max(1, total // cfg.evals)

    def evaluate() -> dict[str, float]:
        vit.eval()
        sums = {'kind': [0, 0], 'color': [0, 0], 'count': [0, 0], 'cell': [0, 0]}
        with torch.no_grad():
            for s in range(0, len(va[0]), 256):
                part = [t[s:s + 256] for t in va]
                hidden = vit(pixel_values=_pixels(part[0], mean, std)).last_hidden_state
                _, hits = heads.loss(hidden, part[4], part[1], part[2], part[3])
                for k, (hit, scored) in hits.items():
                    sums[k][0] += hit
                    sums[k][1] += scored
        vit.train()
        return {k: v[0] / max(1, v[1]) for k, v in sums.items()}

    best: dict[str, float] = {}
    best_state: dict[str, Tensor] | None = None
    vit.train()
    bar = tqdm(range(total), desc='vision', disable=not progress)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in bar:
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        rows = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        for group in opt.param_groups:
            group['lr'] = cfg.lr_at(step, total)
        hidden = vit(pixel_values=_pixels(tr[0][rows], mean, std)).last_hidden_state
        loss, _ = heads.loss(hidden, tr[4][rows], tr[1][rows], tr[2][rows], tr[3][rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == total:
            scores = evaluate()
            bar.set_postfix(loss=f'{float(loss):.3f}', **{k: f'{v:.3f}' for k, v in
                                                          scores.items()})
            if not best or sum(scores.values()) > sum(best.values()):
                best = scores
                best_state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    assert best_state is not None
    vit.load_state_dict(best_state)
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    return best


# --- query slots -----------------------------------------------------------------------------
def slot_targets(scenes: Sequence[Scene]) -> np.ndarray:
    """Per image and slot: ``[attribute, column]`` of the object the slot names (0: absent).

    Colour slots describe the object of that colour (attribute = its kind, 1..), kind slots the
    object of that kind (attribute = its colour, 1..); column is 1..3. A BLIP-2 Q-Former does
    not see the question, so its queries must describe the whole scene; giving each query a
    fixed subject turns 'what shape is the red object?' into reading one known query, which
    the language model learns in a few hundred steps instead of never.
    """
    from cdcca_ros.sim.scene import COLUMNS

    out = np.zeros((len(scenes), len(SLOTS), 2), dtype=np.int64)
    color_names = list(COLORS)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            column = COLUMNS.index(obj.column) + 1
            c = color_names.index(obj.color)
            k = KINDS.index(obj.kind)
            out[i, c] = (k + 1, column)
            out[i, len(COLORS) + k] = (c + 1, column)
    return out


class _SlotHeads:
    """Linear probes on the query outputs (stage 2/3 auxiliary loss)."""

    def __init__(self, dim: int) -> None:
        from torch import nn

        self.kind = nn.Linear(dim, 1 + len(KINDS))      # read from colour slots
        self.color = nn.Linear(dim, 1 + len(COLORS))    # read from kind slots
        self.column = nn.Linear(dim, 4)                 # every slot
        self.modules = nn.ModuleList([self.kind, self.color, self.column])

    def loss(self, query: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over slots; ``query`` ``[B, L, C]``, ``targets`` ``[B, S, 2]``."""
        import torch

        n = len(SLOTS)
        slot = torch.arange(n).expand(query.shape[0], n)
        return self.flat_loss(query[:, :n].flatten(0, 1), slot.flatten(), targets.flatten(0, 1))

    def flat_loss(self, x: Tensor, slot: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of features ``x`` ``[K, C]`` describing slots ``slot`` ``[K]``."""
        from torch.nn import functional as F

        by_color = slot < len(COLORS)
        loss = F.cross_entropy(self.column(x), targets[:, 1])
        if bool(by_color.any()):
            loss = loss + F.cross_entropy(self.kind(x[by_color]), targets[by_color, 0])
        if bool((~by_color).any()):
            loss = loss + F.cross_entropy(self.color(x[~by_color]), targets[~by_color, 0])
        return loss


def subject_positions(model: MLLM, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Where the colour/kind words of each question sit and which slot each names.

    Returns:
        ``(from_end, slot)``, both ``[M, 2]`` (-1: none): ``from_end`` counts prompt tokens
        from the word to the end of the prompt, so the word's position in a left-padded
        training row is ``S - answer_length - from_end``.
    """
    vocab = {model.tokenizer.convert_tokens_to_ids(w): j for j, w in enumerate(SLOTS)}
    from_end = np.full((len(questions), 2), -1, dtype=np.int64)
    slot = np.full((len(questions), 2), -1, dtype=np.int64)
    for i, q in enumerate(questions):
        ids = model.tokenizer(model.prompt_template.format(question=q),
                              add_special_tokens=False)['input_ids']
        found = [(len(ids) - k, vocab[t]) for k, t in enumerate(ids) if t in vocab][:2]
        for j, (fe, sl) in enumerate(found):
            from_end[i, j], slot[i, j] = fe, sl
    return from_end, slot


# --- stages 2 and 3: Q-Former + language model on cached tokens -----------------------------
def encode(model: MLLM, images: np.ndarray, batch: int = 256, desc: str = 'encode',
           progress: bool = True) -> Tensor:
    """Vision tokens of every image (the model's own preprocessing), ``[N, T, D]``."""
    import torch
    from tqdm import tqdm

    parts = []
    for s in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
        parts.append(model.vision_tokens(list(images[s:s + batch])))
    return torch.cat(parts)


def first_token_accuracy(model: MLLM, tokens: Tensor, qs: QuestionSet,
                         batch: int = 256) -> np.ndarray:
    """Per question: 1.0 when the greedy first answer token is the answer's (teacher forced).

    Every answer of the world is one word, i.e. one token, so this is the greedy answer's
    exact match (up to the eos that follows), at the cost of one forward pass.
    """
    import torch

    hits = np.zeros(len(qs.questions))
    torch_model = model.torch_model
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(qs.questions), batch):
                rows = qs.image[s:s + batch]
                answers = qs.answers[s:s + batch]
                out = model.forward_train(tokens[torch.from_numpy(rows)], None,
                                          qs.questions[s:s + batch], answers)
                # With left padding the answer (+ eos) ends every row: the first answer token
                # sits at position S - len(answer) - 1 and is predicted one step earlier.
                lengths = out.answer_mask.sum(1)
                seq = out.logits.shape[1]
                pred = out.logits[torch.arange(len(rows)), seq - lengths - 1].argmax(-1)
                ids = [_first_id(model, a) for a in answers]
                hits[s:s + batch] = (pred.cpu().numpy() == np.asarray(ids)).astype(float)
    finally:
        torch_model.train(was_training)
    return hits


def _first_id(model: MLLM, answer: str) -> int:
    """First token id of ``answer`` as :meth:`MLLM.forward_train` tokenises answers."""
    return int(model.tokenizer(' ' + answer, add_special_tokens=False)['input_ids'][0])


def _bridge_parameters(model: MLLM) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.torch_model.named_parameters()
            if not n.startswith('vision_model.')}


def train_bridge(model: MLLM, tokens: Tensor, slots: np.ndarray, qs: QuestionSet,
                 val_tokens: Tensor, val_qs: QuestionSet, val_domains: np.ndarray,
                 cfg: StageConfig, seed: int, desc: str, slot_weight: float = 1.0,
                 read_weight: float = 1.0, progress: bool = True) -> dict[str, float]:
    """Train everything above the (frozen) ViT on cached tokens; keep the best checkpoint.

    Besides the answer cross-entropy, two auxiliary probes (discarded afterwards) shape the
    path from the image to the answer:

    - ``slot_weight``: query ``j`` must describe the object :data:`SLOTS` ``[j]` names
      (:func:`slot_targets`);
    - ``read_weight``: after the language model's first layer, each colour/kind word of the
      question must carry what its slot says, i.e. the word has looked its object up. The
      second layer then only has to copy from the word to the answer; without this hint the
      two attention hops have to appear together and training stalls near chance.

    The checkpoint score is the mean over the validation domains of the first-token accuracy
    (every domain counts alike, however many questions it has).

    Returns:
        Validation accuracy per domain name of the kept checkpoint.
    """
    import torch
    from tqdm import tqdm

    params = _bridge_parameters(model)
    for name, p in model.torch_model.named_parameters():
        p.requires_grad_(name in params)
    torch.manual_seed(seed)
    config = model.torch_model.config
    q_heads = _SlotHeads(config.qformer_config.hidden_size)
    lm_heads = _SlotHeads(config.text_config.hidden_size)
    slot_t = torch.from_numpy(slots)
    from_end, subj_slot = (torch.from_numpy(a) for a in subject_positions(model, qs.questions))
    opt = torch.optim.AdamW(list(params.values()) + list(q_heads.modules.parameters())
                            + list(lm_heads.modules.parameters()),
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(qs.questions)
    total = max(1, int(cfg.epochs * max(1, n // cfg.batch_size)))
    eval_every = max(1, total // cfg.evals)
    gen = torch.Generator().manual_seed(seed)
    doms = sorted(set(val_domains[val_qs.image].tolist()))

    def evaluate() -> dict[str, float]:
        hits = first_token_accuracy(model, val_tokens, val_qs)
        per_q_dom = val_domains[val_qs.image]
        return {DOMAINS[d]: float(hits[per_q_dom == d].mean()) for d in doms}

    captured: dict[str, Tensor] = {}
    hook = model.decoder.layers[0].register_forward_hook(
        lambda _module, _args, output: captured.__setitem__(
            'h', output[0] if isinstance(output, tuple) else output))
    best_score, best_acc, best_state = -1.0, {}, None
    model.torch_model.train()
    order, pos = torch.randperm(n, generator=gen), 0
    bar = tqdm(range(total), desc=desc, disable=not progress)
    try:
        for step in bar:
            if pos + cfg.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            rows_t = order[pos:pos + cfg.batch_size]
            rows = rows_t.numpy()
            pos += cfg.batch_size
            for group in opt.param_groups:
                group['lr'] = cfg.lr_at(step, total)
            image_rows = torch.from_numpy(qs.image[rows])
            out = model.forward_train(tokens[image_rows], None,
                                      [qs.questions[i] for i in rows],
                                      [qs.answers[i] for i in rows])
            loss = out.loss + slot_weight * q_heads.loss(out.query, slot_t[image_rows])
            fe, sl = from_end[rows_t], subj_slot[rows_t]
            b, k = (fe >= 0).nonzero(as_tuple=True)
            if read_weight > 0 and len(b):
                hidden = captured['h']
                where = hidden.shape[1] - out.answer_mask.sum(1)[b] - fe[b, k]
                loss = loss + read_weight * lm_heads.flat_loss(
                    hidden[b, where], sl[b, k], slot_t[image_rows[b], sl[b, k]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            if (step + 1) % eval_every == 0 or step + 1 == total:
                acc = evaluate()
                score = float(np.mean(list(acc.values())))
                bar.set_postfix(loss=f'{float(out.loss):.3f}', val=f'{score:.3f}')
                if score > best_score:
                    best_score, best_acc = score, acc
                    best_state = {k: v.detach().clone() for k, v in params.items()}
    finally:
        hook.remove()
    assert best_state is not None
    with torch.no_grad():
        for name, value in best_state.items():
            params[name].copy_(value)
    model.torch_model.eval()
    return best_acc


# --- the whole recipe ------------------------------------------------------------------------
def build_teacher(recipe: Recipe) -> MLLM:
    """The untrained teacher (its ViT is the one both models share)."""
    from cdcca_ros.models import build_tiny

    t = recipe.teacher
    return build_tiny('blip2', vocabulary(), image_size=recipe.image_size,
                      patch_size=recipe.patch_size, vision_hidden=recipe.vision_hidden,
                      vision_layers=recipe.vision_layers, vision_heads=recipe.vision_heads,
                      qformer_hidden=t.qformer_hidden, qformer_layers=t.qformer_layers,
                      qformer_heads=t.qformer_heads, num_query_tokens=t.num_query_tokens,
                      lm_hidden=t.lm_hidden, lm_layers=t.lm_layers, lm_heads=t.lm_heads,
                      dropout=t.dropout, seed=recipe.seed + 1)


def build_student(recipe: Recipe, teacher: MLLM) -> MLLM:
    """The untrained student over the teacher's ViT (same weights)."""
    from cdcca_ros.models import build_tiny

    s = recipe.student
    return build_tiny('blip2', vocabulary(), qformer_hidden=s.qformer_hidden,
                      qformer_layers=s.qformer_layers, qformer_heads=s.qformer_heads,
                      num_query_tokens=s.num_query_tokens, lm_hidden=s.lm_hidden,
                      lm_layers=s.lm_layers, lm_heads=s.lm_heads, dropout=s.dropout,
                      seed=recipe.seed + 2, vision_from=teacher)


def _save(model: MLLM, path: Path) -> None:
    """Save into a fresh directory, replacing ``path`` only once the save succeeded."""
    tmp = path.with_name(path.name + '.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def dir_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def train_bundled(out: str | Path = DEFAULT_OUT, recipe: Recipe | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run the whole recipe and write ``teacher/``, ``student/`` and ``accuracy.json``.

    Returns:
        The record written to ``accuracy.json``.
    """
    import torch

    from cdcca_ros.models.registry import check_vision_space
    from cdcca_ros.sim.evaluate import EvalSpec, evaluate_models, format_table

    recipe = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    world = World(recipe.seed)

    t0 = time.perf_counter()
    train = render_images(world, DOMAINS, recipe.teacher_images, TRAIN_START,
                          recipe.image_size, 'render train', progress)
    extra = recipe.student_images - recipe.teacher_images
    source_more = (render_images(world, (SOURCE,), extra, TRAIN_START + recipe.teacher_images,
                                 recipe.image_size, 'render source', progress)
                   if extra > 0 else None)
    val = render_images(world, DOMAINS, recipe.val_images, VAL_START, recipe.image_size,
                        'render val', progress)
    timings['render_s'] = time.perf_counter() - t0

    teacher = build_teacher(recipe)
    t0 = time.perf_counter()
    vision_val = train_vision(teacher, train, val, recipe, progress)
    timings['vision_s'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokens = encode(teacher, train.images, desc='encode train', progress=progress)
    val_tokens = encode(teacher, val.images, desc='encode val', progress=progress)
    qs = ask_all(train, recipe.seed)
    val_qs = ask_all(val, recipe.seed + 1)
    timings['encode_s'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher_val = train_bridge(teacher, tokens, slot_targets(train.scenes), qs, val_tokens,
                               val_qs, val.domains, recipe.teacher_stage, recipe.seed + 21,
                               'teacher', recipe.slot_weight, recipe.read_weight,
                               progress)
    timings['teacher_s'] = time.perf_counter() - t0

    # The student sees the source domain only: the source part of the teacher's training
    # images, plus more source images when the recipe asks for more.
    t0 = time.perf_counter()
    src = np.flatnonzero(train.domains == DOMAINS.index(SOURCE))
    s_tokens = tokens[torch.from_numpy(src)]
    s_images = ImageSet(images=train.images[src], scenes=[train.scenes[i] for i in src],
                        domains=train.domains[src], indices=train.indices[src])
    if source_more is not None:
        s_tokens = torch.cat([s_tokens, encode(teacher, source_more.images,
                                               desc='encode source', progress=progress)])
        s_images = ImageSet(images=np.concatenate([s_images.images, source_more.images]),
                            scenes=s_images.scenes + source_more.scenes,
                            domains=np.concatenate([s_images.domains, source_more.domains]),
                            indices=np.concatenate([s_images.indices, source_more.indices]))
    else:
        s_tokens = s_tokens[:recipe.student_images]
        s_images = ImageSet(images=s_images.images[:recipe.student_images],
                            scenes=s_images.scenes[:recipe.student_images],
                            domains=s_images.domains[:recipe.student_images],
                            indices=s_images.indices[:recipe.student_images])
    s_qs = ask_all(s_images, recipe.seed + 2)
    v_src = np.flatnonzero(val.domains == DOMAINS.index(SOURCE))
    v_src_qs = _subset_questions(val_qs, v_src)
    student = build_student(recipe, teacher)
    check_vision_space(teacher, student)
    student_val = train_bridge(student, s_tokens, slot_targets(s_images.scenes), s_qs,
                               val_tokens, v_src_qs, val.domains, recipe.student_stage,
                               recipe.seed + 31, 'student', recipe.slot_weight,
                               recipe.read_weight, progress)
    timings['student_s'] = time.perf_counter() - t0

    student.configure_trainable(recipe.trainable_config())
    _save(teacher, out / 'teacher')
    _save(student, out / 'student')
    write_bundled_anchor(student, out / 'student', recipe.seed, recipe.image_size)

    t0 = time.perf_counter()
    spec = EvalSpec(seed=recipe.seed, n=recipe.eval_images, start=EVAL_START,
                    image_size=recipe.image_size, domains=DOMAINS)
    table = evaluate_models({'teacher': teacher, 'student': student}, spec, progress=progress)
    timings['eval_s'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    adaptation = [adaptation_check(teacher, out / 'student', replace(recipe.adapt, domain=d),
                                   recipe.seed, recipe.image_size, progress)
                  for d in recipe.adapt_domains]
    timings['adapt_s'] = time.perf_counter() - t0
    timings['total_s'] = time.perf_counter() - t_all

    record = {
        **table,
        'source_domain': SOURCE,
        'eval': spec.to_dict(),
        'validation_first_token': {'teacher': teacher_val, 'student': student_val},
        'vision_stage_val': vision_val,
        'adaptation': adaptation,
        'recipe': _recipe_dict(recipe),
        'sizes_bytes': {name: dir_size(out / name) for name in ('teacher', 'student')},
        'parameters': {name: sum(p.numel() for p in m.torch_model.parameters())
                       for name, m in (('teacher', teacher), ('student', student))},
        'timings_s': {k: round(v, 1) for k, v in timings.items()},
        'torch_threads': torch.get_num_threads(),
    }
    (out / ACCURACY_FILE).write_text(json.dumps(record, indent=2) + '\n')
    if progress:
        print(format_table(table, SOURCE))
        for item in adaptation:
            print(f'AKD on {item["domain"]}: {100 * item["before"][item["domain"]]:.1f} -> '
                  f'{100 * item["after"][item["domain"]]:.1f} '
                  f'(source {100 * item["before"][SOURCE]:.1f} -> '
                  f'{100 * item["after"][SOURCE]:.1f})')
    return record


def write_bundled_anchor(student: MLLM, student_dir: Path, seed: int = 0,
                         image_size: int = 48, n: int = ANCHOR_SAMPLES) -> Path:
    """Write the student's anchor set (:mod:`cdcca_ros.core.rounds.anchor`) beside it.

    Source-domain scenes the student was not trained on (:data:`ANCHOR_START`) with one
    question each (types cycling) and its ground-truth answer, as a model vendor's labelled
    calibration set would come: the gate then checks real source accuracy, and training
    distils the base student's own answer distributions on them.
    """
    from cdcca_ros.core.rounds.anchor import ANCHOR_FILE, write_anchor_from_images

    samples = World(seed).samples(SOURCE, n, image_size, start=ANCHOR_START)
    path = Path(student_dir) / ANCHOR_FILE
    write_anchor_from_images(path, student, [x.image for x in samples],
                             [x.question for x in samples], [x.answer for x in samples],
                             description=f'World({seed}) source samples {ANCHOR_START}..'
                                         f'{ANCHOR_START + n - 1}, {image_size}px')
    return path


ADAPT_START = 2_000_000
"""First sample index of the adaptation samples (apart from training, validation, test)."""


def adaptation_check(teacher: MLLM, student_dir: str | Path, spec: AdaptSpec, seed: int = 0,
                     image_size: int = 48, progress: bool = True) -> dict[str, Any]:
    """Distil ``teacher`` into a fresh copy of the saved student on one drifted domain.

    The copy is loaded from ``student_dir`` (its saved trainable set: LoRA, norms, biases,
    query tokens) and trained with :class:`~cdcca_ros.core.akd.AKDTrainer` on the teacher's
    pseudo-labels of ``spec.samples`` uplinked samples, as the cloud does in one round.

    Returns:
        Accuracy on held-out samples of the domain and of the source, before and after, the
        AKD settings and the training time.
    """
    from cdcca_ros.core.akd import AKDConfig, AkdSample, AKDTrainer
    from cdcca_ros.models.registry import load_model
    from cdcca_ros.sim.evaluate import EvalSpec, evaluate_model

    student = load_model(student_dir)
    student.torch_model.eval()
    eval_spec = EvalSpec(seed=seed, n=spec.eval_images, start=EVAL_START, image_size=image_size,
                         domains=(spec.domain, SOURCE))
    before = evaluate_model(student, eval_spec)
    samples = World(seed).samples(spec.domain, spec.samples, image_size, start=ADAPT_START)
    tokens = encode(student, np.stack([x.image for x in samples]), desc='encode adapt',
                    progress=progress)
    cfg = AKDConfig(lr=spec.lr, steps=spec.steps, batch_size=spec.batch_size, seed=seed)
    t0 = time.perf_counter()
    trainer = AKDTrainer(teacher, student, cfg, progress=progress)
    losses = trainer.fit([AkdSample(tokens[i], None, x.question) for i, x in enumerate(samples)])
    train_s = time.perf_counter() - t0
    student.torch_model.eval()
    after = evaluate_model(student, eval_spec)
    return {'domain': spec.domain, 'samples': spec.samples, 'start': ADAPT_START,
            'akd': asdict(cfg), 'before': before, 'after': after,
            'gain': after[spec.domain] - before[spec.domain],
            'loss_first': losses[0] if losses else None,
            'loss_last': losses[-1] if losses else None, 'train_s': round(train_s, 1)}


def _subset_images(data: ImageSet, rows: np.ndarray) -> ImageSet:
    """The images at ``rows``."""
    return ImageSet(images=data.images[rows], scenes=[data.scenes[i] for i in rows],
                    domains=data.domains[rows], indices=data.indices[rows])


def _subset_questions(qs: QuestionSet, rows: np.ndarray) -> QuestionSet:
    """Questions whose image row is in ``rows`` (image rows keep their numbering)."""
    keep = np.flatnonzero(np.isin(qs.image, rows))
    return QuestionSet(image=qs.image[keep], questions=[qs.questions[i] for i in keep],
                       answers=[qs.answers[i] for i in keep],
                       references=[qs.references[i] for i in keep],
                       qtypes=[qs.qtypes[i] for i in keep])


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    data = asdict(recipe)
    data['student_trainable'] = recipe.trainable_config().to_dict()
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m cdcca_ros.sim.train_bundled [--out DIR] [--seed N] [--quick]``."""
    import os

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT,
                        help=f'output directory (default: {DEFAULT_OUT})')
    parser.add_argument('--seed', type=int, default=0, help='seed of everything (default 0)')
    parser.add_argument('--quick', action='store_true',
                        help='a few-minute smoke run on little data (models below target)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    args = parser.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    # Busy-waiting OpenMP threads slow tiny ops badly on a shared CPU (set before torch loads).
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import torch

    torch.set_num_threads(args.threads)
    recipe = Recipe.quick(args.seed) if args.quick else Recipe(seed=args.seed)
    record = train_bundled(args.out, recipe)
    print(f'wrote {args.out} in {record["timings_s"]["total_s"]:.0f} s '
          f'(teacher {record["sizes_bytes"]["teacher"] / 1e6:.1f} MB, student '
          f'{record["sizes_bytes"]["student"] / 1e6:.1f} MB)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
