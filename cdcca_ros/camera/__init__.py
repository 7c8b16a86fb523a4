"""Frame sources for the camera node, and image <-> ROS message conversion.

No rclpy here: ``nodes/camera_node.py`` is a thin ROS wrapper over these classes.

- :mod:`~cdcca_ros.camera.base`: :class:`Camera`, :class:`Frame`, retry/backoff, stats.
- :mod:`~cdcca_ros.camera.realsense`: Intel RealSense (pyrealsense2), depth aligned to colour.
- :mod:`~cdcca_ros.camera.rs_software`: a software RealSense fed from Python (tests, demos).
- :mod:`~cdcca_ros.camera.opencv`: device index, video file, or RTSP/HTTP URL.
- :mod:`~cdcca_ros.camera.synthetic`: the drifting synthetic world of :mod:`cdcca_ros.sim`.
- :mod:`~cdcca_ros.camera.convert`: Image / CompressedImage conversion, ``annotate``.
"""

from __future__ import annotations

from typing import Any

from cdcca_ros.camera.base import Camera, CameraStats, Frame, RetryPolicy, connect_with_retry
from cdcca_ros.errors import ConfigError

KINDS: tuple[str, ...] = ('synthetic', 'opencv', 'realsense')
"""Camera kinds :func:`create_camera` knows."""


def create_camera(kind: str, *, name: str | None = None, retry: RetryPolicy | None = None,
                  **params: Any) -> Camera:
    """Build a camera of ``kind`` from its config fields (what a node's parameters hold).

    Args:
        kind: one of :data:`KINDS`.
        name: name in messages (default from the source).
        retry: reconnect backoff.
        **params: fields of SyntheticCameraConfig, OpenCVCameraConfig or RealSenseConfig.

    Raises:
        ConfigError: unknown kind, unknown or invalid parameter.
        CameraError: the kind's library cannot be imported (pyrealsense2).
    """
    # Imported here so that a node using one kind does not import the others' libraries.
    if kind == 'synthetic':
        from cdcca_ros.camera.synthetic import SyntheticCamera, SyntheticCameraConfig
        cls, config_cls = SyntheticCamera, SyntheticCameraConfig
    elif kind == 'opencv':
        from cdcca_ros.camera.opencv import OpenCVCamera, OpenCVCameraConfig
        cls, config_cls = OpenCVCamera, OpenCVCameraConfig
    elif kind == 'realsense':
        from cdcca_ros.camera.realsense import RealSenseCamera, RealSenseConfig
        cls, config_cls = RealSenseCamera, RealSenseConfig
    else:
        raise ConfigError(f'unknown camera kind {kind!r}; known: {", ".join(KINDS)}')
    try:
        config = config_cls(**params)
    except TypeError as err:
        raise ConfigError(f'camera kind {kind!r}: {err}') from err
    return cls(config, name=name, retry=retry)


__all__ = ['Camera', 'CameraStats', 'Frame', 'KINDS', 'RetryPolicy', 'connect_with_retry',
           'create_camera']
