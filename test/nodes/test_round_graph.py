"""One real CD-CCA round on a ROS graph: device_node + uts_node -> cloud_node -> device_node.

The uplink (UtsTokens) and the chunked downlink (DwcDelta) travel over DDS between two
contexts (robot and cloud); the device's version and its answers change, and a tampered
delta published afterwards is rejected with the answers unchanged.
"""
from __future__ import annotations

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.parameter import Parameter  # noqa: E402
from ros_graph import Spinner, spin_until  # noqa: E402
from tiny_models import QUESTION  # noqa: E402


@pytest.fixture(scope='module')
def models(red_models):
    return red_models


def _image_msg(rgb):
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg

    return image_to_msg(rgb, 'rgb8', Image)


def test_round_over_ros_changes_version_and_answers(ros_context_pair, models, tmp_path):
    from cdcca_ros.msg import AdaptationStatus, DwcDelta
    from cdcca_ros.srv import Ask, Rollback
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from cdcca_ros.core.akd import AKDConfig
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.rounds.config import GuardConfig
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.cloud_node import CloudNode
    from cdcca_ros.nodes.delta_msgs import envelope_to_msgs
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.nodes.uts_node import UtsNode

    teacher, student_dir, images = models
    private, public = generate_keypair()
    ctx_robot, ctx_cloud = ros_context_pair
    device_rt = DeviceRuntime(bundled.load(str(student_dir)), 'robot1', public,
                              tmp_path / 'device', probe_image=images[0])
    cloud_rt = CloudRuntime(teacher, bundled.load(str(student_dir)), private, CloudConfig(
        min_samples=len(images), akd=AKDConfig(steps=30, lr=5e-3, batch_size=6),
        codec='sparse', budget_bytes=None, guard=GuardConfig.plain(30)),
        state_dir=tmp_path / 'cloud')
    device = DeviceNode(device_rt, context=ctx_robot, parameter_overrides=[
        Parameter('uts.entropy_threshold', value=0.0),
        Parameter('uts.keep_ratio', value=0.5)])
    uts = UtsNode(device, context=ctx_robot)
    cloud = CloudNode(cloud_rt, context=ctx_cloud, parameter_overrides=[
        Parameter('dwc.chunk_bytes', value=1024)])  # force several chunks
    robot = Spinner(ctx_robot, [device, uts])
    cloud_spin = Spinner(ctx_cloud, [cloud])
    client = Node('round_client', context=ctx_robot)
    executor = SingleThreadedExecutor(context=ctx_robot)
    executor.add_node(client)
    statuses = []
    client.create_subscription(AdaptationStatus, 'adaptation_status', statuses.append, 50)
    ask = client.create_client(Ask, 'ask')
    rollback = client.create_client(Rollback, 'rollback')

    def call(cli, request):
        future = cli.call_async(request)
        assert spin_until([executor], future.done, 60.0), 'service call timed out'
        return future.result()

    def answers():
        out = []
        for im in images:
            r = call(ask, Ask.Request(question=QUESTION, use_image=True, image=_image_msg(im)))
            assert r.success, r.message
            out.append(r.answer)
        return out

    try:
        assert spin_until([executor], ask.service_is_ready, 30.0)
        # Wait until the cloud's subscription to uts_tokens is matched before asking.
        assert spin_until([executor], lambda: uts._pub.get_subscription_count() > 0, 30.0)
        before = answers()
        assert all(a.model_version == 'robot1:v0' for a in before)
        # Six uncertain samples reach the cloud -> a round -> a chunked delta -> hot-apply.
        assert spin_until([executor], lambda: device_rt.version == 1, 120.0), (
            cloud.counters, device.counters, cloud.errors.text, device.errors.text)
        # Only one round in this test: the asks below must not start another one.
        cloud_rt.cfg.min_samples = 10**6
        after = answers()
        assert all(a.model_version == 'robot1:v1' for a in after)
        assert [a.answer for a in after] != [a.answer for a in before]
        assert sum(a.answer == 'red' for a in after) > sum(a.answer == 'red' for a in before)
        assert cloud.counters['rounds'] == 1 and cloud.counters['samples'] >= len(images)
        assert spin_until([executor], lambda: any(
            s.state == AdaptationStatus.STATE_APPLIED for s in statuses), 10.0)
        applied = next(s for s in statuses if s.state == AdaptationStatus.STATE_APPLIED)
        assert applied.downlink_bytes > 0 and applied.apply_ms > 0

        # A replayed and a tampered delta on the same topic: rejected, answers unchanged.
        envelope = cloud.results[-1].envelope
        tampered = envelope_to_msgs(envelope, 1024)
        tampered[0].chunk = bytes([tampered[0].chunk[0] ^ 1]) + bytes(tampered[0].chunk[1:])
        from cdcca_ros.nodes.common import DELTA_QOS

        pub = client.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS)
        assert spin_until([executor], lambda: pub.get_subscription_count() > 0, 10.0)
        rejected = device.counters['deltas_rejected']
        for m in envelope_to_msgs(envelope, 4096) + tampered:
            pub.publish(m)
        assert spin_until([executor], lambda: device.counters['deltas_rejected'] >= rejected + 2,
                          20.0), device.counters
        assert device_rt.version == 1
        assert [a.answer for a in answers()] == [a.answer for a in after]

        # Rollback service restores the previous answers.
        r = call(rollback, Rollback.Request())
        assert r.success and r.model_version == 'robot1:v2'
        assert [a.answer for a in answers()] == [a.answer for a in before]
    finally:
        executor.shutdown()
        client.destroy_node()
        robot.close()
        cloud_spin.close()
