"""device_node captions on a real graph: ``describe`` on the ask service, and the ``caption``
topic at ``caption_rate_hz`` (bundled student with its caption head, loaded from the model
parameter); both are offered to UTS like answers unless ``uts.captions`` is off."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from ros_graph import spin_until  # noqa: E402


def test_describe_and_the_caption_topic(ros_context_pair, tmp_path):
    from cdcca_ros.msg import Answer
    from cdcca_ros.srv import Ask
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.nodes.common import SENSOR_QOS, NodeSpinner
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.sim.world import World

    ctx_robot, ctx_client = ros_context_pair
    device = DeviceNode(context=ctx_robot, parameter_overrides=[
        Parameter('model', value='bundled:student'),
        Parameter('state_dir', value=str(tmp_path / 'state')),
        Parameter('frame_max_age_ms', value=3.6e6)])
    handed: list[tuple[str, bool]] = []  # what UTS is offered: (text, is a caption)
    device.listeners.append(lambda sample, header, rgb: handed.append((sample.text,
                                                                       sample.caption)))
    spinner = NodeSpinner([device], 'events', context=ctx_robot).start()
    client = Node('caption_test_client', context=ctx_client)
    executor = SingleThreadedExecutor(context=ctx_client)
    executor.add_node(client)
    answers: list[Answer] = []
    captions: list[Answer] = []
    client.create_subscription(Answer, 'answer', answers.append, 50)
    client.create_subscription(Answer, 'caption', captions.append, 50)
    image_pub = client.create_publisher(Image, 'image', SENSOR_QOS)
    ask = client.create_client(Ask, 'ask')
    try:
        assert spin_until([executor], lambda: device.ready and ask.service_is_ready(), 120.0)
        runtime = device.runtime
        assert runtime is not None and runtime.caption_head is not None
        assert device._caption_timer is None  # default: no caption topic
        rgb = np.ascontiguousarray(World(0).sample('source', 4, (64, 48)).image)
        expected = runtime.caption(rgb)
        msg = image_to_msg(rgb, 'rgb8', Image, header=Header(frame_id='cam'))
        msg.header.stamp = client.get_clock().now().to_msg()
        assert spin_until([executor], lambda: image_pub.get_subscription_count() > 0, 10.0)
        for _ in range(20):
            image_pub.publish(msg)
            if spin_until([executor], lambda: device._latest is not None, 0.5):
                break
        future = ask.call_async(Ask.Request(question_id='d1', question='describe'))
        assert spin_until([executor], future.done, 60.0)
        response = future.result()
        assert response.success, response.message
        assert response.answer.answer == expected.text and response.answer.choice_index == -1
        assert response.answer.entropy_mean == pytest.approx(expected.entropy_mean, rel=1e-5)
        assert spin_until([executor], lambda: len(answers) == 1, 10.0)
        assert answers[0].answer == expected.text and not captions
        assert handed == [(expected.text, True)]  # offered to UTS as a caption sample
        # The caption topic at a rate set while running; offered to UTS too.
        device.set_parameters([Parameter('caption_rate_hz', value=10.0)])
        assert spin_until([executor], lambda: len(captions) >= 3, 30.0), len(captions)
        assert all(c.answer == expected.text and c.question == 'describe' for c in captions)
        assert spin_until([executor], lambda: len(handed) >= 3, 10.0)
        assert set(handed) == {(expected.text, True)} and len(answers) == 1
        # uts.captions off: captions are still published, no longer offered.
        device.set_parameters([Parameter('uts.captions', value=False)])
        offered, published = len(handed), len(captions)
        assert spin_until([executor], lambda: len(captions) >= published + 3, 30.0)
        assert len(handed) <= offered + 1  # (one queued before the set, at most)
        device.set_parameters([Parameter('caption_rate_hz', value=0.0)])
        assert device._caption_timer is None
        assert device.counters['captions'] >= 6
        bad = device.set_parameters([Parameter('caption_rate_hz', value=-1.0)])
        assert not bad[0].successful and device._caption_timer is None
    finally:
        executor.shutdown()
        client.destroy_node()
        spinner.shutdown()
        device.destroy_node()
