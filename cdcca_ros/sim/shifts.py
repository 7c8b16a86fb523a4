"""Distribution shifts: a registry of scene-level and image-level changes, each with a strength.

A shift is a plain function registered under a name::

    @register_shift('fog', stage='image')
    def fog(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray: ...

    @register_shift('distractors', stage='scene')
    def distractors(scene: Scene, strength: float, rng: np.random.Generator) -> Scene: ...

Scene shifts run before rendering (and before the question is asked, so answers see them);
image shifts run on the rendered ``uint8`` RGB image and must return an array of the same shape
and dtype. ``strength`` is in ``[0, 1]``; 0 must leave the input unchanged. Domains
(:mod:`cdcca_ros.sim.domains`) refer to shifts by name only, so a new shift is added by
registering it: nothing else changes.

Sizes and positions are in image fractions so a shift looks the same at 64x64 and 640x480.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.scene import (
    BASE_COLORS,
    COLORS,
    GRID,
    KINDS,
    NOVEL_COLORS,
    NOVEL_KINDS,
    RGB,
    SIZES,
    TEXTURES,
    Background,
    Clutter,
    Scene,
    SceneObject,
)

Stage = Literal['scene', 'image']
SceneShiftFn = Callable[[Scene, float, np.random.Generator], Scene]
ImageShiftFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

REFERENCE_SIDE = 64
"""Image side at which pixel-scale effects (noise grain) are defined; larger images get coarser
grain so that, once a model resizes them, they carry the same noise as a direct 64x64 render."""


@dataclass(frozen=True)
class ShiftSpec:
    """One registered shift.

    Attributes:
        name: Registry key.
        stage: ``'scene'`` (edits the scene) or ``'image'`` (edits pixels).
        fn: The function.
        description: First line of the function's docstring.
    """

    name: str
    stage: Stage
    fn: Callable[..., object]
    description: str = ''


_REGISTRY: dict[str, ShiftSpec] = {}


def register_shift(name: str, stage: Stage = 'image', *, overwrite: bool = False
                   ) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Decorator registering a shift function under ``name``.

    Args:
        name: Registry key (used in domain definitions).
        stage: ``'image'`` or ``'scene'``.
        overwrite: Replace an existing shift of that name instead of raising.

    Raises:
        ConfigError: Bad stage or name, or the name is taken and ``overwrite`` is false.
    """
    if stage not in ('scene', 'image'):
        raise ConfigError(f'shift {name!r}: stage must be scene or image, got {stage!r}')
    if not name or not name.replace('_', '').isalnum():
        raise ConfigError(f'shift name must be non-empty [a-z0-9_], got {name!r}')

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        if name in _REGISTRY and not overwrite:
            raise ConfigError(f'shift {name!r} is already registered')
        doc = (fn.__doc__ or '').strip().splitlines()
        _REGISTRY[name] = ShiftSpec(name, stage, fn, doc[0] if doc else '')
        return fn

    return wrap


def unregister_shift(name: str) -> None:
    """Remove a shift (tests use it to clean up plug-ins they registered)."""
    _REGISTRY.pop(name, None)


def get_shift(name: str) -> ShiftSpec:
    """Look a shift up.

    Raises:
        ConfigError: No shift of that name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f'unknown shift {name!r}; registered: {sorted(_REGISTRY)}') from None


def shift_names(stage: Stage | None = None) -> list[str]:
    """Registered shift names (of one stage, or all), sorted."""
    return sorted(n for n, s in _REGISTRY.items() if stage is None or s.stage == stage)


def _check_strength(name: str, strength: float) -> float:
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ConfigError(f'shift {name!r}: strength must be in [0, 1], got {strength!r}')
    return s


def apply_scene_shift(name: str, scene: Scene, strength: float,
                      rng: np.random.Generator) -> Scene:
    """Run the scene shift ``name`` (identity at strength 0)."""
    spec = get_shift(name)
    if spec.stage != 'scene':
        raise ConfigError(f'shift {name!r} is an {spec.stage} shift, not a scene shift')
    s = _check_strength(name, strength)
    if s == 0.0:
        return scene
    out = spec.fn(scene, s, rng)
    if not isinstance(out, Scene):
        raise ConfigError(f'scene shift {name!r} returned {type(out).__name__}, not Scene')
    return out


def apply_image_shift(name: str, image: np.ndarray, strength: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Run the image shift ``name`` (identity at strength 0); checks shape and dtype."""
    spec = get_shift(name)
    if spec.stage != 'image':
        raise ConfigError(f'shift {name!r} is a {spec.stage} shift, not an image shift')
    s = _check_strength(name, strength)
    if s == 0.0:
        return image
    out = spec.fn(image, s, rng)
    if not isinstance(out, np.ndarray) or out.shape != image.shape or out.dtype != np.uint8:
        got = (getattr(out, 'shape', None), getattr(out, 'dtype', type(out).__name__))
        raise ConfigError(
            f'image shift {name!r} must return uint8 {image.shape}, got {got}')
    return out


# --- helpers --------------------------------------------------------------------------------
def _to_u8(x: np.ndarray) -> np.ndarray:
    """Float image -> uint8, rounded and saturated (ufuncs in place: np.clip is slower here)."""
    x += 0.5
    np.maximum(x, 0.0, out=x)
    np.minimum(x, 255.0, out=x)
    return x.astype(np.uint8)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a per-channel (256, 3) float lookup table to a uint8 RGB image."""
    lut = np.clip(table + 0.5, 0.0, 255.0).astype(np.uint8).reshape(1, 256, 3)
    return cv2.LUT(np.ascontiguousarray(image), lut)


_LEVELS = np.arange(256, dtype=np.float64)[:, None]


def _grain(image: np.ndarray) -> int:
    """Pixel size of one noise grain: 1 at 64x64, coarser on larger images."""
    return max(1, round(min(image.shape[:2]) / REFERENCE_SIDE))


def _random_rgb(rng: np.random.Generator, lo: int = 40, hi: int = 230) -> RGB:
    r, g, b = rng.integers(lo, hi + 1, size=3)
    return int(r), int(g), int(b)


# --- image shifts ---------------------------------------------------------------------------
@register_shift('dark', 'image')
def dark(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Low light: scale brightness down (to 15% at strength 1) and deepen the shadows."""
    gain = 1.0 - 0.85 * strength * float(rng.uniform(0.9, 1.0))
    table = np.power(_LEVELS / 255.0, 1.0 + 0.4 * strength) * (gain * 255.0)
    return _lut(image, np.repeat(table, 3, axis=1))


@register_shift('color_cast', 'image')
def color_cast(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Blue-green cast, like cold street light or a wrong white balance."""
    tint = np.array([0.45, 0.85, 1.35]) * rng.uniform(0.95, 1.05, 3)
    return _lut(image, _LEVELS * (1.0 + strength * (tint - 1.0))[None, :])


@functools.lru_cache(maxsize=16)
def _fog_profile(height: int) -> np.ndarray:
    """Relative fog density per row: 1 at the top, 0.75 at the bottom (float32, H x 1 x 1)."""
    return np.linspace(1.0, 0.75, height, dtype=np.float32)[:, None, None]


@register_shift('fog', 'image')
def fog(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Haze: blend towards a light grey, denser at the top of the image."""
    level = float(rng.uniform(205.0, 235.0))
    rows = (0.88 * strength) * _fog_profile(image.shape[0])
    out = image.astype(np.float32)
    out *= 1.0 - rows
    out += level * rows + 0.5  # a convex mix of values in [0, 255]: no clipping needed
    return out.astype(np.uint8)


@register_shift('noise', 'image')
def noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: Gaussian, sigma 50 grey levels at strength 1, grain scaled to image size."""
    height, width = image.shape[:2]
    g = _grain(image)
    small = rng.standard_normal((-(-height // g), -(-width // g), 3), dtype=np.float32)
    small *= 50.0 * strength
    if g > 1:
        small = np.repeat(np.repeat(small, g, axis=0), g, axis=1)[:height, :width]
    small += image
    return _to_u8(small)


@register_shift('blur', 'image')
def blur(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Defocus: Gaussian blur, sigma 2 px at 64x64 (scaled with image size) at strength 1."""
    sigma = 2.0 * strength * min(image.shape[:2]) / REFERENCE_SIDE
    return cv2.GaussianBlur(image, (0, 0), sigmaX=max(sigma, 1e-3))


@register_shift('occlusion', 'image')
def occlusion(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Grey bars across the view (a wiper, a cable), up to three, thinner than an object."""
    out = image.copy()
    height, width = image.shape[:2]
    count = 1 + int(rng.integers(0, 1 + round(2 * strength)))
    for _ in range(count):
        vertical = bool(rng.integers(0, 2))
        pos = float(rng.uniform(0.1, 0.9))
        half = 0.02 + 0.03 * strength
        level = int(rng.integers(60, 120))
        if vertical:
            a, b = int((pos - half) * width), int(math.ceil((pos + half) * width))
            out[:, max(a, 0):b] = level
        else:
            a, b = int((pos - half) * height), int(math.ceil((pos + half) * height))
            out[max(a, 0):b, :] = level
    return out


# --- scene shifts ---------------------------------------------------------------------------
@register_shift('textured_background', 'scene')
def textured_background(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Replace the plain background with a coloured pattern; contrast grows with strength."""
    pattern = ('stripes', 'checker', 'waves')[int(rng.integers(0, 3))]
    base = np.asarray(_random_rgb(rng, 90, 210), dtype=np.float32)
    other = np.asarray(_random_rgb(rng, 40, 240), dtype=np.float32)
    other = base + strength * (other - base)
    bg = Background(color=tuple(int(c) for c in base),  # type: ignore[arg-type]
                    pattern=pattern,
                    pattern_color=tuple(int(c) for c in other),  # type: ignore[arg-type]
                    period=float(rng.uniform(0.06, 0.16)),
                    angle=float(rng.uniform(0.0, 180.0)))
    return dataclasses.replace(scene, background=bg)


@register_shift('distractors', 'scene')
def distractors(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Add thin lines, dots and arcs in object colours (not objects: never counted or asked)."""
    count = int(round(12 * strength * float(rng.uniform(0.7, 1.3))))
    palette = [COLORS[c] for c in BASE_COLORS]
    items = list(scene.clutter)
    for _ in range(count):
        kind = ('line', 'dot', 'arc')[int(rng.integers(0, 3))]
        color = palette[int(rng.integers(0, len(palette)))]
        p = rng.uniform(0.03, 0.97, size=2)
        if kind == 'line':
            q = np.clip(p + rng.uniform(-0.3, 0.3, size=2), 0.0, 1.0)
            items.append(Clutter('line', color, ((float(p[0]), float(p[1])),
                                                 (float(q[0]), float(q[1]))),
                                 extent=float(rng.uniform(0.012, 0.022))))
        elif kind == 'dot':
            items.append(Clutter('dot', color, ((float(p[0]), float(p[1])),),
                                 extent=float(rng.uniform(0.015, 0.03))))
        else:
            items.append(Clutter('arc', color, ((float(p[0]), float(p[1])),),
                                 extent=float(rng.uniform(0.04, 0.08)),
                                 angle=float(rng.uniform(0.0, 360.0))))
    return dataclasses.replace(scene, clutter=tuple(items))


@register_shift('novel_kinds', 'scene')
def novel_kinds(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Turn objects into kinds the source never shows (star, cross), each with p=strength."""
    used = {o.kind for o in scene.objects}
    free = [k for k in NOVEL_KINDS if k not in used]
    objects = []
    for obj in scene.objects:
        hit = float(rng.random()) < strength
        if hit and free:
            kind = free.pop(int(rng.integers(0, len(free))))
            obj = dataclasses.replace(obj, kind=kind)
        objects.append(obj)
    return dataclasses.replace(scene, objects=tuple(objects))


@register_shift('textures', 'scene')
def textures(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Give objects a striped or dotted texture, each with probability ``strength``."""
    patterned = [t for t in TEXTURES if t != 'solid']
    objects = []
    for obj in scene.objects:
        if float(rng.random()) < strength:
            obj = dataclasses.replace(obj, texture=patterned[int(rng.integers(0, len(patterned)))])
        objects.append(obj)
    return dataclasses.replace(scene, objects=tuple(objects))


@register_shift('crowding', 'scene')
def crowding(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Push objects off their cell centres (up to the cell border) so the layout looks loose."""
    objects = []
    for obj in scene.objects:
        reach = max(0.0, 0.5 / GRID - obj.radius) * strength
        dx, dy = rng.uniform(-reach, reach, size=2)
        objects.append(dataclasses.replace(obj, offset=(float(dx), float(dy))))
    return dataclasses.replace(scene, objects=tuple(objects))


@register_shift('novel_colors', 'scene')
def novel_colors(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Repaint objects in colours the source never shows (white, black), each w.p. strength."""
    used = {o.color for o in scene.objects}
    free = [c for c in NOVEL_COLORS if c not in used]
    objects = []
    for obj in scene.objects:
        if float(rng.random()) < strength and free:
            obj = dataclasses.replace(obj, color=free.pop(int(rng.integers(0, len(free)))))
        objects.append(obj)
    return dataclasses.replace(scene, objects=tuple(objects))


@register_shift('extra_objects', 'scene')
def extra_objects(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """Add up to ``round(2 * strength)`` objects (counts above the source's) in free cells."""
    wanted = int(rng.integers(0, round(2 * strength) + 1))
    objects = list(scene.objects)
    for _ in range(wanted):
        kinds = [k for k in KINDS if k not in {o.kind for o in objects}]
        colors = [c for c in COLORS if c not in {o.color for o in objects}]
        cells = [(r, c) for r in range(GRID) for c in range(GRID)
                 if (r, c) not in {o.cell for o in objects}]
        if not (kinds and colors and cells):
            break
        objects.append(SceneObject(
            kind=kinds[int(rng.integers(0, len(kinds)))],
            color=colors[int(rng.integers(0, len(colors)))],
            size=tuple(SIZES)[int(rng.integers(0, len(SIZES)))],
            cell=cells[int(rng.integers(0, len(cells)))]))
    return dataclasses.replace(scene, objects=tuple(objects))
