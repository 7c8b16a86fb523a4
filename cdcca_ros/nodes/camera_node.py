"""camera_node: publishes frames of a RealSense, an OpenCV capture or the synthetic world.

Topics (relative: namespaces and remapping apply):
    image_raw (sensor_msgs/Image, rgb8, sensor-data QoS)
    image_raw/compressed (sensor_msgs/CompressedImage, JPEG; when publish_compressed)
    depth/image_raw (sensor_msgs/Image, 16UC1 millimetres; RealSense with enable_depth)
    scene (std_msgs/String, JSON; synthetic source): domain and a ground-truth question
    /diagnostics (fps, frames, drops, connected, reconnects, last error)

A missing camera is not a crash: the node logs the error, reports it on /diagnostics and tries
again every ``reconnect_period_s``. A robot that already runs a camera driver needs no
camera_node: start the device set with ``use_camera:=false image_topic:=<the driver's topic>``.

Runtime parameters (``ros2 param set``): ``fps`` (the source reopens at the new rate),
``frame_id``, ``publish_compressed``, ``jpeg_quality``, ``reconnect_period_s`` and the synthetic
source's ``synthetic.schedule`` / ``synthetic.seed``; the rest is read-only.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from cdcca_ros.camera import create_camera
from cdcca_ros.camera.base import Camera, Frame
from cdcca_ros.camera.convert import image_to_compressed, image_to_msg
from cdcca_ros.camera.synthetic import scene_to_json
from cdcca_ros.errors import CameraError, CdccaError, ConfigError
from cdcca_ros.nodes.common import (
    ERROR,
    OK,
    SENSOR_QOS,
    WARN,
    Diagnostics,
    declare_table,
    destroy_on_error,
    spin_node,
)
from cdcca_ros.nodes.process import route_logging, run_node

SOURCE_PARAMS = ('fps', 'synthetic.schedule', 'synthetic.seed')
"""Runtime parameters whose change reopens the frame source."""


def camera_fields(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Map the node's parameters to ``create_camera`` arguments."""
    kind = params['source']
    common = {'width': params['width'], 'height': params['height']}
    if kind == 'synthetic':
        return kind, {**common, 'fps': params['fps'], 'schedule': params['synthetic.schedule'],
                      'seed': params['synthetic.seed'], 'clock': 'wall'}
    if kind == 'realsense':
        return kind, {**common, 'fps': int(round(params['fps'])),
                      'serial': params['realsense.serial'] or None,
                      'depth': params['realsense.enable_depth']}
    device = params['opencv.device']
    source: int | str = int(device) if device.isdigit() else device
    return kind, {**common, 'fps': params['fps'], 'source': source}


class CameraNode(Node):
    """Thin ROS adapter over :class:`cdcca_ros.camera.base.Camera`."""

    @destroy_on_error
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('camera_node', **kwargs)
        self.params = declare_table(self, 'camera_node', on_change=self._on_param)
        kind, fields = camera_fields(self.params)
        self.camera: Camera = create_camera(kind, **fields)
        self._image_pub = self.create_publisher(Image, 'image_raw', SENSOR_QOS)
        self._jpeg_pub = None
        if self.params['publish_compressed']:
            self._jpeg_pub = self.create_publisher(CompressedImage, 'image_raw/compressed',
                                                   SENSOR_QOS)
        self._depth_pub = (self.create_publisher(Image, 'depth/image_raw', SENSOR_QOS)
                           if kind == 'realsense' and self.params['realsense.enable_depth']
                           else None)
        # Ground truth of synthetic frames (JSON: domain, a question and its answers), for
        # evaluation (the demo) and rqt.
        self._scene_pub = (self.create_publisher(String, 'scene', 10)
                           if kind == 'synthetic' else None)
        self._diag = Diagnostics(self, hardware_id=self.camera.describe())
        self._last_stamp = -1
        self._published = 0
        self._connecting = threading.Lock()
        self._error = ''
        self._tick_timer = self.create_timer(1.0 / self.params['fps'], self._tick)
        self.create_timer(1.0, self._report)
        self._reconnect_timer = self.create_timer(self.params['reconnect_period_s'],
                                                  self._ensure_connected)
        self._ensure_connected()

    def _on_param(self, changes: dict[str, Any]) -> None:
        """Apply runtime changes; a new source is built (and so checked) before anything
        changes, and a ConfigError refuses the whole set."""
        params = {**self.params, **changes}
        camera = None
        reopen = any(name in changes for name in SOURCE_PARAMS)
        if reopen and (params['source'] == 'synthetic' or 'fps' in changes):
            try:
                kind, fields = camera_fields(params)
                camera = create_camera(kind, **fields)
            except CdccaError as err:
                raise ConfigError(f'{", ".join(changes)} refused: {err}') from err
        if 'publish_compressed' in changes:
            if changes['publish_compressed'] and self._jpeg_pub is None:
                self._jpeg_pub = self.create_publisher(CompressedImage, 'image_raw/compressed',
                                                       SENSOR_QOS)
            elif not changes['publish_compressed'] and self._jpeg_pub is not None:
                self.destroy_publisher(self._jpeg_pub)
                self._jpeg_pub = None
        if 'fps' in changes:
            self._tick_timer.cancel()
            self.destroy_timer(self._tick_timer)
            self._tick_timer = self.create_timer(1.0 / changes['fps'], self._tick)
        if 'reconnect_period_s' in changes:
            self._reconnect_timer.cancel()
            self.destroy_timer(self._reconnect_timer)
            self._reconnect_timer = self.create_timer(changes['reconnect_period_s'],
                                                      self._ensure_connected)
        if camera is not None:
            old, self.camera = self.camera, camera
            old.disconnect()
            self.get_logger().info(f'source reopened: {camera.describe()}')
            self._ensure_connected()
        # frame_id and jpeg_quality are read from self.params at each frame.

    def _ensure_connected(self) -> None:
        if self.camera.is_connected or not self._connecting.acquire(blocking=False):
            return
        try:
            self.camera.connect()
            self.camera.start_reader()
            self._error = ''
            self.get_logger().info(f'connected: {self.camera.describe()}')
        except CameraError as err:
            if str(err) != self._error:
                self.get_logger().error(f'{err}; retrying every '
                                        f'{self.params["reconnect_period_s"]} s')
            self._error = str(err)
        finally:
            self._connecting.release()

    def _tick(self) -> None:
        if not self.camera.is_connected:
            return
        try:
            frame = self.camera.read_latest(max_age_ms=max(1000.0, 3000.0 / self.params['fps']))
        except CdccaError as err:
            self._error = str(err)
            return
        if frame.stamp_ns == self._last_stamp:
            return
        self._last_stamp = frame.stamp_ns
        self.publish_frame(frame)

    def publish_frame(self, frame: Frame) -> None:
        """Publish one frame (colour, compressed, depth, scene) with one header."""
        header = Header(frame_id=self.params['frame_id'])
        header.stamp.sec, header.stamp.nanosec = divmod(frame.stamp_ns, 1_000_000_000)
        self._image_pub.publish(image_to_msg(frame.rgb, 'rgb8', Image, header=header))
        if self._jpeg_pub is not None:
            self._jpeg_pub.publish(image_to_compressed(
                frame.rgb, 'jpeg', CompressedImage, quality=self.params['jpeg_quality'],
                header=header))
        if self._depth_pub is not None and frame.depth is not None:
            self._depth_pub.publish(image_to_msg(frame.depth, '16UC1', Image, header=header))
        if self._scene_pub is not None:
            # Ground truth of the frame: its domain and one question with its answers.
            self._scene_pub.publish(String(data=scene_to_json(frame, self.camera.ask(frame))))
        self._published += 1

    def _report(self) -> None:
        stats = self.camera.stats
        values = {'source': self.camera.describe(), 'connected': self.camera.is_connected,
                  'published': self._published,
                  'fps': f'{stats.fps:.2f}', 'frames': stats.frames, 'drops': stats.drops,
                  'reconnects': stats.reconnects, 'last_error': self._error or stats.last_error}
        if not self.camera.is_connected:
            self._diag.publish(ERROR, 'camera not connected', values)
        elif self._error:
            self._diag.publish(WARN, 'camera read errors', values)
        else:
            self._diag.publish(OK, 'streaming', values)

    def destroy_node(self) -> None:
        self.camera.disconnect()
        super().destroy_node()


def _spin(args: list[str] | None) -> int:
    node = CameraNode()
    unroute = route_logging(node)
    try:
        spin_node(node)
    finally:
        unroute()
        node.destroy_node()
    return 0


def main(args: list[str] | None = None) -> None:
    sys.exit(run_node('camera_node', _spin, args, table='camera_node', doc=__doc__))


if __name__ == '__main__':
    main()
