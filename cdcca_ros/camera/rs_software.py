"""A RealSense made of software: ``rs.software_device`` fed from Python, for tests and demos.

What is real: the librealsense SDK itself: the device object, its sensors and stream
profiles, ``rs.pipeline`` started on it with ``rs.config``, the SDK's frame syncer, frame
queues and timeouts, ``rs.align`` (depth re-projected into the colour camera with the
intrinsics and extrinsics registered here), and the depth-units option read through
``first_depth_sensor().get_depth_scale()``. What is faked: the USB camera. Pixels come from a
Python pattern, and "unplugging" stops the feed and makes the provider report the device as
absent; the SDK's devices-changed notification does not fire (that path needs hardware).

Example::

    sw = SoftwareRealSense(serial='SW0001', width=64, height=48, depth=True)
    with sw:
        cam = RealSenseCamera(RealSenseConfig(serial='SW0001', width=64, height=48,
                                              depth=True), device_provider=sw.provider)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from cdcca_ros.camera.realsense import import_pyrealsense2
from cdcca_ros.errors import ConfigError, DeviceNotConnectedError

Pattern = Callable[[int], 'tuple[np.ndarray, np.ndarray | None]']
"""``frame number -> (HxWx3 uint8 RGB, depth-size uint16 raw depth or None)``."""


def default_pattern(width: int, height: int, depth_width: int, depth_height: int,
                    depth_raw: int = 1000) -> Pattern:
    """Frames that encode their number: R = n % 256, G = n // 256 % 256, B = column ramp;
    depth = ``depth_raw + n`` raw units everywhere."""
    ramp = np.linspace(0, 255, width).astype(np.uint8)

    def pattern(number: int) -> tuple[np.ndarray, np.ndarray | None]:
        rgb = np.empty((height, width, 3), dtype=np.uint8)
        rgb[..., 0] = number % 256
        rgb[..., 1] = (number // 256) % 256
        rgb[..., 2] = ramp[None, :]
        depth = np.full((depth_height, depth_width), depth_raw + number, dtype=np.uint16)
        return rgb, depth

    return pattern


def _intrinsics(rs: Any, width: int, height: int, fov_scale: float = 1.0) -> Any:
    intr = rs.intrinsics()
    intr.width, intr.height = width, height
    intr.ppx, intr.ppy = width / 2.0, height / 2.0
    # Same field of view for every resolution, so depth and colour see the same scene.
    intr.fx = intr.fy = width * fov_scale
    intr.model = rs.distortion.none
    intr.coeffs = [0.0] * 5
    return intr


class SoftwareRealSense:
    """A software RealSense with a colour and (optionally) a depth sensor, fed at ``fps``.

    Args:
        serial: serial number it reports.
        width: colour width.
        height: colour height.
        fps: feed rate and stream rate.
        depth: add a z16 depth sensor.
        depth_size: (width, height) of depth; default the colour size.
        depth_scale: metres per raw depth unit (the depth_units option).
        pattern: pixel source; default :func:`default_pattern`.
    """

    def __init__(self, serial: str = 'SW0001', width: int = 64, height: int = 48,
                 fps: int = 30, *, depth: bool = True,
                 depth_size: tuple[int, int] | None = None, depth_scale: float = 0.001,
                 pattern: Pattern | None = None) -> None:
        if width <= 0 or height <= 0 or fps <= 0:
            raise ConfigError(f'SoftwareRealSense needs positive size and fps, got '
                              f'{width}x{height}@{fps}')
        if not depth_scale > 0:
            raise ConfigError(f'depth_scale must be > 0, got {depth_scale}')
        rs = import_pyrealsense2()
        self._rs = rs
        self.serial = serial
        self.width, self.height, self.fps = width, height, fps
        self.depth_size = depth_size or (width, height)
        self.has_depth = depth
        self.pattern = pattern or default_pattern(width, height, *self.depth_size)
        self.device = rs.software_device()
        self.device.register_info(rs.camera_info.serial_number, serial)
        self.device.register_info(rs.camera_info.name, 'Software RealSense (cdcca_ros)')
        self._color_sensor = self.device.add_sensor('RGB Camera')
        stream = rs.video_stream()
        stream.type, stream.index, stream.uid = rs.stream.color, 0, 1
        stream.width, stream.height, stream.fps = width, height, fps
        stream.bpp, stream.fmt = 3, rs.format.rgb8
        stream.intrinsics = _intrinsics(rs, width, height)
        self._color_profile = self._color_sensor.add_video_stream(stream, True)
        self._depth_sensor = None
        self._depth_profile = None
        if depth:
            dw, dh = self.depth_size
            self._depth_sensor = self.device.add_sensor('Stereo Module')
            dstream = rs.video_stream()
            dstream.type, dstream.index, dstream.uid = rs.stream.depth, 0, 0
            dstream.width, dstream.height, dstream.fps = dw, dh, fps
            dstream.bpp, dstream.fmt = 2, rs.format.z16
            dstream.intrinsics = _intrinsics(rs, dw, dh)
            self._depth_profile = self._depth_sensor.add_video_stream(dstream, True)
            self._depth_sensor.add_read_only_option(rs.option.depth_units, float(depth_scale))
            identity = rs.extrinsics()
            identity.rotation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
            identity.translation = [0.0, 0.0, 0.0]
            self._depth_profile.register_extrinsics_to(self._color_profile, identity)
        self._plugged = threading.Event()
        self._plugged.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_fed = 0

    # --- the provider a RealSenseCamera takes ------------------------------------------------
    def provider(self, ctx: Any, serial: str | None) -> Any:
        """Device provider for :class:`RealSenseCamera` (``device_provider=sw.provider``).

        Raises:
            DeviceNotConnectedError: while unplugged, or for another serial.
        """
        if not self._plugged.is_set():
            raise DeviceNotConnectedError(f'software RealSense {self.serial} is unplugged')
        if serial and serial != self.serial:
            raise DeviceNotConnectedError(
                f'no RealSense with serial {serial!r} connected; connected: [{self.serial!r}]')
        return self.device

    # --- feeding -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start feeding frames at ``fps`` (while plugged)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._feed, name=f'sw-rs-{self.serial}',
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop feeding."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> SoftwareRealSense:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def unplug(self) -> None:
        """Stop delivering frames and report the device as absent."""
        self._plugged.clear()

    def replug(self) -> None:
        """Deliver frames again and report the device as present."""
        self._plugged.set()

    @property
    def plugged(self) -> bool:
        """True unless :meth:`unplug` was called last."""
        return self._plugged.is_set()

    def _video_frame(self, pixels: np.ndarray, bpp: int, profile: Any, number: int,
                     timestamp_ms: float) -> Any:
        rs = self._rs
        frame = rs.software_video_frame()
        frame.pixels = np.ascontiguousarray(pixels)
        frame.bpp = bpp
        frame.stride = bpp * pixels.shape[1]
        frame.timestamp = timestamp_ms
        frame.domain = rs.timestamp_domain.hardware_clock
        frame.frame_number = number
        frame.profile = profile.as_video_stream_profile()
        return frame

    def _feed(self) -> None:
        period = 1.0 / self.fps
        next_due = time.monotonic()
        while not self._stop.is_set():
            if self._plugged.is_set():
                self.frames_fed += 1
                number = self.frames_fed
                timestamp_ms = number * 1000.0 / self.fps
                rgb, depth = self.pattern(number)
                self._color_sensor.on_video_frame(
                    self._video_frame(rgb, 3, self._color_profile, number, timestamp_ms))
                if self._depth_sensor is not None and depth is not None:
                    self._depth_sensor.on_video_frame(
                        self._video_frame(depth, 2, self._depth_profile, number,
                                          timestamp_ms))
            next_due += period
            self._stop.wait(max(0.0, next_due - time.monotonic()))
