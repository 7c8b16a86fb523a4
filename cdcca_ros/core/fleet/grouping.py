"""Devices whose uplinks stack alike, served together to share teacher batches (no rclpy).

The teacher can run many samples in one forward only when their tokens stack: the same
number of kept tokens in the same layout (all tokens in order, or a subset with indices).
That is a statistic of each device's uplink: a device whose UTS keeps a fixed share sends one
count; a variance threshold (``uts.stage2_mode:=threshold``) sends counts that vary; audit
samples send every token. :class:`UplinkGroups` keeps, per device, the kept-token counts of
its recent uplinks (audit samples aside) and names its group: ``k<count>`` when at least
``share`` of them have one count, ``mixed`` otherwise. The scheduler puts due devices of one
group in one task, and the worker sends their labelling (and AKD targets) to the teacher
together, where the service merges the stackable parts (:mod:`~cdcca_ros.core.fleet.teacher`).

What it saves is measured by the fleet bench (teacher forwards and teacher time per labelled
sample, grouped against one device per task).
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Any

from cdcca_ros.errors import ConfigError

MIXED = 'mixed'
UNKNOWN = 'new'


class UplinkGroups:
    """Per-device uplink signatures and the groups they make.

    Args:
        window: Recent uplinks a signature is made of.
        share: Share of them one kept-token count must have to name the group.
    """

    def __init__(self, window: int = 64, share: float = 0.8) -> None:
        if window < 1 or not 0.0 < share <= 1.0:
            raise ConfigError(f'grouping window={window} must be >= 1 and share={share} in '
                              '(0, 1]')
        self.window, self.share = int(window), float(share)
        self._counts: dict[str, deque[int]] = {}

    def observe(self, device_id: str, kept: int, full: bool) -> None:
        """One uplinked sample: ``kept`` tokens; ``full`` when it carries every token (an
        audit sample: not part of the signature)."""
        if full:
            self._counts.setdefault(device_id, deque(maxlen=self.window))
            return
        self._counts.setdefault(device_id, deque(maxlen=self.window)).append(int(kept))

    def group(self, device_id: str) -> str:
        """``k<count>``, ``mixed``, or ``new`` before its first partial uplink."""
        counts = self._counts.get(device_id)
        if not counts:
            return UNKNOWN
        value, n = Counter(counts).most_common(1)[0]
        return f'k{value}' if n >= self.share * len(counts) else MIXED

    def groups(self) -> dict[str, str]:
        return {d: self.group(d) for d in self._counts}

    def summary(self) -> dict[str, Any]:
        sizes = Counter(self.groups().values())
        return {'groups': dict(sorted(sizes.items())), 'devices': sum(sizes.values())}
