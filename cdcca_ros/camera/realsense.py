"""Intel RealSense through pyrealsense2: colour, and optionally depth aligned to colour.

One code path for real cameras and for tests: the device comes from a ``device_provider``
(default: the first connected RealSense, or the one with the configured serial), the pipeline
is started on exactly that device (``config.enable_device`` + ``pipeline.set_device``), and
frames go through the SDK's syncer and ``rs.align``. Tests hand in an ``rs.software_device``
(see :mod:`cdcca_ros.camera.rs_software`), whose frames travel through the same pipeline.

Unplugging is noticed two ways: the context's devices-changed callback (real hardware) and a
frame timeout (anything). Either makes the grab fail; the reader thread of
:class:`~cdcca_ros.camera.base.Camera` then closes the pipeline and reopens it with backoff
until the camera is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cdcca_ros.camera.base import Camera, Frame, RetryPolicy
from cdcca_ros.errors import CameraError, CameraTimeoutError, ConfigError, DeviceNotConnectedError

DeviceProvider = Callable[[Any, 'str | None'], Any]
"""``(rs.context, wanted serial or None) -> rs.device``; raise DeviceNotConnectedError or
return None when it is absent."""


def import_pyrealsense2() -> ModuleType:
    """Import pyrealsense2, turning a failure into a CameraError that says what to install.

    Raises:
        CameraError: pyrealsense2 is not installed, or its shared library does not load
            (most often because the system library libusb is missing).
    """
    try:
        import pyrealsense2 as rs  # noqa: PLC0415 - optional and slow, only for RealSense
    except ImportError as err:
        hint = ('install the system library libusb (Debian/Ubuntu package libusb-1.0-0: '
                'apt-get install libusb-1.0-0)' if 'libusb' in str(err) else
                'install it with pip install pyrealsense2; it also needs the system library '
                'libusb (Debian/Ubuntu package libusb-1.0-0)')
        raise CameraError(f'RealSense support unavailable: import pyrealsense2 failed ({err}); '
                          f'{hint}') from err
    return rs


@dataclass(frozen=True)
class RealSenseConfig:
    """What to open and how.

    Attributes:
        serial: serial number of the camera; None or '' takes the first one found.
        width: colour width (depth, when aligned, has the same size).
        height: colour height.
        fps: frame rate of both streams.
        depth: also stream depth, aligned to colour, as uint16 millimetres.
        depth_width: depth stream width; None uses ``width``.
        depth_height: depth stream height; None uses ``height``.
        frame_timeout_ms: a grab waiting longer than this counts as a lost camera.
    """

    serial: str | None = None
    width: int = 640
    height: int = 480
    fps: int = 30
    depth: bool = False
    depth_width: int | None = None
    depth_height: int | None = None
    frame_timeout_ms: int = 1000

    def __post_init__(self) -> None:
        if self.serial is not None and not isinstance(self.serial, str):
            raise ConfigError(f'serial must be a string or None, got {self.serial!r}')
        for name in ('width', 'height', 'fps', 'frame_timeout_ms'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f'{name} must be a positive int, got {value!r}')
        for name in ('depth_width', 'depth_height'):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ConfigError(f'{name} must be a positive int or None, got {value!r}')
        if (self.depth_width is None) != (self.depth_height is None):
            raise ConfigError(f'give both depth_width and depth_height or neither, got '
                              f'{self.depth_width}x{self.depth_height}')

    @property
    def depth_size(self) -> tuple[int, int]:
        """(width, height) of the depth stream."""
        return (self.depth_width or self.width, self.depth_height or self.height)


def find_device(ctx: Any, serial: str | None) -> Any:
    """The default provider: a connected RealSense, the one with ``serial`` if given.

    Raises:
        DeviceNotConnectedError: none is connected, or none has that serial.
    """
    rs = import_pyrealsense2()
    devices = list(ctx.query_devices())
    serials = [dev.get_info(rs.camera_info.serial_number) for dev in devices]
    for dev, found in zip(devices, serials, strict=True):
        if not serial or found == serial:
            return dev
    if not devices:
        raise DeviceNotConnectedError(
            'no RealSense camera connected (query_devices() is empty): check the USB cable, '
            'use a USB 3 port, and check udev rules/permissions')
    raise DeviceNotConnectedError(
        f'no RealSense with serial {serial!r} connected; connected: {serials}')


class RealSenseCamera(Camera):
    """A RealSense colour (+ aligned depth) stream.

    Args:
        config: stream parameters.
        name: name in messages; default ``realsense:<serial or first>``.
        retry: backoff for reconnecting.
        context_factory: makes the ``rs.context`` (default ``rs.context``).
        device_provider: finds the device in that context (default :func:`find_device`).

    Raises:
        CameraError: pyrealsense2 cannot be imported (names the missing package).
    """

    def __init__(self, config: RealSenseConfig | None = None, *, name: str | None = None,
                 retry: RetryPolicy | None = None,
                 context_factory: Callable[[], Any] | None = None,
                 device_provider: DeviceProvider | None = None) -> None:
        self.config = config or RealSenseConfig()
        self._rs = import_pyrealsense2()
        self._context_factory = context_factory or self._rs.context
        self._provider = device_provider or find_device
        self._ctx: Any = None
        self._device: Any = None
        self._serial: str | None = None
        self._pipeline: Any = None
        self._align: Any = None
        self._depth_scale = 0.0
        self._removed = threading.Event()
        super().__init__(name or f'realsense:{self.config.serial or "first"}', retry=retry,
                         read_timeout_ms=self.config.frame_timeout_ms)

    def describe(self) -> str:
        """Serial and stream settings."""
        config = self.config
        streams = f'{config.width}x{config.height}@{config.fps} rgb8'
        if config.depth:
            dw, dh = config.depth_size
            streams += f' + depth {dw}x{dh} aligned'
        return f'serial {self._serial or config.serial or "(first found)"} {streams}'

    @property
    def serial(self) -> str | None:
        """Serial of the opened device (None before the first connect)."""
        return self._serial

    @property
    def depth_scale(self) -> float:
        """Metres per raw depth unit reported by the device (0 without depth)."""
        return self._depth_scale

    def _on_devices_changed(self, info: Any) -> None:
        # Called on an SDK thread: only flag it, the grab turns it into an error.
        device = self._device
        if device is not None:
            try:
                if info.was_removed(device):
                    self._removed.set()
            except RuntimeError:
                self._removed.set()

    def _open(self) -> None:
        rs = self._rs
        config = self.config
        if self._ctx is None:
            self._ctx = self._context_factory()
            try:
                self._ctx.set_devices_changed_callback(self._on_devices_changed)
            except (AttributeError, RuntimeError):
                pass  # a context without notifications: frame timeouts still catch unplugs
        try:
            device = self._provider(self._ctx, config.serial or None)
        except RuntimeError as err:
            raise DeviceNotConnectedError(f'{self}: device query failed: {err}') from err
        except DeviceNotConnectedError as err:
            raise DeviceNotConnectedError(f'{self}: {err}') from err
        if device is None:
            raise DeviceNotConnectedError(f'{self}: RealSense not connected')
        serial = device.get_info(rs.camera_info.serial_number)
        pipeline = rs.pipeline(self._ctx)
        rs_config = rs.config()
        rs_config.enable_device(serial)
        if hasattr(pipeline, 'set_device'):
            # Pins the pipeline to this very device object: a software device is not listed
            # by query_devices(), so enable_device alone could not resolve it.
            pipeline.set_device(device)
        rs_config.enable_stream(rs.stream.color, config.width, config.height, rs.format.rgb8,
                                config.fps)
        if config.depth:
            dw, dh = config.depth_size
            rs_config.enable_stream(rs.stream.depth, dw, dh, rs.format.z16, config.fps)
        try:
            profile = pipeline.start(rs_config)
        except RuntimeError as err:
            if 'no device connected' in str(err).lower():
                raise DeviceNotConnectedError(f'{self}: {err}') from err
            raise CameraError(
                f'{self}: could not start the streams ({err}); the camera may not support '
                f'this size/rate') from err
        self._removed.clear()
        self._device = device
        self._serial = serial
        self._pipeline = pipeline
        self._align = None
        self._depth_scale = 0.0
        if config.depth:
            self._align = rs.align(rs.stream.color)
            try:
                self._depth_scale = float(
                    profile.get_device().first_depth_sensor().get_depth_scale())
            except RuntimeError as err:
                self._close()
                raise CameraError(f'{self}: no depth scale on the device ({err})') from err
            if not self._depth_scale > 0:
                self._close()
                raise CameraError(f'{self}: device reports depth scale {self._depth_scale}')

    def _close(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        self._align = None
        if pipeline is not None:
            try:
                pipeline.stop()
            except RuntimeError:
                pass  # already stopped, or the device vanished under it

    def _grab(self, timeout_s: float) -> Frame:
        if self._pipeline is None:
            raise DeviceNotConnectedError(f'{self}: pipeline is not running')
        if self._removed.is_set():
            raise DeviceNotConnectedError(f'{self}: camera was unplugged')
        timeout_ms = max(1, int(timeout_s * 1000))
        try:
            frames = self._pipeline.wait_for_frames(timeout_ms)
        except RuntimeError as err:
            if self._removed.is_set():
                raise DeviceNotConnectedError(f'{self}: camera was unplugged ({err})') from err
            raise CameraTimeoutError(
                f'{self}: no frame within {timeout_ms} ms ({err}); unplugged or stalled?'
            ) from err
        stamp = time.time_ns()
        if self._align is not None:
            frames = self._align.process(frames)
        color = frames.get_color_frame()
        if not color:
            raise CameraError(f'{self}: frameset without a colour frame')
        # Copy: the SDK recycles frame memory once the frame object is released.
        rgb = np.array(np.asanyarray(color.get_data()), dtype=np.uint8, copy=True, order='C')
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise CameraError(f'{self}: colour frame has shape {rgb.shape}, expected HxWx3')
        depth = None
        meta: dict[str, Any] = {
            'serial': self._serial, 'frame_number': int(color.get_frame_number()),
            'device_timestamp_ms': float(color.get_timestamp()),
            'timestamp_domain': str(color.get_frame_timestamp_domain()).split('.')[-1],
        }
        if self.config.depth:
            depth_frame = frames.get_depth_frame()
            if depth_frame:
                depth = self._to_millimetres(np.asanyarray(depth_frame.get_data()))
                meta['depth_frame_number'] = int(depth_frame.get_frame_number())
            meta['depth_scale_m'] = self._depth_scale
        return Frame(rgb=rgb, stamp_ns=stamp, depth=depth, meta=meta)

    def _to_millimetres(self, raw: np.ndarray) -> np.ndarray:
        if abs(self._depth_scale - 0.001) < 1e-9:
            return np.array(raw, dtype=np.uint16, copy=True, order='C')
        millimetres = raw.astype(np.float64) * (self._depth_scale * 1000.0)
        return np.ascontiguousarray(np.clip(np.rint(millimetres), 0, 65535).astype(np.uint16))
