"""Which due device's round a free worker runs next: weighted fair queuing (no rclpy).

Start-time fair queuing (SFQ, Goyal et al. 1996) over devices: each device has a virtual
start tag; the due device with the smallest tag is served; serving it moves its tag on by
``1 / weight``. A device that becomes due starts at the virtual time of the round last
served (it cannot claim service for the time it had nothing to do), so no device starves
and, while several are due, each gets rounds in proportion to its weight.

The weight says how much a device's round is worth, within ``[floor, 1]``:

- the **estimated gain**: the share of its new samples on which its student did not answer
  the teacher's label before the round (what a round can still fix; an exponential average
  over its rounds, 1 until measured);
- **refusals**: every round the gate refused in a row halves the rest (a device whose
  candidates keep being refused does not hog workers);

so a due device never gets less than ``floor`` of an equal share (``fairness`` of the fleet
bench is at most ``1 / floor`` while more rounds are due than workers are free). Devices of
one uplink group (see :mod:`~cdcca_ros.core.fleet.grouping`) that are due ride along in the
same task, up to ``group_max`` devices, when they are at most one virtual round behind the
device served *and* have had no more rounds than it: a rider is served ahead of its turn,
and letting devices that are already ahead ride made the devices that uplink fastest (due
most often, so riding most often) pull away from the others (in a closed-loop simulation of
64 devices on 2 workers, max/min rounds per device 1.44 with any rider, 1.18 with this rule;
see ``test/core/fleet/test_scheduler.py``). Riders never leave a worker idle: a task takes
at most its fair part of the due devices over the free workers (:func:`task_size`).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cdcca_ros.errors import ConfigError


def task_size(due: int, free_workers: int, group_max: int) -> int:
    """How many due devices one task may serve: up to ``group_max`` riders share a task (and
    its teacher batch), but never so many that a free worker is left without a device while
    ``due`` devices wait (each free worker gets ``ceil(due / free_workers)`` at most)."""
    if group_max < 1:
        raise ConfigError(f'group_max must be >= 1, got {group_max}')
    if due <= 0 or free_workers <= 0:
        return 1
    return max(1, min(group_max, math.ceil(due / free_workers)))


@dataclass
class Share:
    """One device's place in the queue."""

    device_id: str
    start: float = 0.0        # virtual start tag of its next round
    queued: bool = False      # due and waiting (its start tag is set)
    served: int = 0
    refused_in_row: int = 0
    gain: float = 1.0         # estimated share of new samples a round can still fix


class FairScheduler:
    """Picks the next device (and its group) for a free worker.

    Args:
        floor: Smallest weight (share of an equal share) of a due device, in ``(0, 1]``.
        gain_alpha: Weight of the newest round in the gain estimate.
    """

    def __init__(self, floor: float = 0.75, gain_alpha: float = 0.5) -> None:
        if not 0.0 < floor <= 1.0 or not 0.0 < gain_alpha <= 1.0:
            raise ConfigError(f'fairness floor={floor} and gain_alpha={gain_alpha} must be in '
                              '(0, 1]')
        self.floor, self.gain_alpha = float(floor), float(gain_alpha)
        self.vtime = 0.0
        self.shares: dict[str, Share] = {}

    def share(self, device_id: str) -> Share:
        share = self.shares.get(device_id)
        if share is None:
            share = self.shares[device_id] = Share(device_id, start=self.vtime)
        return share

    def weight(self, device_id: str) -> float:
        """The device's weight in ``[floor, 1]``."""
        s = self.share(device_id)
        value = min(1.0, max(0.0, s.gain)) * 0.5 ** s.refused_in_row
        return self.floor + (1.0 - self.floor) * value

    def pick(self, due: Collection[str], groups: Mapping[str, str] | None = None,
             group_max: int = 1) -> list[str]:
        """The devices of the next task: the due device with the smallest start tag, and up
        to ``group_max - 1`` due devices of its group at most one virtual round behind it that
        have had no more rounds than it. Empty when nothing is due. Marks them served."""
        if not due:
            return []
        for device_id in due:
            s = self.share(device_id)
            if not s.queued:  # became due now: it starts at the current virtual time
                s.start, s.queued = max(s.start, self.vtime), True
        order = sorted(due, key=lambda d: (self.shares[d].start, self.shares[d].served, d))
        head = order[0]
        task = [head]
        if groups is not None and group_max > 1:
            mine, lead = groups.get(head), self.shares[head]
            for other in order[1:]:
                if len(task) >= group_max:
                    break
                s = self.shares[other]
                if (groups.get(other) == mine and s.start <= lead.start + 1.0
                        and s.served <= lead.served):
                    task.append(other)
        self.vtime = max(self.vtime, self.shares[head].start)
        for device_id in task:
            s = self.shares[device_id]
            s.start += 1.0 / self.weight(device_id)
            s.served += 1
            s.queued = False
        return task

    def finished(self, device_id: str, outcome: str, agreement_before: float | None) -> None:
        """What a device's round did: ``outcome`` ``shipped``, ``refused`` or ``nothing``;
        ``agreement_before`` the share of its new samples the student answered as the teacher
        labelled them before the round (NaN/None: no new sample)."""
        s = self.share(device_id)
        if outcome == 'refused':
            s.refused_in_row += 1
        elif outcome == 'shipped':
            s.refused_in_row = 0
        if agreement_before is not None and math.isfinite(agreement_before):
            room = 1.0 - float(agreement_before)
            s.gain = (1.0 - self.gain_alpha) * s.gain + self.gain_alpha * room

    def forget(self, device_ids: Sequence[str]) -> None:
        for device_id in device_ids:
            self.shares.pop(device_id, None)

    def summary(self) -> dict[str, Any]:
        served = [s.served for s in self.shares.values()]
        return {'devices': len(self.shares), 'vtime': round(self.vtime, 3),
                'served_min': min(served) if served else 0,
                'served_max': max(served) if served else 0,
                'weights': {d: round(self.weight(d), 3) for d in sorted(self.shares)}}
