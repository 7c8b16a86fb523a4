"""OpenCV source: a video file written here with cv2.VideoWriter, and a device that is absent."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cdcca_ros.camera.base import RetryPolicy, connect_with_retry
from cdcca_ros.camera.opencv import OpenCVCamera, OpenCVCameraConfig
from cdcca_ros.errors import ConfigError, DeviceNotConnectedError, EndOfStreamError

N_FRAMES = 24
WIDTH, HEIGHT = 64, 48
MISSING_INDEX = 99  # /dev/video99: no machine of this project has it


@pytest.fixture(scope='module')
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MJPG file whose frame i is blue (BGR) with red = 10 * i: order and colour are checkable."""
    path = tmp_path_factory.mktemp('video') / 'clip.avi'
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 25.0, (WIDTH, HEIGHT))
    assert writer.isOpened(), 'OpenCV cannot write MJPG here'
    for i in range(N_FRAMES):
        bgr = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        bgr[..., 0] = 255       # blue
        bgr[..., 2] = 10 * i    # red grows with the index
        writer.write(bgr)
    writer.release()
    return path


def red_of(rgb: np.ndarray) -> int:
    return int(np.median(rgb[..., 0]))


def test_file_frames_are_rgb_in_order_with_increasing_stamps(video: Path) -> None:
    with OpenCVCamera(OpenCVCameraConfig(str(video), realtime=False)) as cam:
        frames = list(cam.frames(5))
    stamps = [f.stamp_ns for f in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == 5
    assert [f.meta['pos_frames'] for f in frames] == [0, 1, 2, 3, 4]
    for i, frame in enumerate(frames):
        assert frame.rgb.shape == (HEIGHT, WIDTH, 3) and frame.rgb.flags.c_contiguous
        # BGR -> RGB: the written blue is in the last channel, the red ramp in the first.
        assert int(np.median(frame.rgb[..., 2])) > 240
        assert abs(red_of(frame.rgb) - 10 * i) <= 4
        assert frame.depth is None and frame.meta['kind'] == 'file'


def test_read_latest_drops_old_frames(video: Path) -> None:
    config = OpenCVCameraConfig(str(video), fps=250.0, loop=True)  # paced at 250 fps
    with OpenCVCamera(config) as cam:
        first = cam.read_latest(max_age_ms=1000)
        time.sleep(0.08)
        second = cam.read_latest(max_age_ms=1000)
        stats = cam.stats
    assert second.meta['frame_index'] - first.meta['frame_index'] >= 5
    assert second.stamp_ns > first.stamp_ns
    assert stats.drops >= second.meta['frame_index'] - first.meta['frame_index'] - 2
    assert 10 < stats.fps < 300  # paced at 250, not as fast as it decodes


def test_file_plays_at_its_own_rate_when_realtime(video: Path) -> None:
    config = OpenCVCameraConfig(str(video))  # 25 fps as written
    with OpenCVCamera(config) as cam:
        started = time.monotonic()
        list(cam.frames(4))
        elapsed = time.monotonic() - started
    assert 0.10 < elapsed < 1.0  # 3 periods of 40 ms after the first frame


def test_end_of_file_ends_the_stream(video: Path) -> None:
    with OpenCVCamera(OpenCVCameraConfig(str(video), realtime=False)) as cam:
        frames = list(cam.frames(N_FRAMES))
        with pytest.raises(EndOfStreamError, match=f'after {N_FRAMES} frames'):
            cam.read()
        assert cam.read_latest(max_age_ms=5000) is frames[-1]  # the last one, while fresh
        time.sleep(0.03)
        with pytest.raises(EndOfStreamError):
            cam.read_latest(max_age_ms=10)
    assert frames[-1].meta['pos_frames'] == N_FRAMES - 1


def test_looping_file_starts_again(video: Path) -> None:
    with OpenCVCamera(OpenCVCameraConfig(str(video), loop=True, realtime=False)) as cam:
        frames = list(cam.frames(N_FRAMES + 3))
    assert [f.meta['pos_frames'] for f in frames[-3:]] == [0, 1, 2]
    assert abs(red_of(frames[N_FRAMES].rgb) - red_of(frames[0].rgb)) <= 4


def test_requested_size_is_delivered(video: Path) -> None:
    config = OpenCVCameraConfig(str(video), width=32, height=20, realtime=False)
    with OpenCVCamera(config) as cam:
        frame = cam.read()
    assert frame.rgb.shape == (20, 32, 3)
    assert frame.meta['native_size'] == (WIDTH, HEIGHT)


def test_missing_device_is_a_clear_error_and_retries_are_counted() -> None:
    cam = OpenCVCamera(OpenCVCameraConfig(MISSING_INDEX))
    with pytest.raises(DeviceNotConnectedError, match=f'device {MISSING_INDEX}.*could not open'):
        cam.connect()
    assert cam.stats.connect_failures == 1
    seen: list[int] = []
    policy = RetryPolicy(initial_delay_s=0.001, max_delay_s=0.002, max_attempts=3)
    with pytest.raises(DeviceNotConnectedError, match='no camera at this index'):
        connect_with_retry(cam, policy, on_failure=lambda attempt, err: seen.append(attempt))
    assert seen == [1, 2, 3]
    assert cam.stats.connect_failures == 4
    assert not cam.is_connected


def test_unreachable_stream_is_a_clear_error() -> None:
    # Port 9 on the loopback: nothing listens, the connection is refused at once.
    cam = OpenCVCamera(OpenCVCameraConfig('http://127.0.0.1:9/stream.mjpg', read_timeout_ms=500))
    with pytest.raises(DeviceNotConnectedError, match='127.0.0.1:9.*stream did not open'):
        cam.connect()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    cam = OpenCVCamera(OpenCVCameraConfig(str(tmp_path / 'nope.mp4')))
    with pytest.raises(DeviceNotConnectedError, match='nope.mp4.*does not exist'):
        cam.connect()


def test_undecodable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / 'junk.avi'
    path.write_bytes(b'not a video at all' * 10)
    with pytest.raises(DeviceNotConnectedError, match='junk.avi'):
        OpenCVCamera(OpenCVCameraConfig(str(path))).connect()


@pytest.mark.parametrize('source,kind', [(0, 'device'), ('2', 'device'),
                                         ('rtsp://127.0.0.1:8554/cam', 'url'),
                                         ('http://127.0.0.1/stream.mjpg', 'url'),
                                         ('/data/clip.mp4', 'file')])
def test_source_kinds(source, kind: str) -> None:
    assert OpenCVCameraConfig(source).kind == kind


@pytest.mark.parametrize('kwargs,needle', [
    ({'source': -1}, 'device index'),
    ({'source': ''}, 'empty'),
    ({'source': 1.5}, 'source'),
    ({'source': 0, 'width': 640}, 'both width and height'),
    ({'source': 0, 'width': 0, 'height': 480}, 'width'),
    ({'source': 0, 'fps': -5}, 'fps'),
])
def test_config_validation(kwargs, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        OpenCVCameraConfig(**kwargs)
