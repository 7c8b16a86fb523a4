"""cloud_node with backend:=ray on a real graph: uplink messages in, the fleet on a local Ray
cluster runs the round, the signed delta and the status come out on the node's topics; and
backend:=local (the default) never imports Ray."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ros_graph import Spinner, spin_until  # noqa: E402

DEVICE = 'robot1'


def test_the_local_backend_never_imports_ray(tmp_path):
    code = ('import sys\n'
            'from cdcca_ros.nodes import cloud_node\n'
            'from cdcca_ros.nodes.tables import validate\n'
            f'p = validate("cloud_node", {{"state_dir": {str(tmp_path)!r}, '
            '"guard.anchor": "none"})\n'
            'rt = cloud_node.build_runtime(p)\n'
            'assert type(rt).__name__ == "CloudRuntime", type(rt)\n'
            'print("RAY" if "ray" in sys.modules else "NO-RAY")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == 'NO-RAY'


def _uts_msg(tokens, indices, question, sample_id, space):
    from cdcca_ros.msg import UtsTokens

    from cdcca_ros.core.uts import pack_tokens

    packed = pack_tokens(tokens[indices], 'fp16')
    return UtsTokens(device_id=DEVICE, sample_id=sample_id, model_version=f'{DEVICE}:v0',
                     question=question, num_tokens=space.num_tokens, token_dim=space.dim,
                     kept_indices=[int(i) for i in indices], dtype=packed.dtype,
                     scales=[float(s) for s in packed.scale], payload=packed.data)


def test_a_round_on_the_fleet_reaches_the_nodes_topics(ros_context, tmp_path):
    pytest.importorskip('ray')
    import torch
    from cdcca_ros.msg import AdaptationStatus, DwcDelta, UtsTokens
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from cdcca_ros.bench.common import build_tiny_pair
    from cdcca_ros.core import wire
    from cdcca_ros.nodes.cloud_node import CloudNode
    from cdcca_ros.nodes.common import DELTA_QOS, RELIABLE_QOS, UPLINK_QOS
    from cdcca_ros.nodes.delta_msgs import DeltaReassembler
    from cdcca_ros.sim.world import World

    teacher, student = build_tiny_pair(0)
    teacher.save(tmp_path / 'teacher')
    student.save(tmp_path / 'student')
    space = student.vision_space()
    samples = World(2).samples('night', 4, 64, start=1_700_000)
    with torch.no_grad():
        tokens = student.vision_tokens([s.image for s in samples])
    params = {'backend': 'ray', 'teacher': str(tmp_path / 'teacher'),
              'student': str(tmp_path / 'student'), 'state_dir': str(tmp_path / 'cloud'),
              'ray.workers': 1, 'round.min_samples': 4, 'guard.max_steps': 4,
              'guard.min_steps': 2, 'guard.gate': False, 'guard.audit': False,
              'guard.pull_below': 0.0, 'guard.anchor': 'none', 'dwc.refit_steps': 0}
    cloud = CloudNode(context=ros_context, namespace='cloud', parameter_overrides=[
        Parameter(k, value=v) for k, v in params.items()])
    spinner = Spinner(ros_context, [cloud])
    client = Node('fleet_client', namespace='cloud', context=ros_context)
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(client)
    got = {'delta': [], 'status': [], 'diag': []}
    client.create_subscription(DwcDelta, 'dwc_delta', got['delta'].append, DELTA_QOS)
    client.create_subscription(AdaptationStatus, 'adaptation_status', got['status'].append,
                               RELIABLE_QOS)
    client.create_subscription(DiagnosticArray, '/diagnostics',
                               lambda m: got['diag'].extend(m.status), 20)
    pub = client.create_publisher(UtsTokens, 'uts_tokens', UPLINK_QOS)
    try:
        assert spin_until([executor], lambda: cloud.ready or cloud.fatal_error, 300.0)
        assert cloud.fatal_error is None, cloud.fatal_error
        assert type(cloud.runtime).__name__ == 'FleetEngine'
        assert spin_until([executor], lambda: pub.get_subscription_count() > 0, 30.0)
        for i, s in enumerate(samples):
            pub.publish(_uts_msg(tokens[i], torch.arange(0, space.num_tokens, 2), s.question,
                                 f'{DEVICE}-{i}', space))
        done = AdaptationStatus.STATE_ROUND_DONE
        assert spin_until([executor], lambda: any(m.state == done for m in got['status']),
                          240.0), (cloud.counters, cloud.errors.text)
        status = next(m for m in got['status'] if m.state == done)
        assert status.model_version == f'{DEVICE}:v1' and status.uplink_samples == 4
        assert spin_until([executor], lambda: len(got['delta']) >= 1, 30.0)
        envelope = None
        reassembler = DeltaReassembler()
        for msg in got['delta']:
            envelope = reassembler.add(msg) or envelope
        public = wire.load_public_key(tmp_path / 'cloud' / 'cloud_public.pem')
        envelope.verify(public)
        assert (envelope.base_version, envelope.new_version) == (0, 1)
        assert envelope.new_hash == status.model_hash
        assert cloud.counters['samples'] == 4 and cloud.counters['rounds'] == 1
        # An image uplink sample: the fleet holds no student to encode the frame, so it is
        # refused with the reason; the node keeps serving.
        from cdcca_ros.core.uplink.image import encode_jpeg

        frame = UtsTokens(device_id=DEVICE, sample_id=f'{DEVICE}-frame',
                          model_version=f'{DEVICE}:v0', question=samples[0].question,
                          num_tokens=space.num_tokens, token_dim=space.dim, dtype='image')
        frame.image.format, frame.image.data = 'jpeg', encode_jpeg(samples[0].image)
        pub.publish(frame)
        assert spin_until([executor], lambda: cloud.counters['samples_rejected'] == 1, 30.0)
        assert 'backend local' in cloud.errors.text and cloud.counters['samples'] == 4
        assert spin_until([executor], lambda: any(
            kv.key == 'fleet.workers_alive' and kv.value == '1/1'
            for st in got['diag'] for kv in st.values), 10.0)
        # Lifecycle: deactivate keeps the fleet, cleanup unloads it (actors and Ray stop).
        import ray
        from rclpy.lifecycle import TransitionCallbackReturn

        assert cloud.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert type(cloud.runtime).__name__ == 'FleetEngine' and ray.is_initialized()
        assert cloud.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert cloud.runtime is None and cloud.lifecycle_state == 'unconfigured'
        assert not ray.is_initialized()
        # Unsubscribed: the bridge keeps the uplink.
        assert spin_until([executor], lambda: pub.get_subscription_count() == 0, 10.0)
    finally:
        executor.shutdown()
        client.destroy_node()
        spinner.close()  # destroys the node: the fleet's actors and Ray stop (if still up)
    import ray

    assert not ray.is_initialized()
