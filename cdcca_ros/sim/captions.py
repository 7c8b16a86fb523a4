"""Reference captions of a scene, and the nocaps-like in / near / out-of-domain split.

Each scene gets :data:`NUM_CAPTIONS` reference captions (COCO has five per image), written from
its ground truth: the objects (size, texture, colour, kind) in reading order, where they are,
how many there are, the background and its clutter. Each reference uses another template and
draws its synonyms ('big' / 'large', 'center' / 'middle') from the generator, so the references
agree on content and vary in wording, as human ones do; the same generator state gives the same
references.

The split follows nocaps, which sorts images by the classes they show: in-domain images show
only classes the captioning training data has, out-of-domain images only novel ones, near-domain
both. Here the source domain is the training data, so per sample (:func:`caption_split`):

* ``'out'``: the scene shows a kind or colour the source never shows (novel concepts,
  :data:`~cdcca_ros.sim.scene.BASE_KINDS` / :data:`~cdcca_ros.sim.scene.BASE_COLORS`);
* ``'near'``: only seen concepts, but the domain shifts them (any registered shift: fog,
  night, clutter, or one added with ``@register_shift``);
* ``'in'``: only seen concepts in a domain without shifts.

It reads only the domain's shifts and the scene, so domains registered later
(:func:`~cdcca_ros.sim.domains.register_domain`) fall into the split by themselves.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.domains import Domain, get_domain
from cdcca_ros.sim.scene import (
    BACKGROUND_PATTERNS,
    BASE_COLORS,
    BASE_KINDS,
    COLORS,
    GRID,
    KINDS,
    MAX_OBJECTS,
    SIZES,
    TEXTURES,
    Scene,
    SceneObject,
)
from cdcca_ros.sim.world import World, domain_key

NUM_CAPTIONS = 5
"""References per scene."""

SPLITS: tuple[str, ...] = ('in', 'near', 'out')
"""The nocaps-like splits, in table order."""

COUNT_WORDS: tuple[str, ...] = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')
SIZE_WORDS: dict[str, tuple[str, ...]] = {'small': ('small', 'little'), 'big': ('big', 'large')}
KIND_WORDS: dict[str, tuple[str, ...]] = {'circle': ('circle', 'disc')}
TEXTURE_WORDS: dict[str, str] = {'solid': '', 'striped': 'striped', 'dotted': 'dotted'}
BACKGROUND_WORDS: dict[str, str] = {
    'plain': 'grey', 'stripes': 'striped', 'checker': 'checkered', 'waves': 'wavy'}
"""Words per scene attribute; the first is the one most templates use."""

# (row, col) -> (place, preposition); the 'alt' forms are the synonym wording
_PLACES: dict[tuple[int, int], tuple[str, str]] = {
    (0, 0): ('top left', 'at the'), (0, 1): ('top', 'at the'), (0, 2): ('top right', 'at the'),
    (1, 0): ('left', 'on the'), (1, 1): ('center', 'in the'), (1, 2): ('right', 'on the'),
    (2, 0): ('bottom left', 'at the'), (2, 1): ('bottom', 'at the'),
    (2, 2): ('bottom right', 'at the'),
}
_PLACES_ALT: dict[tuple[int, int], str] = {
    (0, 0): 'in the top left corner', (0, 1): 'at the top', (0, 2): 'in the top right corner',
    (1, 0): 'on the left side', (1, 1): 'in the middle', (1, 2): 'on the right side',
    (2, 0): 'in the bottom left corner', (2, 1): 'at the bottom',
    (2, 2): 'in the bottom right corner',
}
assert len(_PLACES) == GRID * GRID and len(COUNT_WORDS) > MAX_OBJECTS


def _reading_order(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: o.cell)


def _noun(obj: SceneObject, *, size: bool = True, synonyms: bool = False,
          rng: np.random.Generator | None = None) -> str:
    """'a big striped red square' (``size``: with the size word; ``synonyms``: drawn)."""
    def pick(words: Sequence[str]) -> str:
        return words[int(rng.integers(0, len(words)))] if synonyms and rng is not None \
            else words[0]
    words = ['a']
    if size:
        words.append(pick(SIZE_WORDS[obj.size]))
    if TEXTURE_WORDS[obj.texture]:
        words.append(TEXTURE_WORDS[obj.texture])
    words += [obj.color, pick(KIND_WORDS.get(obj.kind, (obj.kind,)))]
    return ' '.join(words)


def _place(obj: SceneObject, alt: bool = False) -> str:
    if alt:
        return _PLACES_ALT[obj.cell]
    place, prep = _PLACES[obj.cell]
    return f'{prep} {place}'


def _join(parts: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(parts) <= 1:
        return ''.join(parts)
    return ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _background(scene: Scene) -> str:
    text = f'a {BACKGROUND_WORDS[scene.background.pattern]} background'
    return text + ' with thin marks' if scene.clutter else text


def _count(scene: Scene, noun: str) -> str:
    n = len(scene.objects)
    return f'{COUNT_WORDS[n]} {noun}' + ('s' if n != 1 else '')


def _templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    objs = _reading_order(scene)
    shuffled = [objs[int(i)] for i in rng.permutation(len(objs))]
    return [
        # a big red square and a small blue circle on a grey background
        f'{_join([_noun(o) for o in objs])} on {_background(scene)}',
        # two shapes: a big red square at the top left and a small blue circle in the center
        f'{_count(scene, "shape")}: {_join([f"{_noun(o)} {_place(o)}" for o in objs])}',
        # a big red square at the top left and a small blue circle in the center
        _join([f'{_noun(o)} {_place(o)}' for o in objs]),
        # two objects on a grey background: a red square and a blue circle
        f'{_count(scene, "object")} on {_background(scene)}: '
        f'{_join([_noun(o, size=False) for o in objs])}',
        # a little blue disc in the middle and a large red square in the top left corner
        _join([f'{_noun(o, synonyms=True, rng=rng)} {_place(o, alt=True)}' for o in shuffled]),
    ]


def reference_captions(scene: Scene, rng: np.random.Generator,
                       n: int = NUM_CAPTIONS) -> tuple[str, ...]:
    """``n`` reference captions of ``scene`` (one per template, in template order).

    Args:
        scene: A scene with at least one object.
        rng: Draws the synonyms and the order of the last template.
        n: How many, 1 .. :data:`NUM_CAPTIONS`.

    Raises:
        ConfigError: A scene without objects, or ``n`` out of range.
    """
    if not scene.objects:
        raise ConfigError('cannot caption a scene without objects')
    if not 1 <= n <= NUM_CAPTIONS:
        raise ConfigError(f'number of captions must be in [1, {NUM_CAPTIONS}], got {n}')
    return tuple(_templates(scene, rng)[:n])


def caption_split(domain: str | Domain, scene: Scene) -> str:
    """``'in'``, ``'near'`` or ``'out'`` for a sample of ``domain`` showing ``scene``."""
    dom = get_domain(domain)
    if any(o.kind not in BASE_KINDS or o.color not in BASE_COLORS for o in scene.objects):
        return 'out'
    return 'near' if any(strength > 0 for _, strength in dom.shifts) else 'in'


def caption_vocabulary() -> list[str]:
    """Every word any reference caption can contain (tokenised as the metrics do), sorted."""
    words = {'a', 'and', 'on', 'background', 'with', 'thin', 'marks', 'shape', 'shapes',
             'object', 'objects', 'the', 'at', 'in', 'side', 'corner', 'middle'}
    words.update(COUNT_WORDS)
    for group in (SIZE_WORDS, KIND_WORDS):
        for options in group.values():
            words.update(options)
    words.update(w for w in TEXTURE_WORDS.values() if w)
    words.update(BACKGROUND_WORDS.values())
    words.update(KINDS, COLORS)
    for place, prep in _PLACES.values():
        words.update(f'{prep} {place}'.split())
    for text in _PLACES_ALT.values():
        words.update(text.split())
    return sorted(words)


@dataclass(frozen=True)
class CaptionSample:
    """One captioning sample.

    Attributes:
        image: ``uint8`` RGB ``(H, W, 3)`` (the same image as the world's VQA sample).
        references: The reference captions.
        split: ``'in'``, ``'near'`` or ``'out'`` (see :func:`caption_split`).
        domain: Name of the domain it was drawn from.
        scene: The ground truth.
        index: Index within the domain's sample sequence.
    """

    image: np.ndarray
    references: tuple[str, ...]
    split: str
    domain: str
    scene: Scene
    index: int


_CAPTION_STREAM = 3  # after world.py's scene (0), image (1) and question (2) streams


def caption_samples(world: World, domain: str | Domain, n: int,
                    image_size: int | tuple[int, int] = 64, start: int = 0
                    ) -> list[CaptionSample]:
    """Captioning samples ``start .. start + n - 1`` of ``domain``.

    The image and scene of sample ``i`` are those of the world's VQA sample ``i``; the
    references come from their own generator, seeded with ``(seed, domain, i)``.

    Args:
        world: A :class:`~cdcca_ros.sim.world.World`.
        domain: A registered name or a :class:`Domain`.
        n: Number of samples (>= 0).
        image_size: Side of a square image, or ``(width, height)``.
        start: First index.
    """
    if not isinstance(world, World):
        raise ConfigError(f'caption_samples needs a World, got {type(world).__name__}')
    dom = get_domain(domain)
    out = []
    for sample in world.samples(dom, n, image_size, start=start):
        rng = np.random.default_rng([world.seed, domain_key(dom.name), sample.index,
                                     _CAPTION_STREAM])
        out.append(CaptionSample(image=sample.image,
                                 references=reference_captions(sample.scene, rng),
                                 split=caption_split(dom, sample.scene), domain=dom.name,
                                 scene=sample.scene, index=sample.index))
    return out


assert set(BACKGROUND_WORDS) == set(BACKGROUND_PATTERNS) and set(TEXTURE_WORDS) == set(TEXTURES)
assert set(SIZE_WORDS) == set(SIZES)

__all__ = ['NUM_CAPTIONS', 'SPLITS', 'CaptionSample', 'reference_captions', 'caption_split',
           'caption_vocabulary', 'caption_samples']
