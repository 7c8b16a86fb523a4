"""device_node under hostile input on a real graph: questions too long for the model, through
the ``ask`` service and the ``question`` topic, deltas for other devices, rollback with nothing
to roll back to. The node stays alive, says why on diagnostics, and keeps answering.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from ros_graph import spin_until  # noqa: E402


@pytest.fixture
def tiny_runtime(tiny_student_dir, tmp_path):
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models import bundled

    return DeviceRuntime(bundled.load(str(tiny_student_dir)), 'robot1',
                         state_dir=tmp_path / 'state')


def test_long_questions_are_refused_and_the_node_keeps_answering(ros_context_pair,
                                                                 tiny_runtime):
    from cdcca_ros.msg import Answer, DwcDelta, Question
    from cdcca_ros.srv import Ask, Rollback
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.nodes.common import DELTA_QOS, RELIABLE_QOS, NodeSpinner
    from cdcca_ros.nodes.device_node import DeviceNode

    ctx_robot, ctx_client = ros_context_pair
    device = DeviceNode(tiny_runtime, context=ctx_robot)
    spinner = NodeSpinner([device], 'events', context=ctx_robot).start()
    client = Node('hostile_client', context=ctx_client)
    executor = SingleThreadedExecutor(context=ctx_client)
    executor.add_node(client)
    answers, diags = [], []
    client.create_subscription(Answer, 'answer', answers.append, 50)
    client.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 10)
    question_pub = client.create_publisher(Question, 'question', RELIABLE_QOS)
    delta_pub = client.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS)
    ask = client.create_client(Ask, 'ask')
    rollback = client.create_client(Rollback, 'rollback')
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame = image_to_msg(rgb, 'rgb8', Image)
    long = ' '.join(['what'] * 600) + '?'

    def call(c, request):
        future = c.call_async(request)
        assert spin_until([executor], future.done, 60.0), 'service call timed out'
        return future.result()

    try:
        assert spin_until([executor], lambda: ask.service_is_ready()
                          and rollback.service_is_ready(), 30.0)
        # Through ask: a long question, then a long choices list.
        for request in (Ask.Request(question=long, use_image=True, image=frame),
                        Ask.Request(question='what color?', choices=['red'] * 400,
                                    use_image=True, image=frame)):
            response = call(ask, request)
            assert not response.success and 'context' in response.message
        good = call(ask, Ask.Request(question='what color is the circle?', use_image=True,
                                     image=frame))
        assert good.success and good.answer.answer == tiny_runtime.answer(
            rgb, 'what color is the circle?').text
        # Through the topic: the long one refused, the questions after it answered.
        assert spin_until([executor], lambda: question_pub.get_subscription_count() > 0, 10.0)
        for i, text in enumerate([long, 'what color is the circle?', long,
                                  'how many objects are there?']):
            question_pub.publish(Question(question_id=f't{i}', question=text, use_image=True,
                                          image=frame))
        assert spin_until([executor], lambda: {a.question_id for a in answers} >= {'t1', 't3'},
                          30.0), [a.question_id for a in answers]
        assert not any(a.question_id in ('t0', 't2') for a in answers)
        # A delta for another robot sharing the graph is counted, not applied or rejected.
        assert spin_until([executor], lambda: delta_pub.get_subscription_count() > 0, 10.0)
        delta_pub.publish(DwcDelta(device_id='robot2', chunk_count=1, chunk=b'x'))
        # Rollback with nothing to roll back to: refused, the node lives on.
        r = call(rollback, Rollback.Request())
        assert not r.success and 'nothing to roll back' in r.message

        def counted() -> bool:
            for array in diags:
                for status in array.status:
                    values = {kv.key: kv.value for kv in status.values}
                    if (values.get('questions_refused') == '4'
                            and values.get('deltas_other_device') == '1'):
                        return True
            return False
        assert spin_until([executor], counted, 10.0), device.counters
        assert device.counters['errors'] == 0
        assert call(ask, Ask.Request(question='what color is the circle?', use_image=True,
                                     image=frame)).success
    finally:
        executor.shutdown()
        client.destroy_node()
        spinner.shutdown()
        device.destroy_node()
