"""Shift registry: every shift changes its input and keeps shape/dtype; plug-ins work."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim import shifts
from cdcca_ros.sim.domains import Domain, register_domain, unregister_domain
from cdcca_ros.sim.questions import ask
from cdcca_ros.sim.render import render
from cdcca_ros.sim.scene import (
    BASE_COLORS,
    BASE_KINDS,
    NOVEL_COLORS,
    NOVEL_KINDS,
    Scene,
    SceneObject,
)
from cdcca_ros.sim.world import World

SCENE = Scene((SceneObject('circle', 'red', cell=(0, 0)),
               SceneObject('square', 'blue', 'small', cell=(1, 2)),
               SceneObject('triangle', 'green', cell=(2, 1))))


@pytest.mark.parametrize('name', shifts.shift_names('image'))
@pytest.mark.parametrize('size', [64, (640, 480)])
def test_image_shift_changes_image_keeps_shape(name: str, size: int | tuple[int, int]) -> None:
    image = render(SCENE, size)
    before = image.copy()
    out = shifts.apply_image_shift(name, image, 0.7, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out != image).any(), name
    assert np.array_equal(image, before), f'{name} modified its input in place'
    same = shifts.apply_image_shift(name, image, 0.7, np.random.default_rng(0))
    assert np.array_equal(out, same), f'{name} is not deterministic for a seed'
    assert shifts.apply_image_shift(name, image, 0.0, np.random.default_rng(0)) is image


@pytest.mark.parametrize('name', shifts.shift_names('scene'))
def test_scene_shift_changes_scene_and_image(name: str) -> None:
    out = shifts.apply_scene_shift(name, SCENE, 1.0, np.random.default_rng(3))
    assert isinstance(out, Scene) and out != SCENE
    assert (render(out, 64) != render(SCENE, 64)).any()
    assert len(out.objects) >= len(SCENE.objects)


def test_extra_objects_and_novel_concepts_reach_questions() -> None:
    full = Scene(tuple(SceneObject(k, c, cell=(0, i)) if i < 3 else
                       SceneObject(k, c, cell=(1, 0))
                       for i, (k, c) in enumerate(zip(BASE_KINDS, BASE_COLORS))))
    counts = set()
    for seed in range(20):
        out = shifts.apply_scene_shift('extra_objects', full, 1.0, np.random.default_rng(seed))
        counts.add(len(out.objects))
        assert {o.kind for o in out.objects[4:]} <= set(NOVEL_KINDS)
        assert {o.color for o in out.objects[4:]} <= set(NOVEL_COLORS)
        assert ask(out, np.random.default_rng(seed), 'count').answer == str(len(out.objects))
    assert counts == {4, 5, 6}
    recoloured = shifts.apply_scene_shift('novel_colors', full, 1.0, np.random.default_rng(0))
    assert sorted(o.color for o in recoloured.objects if o.color in NOVEL_COLORS) == \
        sorted(NOVEL_COLORS)


def test_strength_is_monotone_for_fog_and_dark() -> None:
    image = render(SCENE, 64).astype(float)
    for name in ('fog', 'dark'):
        diffs = [np.abs(shifts.apply_image_shift(name, image.astype(np.uint8), s,
                                                 np.random.default_rng(0)) - image).mean()
                 for s in (0.2, 0.5, 0.9)]
        assert diffs[0] < diffs[1] < diffs[2], (name, diffs)


@pytest.mark.parametrize('call, match', [
    (lambda: shifts.get_shift('nope'), 'nope'),
    (lambda: shifts.apply_image_shift('fog', render(SCENE, 32), 1.5,
                                      np.random.default_rng(0)), '1.5'),
    (lambda: shifts.apply_image_shift('distractors', render(SCENE, 32), 0.5,
                                      np.random.default_rng(0)), 'not an image shift'),
    (lambda: shifts.apply_scene_shift('fog', SCENE, 0.5, np.random.default_rng(0)),
     'not a scene shift'),
    (lambda: shifts.register_shift('fog')(lambda i, s, r: i), 'already registered'),
    (lambda: shifts.register_shift('x', stage='audio'), 'stage'),  # type: ignore[arg-type]
])
def test_registry_errors(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.fixture
def plugin() -> Iterator[str]:
    """A shift and a domain registered by the test only, removed afterwards."""

    @shifts.register_shift('test_invert', 'image')
    def invert(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
        """Invert the image (a plug-in no module knows about)."""
        return 255 - image

    @shifts.register_shift('test_all_square', 'scene')
    def all_square(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
        """Keep only one object and make it a square."""
        return dataclasses.replace(scene, objects=(dataclasses.replace(
            scene.objects[0], kind='square'),))

    register_domain(Domain('test_plugin', (('test_all_square', 1.0), ('test_invert', 1.0))))
    yield 'test_plugin'
    unregister_domain('test_plugin')
    shifts.unregister_shift('test_invert')
    shifts.unregister_shift('test_all_square')


def test_plugin_shift_used_by_a_domain(plugin: str) -> None:
    assert shifts.get_shift('test_invert').description.startswith('Invert')
    samples = World(5).samples(plugin, 10)
    for s in samples:
        assert [o.kind for o in s.scene.objects] == ['square']
        assert np.array_equal(255 - s.image, render(s.scene, 64))
    counts = [s.answer for s in samples if s.qtype == 'count']
    assert counts and set(counts) == {'1'}


def test_bad_shift_output_is_rejected() -> None:
    @shifts.register_shift('test_bad', 'image')
    def bad(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
        return image.astype(np.float32)

    try:
        with pytest.raises(ConfigError, match='test_bad'):
            shifts.apply_image_shift('test_bad', render(SCENE, 32), 0.5,
                                     np.random.default_rng(0))
    finally:
        shifts.unregister_shift('test_bad')
