"""Reference captions from the scene's ground truth, and the in / near / out-of-domain split."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cdcca_ros.core.captions.metrics import tokenize_caption
from cdcca_ros.errors import ConfigError
from cdcca_ros.sim import captions
from cdcca_ros.sim.domains import Domain, register_domain, unregister_domain
from cdcca_ros.sim.scene import Background, Scene, SceneObject
from cdcca_ros.sim.shifts import register_shift, unregister_shift
from cdcca_ros.sim.world import World

SCENE = Scene(objects=(
    SceneObject('square', 'red', 'big', (0, 0)),
    SceneObject('circle', 'blue', 'small', (1, 1)),
    SceneObject('triangle', 'green', 'big', (2, 2), texture='striped'),
))


def test_references_follow_the_ground_truth() -> None:
    refs = captions.reference_captions(SCENE, np.random.default_rng(0))
    assert len(refs) == captions.NUM_CAPTIONS == len(set(refs))
    assert refs[0] == ('a big red square, a small blue circle and a big striped green triangle '
                       'on a grey background')
    assert refs[1] == ('three shapes: a big red square at the top left, a small blue circle in '
                       'the center and a big striped green triangle at the bottom right')
    assert refs[3].startswith('three objects on a grey background: a red square, ')
    for ref in refs:
        words = set(tokenize_caption(ref))
        assert {'red', 'blue', 'green', 'square', 'triangle'} <= words, ref
        assert words & {'circle', 'disc'}, ref


def test_background_and_clutter_are_described() -> None:
    scene = dataclasses.replace(SCENE, background=Background(pattern='checker'))
    refs = captions.reference_captions(scene, np.random.default_rng(0))
    assert 'on a checkered background' in refs[0]
    world_sample = captions.caption_samples(World(0), 'clutter', 1)[0]
    assert world_sample.scene.clutter and 'with thin marks' in world_sample.references[0]


def test_references_are_deterministic_and_vary_with_the_seed() -> None:
    a = captions.caption_samples(World(3), 'source', 4, image_size=32)
    b = captions.caption_samples(World(3), 'source', 4, image_size=32)
    assert [s.references for s in a] == [s.references for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    c = captions.caption_samples(World(4), 'source', 4, image_size=32)
    assert [s.references for s in a] != [s.references for s in c]
    # the image is the world's VQA sample of the same index
    assert np.array_equal(a[2].image, World(3).sample('source', 2, 32).image)


def test_vocabulary_is_closed() -> None:
    vocab = set(captions.caption_vocabulary())
    world = World(0)
    for domain in ('source', 'fog', 'clutter', 'novel'):
        for sample in captions.caption_samples(world, domain, 25, image_size=16):
            for ref in sample.references:
                assert set(tokenize_caption(ref)) <= vocab, ref


def test_split_of_built_in_domains() -> None:
    world = World(0)
    assert {s.split for s in captions.caption_samples(world, 'source', 10, 16)} == {'in'}
    assert {s.split for s in captions.caption_samples(world, 'night', 10, 16)} == {'near'}
    novel = captions.caption_samples(world, 'novel', 20, 16)
    assert {s.split for s in novel} <= {'near', 'out'} and 'out' in {s.split for s in novel}
    # 'out' exactly when the scene shows a kind or colour the source never shows
    for s in novel:
        unseen = any(o.kind in ('star', 'cross') or o.color in ('white', 'black')
                     for o in s.scene.objects)
        assert (s.split == 'out') == unseen


def test_registered_domains_and_shifts_join_the_split() -> None:
    @register_shift('test_caption_tint', 'image')
    def tint(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
        return image

    try:
        register_domain(Domain('test_caption_tinted', (('test_caption_tint', 0.5),)))
        register_domain(Domain('test_caption_clean'))
        assert captions.caption_split('test_caption_tinted', SCENE) == 'near'
        assert captions.caption_split('test_caption_clean', SCENE) == 'in'
        starry = Scene(objects=(SceneObject('star', 'red'),))
        assert captions.caption_split('test_caption_clean', starry) == 'out'
    finally:
        unregister_domain('test_caption_tinted')
        unregister_domain('test_caption_clean')
        unregister_shift('test_caption_tint')


def test_bad_input() -> None:
    with pytest.raises(ConfigError):
        captions.reference_captions(Scene(objects=()), np.random.default_rng(0))
    with pytest.raises(ConfigError):
        captions.reference_captions(SCENE, np.random.default_rng(0), n=0)
    with pytest.raises(ConfigError):
        captions.caption_samples('not a world', 'source', 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        captions.caption_split('no_such_domain', SCENE)
