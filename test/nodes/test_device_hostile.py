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


@pytest.fixture(scope='module')
def hostile_graph(tiny_student_dir, tmp_path_factory):
    """device_node (tiny model, a pinned cloud key) in one context, a client in another."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from cdcca_ros.core import wire
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.common import NodeSpinner
    from cdcca_ros.nodes.device_node import DeviceNode

    contexts = [Context(), Context()]
    for ctx in contexts:
        rclpy.init(context=ctx)
    runtime = DeviceRuntime(bundled.load(str(tiny_student_dir)), 'robot1',
                            wire.generate_keypair()[1],
                            state_dir=tmp_path_factory.mktemp('hostile') / 'state')
    device = DeviceNode(runtime, context=contexts[0])
    spinner = NodeSpinner([device], 'events', context=contexts[0]).start()
    client = Node('fuzz_client', context=contexts[1])
    executor = SingleThreadedExecutor(context=contexts[1])
    executor.add_node(client)
    try:
        yield device, client, executor
    finally:
        executor.shutdown()
        client.destroy_node()
        spinner.shutdown()
        device.destroy_node()
        for ctx in contexts:
            rclpy.shutdown(context=ctx)


def test_hostile_messages_on_every_input_change_nothing(hostile_graph):
    """Hypothesis picks the seeds of batches of hostile messages (the fuzz bench's generators)
    for every input of device_node; afterwards the node serves, the adapter hash and the
    answers to good questions are unchanged, and the refusals are counted."""
    from cdcca_ros.msg import DwcDelta, Question
    from cdcca_ros.srv import Ask, Rollback
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from rcl_interfaces.srv import SetParameters
    from sensor_msgs.msg import Image

    from cdcca_ros.bench import fuzz_ros
    from cdcca_ros.nodes.common import DELTA_QOS, RELIABLE_QOS, SENSOR_QOS

    device, client, executor = hostile_graph
    pubs = {'image': client.create_publisher(Image, 'image', SENSOR_QOS),
            'question': client.create_publisher(Question, 'question', RELIABLE_QOS),
            'dwc_delta': client.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS)}
    services = {'ask': client.create_client(Ask, 'ask'),
                'rollback': client.create_client(Rollback, 'rollback'),
                'parameters': client.create_client(SetParameters,
                                                   '/device_node/set_parameters')}
    assert spin_until([executor], lambda: all(s.service_is_ready() for s in services.values())
                      and all(p.get_subscription_count() for p in pubs.values()), 30.0)
    good = fuzz_ros.good_questions(3)

    def answers() -> list[str]:
        out = []
        for question, image in good:
            future = services['ask'].call_async(Ask.Request(question=question, use_image=True,
                                                            image=image, no_uplink=True))
            assert spin_until([executor], future.done, 30.0)
            out.append(future.result().answer.answer)
        return out

    before, hash_before = answers(), device.runtime.base_hash
    make = {'image': fuzz_ros.hostile_image, 'question': fuzz_ros.hostile_question,
            'dwc_delta': fuzz_ros.hostile_delta, 'ask': fuzz_ros.hostile_ask,
            'rollback': fuzz_ros.hostile_rollback,
            'parameters': fuzz_ros.bad_parameter('device_node')}
    refused = {'ask': 0, 'rollback': 0, 'parameters': 0}

    @settings(max_examples=4, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2**32 - 1))
    def batch(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for name, pub in pubs.items():
            for _ in range(15):
                pub.publish(make[name](rng))
        for name, service in services.items():
            for _ in range(5):
                future = service.call_async(make[name](rng))
                assert spin_until([executor], future.done, 30.0), name
                result = future.result()
                ok = (all(r.successful for r in result.results) if name == 'parameters'
                      else result.success)
                refused[name] += not ok

    batch()
    assert spin_until([executor], lambda: device.counters['deltas_rejected'] > 0
                      and device.counters['rejected_images'] > 0, 20.0), device.counters
    assert refused['rollback'] == refused['parameters'] == 20 and refused['ask'] >= 10
    assert device.runtime.base_hash == hash_before and device.runtime.version == 0
    assert answers() == before
    assert device.counters['errors'] == 0, device.errors.text
