"""The update gate: a candidate adapter ships only if it helps and harms nothing (no rclpy).

Before a delta is signed, the cloud answers held-out samples twice -- with the adapter the
device holds and with the candidate *as the device would run it* (after DWC compression) --
and compares them sample by sample against each sample's reference answer (the teacher's
label; the anchor set's own label). The held-out samples are never trained on:

- ``new``: gate-split samples that arrived since the last shipped update (audit samples
  included), the data the round is meant to help with;
- ``replay/<c>``: older gate-split samples, one slice per cluster of the memory (small
  clusters pooled), what earlier updates learnt;
- ``anchor``: the anchor set's held-out part, what the student knew before any update;
- ``new/<c>`` (``new_clusters``): the ``new`` slice again, one per memory cluster with enough
  samples: harm slices only, so that a gain on the whole cannot hide a scene that falls (an
  update learnt on one shift breaking another that went up in the same stretch). The devices'
  audit stream (``uts.audit_fraction``, 20%) puts the scene's sure frames in it too: uplinked
  for uncertainty alone, a scene the student mostly gets right shows only its unsure frames,
  which an update may fix while it breaks the sure ones. Measured on a stream of shifts the
  defaults were never tuned on, this kept the device as it was (0.0 points) where judging the
  new data as a whole at 5% audit let a jpeg update take overexposed scenes from 91.3 to 83.3.

Each sample is answered as the device would answer a fresh frame like it
(``GuardConfig.routing``, :meth:`~cdcca_ros.core.rounds.round.RoundRunner.routed_correct`):
the device's coverage hands frames like the uplinked scenes to the adapter and anchor-like or
never-sent ones to the shipped student, whose answer is the same under both adapters. So the
anchor slice measures the frames near the source that the update does answer; a candidate is
neither refused nor shipped on a change the device never runs.

Rule (:meth:`GateConfig.decide`): ship when the gain slice improves by at least ``min_gain``
points and significantly (one-sided exact McNemar test at ``alpha`` on its discordant pairs),
and no other slice falls by more than its tolerance. The gain slice (``gain_on``) is ``new``
(default), what arrived since the last update, or ``device``, every held-out sample of the
device's own data (``new`` and every ``replay`` slice together): there the evidence builds up
over the rounds instead of starting over after every update, and ``new`` falls like a
replay slice. Measured on the continual bench (seed 0), ``device`` shipped no more often
than ``new`` -- the anchor budget refused most candidates either way -- so it stays an option.

The anchor falls when it loses more than ``anchor_tolerance`` points *and* more than
``anchor_min_broken`` net samples: its reference answers are the base student's own, so every
broken one is the original behaviour lost, and it is held strictly. A replay slice falls when it
loses more than ``tolerance`` points and ``min_broken`` samples *and* the loss is unlikely to be
noise (one-sided McNemar): its references are teacher labels, a few of them wrong, and
answers flip both ways between two adapters. One test of gain, on one slice, so no
multiple-comparison correction is needed for shipping. The harm tests are many (every replay
and ``new/<c>`` slice, 5-12 of them once the memory has its clusters), and at ``harm_alpha``
each a candidate that harms nothing is often refused by one of them by chance alone; with
``harm_correction='holm'`` (default) ``harm_alpha`` bounds the chance that *any* of them
refuses a harmless candidate (Holm's step-down over their p-values). A slice that falls
far and surely (6 broken, 0 fixed: p = 0.016) still refuses among up to 12 slices; a 5-point
fall on 10 broken against 5 fixed of 100 (p = 0.15), which flips between two equally good
adapters produce in one slice of several by chance, no longer does.

Slices are :class:`~cdcca_ros.core.rounds.stats.PairedCounts` (right / wrong against the
reference answer) or :class:`~cdcca_ros.core.rounds.stats.PairedScores` (a per-sample score,
e.g. a caption's CIDEr-D against the reference caption, compared with the sign test); points,
tolerances and the anchor budget are then in the score's points.

With ``guard.gate_questions`` the held-out frames carry the cloud's derived questions too
(:mod:`~cdcca_ros.core.rounds.extra_questions`) and every slice that holds some is a
:class:`~cdcca_ros.core.rounds.stats.PairedScores` over frames (a frame's share of right
answers; :func:`~cdcca_ros.core.rounds.round.paired`): the tests still count independent
frames, and each frame shows more of what an update changed.

Where the teacher is no better than the device on a shift, its labels either agree with what
the device already answers (no discordant pairs to gain from) or are unsure and dropped
(an empty ``new`` slice): both refuse, and the device stays as it is.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdcca_ros.core.rounds.stats import Paired
from cdcca_ros.errors import ConfigError

NEW, ANCHOR, REPLAY, DEVICE = 'new', 'anchor', 'replay', 'device'
GAIN_ON = ('new', 'device')
HARM_CORRECTIONS = ('holm', 'none')


@dataclass
class GateConfig:
    """When a candidate ships.

    Attributes:
        enabled: False ships every candidate (the ungated round of the paper).
        alpha: One-sided significance of the gain on the ``new`` slice.
        min_gain: Smallest gain (points) on the ``new`` slice worth an update.
        tolerance: Largest fall (points) of a replay slice.
        anchor_tolerance: Largest fall (points) of the anchor slice. 0 (with
            ``anchor_min_broken`` 0): any net loss of the base student's own answers refuses.
            Measured against 1.0 and 2: on the continual bench seed 0 went +19.1 -> +22.0
            (seeds 1 and 2 identical), but ``make demo`` then shipped a night update that
            took night 0.53 -> 0.48 on its 60 held-out samples: not the default.
        min_broken: A slice falls only when it also loses more than this many samples net.
        anchor_min_broken: The same for the anchor slice (its references are the base
            student's own answers, so a net loss there is the original behaviour lost).
        harm_alpha: A replay slice falls only when its loss is significant at this level
            (one-sided McNemar); 1 disables that condition.
        anchor_budget: The anchor also falls when the candidate answers it more than this
            many points worse than the base student did: the tolerance above applies per
            update, this one to all updates together, so small losses cannot pile up.
        min_slice: Replay clusters with fewer gate samples are pooled into one slice.
        max_new: The ``new`` slice holds at most this many of the newest samples.
        gain_on: The slice whose gain ships an update: ``'device'`` (all the device's
            held-out data) or ``'new'`` (what arrived since the last update).
        new_clusters: The new data is also judged per memory cluster (``new/<c>`` harm
            slices).
        harm_correction: ``'holm'``: ``harm_alpha`` holds for the harm tests of all replay
            and ``new/<c>`` slices together (Holm's step-down); ``'none'``: for each alone.
        big_fall: A slice that falls by more than this many points is tested at
            ``harm_alpha`` alone, outside the correction: the correction spares small
            falls that flips between equal adapters produce by chance, not large ones
            (0: every slice inside it).
    """

    enabled: bool = True
    alpha: float = 0.1
    min_gain: float = 1.0
    tolerance: float = 2.0
    anchor_tolerance: float = 1.0
    min_broken: int = 2
    anchor_min_broken: int = 2
    harm_alpha: float = 0.2
    anchor_budget: float = 3.0
    min_slice: int = 30
    max_new: int = 1000
    gain_on: str = 'new'
    new_clusters: bool = True
    harm_correction: str = 'holm'
    big_fall: float = 5.0

    def __post_init__(self) -> None:
        if self.gain_on not in GAIN_ON:
            raise ConfigError(f'gate gain_on must be one of {GAIN_ON}, got {self.gain_on!r}')
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f'gate alpha must be in (0, 1), got {self.alpha}')
        for name in ('min_gain', 'tolerance', 'anchor_tolerance', 'big_fall'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f'gate {name} must be finite and >= 0, got {value}')
        if self.harm_correction not in HARM_CORRECTIONS:
            raise ConfigError(f'gate harm_correction must be one of {HARM_CORRECTIONS}, '
                              f'got {self.harm_correction!r}')
        if not 0.0 < self.harm_alpha <= 1.0:
            raise ConfigError(f'gate harm_alpha must be in (0, 1], got {self.harm_alpha}')
        if (self.min_broken < 0 or self.anchor_min_broken < 0 or self.min_slice < 1
                or self.max_new < 1):
            raise ConfigError(f'gate min_broken={self.min_broken}, anchor_min_broken='
                              f'{self.anchor_min_broken}, min_slice={self.min_slice} '
                              f'and max_new={self.max_new} are out of range')

    def falls(self, name: str, counts: Paired, level: float | None = None) -> bool:
        """Whether slice ``name`` fell by more than it may; a replay slice's loss must also be
        significant at ``level`` (default ``harm_alpha``; :meth:`fallen` passes Holm's)."""
        anchor = name == ANCHOR
        tol = self.anchor_tolerance if anchor else self.tolerance
        net = counts.broken - counts.fixed
        fell = (counts.n > 0 and -counts.gain > tol
                and net > (self.anchor_min_broken if anchor else self.min_broken))
        if anchor or not fell:
            return fell
        return counts.p_worse() < (self.harm_alpha if level is None else level)

    def fallen(self, slices: Mapping[str, Paired], skip: tuple[str, ...] = ()) -> list[str]:
        """The slices (all but ``skip``) that fall: the anchor by its own rule, the others
        by size and a harm test, Holm-corrected over them unless ``harm_correction`` is
        ``'none'``."""
        names = [n for n in slices if n not in skip]
        harm = sorted((slices[n].p_worse(), n) for n in names if n != ANCHOR)
        level = {n: self.harm_alpha for _, n in harm}
        if self.harm_correction == 'holm':
            # Step-down: the i-th smallest p is tested at alpha / (m - i); once one is not
            # rejected, none after it is (their levels are those it failed at, or looser).
            rejecting = True
            for i, (p, n) in enumerate(harm):
                rejecting = rejecting and p < self.harm_alpha / (len(harm) - i)
                level[n] = self.harm_alpha / (len(harm) - i) if rejecting else 0.0
            if self.big_fall > 0:
                for _, n in harm:
                    if -slices[n].gain > self.big_fall:
                        level[n] = self.harm_alpha
        return [n for n in names if self.falls(n, slices[n], level.get(n))]

    def over_budget(self, anchor: Paired | None, anchor_base: float | None) -> str:
        """Why the anchor slice is beyond ``anchor_budget`` below the base student (its
        ``anchor_base``, in the slice's unit), or '' when it is not (or cannot be told)."""
        if anchor is None or not anchor.n or anchor_base is None:
            return ''
        lost = 100.0 * (anchor_base - anchor.new_accuracy)
        if lost > self.anchor_budget and anchor.new_accuracy <= anchor.old_accuracy:
            return (f'anchor would be {lost:.1f} points below the base student (budget '
                    f'{self.anchor_budget:g})')
        return ''

    def anchor_harm(self, anchor: Paired | None, anchor_base: float | None = None) -> str:
        """Why an anchor slice alone refuses a candidate (beyond the budget, or it falls), or
        '' when it does not: the anchor rule of :meth:`decide`, for a check that has no
        ``new`` slice of its own (a caption round's effect on the answers)."""
        over = self.over_budget(anchor, anchor_base)
        if over or anchor is None:
            return over
        return _fall(ANCHOR, anchor) if self.falls(ANCHOR, anchor) else ''

    def decide(self, slices: Mapping[str, Paired],
               anchor_base: float | None = None) -> GateDecision:
        """Ship or refuse, with the reason (see the module docstring).

        Args:
            slices: Paired counts (current adapter vs candidate) per slice.
            anchor_base: The base student's accuracy (or mean score) on the anchor slice,
                in the slices' unit (None: no cumulative check).
        """
        if not self.enabled:
            return GateDecision(True, 'gate disabled', dict(slices))
        new = slices.get(NEW)
        if new is None or new.n == 0:
            return GateDecision(False, 'no held-out sample of the new data yet', dict(slices))
        over = self.over_budget(slices.get(ANCHOR), anchor_base)
        if over:
            return GateDecision(False, over, dict(slices), harmful=True)
        gain_name = DEVICE if self.gain_on == 'device' else NEW
        gain = slices.get(gain_name, new)
        fallen = self.fallen(slices, skip=(gain_name, DEVICE))
        if fallen:
            worst = min(fallen, key=lambda name: slices[name].gain)
            return GateDecision(False, _fall(worst, slices[worst]), dict(slices), harmful=True)
        p = gain.p_better()
        what = 'new data' if gain_name == NEW else 'the device\'s data'
        if gain.gain < self.min_gain or p >= self.alpha:
            return GateDecision(False, f'{what} gains {gain.gain:+.1f} points on {gain.n} '
                                       f'held-out samples (p={p:.3f}; needs >= '
                                       f'{self.min_gain:g} and p < {self.alpha:g})',
                                dict(slices))
        return GateDecision(True, f'{what} {gain.gain:+.1f} points on {gain.n} held-out '
                                  f'samples (p={p:.3f}); no slice falls', dict(slices))


def _fall(name: str, counts: Paired) -> str:
    return (f'{name} falls by {-counts.gain:.1f} points ({counts.broken} broken, '
            f'{counts.fixed} fixed of {counts.n})')


@dataclass
class GateDecision:
    """The gate's verdict and its evidence."""

    ship: bool
    reason: str
    slices: dict[str, Paired] = field(default_factory=dict)
    harmful: bool = False   # refused because a slice falls (not for too little gain)

    def to_dict(self) -> dict[str, Any]:
        return {'ship': self.ship, 'reason': self.reason, 'harmful': self.harmful,
                'slices': {k: v.to_dict() for k, v in self.slices.items()}}
