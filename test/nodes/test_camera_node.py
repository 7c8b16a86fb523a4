"""camera_node's compressed stream on a real graph: real sensor_msgs/CompressedImage messages
that decode to the frame published raw with the same stamp."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from ros_graph import Spinner, spin_until  # noqa: E402


def test_compressed_stream_decodes_to_the_raw_frame(ros_context_pair) -> None:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image

    from cdcca_ros.camera.convert import compressed_to_image, msg_to_rgb
    from cdcca_ros.nodes.camera_node import CameraNode
    from cdcca_ros.nodes.common import SENSOR_QOS

    ctx_robot, ctx_client = ros_context_pair
    camera = CameraNode(context=ctx_robot, parameter_overrides=[
        Parameter('fps', value=10.0), Parameter('width', value=96),
        Parameter('height', value=64), Parameter('publish_compressed', value=True),
        Parameter('jpeg_quality', value=95), Parameter('synthetic.schedule', value='source:600')])
    robot = Spinner(ctx_robot, [camera])
    client = Node('compressed_client', context=ctx_client)
    executor = SingleThreadedExecutor(context=ctx_client)
    executor.add_node(client)
    raw: dict[tuple[int, int], Image] = {}
    jpeg: dict[tuple[int, int], CompressedImage] = {}

    def key(msg) -> tuple[int, int]:
        return msg.header.stamp.sec, msg.header.stamp.nanosec

    client.create_subscription(Image, 'image_raw', lambda m: raw.setdefault(key(m), m),
                               SENSOR_QOS)
    client.create_subscription(CompressedImage, 'image_raw/compressed',
                               lambda m: jpeg.setdefault(key(m), m), SENSOR_QOS)
    try:
        assert spin_until([executor], lambda: len(set(raw) & set(jpeg)) >= 2, 30.0), (
            len(raw), len(jpeg))
        for stamp in sorted(set(raw) & set(jpeg))[:2]:
            compressed = jpeg[stamp]
            assert type(compressed) is CompressedImage and compressed.format == 'jpeg'
            assert compressed.header == raw[stamp].header
            frame = msg_to_rgb(raw[stamp])
            decoded = compressed_to_image(compressed, 'rgb8')
            assert decoded.shape == frame.shape == (64, 96, 3)
            error = np.abs(decoded.astype(int) - frame.astype(int)).mean()
            # JPEG at quality 95: a few levels off; swapped channels would be tens.
            assert error < 4.0, error
            assert np.abs(decoded[..., ::-1].astype(int) - frame.astype(int)).mean() > 4 * error
    finally:
        executor.shutdown()
        client.destroy_node()
        robot.close()
