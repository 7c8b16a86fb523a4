"""Captions end to end on real graphs: a device asked ``describe`` uplinks caption samples, the
cloud keeps them apart, labels them with the teacher's captions, runs a caption round on them,
and its status (with the caption metric) comes back to the device.

The robot's nodes (device_node + uts_node + device bridge, in /robot1) and the cloud's
(cloud_node + cloud bridge, in /cloud) live in two ROS contexts joined only by the Zenoh link
(mutual TLS, per-device access control) on 127.0.0.1, as in ``test_guard_graph``. The models
are the bundled teacher and student with their caption heads, loaded from the nodes'
parameters; the cloud's anchor set is a small cut of the student's own.
"""
from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.parameter import Parameter  # noqa: E402
from ros_graph import Spinner, spin_until  # noqa: E402

DEVICE = 'robot1'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _params(values: dict) -> list:
    return [Parameter(k, value=v) for k, v in values.items()]


@pytest.fixture
def keys(tmp_path):
    from cdcca_ros.core import wire

    private, public = wire.generate_keypair()
    wire.save_private_key(private, tmp_path / 'cloud_signing_key.pem')
    wire.save_public_key(public, tmp_path / 'cloud_public.pem')
    return tmp_path / 'cloud_signing_key.pem', tmp_path / 'cloud_public.pem'


def _small_anchor(path, frames: int = 40):
    """The first ``frames`` samples of the bundled student's anchor set (a quick configure)."""
    from cdcca_ros.core.rounds.anchor import ANCHOR_FILE, read_anchor, write_anchor
    from cdcca_ros.models import bundled

    tokens, questions, answers = read_anchor(f'{bundled.resolve("bundled:student")}/'
                                             f'{ANCHOR_FILE}')
    write_anchor(path, tokens[:frames], questions[:frames],
                 None if answers is None else answers[:frames])
    return path


def test_describe_uplinks_a_caption_sample_and_its_round_reports(ros_context_pair, keys,
                                                                  tmp_path):
    from cdcca_ros.msg import AdaptationStatus
    from cdcca_ros.srv import Ask
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.core.rounds.memory import split_of
    from cdcca_ros.nodes.cloud_bridge_node import CloudBridgeNode
    from cdcca_ros.nodes.cloud_node import CloudNode
    from cdcca_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.nodes.uts_node import UtsNode
    from cdcca_ros.sim.captions import caption_samples
    from cdcca_ros.sim.world import World
    from cdcca_ros.transport.certs import create_certificates
    from cdcca_ros.transport.config import RouterConfig
    from cdcca_ros.transport.router import Router

    private_pem, public_pem = keys
    # Caption samples robot1-1..k: some train and exactly one is held out for the gate (the
    # caption split is a pure function of the id; guard.gate_fraction 0.5 here). One held-out
    # sample can never make the gain significant, so the round is refused whatever the
    # student learns: this test is about the plumbing; a shipped caption delta that a device
    # verifies and applies is in test/core/captions/test_caption_round.py.
    splits = [split_of(f'{DEVICE}-{i}', 0.0, 0.5) for i in range(1, 9)]
    k = next(n for n in range(2, 9) if splits[:n].count('gate') == 1 and 'train' in splits[:n])
    frames = [s.image for d in ('fog', 'night')
              for s in caption_samples(World(0), d, k, 48, 2_000_000)][:k]

    closers = []
    try:
        certs = tmp_path / 'certs'
        create_certificates(certs, devices=[DEVICE], cloud='cloud',
                            router_hosts=['localhost', '127.0.0.1'])
        port = _free_port()
        router = Router(RouterConfig(certs_dir=certs, listen=[f'tls/127.0.0.1:{port}'],
                                     devices=[DEVICE]))
        closers.append(router.close)
        link = {'connect': f'tls/localhost:{port}', 'certs_dir': str(certs)}
        ctx_robot, ctx_cloud = ros_context_pair
        device = DeviceNode(context=ctx_robot, namespace=DEVICE, parameter_overrides=_params({
            'device_id': DEVICE, 'model': 'bundled:student',
            'cloud_public_key': str(public_pem), 'state_dir': str(tmp_path / 'device'),
            'uts.caption_entropy_threshold': 0.0,  # every caption goes up ...
            'uts.entropy_threshold': 50.0,  # ... on its own threshold: no answer would
            'uts.audit_fraction': 0.0}))
        uts = UtsNode(device, context=ctx_robot, namespace=DEVICE)
        uts.sample_prefix = DEVICE  # ids robot1-1..k, whose splits are known (see above)
        device_bridge = CloudBridgeNode(
            context=ctx_robot, namespace=DEVICE, parameter_overrides=_params({
                **link, 'role': 'device', 'device_id': DEVICE,
                'spool_dir': str(tmp_path / 'spool')}))
        cloud = CloudNode(context=ctx_cloud, namespace='cloud', parameter_overrides=_params({
            'teacher': 'bundled:teacher', 'student': 'bundled:student',
            'state_dir': str(tmp_path / 'cloud'), 'signing_key': str(private_pem),
            'dwc.refit_steps': 0, 'round.min_samples': 1000, 'round.max_wait_s': 3600.0,
            'guard.anchor': str(_small_anchor(tmp_path / 'anchor.safetensors')),
            'guard.gate_fraction': 0.5, 'captions.min_samples': k,
            'captions.steps': 20, 'captions.anchor_frames': 16}))
        cloud_bridge = CloudBridgeNode(
            context=ctx_cloud, namespace='cloud', parameter_overrides=_params({
                **link, 'role': 'cloud', 'devices': DEVICE,
                'store_dir': str(tmp_path / 'store')}))
        for ctx, nodes in ((ctx_robot, [device, uts, device_bridge]),
                           (ctx_cloud, [cloud, cloud_bridge])):
            closers.append(Spinner(ctx, nodes).close)
        robot = Node('caption_robot_client', namespace=DEVICE, context=ctx_robot)
        cloud_side = Node('caption_cloud_client', namespace='cloud', context=ctx_cloud)
        executors = [SingleThreadedExecutor(context=ctx_robot),
                     SingleThreadedExecutor(context=ctx_cloud)]
        executors[0].add_node(robot)
        executors[1].add_node(cloud_side)
        closers += [e.shutdown for e in executors]
        closers += [robot.destroy_node, cloud_side.destroy_node]
        got: dict[str, list] = {'cloud': [], 'heard': [], 'diagnostics': []}
        cloud_side.create_subscription(DiagnosticArray, '/diagnostics',
                                       lambda m: got['diagnostics'].extend(m.status), 50)
        cloud_side.create_subscription(AdaptationStatus, 'adaptation_status',
                                       got['cloud'].append, RELIABLE_QOS)
        robot.create_subscription(AdaptationStatus, 'cloud_status', got['heard'].append,
                                  LATCHED_QOS)
        ask = robot.create_client(Ask, 'ask')

        def spin(condition, timeout_s: float) -> bool:
            return spin_until(executors, condition, timeout_s)

        assert spin(lambda: ask.service_is_ready() and device.ready and cloud.ready
                    and cloud_bridge._up_pubs['uts_tokens'].get_subscription_count() >= 1
                    and uts._pub.get_subscription_count() >= 1, 90.0), (
            device.errors.text, cloud.errors.text)
        assert spin(lambda: device_bridge.link.stats()['connected']
                    and cloud_bridge.link.stats()['connected'], 20.0), 'link never up'
        assert cloud.runtime.captions is not None  # the bundled pair has caption heads

        for rgb in frames:
            future = ask.call_async(Ask.Request(question='describe', use_image=True,
                                                image=image_to_msg(rgb, 'rgb8', Image)))
            assert spin(future.done, 30.0), 'ask timed out'
            response = future.result()
            assert response.success, response.message
            assert response.answer.choice_index == -1 and response.answer.answer
        assert spin(lambda: uts.counters['captions_selected'] == k
                    and cloud.counters['caption_samples'] == k, 30.0), (
            uts.counters, cloud.counters, cloud.errors.text)
        assert uts.counters['captions_offered'] == k

        # The caption round: its status, refused, with the caption metric (CIDEr-D points).
        done = (AdaptationStatus.STATE_ROUND_DONE, AdaptationStatus.STATE_REFUSED)
        assert spin(lambda: any(s.state in done for s in got['cloud']), 120.0), (
            cloud.counters, cloud.errors.text)
        status = next(s for s in got['cloud'] if s.state in done)
        assert status.state == AdaptationStatus.STATE_REFUSED, status.message
        detail = json.loads(status.detail)
        assert detail['task'] == 'caption' and detail['metric'] == 'cider'
        assert detail['outcome'] == 'refused' and 'p < 0.1' in detail['gate']['reason']
        assert status.message.startswith('caption round:') and 'p < 0.1' in status.message
        assert status.uplink_samples == k and status.uplink_bytes > 0
        assert status.model_version == f'{DEVICE}:v0'
        new = detail['gate']['slices']['new']
        assert new['n'] == 1 and 0.0 <= new['old'] <= 1000.0 and 0.0 <= new['new'] <= 1000.0
        assert detail['agreement_after'] >= 0.0  # CIDEr-D against the teacher's captions
        state = cloud.runtime.device(DEVICE)
        assert len(state.captions) == k and len(state.memory) == 0  # kept apart
        assert all(r.label for r in state.captions.records.values())  # teacher captions
        assert cloud.counters['caption_rounds'] == 1
        assert cloud.counters['caption_refused'] == 1 and state.version == 0

        def diagnostics() -> dict[str, str]:
            found = [d for d in got['diagnostics'] if d.name == '/cloud/cloud_node']
            return {kv.key: kv.value for kv in found[-1].values} if found else {}
        # On /diagnostics like an answer round's refusal: counters and the gate's reason.
        assert spin(lambda: diagnostics().get(f'{DEVICE}.caption_refused') == '1', 10.0)
        figures = diagnostics()
        assert 'p < 0.1' in figures[f'{DEVICE}.caption_gate']
        assert figures['caption_samples'] == str(k) and figures['caption_rounds'] == '1'
        assert figures[f'{DEVICE}.caption_records'] == str(k)
        # The device hears of it through the link; its model stays as it was.
        assert spin(lambda: any(s.state == status.state for s in got['heard']), 30.0)
        assert device.runtime.version == 0 and device.counters['deltas_applied'] == 0
    finally:
        for close in reversed(closers):
            close()
