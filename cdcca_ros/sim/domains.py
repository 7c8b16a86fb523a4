"""Named domains (mixes of shifts) and the schedule that says which domain is live when.

A :class:`Domain` is a list of ``(shift name, strength)`` pairs over a base scene sampler.
``'source'`` is clean and simple; the drifted domains (``fog``, ``night``, ``clutter``,
``novel``) each move the data in one direction that a model trained on the source alone has
never seen. A :class:`DomainSchedule` maps a position (seconds or frames) to a domain, with an
optional linear blend of shift strengths across segment boundaries, and parses from the string a
camera node takes as a parameter::

    'source:30,fog:30,night:30'                 # 30 s each, then start again
    'source:300,novel:300;unit=frames;blend=50;loop=false'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim import shifts as _shifts
from cdcca_ros.sim.render import render
from cdcca_ros.sim.scene import Scene, SceneConfig, sample_scene

Unit = Literal['s', 'frames']
UNITS: tuple[str, ...] = ('s', 'frames')


@dataclass(frozen=True)
class Domain:
    """A named mix of shifts.

    Attributes:
        name: Registry key, also part of the per-sample seed.
        shifts: ``(shift name, strength)`` pairs, applied in order within each stage (all scene
            shifts before rendering, all image shifts after).
        description: One line for humans.
        scene_config: The base scene sampler.
    """

    name: str
    shifts: tuple[tuple[str, float], ...] = ()
    description: str = ''
    scene_config: SceneConfig = field(default_factory=SceneConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ':,;= '):
            raise ConfigError(f'domain name must be non-empty without ":,;= ", got {self.name!r}')
        seen = set()
        for item in self.shifts:
            if len(item) != 2:
                raise ConfigError(f'domain {self.name!r}: shift entry {item!r} is not (name, s)')
            name, strength = item
            _shifts.get_shift(name)  # raises ConfigError naming the registered shifts
            if not 0.0 <= float(strength) <= 1.0:
                raise ConfigError(
                    f'domain {self.name!r}: strength of {name!r} must be in [0, 1], '
                    f'got {strength!r}')
            if name in seen:
                raise ConfigError(f'domain {self.name!r}: shift {name!r} is listed twice')
            seen.add(name)

    def strength(self, shift: str) -> float:
        """Strength of ``shift`` in this domain (0 when absent)."""
        return next((float(s) for n, s in self.shifts if n == shift), 0.0)

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """Draw a base scene and run this domain's scene shifts on it."""
        scene = sample_scene(rng, self.scene_config)
        for name, strength in self.shifts:
            if _shifts.get_shift(name).stage == 'scene':
                scene = _shifts.apply_scene_shift(name, scene, strength, rng)
        return scene

    def render(self, scene: Scene, size: tuple[int, int] | int,
               rng: np.random.Generator) -> np.ndarray:
        """Render ``scene`` at ``size`` and run this domain's image shifts.

        Each image shift gets its own generator (seeded from ``rng``), so what one shift draws
        does not depend on the image size another shift worked at.
        """
        image = render(scene, size)
        image_shifts = [(n, s) for n, s in self.shifts if _shifts.get_shift(n).stage == 'image']
        if not image_shifts:
            return image
        seeds = rng.integers(0, 2 ** 63, size=len(image_shifts))
        for (name, strength), seed in zip(image_shifts, seeds):
            image = _shifts.apply_image_shift(name, image, strength,
                                              np.random.default_rng(int(seed)))
        return image

    def blend(self, other: Domain, weight: float) -> Domain:
        """Linear mix: strength ``(1 - weight) * self + weight * other`` for every shift.

        Raises:
            ConfigError: ``weight`` outside ``[0, 1]``.
        """
        w = float(weight)
        if not 0.0 <= w <= 1.0:
            raise ConfigError(f'blend weight must be in [0, 1], got {weight!r}')
        if w == 0.0:
            return self
        if w == 1.0:
            return other
        names = [n for n, _ in self.shifts] + [n for n, _ in other.shifts
                                                 if n not in dict(self.shifts)]
        mixed = tuple((n, (1.0 - w) * self.strength(n) + w * other.strength(n)) for n in names)
        return Domain(name=f'{self.name}>{other.name}@{w:.3f}', shifts=mixed,
                      description=f'{1 - w:.2f} {self.name} + {w:.2f} {other.name}',
                      scene_config=self.scene_config if w < 0.5 else other.scene_config)


_DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain, *, overwrite: bool = False) -> Domain:
    """Add ``domain`` to the registry and return it.

    Raises:
        ConfigError: The name is taken and ``overwrite`` is false.
    """
    if domain.name in _DOMAINS and not overwrite:
        raise ConfigError(f'domain {domain.name!r} is already registered')
    _DOMAINS[domain.name] = domain
    return domain


def unregister_domain(name: str) -> None:
    """Remove a domain (tests use it to clean up)."""
    _DOMAINS.pop(name, None)


def get_domain(name: str | Domain) -> Domain:
    """The registered domain called ``name`` (a :class:`Domain` passes through).

    Raises:
        ConfigError: Unknown name.
    """
    if isinstance(name, Domain):
        return name
    try:
        return _DOMAINS[name]
    except KeyError:
        raise ConfigError(f'unknown domain {name!r}; registered: {sorted(_DOMAINS)}') from None


def domain_names() -> list[str]:
    """Registered domain names, in registration order."""
    return list(_DOMAINS)


SOURCE = 'source'
DRIFTED: tuple[str, ...] = ('fog', 'night', 'clutter', 'novel')
"""The built-in drifted domains; ``SOURCE`` + these are the bundled models' domains."""

for _domain in (
        Domain(SOURCE, (), 'clean: plain grey background, solid shapes, daylight'),
        Domain('fog', (('fog', 0.75), ('blur', 0.4)),
               'haze and soft focus: low contrast, washed-out colours'),
        Domain('night', (('dark', 0.65), ('color_cast', 0.65), ('noise', 0.3)),
               'low light with a blue-green cast and sensor noise'),
        Domain('clutter', (('textured_background', 0.7), ('distractors', 0.6)),
               'patterned coloured backgrounds and thin distractor marks'),
        Domain('novel', (('novel_kinds', 0.8), ('novel_colors', 0.5), ('extra_objects', 0.5),
                         ('textures', 0.3)),
               'new kinds (star, cross), new colours (white, black), up to 5-6 objects, '
               'striped/dotted textures'),
):
    register_domain(_domain)


# --- schedule -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One schedule segment: ``domain`` for ``duration`` units."""

    domain: str
    duration: float

    def __post_init__(self) -> None:
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ConfigError(
                f'segment {self.domain!r}: duration must be finite and > 0, got {self.duration!r}')


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ('1', 'true', 'yes', 'on'):
        return True
    if v in ('0', 'false', 'no', 'off'):
        return False
    raise ConfigError(f'schedule option {key}={value!r} is not a boolean')


@dataclass(frozen=True)
class DomainSchedule:
    """Which domain is live at a position (seconds or frames).

    Attributes:
        segments: The segments in order.
        unit: ``'s'`` (positions are seconds) or ``'frames'`` (frame indices).
        blend: Length of the linear blend at the start of every segment from the previous one
            (0: hard switches). Must be shorter than every segment.
        loop: Start again after the last segment (else hold the last domain).
    """

    segments: tuple[Segment, ...]
    unit: Unit = 's'
    blend: float = 0.0
    loop: bool = True

    def __post_init__(self) -> None:
        if not self.segments:
            raise ConfigError('DomainSchedule needs at least one segment')
        for seg in self.segments:
            get_domain(seg.domain)
        if self.unit not in UNITS:
            raise ConfigError(f'DomainSchedule unit must be one of {UNITS}, got {self.unit!r}')
        shortest = min(seg.duration for seg in self.segments)
        if not (0.0 <= self.blend < shortest) or not math.isfinite(self.blend):
            raise ConfigError(
                f'DomainSchedule blend={self.blend!r} must be >= 0 and shorter than the '
                f'shortest segment ({shortest})')

    @classmethod
    def parse(cls, text: str) -> DomainSchedule:
        """Parse ``'name:duration,...[;unit=s|frames][;blend=X][;loop=true|false]'``.

        Raises:
            ConfigError: Malformed text, unknown domain or option, bad number.
        """
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'domain schedule must be a non-empty string, got {text!r}')
        head, *options = [part.strip() for part in text.split(';')]
        segments = []
        for item in head.split(','):
            name, sep, value = item.partition(':')
            if not sep or not name.strip():
                raise ConfigError(f'schedule segment {item.strip()!r} is not name:duration '
                                  f'(in {text!r})')
            try:
                duration = float(value)
            except ValueError as err:
                raise ConfigError(f'schedule segment {item.strip()!r}: duration {value!r} is '
                                  f'not a number') from err
            segments.append(Segment(name.strip(), duration))
        kwargs: dict[str, object] = {}
        for opt in options:
            if not opt:
                continue
            key, sep, value = (p.strip() for p in opt.partition('='))
            if not sep:
                raise ConfigError(f'schedule option {opt!r} is not key=value (in {text!r})')
            if key == 'unit':
                kwargs['unit'] = value
            elif key == 'blend':
                try:
                    kwargs['blend'] = float(value)
                except ValueError as err:
                    raise ConfigError(f'schedule option blend={value!r} is not a number') from err
            elif key == 'loop':
                kwargs['loop'] = _parse_bool(key, value)
            else:
                raise ConfigError(f'unknown schedule option {key!r}; known: unit, blend, loop')
        return cls(tuple(segments), **kwargs)  # type: ignore[arg-type]

    def __str__(self) -> str:
        head = ','.join(f'{s.domain}:{s.duration:g}' for s in self.segments)
        return f'{head};unit={self.unit};blend={self.blend:g};loop={str(self.loop).lower()}'

    @property
    def total(self) -> float:
        """Length of one pass over all segments."""
        return sum(s.duration for s in self.segments)

    def locate(self, position: float) -> tuple[int, float, int]:
        """``(segment index, offset into it, pass number)`` at ``position``.

        Raises:
            ConfigError: ``position`` is negative or not finite.
        """
        pos = float(position)
        if not (pos >= 0.0 and math.isfinite(pos)):
            raise ConfigError(f'schedule position must be finite and >= 0, got {position!r}')
        cycle = 0
        if self.loop:
            cycle = int(pos // self.total)
            pos -= cycle * self.total
        for i, seg in enumerate(self.segments):
            if pos < seg.duration:
                return i, pos, cycle
            pos -= seg.duration
        last = len(self.segments) - 1  # past the end without loop: hold the last segment
        return last, self.segments[last].duration + pos, cycle

    def name_at(self, position: float) -> str:
        """Name of the segment's domain at ``position`` (ignores blending)."""
        return self.segments[self.locate(position)[0]].domain

    def weights_at(self, position: float) -> tuple[str, str, float]:
        """``(previous domain, current domain, weight of current)`` at ``position``."""
        index, offset, cycle = self.locate(position)
        current = self.segments[index].domain
        if self.blend <= 0.0 or offset >= self.blend or (index == 0 and cycle == 0):
            return current, current, 1.0
        previous = self.segments[index - 1].domain  # index 0 after a loop takes the last one
        return previous, current, offset / self.blend

    def domain_at(self, position: float) -> Domain:
        """The (possibly blended) domain at ``position``."""
        previous, current, w = self.weights_at(position)
        if previous == current or w >= 1.0:
            return get_domain(current)
        return get_domain(previous).blend(get_domain(current), w)

    def position(self, frame_index: int, seconds: float | None = None) -> float:
        """Schedule position of a frame: its index (unit 'frames') or ``seconds`` (unit 's')."""
        if self.unit == 'frames':
            return float(frame_index)
        if seconds is None:
            raise ConfigError('schedule unit is seconds: pass the frame time in seconds')
        return float(seconds)


def as_schedule(value: str | DomainSchedule) -> DomainSchedule:
    """Accept a schedule or its string form."""
    return value if isinstance(value, DomainSchedule) else DomainSchedule.parse(value)


__all__ = ['Domain', 'DomainSchedule', 'Segment', 'SOURCE', 'DRIFTED', 'register_domain',
           'unregister_domain', 'get_domain', 'domain_names', 'as_schedule']
