"""RealSense through the real SDK: a software device for frames, a real empty context for 'none'.

Real here: pyrealsense2 / librealsense (pipeline, syncer, rs.align, depth units) and the empty
device list of this machine. Fake: the USB camera (rs.software_device fed from Python).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from cdcca_ros.camera.base import RetryPolicy
from cdcca_ros.camera.realsense import (
    RealSenseCamera,
    RealSenseConfig,
    import_pyrealsense2,
)
from cdcca_ros.errors import CameraError, ConfigError, DeviceNotConnectedError

try:
    rs = import_pyrealsense2()
except CameraError as _err:  # the project's setup installs libusb-1.0-0; say so if it did not
    pytestmark = pytest.mark.skip(reason=str(_err))
    rs = None
else:
    from cdcca_ros.camera.rs_software import SoftwareRealSense

SERIAL = 'SW0001'
FAST = RetryPolicy(initial_delay_s=0.02, max_delay_s=0.05)


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, 'condition not reached in time'
        time.sleep(0.01)


def make_camera(sw: SoftwareRealSense, **kwargs) -> RealSenseCamera:
    fields = dict(serial=SERIAL, width=sw.width, height=sw.height, fps=sw.fps,
                  frame_timeout_ms=300)
    fields.update(kwargs)
    return RealSenseCamera(RealSenseConfig(**fields), device_provider=sw.provider, retry=FAST)


def test_no_realsense_connected_is_a_clear_error() -> None:
    if len(rs.context().query_devices()) > 0:
        pytest.skip('a real RealSense is connected to this machine')
    cam = RealSenseCamera(RealSenseConfig(), retry=FAST)
    with pytest.raises(DeviceNotConnectedError, match=r'query_devices\(\) is empty'):
        cam.connect()
    assert cam.stats.connect_failures == 1 and not cam.is_connected


def test_colour_only_stream() -> None:
    with SoftwareRealSense(SERIAL, 64, 48, 30, depth=False) as sw, make_camera(sw) as cam:
        frames = list(cam.frames(3, timeout_ms=2000))
    numbers = [f.meta['frame_number'] for f in frames]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    for frame in frames:
        assert frame.rgb.shape == (48, 64, 3) and frame.depth is None
        # The pattern writes the frame number into red, a column ramp into blue.
        assert (frame.rgb[..., 0] == frame.meta['frame_number'] % 256).all()
        assert frame.rgb[0, 0, 2] == 0 and frame.rgb[0, -1, 2] == 255
        assert frame.meta['serial'] == SERIAL
        assert frame.meta['timestamp_domain'] == 'hardware_clock'
    assert frames[0].stamp_ns < frames[-1].stamp_ns


@pytest.mark.parametrize('depth_size', [(64, 48), (32, 24)], ids=['same-size', 'half-size'])
@pytest.mark.parametrize('scale', [0.001, 0.0001], ids=['1mm', '0.1mm'])
def test_depth_is_aligned_to_colour_and_in_millimetres(depth_size, scale: float) -> None:
    sw = SoftwareRealSense(SERIAL, 64, 48, 30, depth=True, depth_size=depth_size,
                           depth_scale=scale)
    with sw, make_camera(sw, depth=True, depth_width=depth_size[0],
                         depth_height=depth_size[1]) as cam:
        frame = cam.read(timeout_ms=2000)
        assert cam.depth_scale == pytest.approx(scale)
    number = frame.meta['depth_frame_number']
    assert number == frame.meta['frame_number']
    # rs.align re-projects depth into the colour camera: colour size even from half-size depth.
    assert frame.depth.shape == (48, 64) and frame.depth.dtype == np.uint16
    expected_mm = round((1000 + number) * scale * 1000)
    valid = frame.depth[frame.depth > 0]
    assert valid.size > 0.9 * frame.depth.size
    assert np.all(np.abs(valid.astype(int) - expected_mm) <= 1)


def test_unplug_and_replug_reconnects() -> None:
    with SoftwareRealSense(SERIAL, 64, 48, 30, depth=True) as sw, \
            make_camera(sw, depth=True) as cam:
        before = cam.read_latest(max_age_ms=2000)
        sw.unplug()
        wait_for(lambda: cam.stats.connect_failures >= 1)  # frame timeout, then retries
        stats = cam.stats
        assert stats.read_errors >= 1 and 'unplugged' in stats.last_error
        assert not cam.is_connected
        with pytest.raises(DeviceNotConnectedError, match='reconnected'):
            cam.read_latest(max_age_ms=1)
        sw.replug()
        wait_for(lambda: cam.stats.reconnects >= 1)
        after = cam.read(timeout_ms=2000)
        assert cam.is_connected
    assert after.meta['frame_number'] > before.meta['frame_number']
    assert after.depth is not None and after.depth.shape == (48, 64)


def test_wrong_serial_names_both() -> None:
    with SoftwareRealSense(SERIAL, 64, 48, 30, depth=False) as sw:
        cam = make_camera(sw, serial='123456789')
        with pytest.raises(DeviceNotConnectedError, match="'123456789'.*'SW0001'"):
            cam.connect()


def test_unsupported_stream_settings_are_a_clear_error() -> None:
    with SoftwareRealSense(SERIAL, 64, 48, 30, depth=False) as sw:
        cam = make_camera(sw, width=1280, height=720)
        with pytest.raises(CameraError, match='1280x720@30.*could not start'):
            cam.connect()
        assert not cam.is_connected


def test_import_failure_names_libusb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'pyrealsense2', None)  # import now raises ImportError
    with pytest.raises(CameraError, match='libusb-1.0-0'):
        import_pyrealsense2()
    with pytest.raises(CameraError, match='pyrealsense2'):
        RealSenseCamera(RealSenseConfig())


@pytest.mark.parametrize('kwargs,needle', [
    ({'width': 0}, 'width'),
    ({'fps': 2.5}, 'fps'),
    ({'depth_width': 320}, 'depth_width and depth_height'),
    ({'serial': 12345}, 'serial'),
    ({'frame_timeout_ms': -1}, 'frame_timeout_ms'),
])
def test_config_validation(kwargs, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RealSenseConfig(**kwargs)
