"""Scene dataclasses: validation, geometry helpers, the sampler's invariants."""
from __future__ import annotations

import numpy as np
import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.scene import (
    BASE_KINDS,
    COLORS,
    GRID,
    Background,
    Scene,
    SceneConfig,
    SceneObject,
    sample_scene,
)


@pytest.mark.parametrize('kwargs', [
    {'kind': 'hexagon', 'color': 'red'},
    {'kind': 'circle', 'color': 'pink'},
    {'kind': 'circle', 'color': 'red', 'size': 'huge'},
    {'kind': 'circle', 'color': 'red', 'texture': 'plaid'},
    {'kind': 'circle', 'color': 'red', 'cell': (0, GRID)},
])
def test_scene_object_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SceneObject(**kwargs)


@pytest.mark.parametrize('objects', [
    (SceneObject('circle', 'red', cell=(0, 0)), SceneObject('circle', 'blue', cell=(0, 1))),
    (SceneObject('circle', 'red', cell=(0, 0)), SceneObject('square', 'red', cell=(0, 1))),
    (SceneObject('circle', 'red', cell=(0, 0)), SceneObject('square', 'blue', cell=(0, 0))),
])
def test_scene_requires_unique_kinds_colors_cells(objects: tuple) -> None:
    with pytest.raises(ConfigError):
        Scene(objects)


@pytest.mark.parametrize('cell, column, row', [
    ((0, 0), 'left', 'top'), ((1, 1), 'middle', 'middle'), ((2, 2), 'right', 'bottom'),
])
def test_object_position_names(cell: tuple[int, int], column: str, row: str) -> None:
    obj = SceneObject('square', 'green', cell=cell)
    assert (obj.column, obj.row) == (column, row)
    x, y = obj.center
    assert int(x * GRID) == cell[1] and int(y * GRID) == cell[0]


@pytest.mark.parametrize('kwargs', [
    {'min_objects': 0}, {'min_objects': 3, 'max_objects': 2}, {'max_objects': 5},
    {'kinds': ('circle', 'blob')}, {'gray_range': (200, 100)}, {'jitter': 0.2},
])
def test_scene_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SceneConfig(**kwargs)


def test_background_rejects_unknown_pattern() -> None:
    with pytest.raises(ConfigError, match='tartan'):
        Background(pattern='tartan')


def test_sampler_covers_counts_and_stays_in_source_kinds() -> None:
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        scene = sample_scene(rng)
        counts.add(len(scene.objects))
        assert all(o.kind in BASE_KINDS and o.color in COLORS for o in scene.objects)
        assert all(o.texture == 'solid' for o in scene.objects)
        assert scene.background.pattern == 'plain' and not scene.clutter
    assert counts == {1, 2, 3, 4}
