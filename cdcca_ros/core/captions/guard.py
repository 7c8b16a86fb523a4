"""Updates that never make a captioner worse: coverage routing and the gate on a caption metric.

The VQA path guards its updates twice (DESIGN.md, "Updates that never make a robot worse");
captions reuse both parts rather than a second copy of them:

* routing (:class:`RoutedCaptioner`): the device captions a frame with the update only where
  :class:`~cdcca_ros.core.coverage.Coverage` says the update was trained (its nearest
  neighbour in token-statistics space is an uplinked sample, within the calibrated radius),
  and with the shipped captioner elsewhere -- in particular on anchor-like (source-like)
  frames, where the shipped captioner is known to be right;
* the gate (:class:`~cdcca_ros.core.rounds.gate.GateConfig`): the cloud captions held-out
  samples with the adapter the device holds and with the candidate as the device would run
  it, scores every caption against its reference (:func:`caption_scores`: per-sample CIDEr-D,
  x100 = CIDEr points) and compares them pairwise (:func:`caption_slice`, a
  :class:`~cdcca_ros.core.rounds.stats.PairedScores` with the sign test). References: the
  teacher's captions for the device's own samples (``new``, ``replay``), the shipped
  student's own captions for the anchor set (what it must keep saying). The anchor is best
  captioned as the device would caption it (a :class:`RoutedCaptioner` with the coverage the
  candidate would bring): against its own words the unrouted adapter loses ~40% of the
  anchor's CIDEr-D on the bundled pair (wording moves even where content does not), while
  routed, the frames nearest an anchor keep the shipped captions and only those nearest a
  sent sample are judged.

No rclpy; models are reached through :class:`~cdcca_ros.models.caption_head.Captioner`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cdcca_ros.core.captions.metrics import cider_d
from cdcca_ros.core.rounds.gate import GateConfig
from cdcca_ros.core.rounds.memory import token_feature
from cdcca_ros.core.rounds.stats import PairedScores
from cdcca_ros.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.coverage import Coverage
    from cdcca_ros.models.base import MLLM, AnswerResult
    from cdcca_ros.models.caption_head import Captioner


def caption_gate_config(**overrides: float | int | bool | str) -> GateConfig:
    """The gate's rule for captions, in CIDEr points (per-sample CIDEr-D x100, 0 .. 1000).

    Against one reference caption a sample scores up to 1000 points and a changed word costs
    tens, so the VQA defaults (1 - 3 points of accuracy) would refuse any change at all:
    ``new`` must gain 5 points (p < 0.1, sign test), a replay slice may lose 20, the anchor
    (the shipped student's own captions, held strictly) 20 per update and 30 over all
    updates together. Keyword arguments override single fields.
    """
    base: dict[str, float | int | bool | str] = {
        'min_gain': 5.0, 'tolerance': 20.0, 'anchor_tolerance': 20.0, 'anchor_min_broken': 2,
        'anchor_budget': 30.0}
    base.update(overrides)
    return GateConfig(**base)  # type: ignore[arg-type]


def caption_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """Per-sample CIDEr-D (COCO scale, 0 .. 10) of ``captions[i]`` against ``references[i]``;
    document frequencies from these references (score a slice in one call)."""
    if len(captions) != len(references):
        raise ConfigError(f'caption_scores: {len(captions)} captions for {len(references)} '
                          f'reference sets')
    if not captions:
        return np.zeros(0, dtype=np.float64)
    result = cider_d({i: list(r) for i, r in enumerate(references)},
                     {i: c for i, c in enumerate(captions)})
    return np.asarray(result.per_image, dtype=np.float64)


def caption_slice(old: Sequence[str], new: Sequence[str],
                  references: Sequence[Sequence[str]]) -> PairedScores:
    """The gate's evidence on one slice: the held adapter's and the candidate's captions of
    the same samples, each scored against the samples' references (:func:`caption_scores`)."""
    if len(old) != len(new):
        raise ConfigError(f'caption_slice: {len(old)} old and {len(new)} new captions')
    return PairedScores.of(caption_scores(old, references), caption_scores(new, references))


class RoutedCaptioner:
    """A captioner that answers each frame with the update or the shipped captioner, as the
    coverage decides (module docstring).

    Args:
        adapted: The captioner holding the update (changes as updates are applied).
        base: The shipped captioner (never updated).
        coverage: What the applied update covers; None: every frame goes to ``adapted``.
    """

    def __init__(self, adapted: Captioner, base: Captioner, coverage: Coverage | None
                 ) -> None:
        self.adapted, self.base, self.coverage = adapted, base, coverage

    @property
    def model(self) -> MLLM:
        """The adapted captioner's model (its vision encoder encodes frames)."""
        return self.adapted.model

    def routes(self, tokens: Tensor) -> np.ndarray:
        """Per frame of ``[B, N, D]`` tokens: True where the update captions it."""
        if self.coverage is None:
            return np.ones(tokens.shape[0], dtype=bool)
        features = np.stack([token_feature(t) for t in tokens])
        return self.coverage.covers_all(features)

    def caption_from_tokens(self, tokens: Tensor, indices: Tensor | None = None,
                            max_length: int | None = None) -> list[AnswerResult]:
        """:meth:`Captioner.caption_from_tokens`, each row by the captioner it routes to."""
        mask = self.routes(tokens)
        out: list[AnswerResult | None] = [None] * tokens.shape[0]
        for which, captioner in ((True, self.adapted), (False, self.base)):
            rows = np.flatnonzero(mask == which)
            if not rows.size:
                continue
            pick = rows.tolist()
            results = captioner.caption_from_tokens(
                tokens[pick], None if indices is None else indices[pick], max_length)
            for r, res in zip(pick, results):
                out[r] = res
        return [r for r in out if r is not None]


__all__ = ['caption_gate_config', 'caption_scores', 'caption_slice', 'RoutedCaptioner']
