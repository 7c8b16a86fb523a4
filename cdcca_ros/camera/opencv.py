"""Any OpenCV capture as a camera: a device index, a video file, or an RTSP/HTTP URL."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cdcca_ros.camera.base import Camera, Frame, RetryPolicy
from cdcca_ros.errors import (
    CameraError,
    ConfigError,
    DeviceNotConnectedError,
    EndOfStreamError,
)


@dataclass(frozen=True)
class OpenCVCameraConfig:
    """What to open and what to ask of it.

    Attributes:
        source: device index (int or digits), file path, or URL (anything with '://').
        width: requested width; frames of another width are resized to it. None keeps native.
        height: requested height, as ``width``.
        fps: requested rate; for files, the playback rate (default: the file's own rate).
        loop: files only: start again at the end instead of ending the stream.
        realtime: files only: deliver at the playback rate rather than as fast as decoded.
        read_timeout_ms: how long one read may take before it counts as failed.
        api_preference: OpenCV backend (``cv2.CAP_ANY`` lets OpenCV choose).
    """

    source: int | str
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    loop: bool = False
    realtime: bool = True
    read_timeout_ms: float = 2000.0
    api_preference: int = cv2.CAP_ANY

    def __post_init__(self) -> None:
        source = self.source
        if isinstance(source, bool) or not isinstance(source, (int, str)):
            raise ConfigError(f'source must be a device index, path or URL, got {source!r}')
        if isinstance(source, int) and source < 0:
            raise ConfigError(f'device index must be >= 0, got {source}')
        if isinstance(source, str) and not source.strip():
            raise ConfigError('source must not be empty')
        for name in ('width', 'height'):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f'{name} must be a positive int or None, got {value!r}')
        if (self.width is None) != (self.height is None):
            raise ConfigError(
                f'give both width and height or neither, got width={self.width} '
                f'height={self.height}')
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f'fps must be > 0 or None, got {self.fps}')
        if not self.read_timeout_ms > 0:
            raise ConfigError(f'read_timeout_ms must be > 0, got {self.read_timeout_ms}')

    @property
    def kind(self) -> str:
        """'device', 'url' or 'file'."""
        if isinstance(self.source, int) or self.source.strip().isdigit():
            return 'device'
        if '://' in self.source:
            return 'url'
        return 'file'

    @property
    def target(self) -> int | str:
        """What cv2.VideoCapture is given."""
        if self.kind == 'device':
            return int(self.source)
        return str(self.source)


class OpenCVCamera(Camera):
    """A cv2.VideoCapture source delivering RGB frames.

    A failed read closes and reopens the capture (through the reader thread's backoff), so an
    unplugged USB camera or a dropped stream comes back by itself. Frames carry ``meta`` with
    the source, the frame index since connect, and for files the position in the file.
    """

    def __init__(self, config: OpenCVCameraConfig, *, name: str | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.config = config
        self._cap: Any = None
        self._index = 0
        self._pos_frames = 0
        pace = None
        if config.kind == 'file' and config.realtime:
            pace = config.fps or self._file_fps(config.target) or 30.0
        super().__init__(name or f'opencv:{config.source}', pace_fps=pace, retry=retry,
                         read_timeout_ms=config.read_timeout_ms)

    @staticmethod
    def _file_fps(path: int | str) -> float | None:
        cap = cv2.VideoCapture(str(path))
        try:
            fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
        finally:
            cap.release()
        return float(fps) if fps and fps > 0 and np.isfinite(fps) else None

    def describe(self) -> str:
        """The source and what was requested."""
        size = f' {self.config.width}x{self.config.height}' if self.config.width else ''
        return f'{self.config.kind} {self.config.source!r}{size}'

    def _open(self) -> None:
        config = self.config
        if config.kind == 'file' and not os.path.isfile(config.target):
            raise DeviceNotConnectedError(f'{self}: video file does not exist')
        if config.kind == 'url':
            # Network streams take their timeouts at open time; without them a dead server
            # can block a read for about 30 s.
            timeout = int(config.read_timeout_ms)
            cap = cv2.VideoCapture(config.target, config.api_preference,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout,
                                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout])
        else:
            cap = cv2.VideoCapture(config.target, config.api_preference)
        if not cap.isOpened():
            cap.release()
            hint = {
                'device': 'no camera at this index (check /dev/video*, permissions, or '
                          'whether another process holds it)',
                'url': 'the stream did not open (address, credentials, network)',
                'file': 'OpenCV cannot decode this file',
            }[config.kind]
            raise DeviceNotConnectedError(f'{self}: could not open: {hint}')
        if config.kind == 'device':
            # Requests only: a device may ignore them, which the resize in _grab covers.
            if config.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
            if config.fps:
                cap.set(cv2.CAP_PROP_FPS, config.fps)
        self._cap = cap
        self._pos_frames = 0

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _grab(self, timeout_s: float) -> Frame:
        cap = self._cap
        if cap is None:
            raise DeviceNotConnectedError(f'{self}: capture is not open')
        ok, bgr = cap.read()
        if not ok and self.config.kind == 'file':
            if not self.config.loop:
                raise EndOfStreamError(f'{self}: end of file after {self._pos_frames} frames')
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._pos_frames = 0
            ok, bgr = cap.read()
        if not ok or bgr is None:
            raise CameraError(f'{self}: read failed (device unplugged or stream dropped?)')
        stamp = time.time_ns()
        if bgr.ndim == 2:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        elif bgr.shape[2] == 4:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        native = (int(rgb.shape[1]), int(rgb.shape[0]))
        if self.config.width and native != (self.config.width, self.config.height):
            rgb = cv2.resize(rgb, (self.config.width, self.config.height),
                             interpolation=cv2.INTER_AREA)
        meta: dict[str, Any] = {
            'source': str(self.config.source), 'kind': self.config.kind,
            'frame_index': self._index, 'native_size': native,
        }
        if self.config.kind == 'file':
            meta['pos_frames'] = self._pos_frames
        self._index += 1
        self._pos_frames += 1
        return Frame(rgb=np.ascontiguousarray(rgb), stamp_ns=stamp, meta=meta)
