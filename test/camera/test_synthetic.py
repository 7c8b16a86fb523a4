"""Synthetic camera: deterministic per seed, domains follow the schedule, ground truth in meta."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cdcca_ros.camera.synthetic import SyntheticCamera, SyntheticCameraConfig
from cdcca_ros.errors import CameraError, ConfigError
from cdcca_ros.sim.scene import Scene

SMALL = {'width': 64, 'height': 48, 'realtime': False}


def grab(config: SyntheticCameraConfig, n: int) -> list:
    with SyntheticCamera(config) as cam:
        return list(cam.frames(n))


def test_same_seed_same_frames_other_seed_other_frames() -> None:
    schedule = 'source:2,fog:2,night:2;unit=frames'
    first = grab(SyntheticCameraConfig(schedule, seed=7, **SMALL), 6)
    again = grab(SyntheticCameraConfig(schedule, seed=7, **SMALL), 6)
    other = grab(SyntheticCameraConfig(schedule, seed=8, **SMALL), 6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.rgb, b.rgb)
        assert a.meta['scene'] == b.meta['scene'] and a.meta['domain'] == b.meta['domain']
    assert any(not np.array_equal(a.rgb, c.rgb) for a, c in zip(first, other, strict=True))
    # Consecutive frames are new scenes, not one picture repeated.
    assert not np.array_equal(first[0].rgb, first[1].rgb)


@pytest.mark.parametrize('schedule,fps,start,expected', [
    ('source:3,fog:2,night:1;unit=frames', 30.0, 0,
     ['source'] * 3 + ['fog'] * 2 + ['night'] + ['source']),          # loops by default
    ('source:3,fog:2;unit=frames;loop=false', 30.0, 0,
     ['source'] * 3 + ['fog'] * 4),                                     # holds the last
    ('source:1,night:1', 4.0, 2, ['source'] * 2 + ['night'] * 4 + ['source']),  # seconds
])
def test_domains_follow_the_schedule(schedule: str, fps: float, start: int,
                                     expected: list[str]) -> None:
    config = SyntheticCameraConfig(schedule, fps=fps, start_index=start, **SMALL)
    frames = grab(config, len(expected))
    assert [f.meta['segment'] for f in frames] == expected
    assert [f.meta['frame_index'] for f in frames] == list(range(start, start + len(expected)))


def test_domain_switch_changes_the_pictures() -> None:
    config = SyntheticCameraConfig('source:4,night:4;unit=frames', seed=1, **SMALL)
    frames = grab(config, 8)
    source = np.mean([f.rgb.mean() for f in frames[:4]])
    night = np.mean([f.rgb.mean() for f in frames[4:]])
    assert night < 0.8 * source  # the night domain darkens the frames


def test_frames_carry_ground_truth_and_questions_are_reproducible() -> None:
    cam = SyntheticCamera(SyntheticCameraConfig('clutter:5;unit=frames', seed=3, **SMALL))
    with cam:
        frame = cam.read()
    meta = frame.meta
    assert isinstance(meta['scene'], Scene)
    assert (meta['domain'], meta['segment'], meta['seed']) == ('clutter', 'clutter', 3)
    question = cam.ask(frame)
    assert question == cam.ask(frame)            # same frame, same question
    assert question.answer in question.choices
    assert question.answer == question.choices[question.answer_index]
    with pytest.raises(CameraError, match='ground truth'):
        cam.ask(type(frame)(rgb=frame.rgb, stamp_ns=1))


def test_default_resolution_is_a_realsense_colour_stream() -> None:
    config = SyntheticCameraConfig(schedule='source:1', realtime=False)
    assert (config.width, config.height) == (640, 480)
    with SyntheticCamera(config) as cam:
        assert cam.read().rgb.shape == (480, 640, 3)


def test_realtime_paces_at_fps_and_read_latest_works() -> None:
    config = SyntheticCameraConfig('source:10', fps=50.0, width=32, height=24)
    with SyntheticCamera(config) as cam:
        started = time.monotonic()
        list(cam.frames(6))
        elapsed = time.monotonic() - started
        latest = cam.read_latest(max_age_ms=500)
        assert latest.rgb.shape == (24, 32, 3)
    assert 0.08 <= elapsed < 1.0  # 5 periods of 20 ms after the first frame


def test_wall_clock_schedule_follows_time() -> None:
    config = SyntheticCameraConfig('source:0.4,fog:10', clock='wall', **SMALL)
    with SyntheticCamera(config) as cam:
        assert cam.read().meta['segment'] == 'source'
        time.sleep(0.45)
        assert cam.read().meta['segment'] == 'fog'


@pytest.mark.parametrize('kwargs,needle', [
    ({'schedule': 'source:10,unknown:5'}, 'unknown'),
    ({'schedule': 'source'}, 'name:duration'),
    ({'seed': -1}, 'seed'),
    ({'width': 0}, 'width'),
    ({'fps': 0}, 'fps'),
    ({'clock': 'sundial'}, 'clock'),
])
def test_bad_parameters_fail_at_construction(kwargs, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SyntheticCamera(SyntheticCameraConfig(**kwargs))
