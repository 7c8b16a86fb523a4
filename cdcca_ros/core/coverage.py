"""Where an update may answer: the device's coverage of what the cloud trained on (no rclpy).

The cloud's gate proves an update on held-out samples of the data it trained on: the device's
own uplink and the anchor set. Nothing proves it on a scene the device never sent -- an update
learnt in fog can make night worse before the robot has seen any night. So the device answers
with the adapter only where the update was trained, and with the adapter it shipped with
(the base) elsewhere, until the new scenes have gone up the link and come back in an update.

"Where" is measured on the vision tokens the device computes anyway: a frame's feature is the
mean and spread of its tokens (:func:`~cdcca_ros.core.rounds.memory.token_feature`),
standardised; it is *covered* when its nearest neighbour among the features of everything
the update could have been trained on (the device's uplinked samples until the update, and
the anchor set) lies within a radius calibrated on those features themselves (a high
quantile of their leave-one-out nearest-neighbour distances, times a margin). Scenes the
device did send are covered; a new kind of scene is not.

The anchor set is where the shipped model is known to be right (it is the student's own
training distribution): a frame whose nearest neighbour is an anchor, not an uplinked sample,
is answered by the shipped model too (``anchor_answers_base``). The update is only ever
proven on the anchor to within the gate's tolerance, so on source-like scenes it can only
match the shipped model or lose a little; the device's own uncertain source frames went up
the link and stay with the update. This also keeps a shift that leaves token statistics
almost alone (new objects on a clean background) with the shipped model until its own
samples have gone up and come back in an update: then its frames lie nearer those samples
than the anchors, and the update answers them.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdcca_ros.errors import ConfigError


@dataclass(frozen=True)
class CoverageConfig:
    """How coverage is measured.

    Attributes:
        max_features: Features kept (uplinked samples and anchors; newest kept).
        quantile: Quantile of the leave-one-out nearest-neighbour distances ...
        margin: ... times this is the radius. 1.25: on the continual bench 1.5 handed
            frames of a scene never sent (clutter) to an update learnt on others (night),
            2.7 points below the shipped model; 1.25 kept every scene within 0.7 of it, at
            about a point of the drifted gain (edge frames of learnt scenes go to the
            shipped model).
        min_features: Fewer features than this: everything counts as covered (too little to
            tell).
        anchor_answers_base: A frame whose nearest neighbour is an anchor is answered by the
            shipped model (False: anchors cover like uplinked samples).
    """

    max_features: int = 2048
    quantile: float = 0.99
    margin: float = 1.25
    min_features: int = 32
    anchor_answers_base: bool = True

    def __post_init__(self) -> None:
        if self.max_features < 2 or self.min_features < 2:
            raise ConfigError(f'coverage max_features={self.max_features} and min_features='
                              f'{self.min_features} must be >= 2')
        if not 0.0 < self.quantile <= 1.0 or not self.margin > 0.0:
            raise ConfigError(f'coverage quantile={self.quantile} must be in (0, 1] and '
                              f'margin={self.margin} > 0')


    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CoverageConfig | None:
        """The coverage a device node builds from its ``guard.*`` parameters; None when
        ``guard.coverage`` is off."""
        if not params['guard.coverage']:
            return None
        return cls(margin=params['guard.coverage_margin'],
                   anchor_answers_base=bool(params['guard.coverage_anchor_base']))


def anchor_tokens_of(model_dir: str | None) -> Any:
    """The vision tokens of the anchor set shipped in a model directory (None: none)."""
    from pathlib import Path

    from cdcca_ros.core.rounds.anchor import ANCHOR_FILE, read_anchor

    if not model_dir or not (Path(model_dir) / ANCHOR_FILE).is_file():
        return None
    return read_anchor(Path(model_dir) / ANCHOR_FILE)[0]


class Coverage:
    """Features the current update was trained on, and the test of a frame against them.

    :meth:`note` records an uplinked sample's feature; :meth:`snapshot` (at every applied
    update) freezes what that update covers; :meth:`covers` tests a frame.
    """

    def __init__(self, cfg: CoverageConfig, anchors: np.ndarray | None = None) -> None:
        self.cfg = cfg
        self._anchors = (np.zeros((0, 0), np.float32) if anchors is None
                         else np.asarray(anchors, np.float32))
        self._seen: deque[np.ndarray] = deque(maxlen=cfg.max_features)
        self._lock = threading.Lock()
        self._points: np.ndarray | None = None
        self._is_anchor: np.ndarray = np.zeros(0, dtype=bool)
        self._scale: tuple[np.ndarray, np.ndarray] | None = None
        self.radius = float('inf')
        self.checked = 0
        self.uncovered = 0

    @classmethod
    def trained(cls, cfg: CoverageConfig, anchors: np.ndarray | None,
                noted: Iterable[np.ndarray]) -> Coverage:
        """What an update trained now covers on a device with ``cfg``: every sample it sent
        (``noted`` features) and the ``anchors``, frozen as the device freezes them when it
        applies the update (the cloud's gate routes held-out samples with it)."""
        coverage = cls(cfg, anchors)
        for feature in noted:
            coverage.note(feature)
        coverage.snapshot()
        return coverage

    def note(self, feature: np.ndarray) -> None:
        """Record the feature of a sample that went up the link."""
        with self._lock:
            self._seen.append(np.asarray(feature, np.float32))

    def snapshot(self) -> None:
        """Freeze what the update now being applied was trained on (everything noted so far
        and the anchors) and calibrate the radius on it."""
        with self._lock:
            parts = [np.stack(self._seen)] if self._seen else []
        if self._anchors.size:
            parts.append(self._anchors)
        if not parts:
            self._points = None
            return
        is_anchor = np.zeros(sum(len(p) for p in parts), dtype=bool)
        if self._anchors.size:
            is_anchor[-len(self._anchors):] = True
        points = np.concatenate(parts)[-self.cfg.max_features:]
        is_anchor = is_anchor[-self.cfg.max_features:]
        if len(points) < self.cfg.min_features:
            self._points = None
            return
        mean, std = points.mean(axis=0), points.std(axis=0) + 1e-6
        z = (points - mean) / std
        d2 = _sq_distances(z, z)
        np.fill_diagonal(d2, np.inf)
        loo = np.sqrt(d2.min(axis=1))
        self.radius = float(np.quantile(loo, self.cfg.quantile) * self.cfg.margin)
        self._points, self._scale, self._is_anchor = z, (mean, std), is_anchor

    def covers(self, feature: np.ndarray) -> bool:
        """Whether the update answers a frame with this feature: it lies where the update was
        trained and (``anchor_answers_base``) nearer an uplinked sample than any anchor; True
        when nothing is frozen yet (no update, or too little to tell); counted."""
        inside = bool(self.covers_all(np.asarray(feature, np.float32)[None])[0])
        self.checked += 1
        self.uncovered += int(not inside)
        return inside

    def covers_all(self, features: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """:meth:`covers` for ``[n, F]`` features at once (not counted: evaluations).

        Args:
            features: ``[n, F]`` frame features.
            exclude_self: A frame's own feature among the frozen points (distance 0) is not
                its neighbour: the test of a *fresh* frame drawn like a recorded one (the
                cloud's gate judges held-out samples the device has noted this way).
        """
        points, scale, is_anchor = self._points, self._scale, self._is_anchor
        features = np.asarray(features, np.float32)
        if points is None or scale is None:
            return np.ones(len(features), dtype=bool)
        z = (features - scale[0]) / scale[1]
        d2 = _sq_distances(z, points)
        if exclude_self:
            # float32 expansion leaves ~1e-6 * |z|^2 of a point's distance to itself.
            d2[d2 <= _SELF_D2 * (1.0 + (z * z).sum(1))[:, None]] = np.inf
        nearest = d2.argmin(axis=1)
        inside = np.sqrt(d2[np.arange(len(z)), nearest]) <= self.radius
        if self.cfg.anchor_answers_base:
            inside &= ~is_anchor[nearest]
        return inside

    def status(self) -> dict[str, float | int]:
        with self._lock:
            noted = len(self._seen)
        return {'noted': noted, 'frozen': 0 if self._points is None else len(self._points),
                'radius': round(self.radius, 3) if np.isfinite(self.radius) else -1.0,
                'checked': self.checked, 'uncovered': self.uncovered}


_SELF_D2 = 1e-4
"""Squared standardised distance (relative to ``1 + |z|^2``) below which a point is the frame
itself: distinct frames lie O(1) apart in the standardised space."""


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n, m]`` squared Euclidean distances (one matrix product)."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T, 0.0)
