"""Sample API of the synthetic world: training/eval samples and a drifting camera stream.

Everything is a pure function of the seed: sample ``i`` of a domain is drawn from generators
seeded with ``(seed, domain, i)``, so it does not depend on how many samples were asked for, on
the order of the calls, or on the image size (the same scene and question at 64x64 and 640x480).
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.domains import Domain, DomainSchedule, as_schedule, get_domain
from cdcca_ros.sim.questions import QTYPES, Question, ask, format_mc_prompt
from cdcca_ros.sim.render import check_size
from cdcca_ros.sim.scene import Scene

_SCENE_STREAM, _IMAGE_STREAM, _QUESTION_STREAM = 0, 1, 2
_CAMERA_KEY = 0x43414D  # 'CAM': the camera stream's key in place of a domain's


def domain_key(name: str) -> int:
    """A stable (not ``hash()``, which is salted per process) key of a domain name."""
    return zlib.crc32(name.encode('utf-8'))


_key = domain_key


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return check_size((image_size, image_size) if isinstance(image_size, int) else image_size)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f'seed must be a non-negative int, got {seed!r}')
    return int(seed)


@dataclass(frozen=True)
class Sample:
    """One VQA sample.

    Attributes:
        image: ``uint8`` RGB ``(H, W, 3)``.
        question: Question text.
        answer: Canonical one-word answer.
        answers: Ten reference answers (for :func:`~cdcca_ros.sim.scoring.vqa_accuracy`).
        choices: Four multiple-choice options.
        answer_index: Index of the answer in ``choices``.
        qtype: Question type (one of :data:`~cdcca_ros.sim.questions.QTYPES`).
        domain: Name of the domain it was drawn from.
        scene: The scene (ground truth for any other question).
        index: Index within the domain's sample sequence.
    """

    image: np.ndarray
    question: str
    answer: str
    answers: tuple[str, ...]
    choices: tuple[str, ...]
    answer_index: int
    qtype: str
    domain: str
    scene: Scene
    index: int

    @property
    def mc_prompt(self) -> str:
        """The question with its four choices in the text."""
        return format_mc_prompt(self.question, self.choices)


class World:
    """Deterministic sample generator over the registered domains.

    Args:
        seed: Non-negative int; equal seeds give byte-identical samples.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = _check_seed(seed)

    def _rngs(self, key: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        base = [self.seed, key, index]
        return (np.random.default_rng(base + [_SCENE_STREAM]),
                np.random.default_rng(base + [_IMAGE_STREAM]))

    def sample(self, domain: str | Domain, index: int, image_size: int | tuple[int, int] = 64,
               qtype: str | None = None) -> Sample:
        """Sample ``index`` of ``domain``.

        Args:
            domain: A registered name or a :class:`Domain`.
            index: Non-negative position in the domain's sequence.
            image_size: Side of a square image, or ``(width, height)``.
            qtype: Question type; default cycles through the types by index, so any run of
                ``len(QTYPES)`` consecutive samples holds every type once.

        Raises:
            ConfigError: Unknown domain or question type, bad size or index.
        """
        dom = get_domain(domain)
        if index < 0:
            raise ConfigError(f'sample index must be >= 0, got {index}')
        size = _size(image_size)
        rng_scene, rng_image = self._rngs(_key(dom.name), index)
        scene = dom.sample_scene(rng_scene)
        q = ask(scene, rng_scene, qtype or QTYPES[index % len(QTYPES)])
        image = dom.render(scene, size, rng_image)
        return Sample(image=image, question=q.text, answer=q.answer, answers=q.answers,
                      choices=q.choices, answer_index=q.answer_index, qtype=q.qtype,
                      domain=dom.name, scene=scene, index=index)

    def samples(self, domain: str | Domain, n: int, image_size: int | tuple[int, int] = 64,
                start: int = 0, qtype: str | None = None) -> list[Sample]:
        """Samples ``start .. start + n - 1`` of ``domain`` (see :meth:`sample`)."""
        if n < 0:
            raise ConfigError(f'number of samples must be >= 0, got {n}')
        dom = get_domain(domain)
        return [self.sample(dom, start + i, image_size, qtype) for i in range(n)]


def stack_images(samples: Sequence[Sample]) -> np.ndarray:
    """Images of equally sized samples as one ``uint8`` array ``(N, H, W, 3)``."""
    if not samples:
        raise ConfigError('stack_images needs at least one sample')
    return np.stack([s.image for s in samples])


@dataclass(frozen=True)
class Frame:
    """One camera frame of a :class:`SyntheticStream`.

    Attributes:
        index: Frame number.
        stamp: Schedule time of the frame in seconds (``index / fps`` unless given).
        image: ``uint8`` RGB ``(H, W, 3)``.
        scene: What the frame shows (ground truth for questions about it).
        domain: Name of the (possibly blended) domain that drew it.
        segment: Name of the schedule segment it falls in.
    """

    index: int
    stamp: float
    image: np.ndarray
    scene: Scene
    domain: str
    segment: str


class SyntheticStream:
    """A camera that shows a drifting world: each frame is a new scene from the live domain.

    Args:
        schedule: A :class:`DomainSchedule` or its string form (``'source:30,fog:30'``).
        seed: Non-negative int; frame ``i`` depends only on ``(seed, i, position)``.
        size: ``(width, height)`` of the frames; 640x480 like a RealSense colour stream.
        fps: Frame rate that turns frame indices into seconds for a seconds schedule.
    """

    def __init__(self, schedule: str | DomainSchedule, seed: int = 0,
                 size: tuple[int, int] = (640, 480), fps: float = 30.0) -> None:
        self.schedule = as_schedule(schedule)
        self.seed = _check_seed(seed)
        self.size = _size(size)
        if not fps > 0:
            raise ConfigError(f'fps must be > 0, got {fps!r}')
        self.fps = float(fps)

    def frame(self, index: int, stamp: float | None = None) -> Frame:
        """Frame ``index``; ``stamp`` (seconds) overrides ``index / fps`` for the schedule,
        e.g. the wall time since start in a live camera node."""
        if index < 0:
            raise ConfigError(f'frame index must be >= 0, got {index}')
        seconds = index / self.fps if stamp is None else float(stamp)
        position = self.schedule.position(index, seconds)
        dom = self.schedule.domain_at(position)
        base = [self.seed, _CAMERA_KEY, index]
        rng_scene = np.random.default_rng(base + [_SCENE_STREAM])
        rng_image = np.random.default_rng(base + [_IMAGE_STREAM])
        scene = dom.sample_scene(rng_scene)
        image = dom.render(scene, self.size, rng_image)
        return Frame(index=index, stamp=seconds, image=image, scene=scene, domain=dom.name,
                     segment=self.schedule.name_at(position))

    def ask(self, frame: Frame, qtype: str | None = None) -> Question:
        """A question about ``frame`` with its ground truth (same frame -> same question)."""
        rng = np.random.default_rng([self.seed, _CAMERA_KEY, frame.index, _QUESTION_STREAM])
        return ask(frame.scene, rng, qtype)

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while True:
            yield self.frame(index)
            index += 1
