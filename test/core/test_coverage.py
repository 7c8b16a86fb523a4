"""Coverage: the update answers where it was trained, the shipped model elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.core.coverage import Coverage, CoverageConfig
from cdcca_ros.errors import ConfigError


def blob(center: float, n: int, seed: int, dim: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(center, 1.0, (n, dim)).astype(np.float32)


@pytest.mark.parametrize('anchor_base', [False, True])
def test_frames_like_the_uplinked_ones_are_covered_and_others_are_not(anchor_base):
    cov = Coverage(CoverageConfig(min_features=8, anchor_answers_base=anchor_base),
                   anchors=blob(0.0, 60, 0))
    assert cov.covers(blob(40.0, 1, 1)[0])  # nothing frozen yet: everything answers
    for f in blob(10.0, 60, 2):
        cov.note(f)
    cov.snapshot()
    # The anchor's scenes: the shipped model answers them where anchors mark its ground.
    assert [cov.covers(f) for f in blob(0.0, 30, 3)] == [not anchor_base] * 30
    assert all(cov.covers(f) for f in blob(10.0, 30, 4))    # the uplinked scenes
    assert not any(cov.covers(f) for f in blob(40.0, 30, 5))  # a scene never sent
    # the first check, before any update, counts
    assert cov.uncovered == 30 + 30 * anchor_base and cov.checked == 91
    # Once that scene has gone up and an update comes, it is covered too.
    for f in blob(40.0, 60, 6):
        cov.note(f)
    cov.snapshot()
    assert all(cov.covers(f) for f in blob(40.0, 30, 7))


def test_a_shift_near_the_anchor_waits_for_its_own_samples():
    """A shift that barely moves the token statistics (a blob overlapping the anchor's) is
    answered by the shipped model after an update learnt elsewhere, and by the update once its
    own samples went up: each frame follows its nearest neighbour."""
    cov = Coverage(CoverageConfig(min_features=8), anchors=blob(0.0, 200, 0))
    for f in blob(10.0, 60, 1):      # fog went up: the first update is fog's
        cov.note(f)
    cov.snapshot()
    near = blob(1.0, 100, 2)         # clutter: close to the source scenes
    assert sum(cov.covers(f) for f in near) <= 10
    for f in blob(1.0, 200, 3):      # clutter's own samples go up; the next update has them
        cov.note(f)
    cov.snapshot()
    assert sum(cov.covers(f) for f in near) >= 50
    assert sum(cov.covers(f) for f in blob(-1.0, 100, 4)) <= 30  # the far side of the source


def test_too_little_to_tell_covers_everything():
    cov = Coverage(CoverageConfig(min_features=50))
    for f in blob(0.0, 10, 0):
        cov.note(f)
    cov.snapshot()
    assert cov.covers(blob(99.0, 1, 1)[0])
    with pytest.raises(ConfigError):
        CoverageConfig(quantile=0.0)


def test_the_device_answers_uncovered_frames_with_the_shipped_model():
    from cdcca_ros.core import dwc
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.updates import seal_delta
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.models import bundled
    from cdcca_ros.sim.world import World

    private, public = generate_keypair()
    world = World(0)
    fog = world.samples('fog', 40, 48, start=1_900_000)
    night = world.samples('night', 10, 48, start=1_900_000)
    student = bundled.load('bundled:student')
    with torch.no_grad():
        anchor = student.vision_tokens([s.image for s in world.samples('source', 40, 48)])
    device = DeviceRuntime(bundled.load('bundled:student'), 'robot1', public,
                           coverage=CoverageConfig(min_features=16), anchor_tokens=anchor)
    for s in fog[:30]:
        device.note_uplinked(device.answer(s.image, s.question).tokens)
    base = {k: v.clone() for k, v in device.model.trainable_state_dict().items()}
    g = torch.Generator().manual_seed(0)
    trained = {k: v + torch.randn(v.shape, generator=g) * 0.3 for k, v in base.items()}
    delta = dwc.compute_delta(trained, base)
    payload = dwc.compress(delta, dwc.get_codec('fp16'), self_describing=False)
    view = dwc.apply_delta(base, payload.decoded)
    from cdcca_ros.core import wire

    device.apply(seal_delta(private, device_id='robot1', round=1, base_version=0,
                            base_hash=device.base_hash, new_version=1,
                            new_hash=wire.state_dict_hash(view), codec='fp16',
                            payload=payload.payload))
    student.load_trainable_state_dict(view)
    shipped = bundled.load('bundled:student')
    frames = fog[30:] + night
    answers = [device.answer(s.image, s.question) for s in frames]
    adapted = [r.text for r in student.answer([s.image for s in frames],
                                               [s.question for s in frames])]
    base_texts = [r.text for r in shipped.answer([s.image for s in frames],
                                                 [s.question for s in frames])]
    # Fog (uplinked) answers with the update; most of night (never sent) with the shipped
    # model; and each answer is exactly what the model it names answers.
    assert all(a.adapted for a in answers[:10])
    assert sum(not a.adapted for a in answers[10:]) >= 8
    for a, new, old in zip(answers, adapted, base_texts):
        assert a.text == (new if a.adapted else old)
    assert adapted != base_texts  # the update does change answers
    assert device.status()['base_answers'] == sum(not a.adapted for a in answers)


def test_the_device_node_parameters_build_the_coverage():
    from cdcca_ros.nodes.tables import defaults

    params = defaults('device_node')
    assert CoverageConfig.from_params(params) == CoverageConfig(margin=1.25)
    off = CoverageConfig.from_params({**params, 'guard.coverage_anchor_base': False})
    assert off is not None and not off.anchor_answers_base
    assert CoverageConfig.from_params({**params, 'guard.coverage': False}) is None


def test_a_frame_is_not_its_own_neighbour_when_excluded():
    """The cloud's gate tests a recorded sample as a fresh frame like it: a lone sample far
    from the rest covers itself only, one inside a blob is covered by its neighbours."""
    cov = Coverage(CoverageConfig(min_features=8, anchor_answers_base=False))
    dense, lone = blob(10.0, 60, 0), blob(60.0, 1, 1)
    for f in np.concatenate([dense, lone]):
        cov.note(f)
    cov.snapshot()
    assert cov.covers_all(lone).all()
    assert not cov.covers_all(lone, exclude_self=True).any()
    assert cov.covers_all(dense, exclude_self=True).mean() > 0.9
