"""The image uplink mode and the basis packing end to end on the bundled models, on a ROS graph:
device_node + uts_node send selected samples (a JPEG frame, or tokens coded in the shared basis)
to cloud_node, which builds a round from them and sends a delta the device applies. A sample
coded in another basis version is refused by the cloud, which keeps serving.
"""
from __future__ import annotations

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.parameter import Parameter  # noqa: E402
from ros_graph import Spinner, spin_until  # noqa: E402

SAMPLES = 4


@pytest.fixture(scope='module')
def frames():
    from cdcca_ros.sim.domains import DRIFTED
    from cdcca_ros.sim.world import World

    return World(5).samples(DRIFTED[0], SAMPLES, (640, 480), start=2_100_000)


@pytest.mark.parametrize('mode', ['image', 'basis'])
def test_uplink_mode_runs_a_round_end_to_end(ros_context_pair, frames, tmp_path, mode):
    from cdcca_ros.msg import UtsTokens
    from cdcca_ros.srv import Ask
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.core.akd import AKDConfig
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.rounds.config import GuardConfig
    from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.models import bundled
    from cdcca_ros.models.bundled import BUNDLED_DIR
    from cdcca_ros.nodes.cloud_node import CloudNode, frame_tokens
    from cdcca_ros.nodes.common import RELIABLE_QOS
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.nodes.uts_node import UtsNode

    private, public = generate_keypair()
    ctx_robot, ctx_cloud = ros_context_pair
    device_rt = DeviceRuntime(bundled.load('bundled:student'), 'robot1', public,
                              tmp_path / 'device', trace_probe=False)
    cloud_rt = CloudRuntime(bundled.load('bundled:teacher'), bundled.load('bundled:student'),
                            private, CloudConfig(min_samples=SAMPLES, akd=AKDConfig(
                                steps=5, batch_size=4), codec='sparse', budget_bytes=None,
                                guard=GuardConfig.plain(5)),
                            state_dir=tmp_path / 'cloud')
    uplink = [Parameter('uts.uplink', value='image')] if mode == 'image' else [
        Parameter('uts.pack_dtype', value='basis'), Parameter('uts.keep_ratio', value=1.0),
        Parameter('uts.budget_bytes', value=160)]
    # No audit draws: every sample goes up in the mode under test.
    device = DeviceNode(device_rt, context=ctx_robot, parameter_overrides=[
        Parameter('uts.entropy_threshold', value=0.0),
        Parameter('uts.audit_fraction', value=0.0), *uplink])
    uts = UtsNode(device, context=ctx_robot)
    cloud = CloudNode(cloud_rt, context=ctx_cloud)
    robot = Spinner(ctx_robot, [device, uts])
    cloud_spin = Spinner(ctx_cloud, [cloud])
    client = Node('uplink_client', context=ctx_robot)
    executor = SingleThreadedExecutor(context=ctx_robot)
    executor.add_node(client)
    sent: list = []
    client.create_subscription(UtsTokens, 'uts_tokens', sent.append, RELIABLE_QOS)
    ask = client.create_client(Ask, 'ask')
    try:
        assert spin_until([executor], ask.service_is_ready, 30.0)
        assert spin_until([executor], lambda: uts._pub.get_subscription_count() >= 2, 30.0)
        for s in frames:
            future = ask.call_async(Ask.Request(question=s.question, use_image=True,
                                                image=image_to_msg(s.image, 'rgb8', Image)))
            assert spin_until([executor], future.done, 60.0) and future.result().success
        assert spin_until([executor], lambda: device_rt.version == 1, 120.0), (
            cloud.counters, uts.counters, cloud.errors.latest(), uts.errors.latest())
        assert spin_until([executor], lambda: len(sent) >= SAMPLES, 10.0)
        assert cloud.counters['samples'] == SAMPLES and cloud.counters['samples_rejected'] == 0
        msg = sent[0]
        if mode == 'image':
            assert msg.dtype == 'image' and msg.image.format == 'jpeg'
            assert len(msg.payload) == 0 and len(msg.kept_indices) == 0
            assert 1000 < len(msg.image.data) < 640 * 480
            assert tuple(frame_tokens(msg, cloud_rt.student).shape) == (msg.num_tokens,
                                                                         msg.token_dim)
        else:
            basis = TokenBasis.load(BUNDLED_DIR / 'student' / BASIS_FILE)
            assert msg.dtype == 'basis' and msg.basis_version == basis.version
            assert len(msg.kept_indices) == 0 and 0 < len(msg.payload) <= 160
            assert cloud.counters['uplink_bytes'] < SAMPLES * 200
            # The same sample in another basis version: refused, the cloud keeps serving.
            stray = client.create_publisher(UtsTokens, 'uts_tokens', RELIABLE_QOS)
            msg.basis_version, msg.sample_id = 'f' * 16, 'robot1-stray'
            stray.publish(msg)
            assert spin_until([executor], lambda: cloud.counters['samples_rejected'] == 1,
                              20.0), cloud.counters
            assert 'basis' in cloud.errors.latest()[0]
            assert cloud.counters['samples'] == SAMPLES
    finally:
        executor.shutdown()
        client.destroy_node()
        robot.close()
        cloud_spin.close()


def test_both_sides_refuse_a_basis_of_another_encoder(tmp_path):
    import torch

    from cdcca_ros.core.uplink.basis import fit_basis
    from cdcca_ros.errors import BasisMismatchError, ConfigError
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.cloud_node import cloud_basis
    from cdcca_ros.nodes.tables import validate
    from cdcca_ros.nodes.uts_node import device_basis

    student = bundled.load('bundled:student')
    space = student.vision_space()
    # The shipped basis belongs to the bundled student's encoder: both sides find it.
    assert device_basis(validate('device_node', {}), space).version == \
        cloud_basis(validate('cloud_node', {}), space).version
    other = fit_basis(torch.randn(300, space.dim), 'another-vit#0000:d64:n10:g3x3:cls')
    path = other.save(tmp_path / 'other.safetensors')
    with pytest.raises(BasisMismatchError, match='fitted for'):
        device_basis(validate('device_node', {'uts.basis': str(path)}), space)
    with pytest.raises(BasisMismatchError, match='fitted for'):
        cloud_basis(validate('cloud_node', {'uplink_basis': str(path)}), space)
    with pytest.raises(ConfigError, match='no token basis'):
        device_basis(validate('device_node', {'uts.basis': str(tmp_path / 'none')}), space)
