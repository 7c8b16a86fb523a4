"""The device's own guard: roll back an update whose answers turn unsure (no rclpy).

The cloud's gate and audit judge updates against the teacher; the device has no teacher but
sees every answer's entropy (Eq. 2). An update that broke the model -- whatever the cloud
believed -- shows as answers much less sure than the version before gave. The guard compares
the mean answer entropy of the first ``window`` answers of a new version with that of the
last ``window`` answers of its predecessor and asks for a rollback when it rose by more than
``ratio`` times *and* by more than ``min_rise`` nats. The absolute floor keeps a domain change
right after an update (a new scene is less familiar, entropy rises a little) from counting:
on the bundled student a drifted domain raises the mean by a few tenths of a nat, a broken
update by several nats.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from cdcca_ros.errors import ConfigError


@dataclass(frozen=True)
class EntropyGuardConfig:
    """When the device rolls an update back on its own.

    Attributes:
        window: Answers of each version compared (the predecessor's last, the new one's
            first).
        ratio: The new mean must exceed the old one this many times ...
        min_rise: ... and by at least this many nats.
    """

    window: int = 50
    ratio: float = 3.0
    min_rise: float = 1.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EntropyGuardConfig | None:
        """The guard a device node builds from its ``guard.*`` parameters; None when
        ``guard.local_rollback`` is off."""
        if not params['guard.local_rollback']:
            return None
        return cls(window=params['guard.entropy_window'], ratio=params['guard.entropy_ratio'],
                   min_rise=params['guard.entropy_min_rise'])

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f'entropy guard window must be >= 1, got {self.window}')
        if not (math.isfinite(self.ratio) and self.ratio >= 1.0):
            raise ConfigError(f'entropy guard ratio must be >= 1, got {self.ratio}')
        if not (math.isfinite(self.min_rise) and self.min_rise >= 0.0):
            raise ConfigError(f'entropy guard min_rise must be >= 0, got {self.min_rise}')


class EntropyGuard:
    """Watches answer entropies per adapter version (see the module docstring)."""

    def __init__(self, cfg: EntropyGuardConfig) -> None:
        self.cfg = cfg
        self._version: int | None = None
        self._current: deque[float] = deque(maxlen=cfg.window)
        self._seen = 0                        # answers of the current version
        self._reference: float | None = None  # predecessor's mean over its last window
        self._judged = False
        self.last: dict[str, float | int | str] = {}

    def observe(self, version: int, entropy: float) -> str | None:
        """Record one answer; the reason to roll ``version`` back when it is due, else None.

        A verdict is given once per version, after its first ``window`` answers.
        """
        if not math.isfinite(entropy):
            return None
        if version != self._version:
            enough = len(self._current) >= max(1, self.cfg.window // 2)
            self._reference = (sum(self._current) / len(self._current)) if enough else None
            self._version, self._seen, self._judged = version, 0, False
            self._current.clear()
        self._current.append(float(entropy))
        self._seen += 1
        if self._judged or self._seen < self.cfg.window or self._reference is None:
            return None
        self._judged = True
        new = sum(self._current) / len(self._current)
        old = self._reference
        self.last = {'version': version, 'mean_entropy': round(new, 4),
                     'previous_mean_entropy': round(old, 4)}
        if new > self.cfg.ratio * old and new - old > self.cfg.min_rise:
            reason = (f'mean answer entropy of v{version} rose from {old:.3f} to {new:.3f} '
                      f'nats over {self.cfg.window} answers')
            self.last['verdict'] = 'rollback'
            return reason
        self.last['verdict'] = 'kept'
        return None
