"""Rendering: shapes land where the scene says, sizes are honoured, speed is adequate."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.render import UNIT_SHAPES, render
from cdcca_ros.sim.scene import COLORS, KINDS, Background, Scene, SceneObject


def _scene(kind: str = 'square', color: str = 'red', cell: tuple[int, int] = (1, 1)) -> Scene:
    return Scene((SceneObject(kind, color, cell=cell),),
                 Background(color=(128, 128, 128), pattern_color=(128, 128, 128)))


@pytest.mark.parametrize('size, shape', [
    (64, (64, 64, 3)), ((640, 480), (480, 640, 3)), ((32, 48), (48, 32, 3)),
])
def test_render_shape_and_dtype(size: int | tuple[int, int], shape: tuple[int, ...]) -> None:
    img = render(_scene(), size)
    assert img.shape == shape and img.dtype == np.uint8


@pytest.mark.parametrize('size', [0, (4, 4), (64, -1), 'big'])
def test_render_rejects_bad_size(size: object) -> None:
    with pytest.raises(ConfigError):
        render(_scene(), size)  # type: ignore[arg-type]


@pytest.mark.parametrize('cell', [(0, 0), (1, 2), (2, 1)])
def test_object_is_drawn_in_its_cell(cell: tuple[int, int]) -> None:
    img = render(_scene('circle', 'blue', cell), 63)
    mask = np.all(img == COLORS['blue'], axis=-1)
    ys, xs = np.nonzero(mask)
    assert mask.sum() > 50
    assert (int(ys.mean()) // 21, int(xs.mean()) // 21) == cell


def test_every_kind_has_an_outline_and_draws() -> None:
    assert set(UNIT_SHAPES) == set(KINDS)
    areas = {k: int(np.all(render(_scene(k), 64) == COLORS['red'], -1).sum()) for k in KINDS}
    assert min(areas.values()) > 40, areas
    # Kinds must differ in outline, not only in area: compare binary masks pairwise.
    masks = {k: np.any(render(_scene(k), 64) != 128, -1) for k in KINDS}
    for a in KINDS:
        for b in KINDS:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 15, (a, b)


def test_large_frame_resized_matches_small_render() -> None:
    # Normalised coordinates: a 640x480 frame resized like a model would equals the 64x64 one.
    scene = Scene((SceneObject('triangle', 'green', cell=(0, 2)),
                   SceneObject('circle', 'yellow', 'small', cell=(2, 0))))
    big = cv2.resize(render(scene, (640, 480)), (64, 64), interpolation=cv2.INTER_AREA)
    small = render(scene, 64)
    assert np.abs(big.astype(int) - small.astype(int)).mean() < 3.0


def test_textured_object_differs_from_solid() -> None:
    solid = render(Scene((SceneObject('square', 'red'),)), 64)
    for texture in ('striped', 'dotted'):
        textured = render(Scene((SceneObject('square', 'red', texture=texture),)), 64)
        assert (solid != textured).any(axis=-1).sum() > 30


def test_render_is_fast_at_64() -> None:
    scene = Scene(tuple(SceneObject(k, c, cell=(i // 3, i % 3))
                        for i, (k, c) in enumerate(zip(KINDS, COLORS))))
    start = time.perf_counter()
    for _ in range(500):
        render(scene, 64)
    per_second = 500 / (time.perf_counter() - start)
    assert per_second > 2000, f'{per_second:.0f} renders/s'
