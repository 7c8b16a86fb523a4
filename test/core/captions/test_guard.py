"""Guarding caption updates: the gate on per-sample CIDEr-D and coverage routing (real scorer,
tiny real models)."""
from __future__ import annotations

import numpy as np
import pytest

from cdcca_ros.core.captions.guard import (
    RoutedCaptioner,
    caption_gate_config,
    caption_scores,
    caption_slice,
)
from cdcca_ros.core.coverage import Coverage, CoverageConfig
from cdcca_ros.core.rounds.gate import ANCHOR, NEW
from cdcca_ros.core.rounds.memory import token_feature
from cdcca_ros.errors import ConfigError

COLOURS = ('red', 'blue', 'green', 'yellow', 'purple', 'orange')
KINDS = ('cube', 'ball', 'cone', 'ring')


def _scene(i: int) -> str:
    return (f'a {COLOURS[i % 6]} {KINDS[i % 4]} left of a {COLOURS[(i + 1) % 6]} '
            f'{KINDS[(i + 2) % 4]}')


def _foggy(i: int) -> str:
    return f'a small {COLOURS[i % 6]} {KINDS[(i + 1) % 4]} in fog'


# Teacher captions of 24 held-out drifted frames; the held adapter gets them mostly wrong.
TEACHER = [_foggy(i) for i in range(24)]
HELD_NEW = [f'a {KINDS[i % 4]} on a table' for i in range(24)]
# The anchors' references are the shipped student's own captions.
BASE_ANCHOR = [_scene(i) for i in range(24)]


def _slices(new: list[str], anchor: list[str]) -> dict:
    return {NEW: caption_slice(HELD_NEW, new, [[t] for t in TEACHER]),
            ANCHOR: caption_slice(BASE_ANCHOR, anchor, [[b] for b in BASE_ANCHOR])}


def _anchor_base() -> float:
    return float(caption_scores(BASE_ANCHOR, [[b] for b in BASE_ANCHOR]).mean())


def test_the_gate_accepts_a_caption_candidate_that_helps() -> None:
    helps = TEACHER[:20] + HELD_NEW[20:]
    d = caption_gate_config().decide(_slices(helps, BASE_ANCHOR), anchor_base=_anchor_base())
    assert d.ship, d.reason
    assert d.slices[NEW].gain > 100 and d.slices[NEW].fixed == 20
    assert d.slices[ANCHOR].gain == 0 and d.slices[ANCHOR].broken == 0


def test_the_gate_refuses_a_caption_candidate_that_ruins_anchors() -> None:
    ruins = ['a thing' for _ in BASE_ANCHOR]   # forgets what the source looked like
    d = caption_gate_config().decide(_slices(TEACHER, ruins), anchor_base=_anchor_base())
    assert not d.ship and d.harmful
    assert d.slices[ANCHOR].broken == len(BASE_ANCHOR)


def test_the_gate_refuses_a_small_anchor_loss_beyond_the_caption_tolerance() -> None:
    # Four anchors of 24 lose their colour word: the new data gains, the anchor pays for it.
    anchor = [b.replace('a ', 'an ', 1) if i < 4 else b for i, b in enumerate(BASE_ANCHOR)]
    anchor = [a.replace(COLOURS[i % 6], 'odd', 1) if i < 4 else a
              for i, a in enumerate(anchor)]
    d = caption_gate_config().decide(_slices(TEACHER, anchor), anchor_base=_anchor_base())
    assert d.slices[ANCHOR].gain < -20 and not d.ship
    # The same loss on one anchor only is within the tolerance.
    one = [anchor[0]] + BASE_ANCHOR[1:]
    assert caption_gate_config().decide(_slices(TEACHER, one),
                                        anchor_base=_anchor_base()).ship


def test_caption_scores_are_the_per_image_cider_d() -> None:
    s = caption_scores(['a red cube', 'a blue ball'], [['a red cube'], ['a green cone']])
    assert s[0] > s[1] >= 0.0
    with pytest.raises(ConfigError):
        caption_scores(['a'], [])


@pytest.fixture(scope='module')
def captioners():
    """Two captioners on one tiny student model with different random heads (the base and
    the adapted one), and the images of two kinds of frames."""
    from cdcca_ros.bench.common import build_tiny_pair
    from cdcca_ros.models.caption_head import Captioner, CaptionHeadConfig, build_head

    _, student = build_tiny_pair(0)
    rng = np.random.default_rng(0)
    bright = [rng.integers(120, 256, (64, 64, 3), dtype=np.uint8) for _ in range(24)]
    dark = [rng.integers(0, 40, (64, 64, 3), dtype=np.uint8) for _ in range(24)]
    tokens = student.vision_tokens(bright + dark)
    query_dim = student.query_features(tokens[:1]).shape[2]
    cfg = CaptionHeadConfig(words=tuple(f'w{i}' for i in range(12)),
                            token_dim=tokens.shape[2], query_dim=query_dim, hidden=32,
                            layers=1, max_length=6)
    heads = [build_head(CaptionHeadConfig(**{**cfg.__dict__, 'seed': s})) for s in (1, 7)]
    return Captioner(student, heads[0]), Captioner(student, heads[1]), tokens


def test_routing_sends_anchor_like_frames_to_the_base_captioner(captioners) -> None:
    base, adapted, tokens = captioners
    bright, dark = tokens[:24], tokens[24:]
    cov = Coverage(CoverageConfig(min_features=4),
                   np.stack([token_feature(t) for t in bright[:20]]))
    for t in dark[:20]:
        cov.note(token_feature(t))
    cov.snapshot()
    routed = RoutedCaptioner(adapted, base, cov)
    test = tokens[[20, 21, 44, 45]]           # two unseen bright, two unseen dark frames
    assert routed.routes(test).tolist() == [False, False, True, True]
    got = [r.text for r in routed.caption_from_tokens(test)]
    by_base = [r.text for r in base.caption_from_tokens(test)]
    by_adapted = [r.text for r in adapted.caption_from_tokens(test)]
    assert by_base != by_adapted  # the two heads say different things: the test can tell
    assert got == by_base[:2] + by_adapted[2:]
    # Without coverage every frame gets the update.
    assert [r.text for r in RoutedCaptioner(adapted, base, None).caption_from_tokens(test)] \
        == by_adapted
