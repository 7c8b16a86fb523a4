"""A camera that shows the drifting synthetic world of :mod:`cdcca_ros.sim`.

It wraps :class:`cdcca_ros.sim.world.SyntheticStream` so that the same camera node serves a
RealSense, a webcam, or a world whose domain (clean, fog, night, clutter, novel...) changes
over time by a schedule. Every frame carries its ground truth in ``meta`` (scene, domain,
schedule segment), so a question about it can be scored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from cdcca_ros.camera.base import Camera, Frame, RetryPolicy
from cdcca_ros.errors import CameraError, ConfigError, WireError
from cdcca_ros.sim.questions import Question
from cdcca_ros.sim.world import SyntheticStream

Clock = Literal['frames', 'wall']
DEFAULT_SCHEDULE = 'source:30,fog:30,night:30,clutter:30,novel:30'
"""30 s of each built-in domain, looping: what ``make demo`` shows without a camera."""


@dataclass(frozen=True)
class SyntheticCameraConfig:
    """Parameters of the synthetic camera.

    Attributes:
        schedule: domain schedule string (see :class:`cdcca_ros.sim.domains.DomainSchedule`).
        seed: non-negative int; equal seeds and clocks give identical frames.
        width: frame width (640 like a RealSense colour stream).
        height: frame height.
        fps: frame rate: the pacing, and what turns frame indices into schedule seconds.
        clock: 'frames': schedule time is ``index / fps`` (reproducible, slows down with a slow
            machine); 'wall': schedule time is the wall time since connect (follows real time,
            skips frames when rendering is slower than ``fps``).
        realtime: deliver at ``fps``; False renders as fast as it can (tests, benchmarks).
        start_index: index of the first frame.
    """

    schedule: str = DEFAULT_SCHEDULE
    seed: int = 0
    width: int = 640
    height: int = 480
    fps: float = 30.0
    clock: Clock = 'frames'
    realtime: bool = True
    start_index: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f'seed must be a non-negative int, got {self.seed!r}')
        for name in ('width', 'height'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f'{name} must be a positive int, got {value!r}')
        if not self.fps > 0:
            raise ConfigError(f'fps must be > 0, got {self.fps!r}')
        if self.clock not in ('frames', 'wall'):
            raise ConfigError(f"clock must be 'frames' or 'wall', got {self.clock!r}")
        if isinstance(self.start_index, bool) or not isinstance(self.start_index, int) \
                or self.start_index < 0:
            raise ConfigError(f'start_index must be a non-negative int, got '
                              f'{self.start_index!r}')


class SyntheticCamera(Camera):
    """Frames of a :class:`SyntheticStream`, with ground truth in ``meta``.

    ``meta`` keys: ``frame_index``, ``schedule_time_s``, ``domain`` (possibly a blend name),
    ``segment`` (the schedule segment's domain), ``scene`` (:class:`cdcca_ros.sim.scene.Scene`),
    ``seed``, and ``sim_frame`` (the stream's own frame, for :meth:`ask`).

    Raises:
        ConfigError: bad parameters or an unparsable schedule (at construction).
    """

    def __init__(self, config: SyntheticCameraConfig | None = None, *,
                 name: str | None = None, retry: RetryPolicy | None = None) -> None:
        self.config = config or SyntheticCameraConfig()
        # Built here so that a bad schedule fails at construction, naming the bad part.
        self.stream = SyntheticStream(self.config.schedule, seed=self.config.seed,
                                      size=(self.config.width, self.config.height),
                                      fps=self.config.fps)
        self._index = self.config.start_index
        self._t0_ns = 0
        super().__init__(name or f'synthetic:{self.config.seed}',
                         pace_fps=self.config.fps if self.config.realtime else None,
                         retry=retry)

    def describe(self) -> str:
        """Schedule, seed and size."""
        config = self.config
        return (f'schedule {str(self.stream.schedule)!r} seed {config.seed} '
                f'{config.width}x{config.height}@{config.fps:g}')

    def _open(self) -> None:
        self._index = self.config.start_index
        self._t0_ns = time.monotonic_ns()

    def _close(self) -> None:
        pass

    def _grab(self, timeout_s: float) -> Frame:
        index = self._index
        stamp = None
        if self.config.clock == 'wall':
            stamp = (time.monotonic_ns() - self._t0_ns) / 1e9
        try:
            sim = self.stream.frame(index, stamp)
        except ConfigError as err:
            raise CameraError(f'{self}: frame {index} could not be drawn: {err}') from err
        self._index += 1
        meta: dict[str, Any] = {
            'frame_index': sim.index, 'schedule_time_s': sim.stamp, 'domain': sim.domain,
            'segment': sim.segment, 'scene': sim.scene, 'seed': self.config.seed,
            'sim_frame': sim,
        }
        return Frame(rgb=sim.image, stamp_ns=time.time_ns(), meta=meta)

    def ask(self, frame: Frame, qtype: str | None = None) -> Question:
        """A question about ``frame`` with its ground-truth answer (same frame, same question).

        Raises:
            CameraError: ``frame`` did not come from a synthetic camera.
        """
        sim = frame.meta.get('sim_frame')
        if sim is None:
            raise CameraError(f'{self}: frame has no synthetic ground truth (meta["sim_frame"])')
        return self.stream.ask(sim, qtype)


# --- the ``scene`` topic's JSON ---------------------------------------------------------------
MAX_SCENE_BYTES = 64 * 1024
_SCENE_FIELDS: dict[str, type] = {'domain': str, 'stamp_ns': int, 'question': str,
                                  'answer': str, 'answers': list, 'qtype': str,
                                  'choices': list}
_SCENE_OPTIONAL: dict[str, type] = {'frame_index': int, 'seed': int}


def scene_to_json(frame: Frame, question: Question) -> str:
    """The ``scene`` message of a synthetic frame: its domain, stamp and one question with its
    ground-truth answers (what :func:`scene_from_json` reads)."""
    meta = {k: v for k, v in frame.meta.items() if k in ('domain', 'frame_index', 'seed')}
    meta.update(stamp_ns=frame.stamp_ns, question=question.text, answer=question.answer,
                answers=list(question.answers), qtype=question.qtype,
                choices=list(question.choices))
    return json.dumps(meta)


def scene_from_json(text: str) -> dict[str, Any]:
    """Read a ``scene`` message: one JSON object with the fields of :func:`scene_to_json`.

    Raises:
        WireError: Too large, not JSON, not an object, a missing field, a field of the wrong
            type (``stamp_ns``, ``frame_index`` and ``seed`` are non-negative integers; the
            answers and choices lists of strings).
    """
    if not isinstance(text, str):
        raise WireError(f'scene must be a str, got {type(text).__name__}')
    if len(text) > MAX_SCENE_BYTES:
        raise WireError(f'scene of {len(text)} characters exceeds {MAX_SCENE_BYTES}')
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise WireError(f'scene is not JSON: {err}'[:200]) from err
    if not isinstance(meta, dict):
        raise WireError(f'scene must be a JSON object, got {type(meta).__name__}')
    missing = sorted(set(_SCENE_FIELDS) - set(meta))
    if missing:
        raise WireError(f'scene lacks {missing}')
    out: dict[str, Any] = {}
    for name, kind in {**_SCENE_FIELDS, **_SCENE_OPTIONAL}.items():
        if name not in meta:
            continue
        value = meta[name]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is int and value < 0) or (
                kind is list and not all(isinstance(v, str) for v in value)):
            raise WireError(f'scene {name} has a bad value {str(value)[:40]!r}')
        out[name] = value
    return out
