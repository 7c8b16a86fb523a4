"""Scenes of the synthetic world: a few flat shapes on a 3x3 grid, plus optional clutter.

Everything is in normalised image coordinates (``x`` to the right, ``y`` down, both in
``[0, 1]``), so one scene renders at any resolution. Scenes are frozen dataclasses: scene
shifts (:mod:`cdcca_ros.sim.shifts`) return modified copies with :func:`dataclasses.replace`.

Within one scene every object has a distinct kind and a distinct colour, so 'the square' or
'the red object' always names exactly one object and every question has one true answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cdcca_ros.errors import ConfigError

RGB = tuple[int, int, int]

GRID = 3
"""The scene is a ``GRID x GRID`` grid of cells; one object per cell at most."""

BASE_KINDS: tuple[str, ...] = ('circle', 'square', 'triangle', 'diamond')
"""Kinds the source domain shows."""

NOVEL_KINDS: tuple[str, ...] = ('star', 'cross')
"""Kinds that only appear under drift (scene shift ``novel_kinds``)."""

KINDS: tuple[str, ...] = BASE_KINDS + NOVEL_KINDS

BASE_COLORS: tuple[str, ...] = ('red', 'green', 'blue', 'yellow')
"""Colours the source domain shows."""

NOVEL_COLORS: tuple[str, ...] = ('white', 'black')
"""Colours that only appear under drift (scene shifts ``novel_colors``, ``extra_objects``)."""

COLORS: dict[str, RGB] = {
    'red': (215, 40, 40),
    'green': (40, 165, 60),
    'blue': (45, 85, 220),
    'yellow': (240, 205, 35),
    'white': (245, 245, 245),
    'black': (25, 25, 25),
}
"""Object colour names and their RGB values (saturated, far apart, so that a cast or fog
keeps them separable for a model that has seen the cast)."""

SIZES: dict[str, float] = {'small': 0.095, 'big': 0.13}
"""Object radius per size name, as a fraction of the image side."""

TEXTURES: tuple[str, ...] = ('solid', 'striped', 'dotted')

COLUMNS: tuple[str, ...] = ('left', 'middle', 'right')
ROWS: tuple[str, ...] = ('top', 'middle', 'bottom')

BACKGROUND_PATTERNS: tuple[str, ...] = ('plain', 'stripes', 'checker', 'waves')
CLUTTER_KINDS: tuple[str, ...] = ('line', 'dot', 'arc')

MAX_OBJECTS = min(len(KINDS), len(COLORS), GRID * GRID)
"""Distinct kinds and colours per scene bound the number of objects (6; the source shows at
most ``len(BASE_COLORS)``)."""


@dataclass(frozen=True)
class SceneObject:
    """One shape of the scene.

    Attributes:
        kind: One of :data:`KINDS`.
        color: A key of :data:`COLORS`.
        size: A key of :data:`SIZES`.
        cell: ``(row, col)`` grid cell, each in ``range(GRID)``.
        offset: Jitter of the centre from the cell centre, in image fractions ``(dx, dy)``.
        texture: One of :data:`TEXTURES`.
    """

    kind: str
    color: str
    size: str = 'big'
    cell: tuple[int, int] = (1, 1)
    offset: tuple[float, float] = (0.0, 0.0)
    texture: str = 'solid'

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f'SceneObject kind {self.kind!r} is not one of {KINDS}')
        if self.color not in COLORS:
            raise ConfigError(f'SceneObject color {self.color!r} is not one of {tuple(COLORS)}')
        if self.size not in SIZES:
            raise ConfigError(f'SceneObject size {self.size!r} is not one of {tuple(SIZES)}')
        if self.texture not in TEXTURES:
            raise ConfigError(
                f'SceneObject texture {self.texture!r} is not one of {TEXTURES}')
        if not all(0 <= c < GRID for c in self.cell):
            raise ConfigError(f'SceneObject cell {self.cell!r} is outside the {GRID}x{GRID} grid')

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` in image fractions."""
        row, col = self.cell
        return ((col + 0.5) / GRID + self.offset[0], (row + 0.5) / GRID + self.offset[1])

    @property
    def radius(self) -> float:
        """Radius as a fraction of the image side."""
        return SIZES[self.size]

    @property
    def column(self) -> str:
        """'left', 'middle' or 'right'."""
        return COLUMNS[self.cell[1]]

    @property
    def row(self) -> str:
        """'top', 'middle' or 'bottom'."""
        return ROWS[self.cell[0]]


@dataclass(frozen=True)
class Background:
    """The scene background.

    Attributes:
        color: Base RGB colour.
        pattern: One of :data:`BACKGROUND_PATTERNS`.
        pattern_color: RGB colour of the pattern's second phase.
        period: Pattern period as a fraction of the image side.
        angle: Pattern orientation in degrees.
    """

    color: RGB = (190, 190, 190)
    pattern: str = 'plain'
    pattern_color: RGB = (190, 190, 190)
    period: float = 0.125
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.pattern not in BACKGROUND_PATTERNS:
            raise ConfigError(
                f'Background pattern {self.pattern!r} is not one of {BACKGROUND_PATTERNS}')
        if self.period <= 0:
            raise ConfigError(f'Background period must be > 0, got {self.period}')


@dataclass(frozen=True)
class Clutter:
    """A distractor mark that is not an object (not counted, never asked about).

    Attributes:
        kind: One of :data:`CLUTTER_KINDS`.
        color: RGB colour.
        points: Normalised ``(x, y)`` points: two for a line, one for a dot, one (centre) for
            an arc.
        extent: Thickness (line), radius (dot, arc) as a fraction of the image side.
        angle: Start angle of an arc in degrees.
    """

    kind: str
    color: RGB
    points: tuple[tuple[float, float], ...]
    extent: float = 0.02
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in CLUTTER_KINDS:
            raise ConfigError(f'Clutter kind {self.kind!r} is not one of {CLUTTER_KINDS}')


@dataclass(frozen=True)
class Scene:
    """A full scene: objects, background and clutter.

    Attributes:
        objects: The shapes, distinct kinds and distinct colours.
        background: The background.
        clutter: Distractor marks drawn under the objects.
    """

    objects: tuple[SceneObject, ...]
    background: Background = field(default_factory=Background)
    clutter: tuple[Clutter, ...] = ()

    def __post_init__(self) -> None:
        kinds = [o.kind for o in self.objects]
        colors = [o.color for o in self.objects]
        cells = [o.cell for o in self.objects]
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f'Scene objects must have distinct kinds, got {kinds}')
        if len(set(colors)) != len(colors):
            raise ConfigError(f'Scene objects must have distinct colors, got {colors}')
        if len(set(cells)) != len(cells):
            raise ConfigError(f'Scene objects must occupy distinct cells, got {cells}')

    def find(self, kind: str | None = None, color: str | None = None) -> list[SceneObject]:
        """Objects matching every given attribute."""
        return [o for o in self.objects
                if (kind is None or o.kind == kind) and (color is None or o.color == color)]

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        """Number of objects matching every given attribute."""
        return len(self.find(kind, color))


@dataclass(frozen=True)
class SceneConfig:
    """How the base (source) scene sampler draws scenes.

    Attributes:
        min_objects: Fewest objects.
        max_objects: Most objects (at most the number of kinds and of colours).
        kinds: Kinds to draw from.
        colors: Colours to draw from.
        gray_range: Range of the plain background's grey level.
        jitter: Largest centre jitter in image fractions (kept inside the cell).
    """

    min_objects: int = 1
    max_objects: int = len(BASE_COLORS)
    kinds: tuple[str, ...] = BASE_KINDS
    colors: tuple[str, ...] = BASE_COLORS
    gray_range: tuple[int, int] = (150, 215)
    jitter: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(
                f'SceneConfig needs 1 <= min_objects <= max_objects, got '
                f'min_objects={self.min_objects}, max_objects={self.max_objects}')
        limit = min(len(set(self.colors)), len(set(self.kinds)), GRID * GRID)
        if self.max_objects > limit:
            raise ConfigError(
                f'SceneConfig max_objects={self.max_objects} exceeds {limit} '
                f'(distinct kinds/colours/cells)')
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ConfigError(f'SceneConfig kinds {unknown} are not in {KINDS}')
        unknown = [c for c in self.colors if c not in COLORS]
        if unknown:
            raise ConfigError(f'SceneConfig colors {unknown} are not in {tuple(COLORS)}')
        lo, hi = self.gray_range
        if not 0 <= lo <= hi <= 255:
            raise ConfigError(
                f'SceneConfig gray_range {self.gray_range} must be 0 <= lo <= hi <= 255')
        if not 0.0 <= self.jitter <= 1.0 / (2 * GRID) - max(SIZES.values()):
            raise ConfigError(
                f'SceneConfig jitter={self.jitter} would push objects out of their cells')


def sample_scene(rng: np.random.Generator, config: SceneConfig | None = None) -> Scene:
    """Draw a clean scene (plain background, solid objects, no clutter).

    Args:
        rng: The generator; the scene depends only on its state.
        config: Sampler settings; defaults to :class:`SceneConfig()`.

    Returns:
        A new :class:`Scene`.
    """
    cfg = config or SceneConfig()
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    kinds = rng.permutation(len(cfg.kinds))[:n]
    colors = rng.permutation(len(cfg.colors))[:n]
    cells = rng.permutation(GRID * GRID)[:n]
    sizes = rng.integers(0, len(SIZES), size=n)
    offsets = rng.uniform(-cfg.jitter, cfg.jitter, size=(n, 2))
    size_names = tuple(SIZES)
    objects = tuple(
        SceneObject(kind=cfg.kinds[int(kinds[i])], color=cfg.colors[int(colors[i])],
                    size=size_names[int(sizes[i])],
                    cell=(int(cells[i]) // GRID, int(cells[i]) % GRID),
                    offset=(float(offsets[i, 0]), float(offsets[i, 1])))
        for i in range(n))
    gray = int(rng.integers(cfg.gray_range[0], cfg.gray_range[1] + 1))
    return Scene(objects=objects, background=Background(color=(gray, gray, gray),
                                                        pattern_color=(gray, gray, gray)))
