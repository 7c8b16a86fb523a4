"""The Camera base: frames, retry policy, reader thread, drops, reconnects."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cdcca_ros.camera import create_camera
from cdcca_ros.camera.base import Camera, Frame, RetryPolicy, connect_with_retry
from cdcca_ros.errors import (
    CameraError,
    CameraTimeoutError,
    ConfigError,
    DeviceNotConnectedError,
)


class PluggableCamera(Camera):
    """A device the test plugs and unplugs: stands in for the hardware faults that cannot be
    produced here. Everything above _open/_grab is the real base class."""

    def __init__(self, *, plugged: bool = True, fps: float = 200.0, **kwargs) -> None:
        self.plugged = threading.Event()
        if plugged:
            self.plugged.set()
        self.opens = 0
        self.count = 0
        self.is_open = False
        super().__init__('pluggable', pace_fps=fps, **kwargs)

    def _open(self) -> None:
        if not self.plugged.is_set():
            raise DeviceNotConnectedError(f'{self}: not plugged in')
        self.opens += 1
        self.is_open = True

    def _close(self) -> None:
        self.is_open = False

    def _grab(self, timeout_s: float) -> Frame:
        if not self.plugged.is_set():
            raise DeviceNotConnectedError(f'{self}: vanished')
        self.count += 1
        rgb = np.full((4, 6, 3), self.count % 256, np.uint8)
        return Frame(rgb=rgb, stamp_ns=time.time_ns(), meta={'n': self.count})


FAST = RetryPolicy(initial_delay_s=0.005, max_delay_s=0.02)


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, 'condition not reached in time'
        time.sleep(0.005)


@pytest.mark.parametrize('kwargs,needle', [
    ({'rgb': np.zeros((4, 4), np.uint8)}, 'HxWx3'),
    ({'rgb': np.zeros((4, 4, 3), np.float32)}, 'float32'),
    ({'rgb': np.zeros((0, 4, 3), np.uint8)}, 'empty'),
    ({'depth': np.zeros((4, 5), np.uint16)}, '(4, 4)'),
    ({'depth': np.zeros((4, 4), np.float32)}, 'float32'),
    ({'stamp_ns': -1}, '-1'),
    ({'stamp_ns': 1.5}, '1.5'),
])
def test_frame_validation(kwargs, needle: str) -> None:
    fields = {'rgb': np.zeros((4, 4, 3), np.uint8), 'stamp_ns': 1, **kwargs}
    with pytest.raises(CameraError) as info:
        Frame(**fields)
    assert needle in str(info.value)


def test_frame_accepts_aligned_depth() -> None:
    frame = Frame(np.zeros((4, 6, 3), np.uint8), 5, np.ones((4, 6), np.uint16), {'k': 1})
    assert (frame.height, frame.width, frame.meta['k']) == (4, 6, 1)


def test_retry_policy_backs_off_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=0.5, factor=2.0, max_attempts=6)
    assert list(policy.delays()) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert policy.delay(0) == 0.0


@pytest.mark.parametrize('kwargs,needle', [
    ({'initial_delay_s': -1}, 'initial_delay_s'),
    ({'initial_delay_s': 2.0, 'max_delay_s': 1.0}, 'max_delay_s (1.0)'),
    ({'factor': 0.5}, 'factor'),
    ({'max_attempts': 0}, 'max_attempts'),
])
def test_retry_policy_validation(kwargs, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace('(', r'\(').replace(')', r'\)')):
        RetryPolicy(**kwargs)


def test_reads_before_connect_are_clear_errors() -> None:
    cam = PluggableCamera()
    for call in (cam.read, cam.read_latest, cam.start_reader):
        with pytest.raises(DeviceNotConnectedError, match='not connected'):
            call()
    assert not cam.is_connected


def test_context_manager_opens_and_closes() -> None:
    cam = PluggableCamera()
    with cam as opened:
        assert opened is cam and cam.is_connected and cam.is_open
        first, second = cam.read(), cam.read()
        assert second.meta['n'] == first.meta['n'] + 1
        with pytest.raises(CameraError, match='already connected'):
            cam.connect()
    assert not cam.is_connected and not cam.is_open
    cam.disconnect()  # twice is fine


def test_connect_with_retry_waits_for_the_device() -> None:
    cam = PluggableCamera(plugged=False)
    failures: list[int] = []

    def plug_on_third(attempt: int, err: CameraError) -> None:
        failures.append(attempt)
        assert 'not plugged in' in str(err)
        if attempt == 2:
            cam.plugged.set()

    attempts = connect_with_retry(cam, FAST, on_failure=plug_on_third)
    try:
        assert attempts == 3 and failures == [1, 2]
        assert cam.stats.connect_failures == 2 and cam.is_connected
    finally:
        cam.disconnect()


def test_connect_with_retry_gives_up_after_max_attempts() -> None:
    cam = PluggableCamera(plugged=False)
    policy = RetryPolicy(initial_delay_s=0.001, max_delay_s=0.001, max_attempts=4)
    with pytest.raises(DeviceNotConnectedError, match='not plugged in'):
        connect_with_retry(cam, policy)
    assert cam.stats.connect_failures == 4
    assert 'not plugged in' in cam.stats.last_error


def test_connect_with_retry_stops_when_asked() -> None:
    cam = PluggableCamera(plugged=False)
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(DeviceNotConnectedError, match='stopped'):
        connect_with_retry(cam, RetryPolicy(initial_delay_s=10, max_delay_s=10), stop=stop)
    assert time.monotonic() - started < 5


def test_read_latest_keeps_only_the_newest_and_counts_drops() -> None:
    with PluggableCamera(fps=500) as cam:
        first = cam.read_latest(max_age_ms=1000)
        time.sleep(0.1)
        second = cam.read_latest(max_age_ms=1000)
        assert second.meta['n'] > first.meta['n'] + 5
        assert second.stamp_ns > first.stamp_ns
        stats = cam.stats
        assert stats.drops >= second.meta['n'] - first.meta['n'] - 2
        assert stats.frames >= second.meta['n']
        assert 10 < stats.fps < 600  # measured, and never faster than the pacing
        # read() with the reader running waits for a frame newer than the last handed out.
        third = cam.read(timeout_ms=1000)
        assert third.meta['n'] > second.meta['n']


def test_read_latest_refuses_a_stale_frame() -> None:
    with PluggableCamera(fps=2) as cam:  # one frame every 500 ms
        cam.read_latest(max_age_ms=1000)
        time.sleep(0.05)
        with pytest.raises(CameraTimeoutError, match='ms old'):
            cam.read_latest(max_age_ms=10)


def test_reader_reconnects_after_unplug_and_replug() -> None:
    cam = PluggableCamera(fps=200, retry=FAST)
    with cam:
        before = cam.read_latest(max_age_ms=1000)
        cam.plugged.clear()
        wait_for(lambda: cam.stats.connect_failures >= 2)
        assert not cam.is_connected
        with pytest.raises(DeviceNotConnectedError, match='reconnected'):
            cam.read_latest(max_age_ms=1)
        stats = cam.stats
        assert stats.read_errors >= 1 and 'not plugged in' in (stats.last_error or '')
        cam.plugged.set()
        wait_for(lambda: cam.stats.reconnects == 1)
        after = cam.read(timeout_ms=2000)
        assert after.meta['n'] > before.meta['n']
        assert cam.is_connected and cam.opens == 2


def test_sync_read_reopens_once_after_a_failure() -> None:
    cam = PluggableCamera(fps=1000)
    with cam:
        cam.read()
        cam.plugged.clear()
        with pytest.raises(DeviceNotConnectedError, match='vanished'):
            cam.read()
        assert not cam.is_connected and not cam.is_open
        with pytest.raises(DeviceNotConnectedError, match='not plugged in'):
            cam.read()
        cam.plugged.set()
        assert cam.read().meta['n'] >= 2
        assert cam.stats.reconnects == 1 and cam.stats.read_errors == 1


class _WatchedCondition(threading.Condition):
    """The camera's state condition, telling when a reader waits on it."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_disconnect_interrupts_a_waiting_read() -> None:
    cam = PluggableCamera(fps=0.5)  # a frame every two seconds
    cam._state = _WatchedCondition()
    cam.connect()
    cam.read_latest(max_age_ms=1000)
    cam._state.waiting.clear()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            cam.read(timeout_ms=5000)
        except CameraError as err:
            errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    # The read is waiting for the next frame (1.9 s away) when the camera is disconnected.
    assert cam._state.waiting.wait(1.5), 'the read never waited for a frame'
    started = time.monotonic()
    cam.disconnect()
    thread.join(3)
    assert not thread.is_alive() and time.monotonic() - started < 1.5
    assert len(errors) == 1 and isinstance(errors[0], DeviceNotConnectedError)
    assert 'disconnected while reading' in str(errors[0])  # not "call connect() first"


@pytest.mark.parametrize('kind,params,needle', [
    ('thermal', {}, "'thermal'"),
    ('synthetic', {'colour': 'red'}, 'colour'),
    ('synthetic', {'fps': 0}, 'fps'),
])
def test_create_camera_rejects_bad_requests(kind: str, params, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        create_camera(kind, **params)


def test_create_camera_builds_each_pure_python_kind(tmp_path) -> None:
    synthetic = create_camera('synthetic', width=32, height=24, realtime=False)
    opencv = create_camera('opencv', source=str(tmp_path / 'none.avi'))
    assert type(synthetic).__name__ == 'SyntheticCamera'
    assert type(opencv).__name__ == 'OpenCVCamera'
    with synthetic:
        assert synthetic.read().rgb.shape == (24, 32, 3)
