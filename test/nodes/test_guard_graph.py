"""The guarded round's plumbing on real graphs: token pulls, refused rounds, rollback orders.

The robot's nodes (device_node + uts_node + device bridge, in /robot1) and the cloud's
(cloud_node + cloud bridge, in /cloud) live in two ROS contexts joined only by the Zenoh link
(mutual TLS, per-device access control) on 127.0.0.1, with the tiny red-answering teacher and
its student of ``tiny_models``. Nodes load their models and keys from their parameters, as a
deployment does.
"""
from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.parameter import Parameter  # noqa: E402
from ros_graph import Spinner, spin_until  # noqa: E402
from tiny_models import QUESTION  # noqa: E402

DEVICE = 'robot1'


@pytest.fixture(scope='module')
def models(red_models, tmp_path_factory):
    """Saved teacher and student folders, a signing key pair in PEM files, the images."""
    from cdcca_ros.core import wire

    teacher, student, images = red_models
    root = tmp_path_factory.mktemp('guard_models')
    teacher.save(root / 'teacher')
    private, public = wire.generate_keypair()
    wire.save_private_key(private, root / 'cloud_signing_key.pem')
    wire.save_public_key(public, root / 'cloud_public.pem')
    return {'teacher': root / 'teacher', 'student': student, 'private': private,
            'public': public, 'private_pem': root / 'cloud_signing_key.pem',
            'public_pem': root / 'cloud_public.pem', 'images': images}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _image_msg(rgb):
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg

    return image_to_msg(rgb, 'rgb8', Image)


def _params(values: dict) -> list:
    return [Parameter(k, value=v) for k, v in values.items()]


class _Graph:
    """Both sides, the link between them, and a client node on each side."""

    def __init__(self, contexts, models, tmp_path, device_params: dict, cloud_params: dict,
                 device_runtime=None) -> None:
        from cdcca_ros.msg import AdaptationStatus, RollbackOrder, UtsTokens
        from cdcca_ros.srv import Ask
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        from cdcca_ros.nodes.cloud_bridge_node import CloudBridgeNode
        from cdcca_ros.nodes.cloud_node import CloudNode
        from cdcca_ros.nodes.common import DELTA_QOS, LATCHED_QOS, RELIABLE_QOS
        from cdcca_ros.nodes.device_node import DeviceNode
        from cdcca_ros.nodes.uts_node import UtsNode
        from cdcca_ros.transport.certs import create_certificates
        from cdcca_ros.transport.config import RouterConfig
        from cdcca_ros.transport.router import Router

        self._closers = []
        certs = tmp_path / 'certs'
        create_certificates(certs, devices=[DEVICE], cloud='cloud',
                            router_hosts=['localhost', '127.0.0.1'])
        port = _free_port()
        self.router = Router(RouterConfig(certs_dir=certs, listen=[f'tls/127.0.0.1:{port}'],
                                          devices=[DEVICE]))
        self._closers.append(self.router.close)
        ctx_robot, ctx_cloud = contexts
        link = {'connect': f'tls/localhost:{port}', 'certs_dir': str(certs)}
        self.device = DeviceNode(device_runtime, context=ctx_robot, namespace=DEVICE,
                                 parameter_overrides=_params({
                                     'device_id': DEVICE, 'model': str(models['student']),
                                     'cloud_public_key': str(models['public_pem']),
                                     'state_dir': str(tmp_path / 'device'), **device_params}))
        self.uts = UtsNode(self.device, context=ctx_robot, namespace=DEVICE)
        self.device_bridge = CloudBridgeNode(
            context=ctx_robot, namespace=DEVICE, parameter_overrides=_params({
                **link, 'role': 'device', 'device_id': DEVICE,
                'spool_dir': str(tmp_path / 'spool')}))
        self.cloud = CloudNode(context=ctx_cloud, namespace='cloud', parameter_overrides=_params({
            'teacher': str(models['teacher']), 'student': str(models['student']),
            'state_dir': str(tmp_path / 'cloud'), 'signing_key': str(models['private_pem']),
            'dwc.refit_steps': 0, **cloud_params}))
        self.cloud_bridge = CloudBridgeNode(
            context=ctx_cloud, namespace='cloud', parameter_overrides=_params({
                **link, 'role': 'cloud', 'devices': DEVICE,
                'store_dir': str(tmp_path / 'store')}))
        spinners = [Spinner(ctx_robot, [self.device, self.uts, self.device_bridge]),
                    Spinner(ctx_cloud, [self.cloud, self.cloud_bridge])]
        self._closers += [s.close for s in spinners]
        self.robot = Node('guard_robot_client', namespace=DEVICE, context=ctx_robot)
        self.cloud_side = Node('guard_cloud_client', namespace='cloud', context=ctx_cloud)
        self.executors = [SingleThreadedExecutor(context=ctx_robot),
                          SingleThreadedExecutor(context=ctx_cloud)]
        self.executors[0].add_node(self.robot)
        self.executors[1].add_node(self.cloud_side)
        self._closers += [e.shutdown for e in self.executors]
        self._closers += [self.robot.destroy_node, self.cloud_side.destroy_node]
        self.got = {'device_status': [], 'cloud_status': [], 'cloud_adaptation': [],
                    'device_reports': [], 'uplink': [], 'diagnostics': []}
        for node in (self.robot, self.cloud_side):
            node.create_subscription(DiagnosticArray, '/diagnostics',
                                     lambda m: self.got['diagnostics'].extend(m.status), 50)
        self.robot.create_subscription(AdaptationStatus, 'adaptation_status',
                                       self.got['device_status'].append, RELIABLE_QOS)
        self.robot.create_subscription(AdaptationStatus, 'cloud_status',
                                       self.got['cloud_status'].append, LATCHED_QOS)
        self.cloud_side.create_subscription(AdaptationStatus, 'adaptation_status',
                                            self.got['cloud_adaptation'].append, RELIABLE_QOS)
        self.cloud_side.create_subscription(AdaptationStatus, 'device_status',
                                            self.got['device_reports'].append, RELIABLE_QOS)
        self.cloud_side.create_subscription(UtsTokens, 'uts_tokens', self.got['uplink'].append,
                                            RELIABLE_QOS)
        self.order_pub = self.cloud_side.create_publisher(RollbackOrder, 'rollback_order',
                                                          DELTA_QOS)
        self.ask = self.robot.create_client(Ask, 'ask')
        from cdcca_ros.nodes.cloud_bridge_node import ORDER_TOPIC, REQUEST_TOPIC

        matched = [  # every hop of the uplink, the downlink and the reports
            lambda: self.uts._pub.get_subscription_count() >= 1,     # the device bridge
            lambda: self.cloud_bridge._up_pubs['uts_tokens'].get_subscription_count() >= 2,
            lambda: self.cloud_bridge._up_pubs['adaptation_status'].get_subscription_count() >= 2,
            lambda: self.cloud._request_pub.get_subscription_count() >= 1,
            lambda: self.cloud._order_pub.get_subscription_count() >= 1,
            lambda: self.order_pub.get_subscription_count() >= 1,
            lambda: self.device_bridge._down_pubs[REQUEST_TOPIC].get_subscription_count() >= 1,
            lambda: self.device_bridge._down_pubs[ORDER_TOPIC].get_subscription_count() >= 1,
            lambda: self.device._status_pub.get_subscription_count() >= 2,
            self.ask.service_is_ready]
        try:
            assert self.spin(lambda: all(m() for m in matched), 30.0), \
                [i for i, m in enumerate(matched) if not m()]
            assert self.spin(lambda: self.device.ready and self.cloud.ready, 60.0), (
                self.device.errors.text, self.cloud.errors.text)
            assert self.spin(lambda: self.device_bridge.link.stats()['connected']
                             and self.cloud_bridge.link.stats()['connected'], 20.0), \
                'link never up'
        except BaseException:
            self.close()
            raise

    def spin(self, condition, timeout_s: float) -> bool:
        return spin_until(self.executors, condition, timeout_s)

    def ask_about(self, image) -> None:
        from cdcca_ros.srv import Ask

        future = self.ask.call_async(Ask.Request(question=QUESTION, use_image=True,
                                                 image=_image_msg(image)))
        assert self.spin(future.done, 30.0), 'ask timed out'
        assert future.result().success, future.result().message

    def diagnostics(self, name: str) -> dict[str, str]:
        """The latest /diagnostics values of the node named ``name`` (e.g. /cloud/cloud_node)."""
        found = [s for s in self.got['diagnostics'] if s.name == name]
        return {kv.key: kv.value for kv in found[-1].values} if found else {}

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()


@pytest.fixture
def graph(ros_context_pair, models, tmp_path):
    made = []

    def make(device_params: dict, cloud_params: dict, device_runtime=None) -> _Graph:
        made.append(_Graph(ros_context_pair, models, tmp_path, device_params, cloud_params,
                           device_runtime))
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_token_pull_then_a_refused_round_over_the_link(graph, models):
    """An unsure label from the kept tokens -> TokenRequest down the link -> the device's
    ring answers with the rest (or "gone" when it no longer holds the sample) -> the cloud
    relabels from every token. Then a round the gate refuses is reported, and nothing ships."""
    from cdcca_ros.msg import AdaptationStatus

    from cdcca_ros.core.rounds.memory import split_of

    # Samples robot1-1..k: at least one trains and one is held out for the gate (splits are a
    # pure function of the id).
    splits = [split_of(f'{DEVICE}-{i}', 0.0, 0.5) for i in range(1, 7)]
    k = next(n for n in range(2, 7) if {'train', 'gate'} <= set(splits[:n]))
    g = graph(device_params={'uts.entropy_threshold': 0.0, 'uts.keep_ratio': 0.5,
                             'uts.audit_fraction': 0.0, 'uts.ring_samples': 1},
              cloud_params={'round.min_samples': 1000, 'round.max_wait_s': 3600.0,
                            'guard.pull_below': 0.999,  # the teacher's 0.986 asks for more
                            'guard.pull_fraction': 1.0,  # every unsure sample is pulled
                            'guard.min_gain': 100.0,    # no candidate can clear it
                            'guard.val_fraction': 0.0, 'guard.gate_fraction': 0.5,
                            'guard.anchor': 'none', 'guard.max_steps': 5,
                            'guard.min_steps': 0, 'akd.batch_size': 4})
    g.uts.sample_prefix = DEVICE  # ids robot1-1..k, whose splits are known (see above)
    # The cloud neither labels nor asks while every sample goes up, so the device's ring (one
    # sample) holds only the last one when the requests come: the others are gone.
    with g.cloud._lock:
        for image in models['images'][:k]:
            g.ask_about(image)
        assert g.spin(lambda: g.uts.counters['selected'] == k
                      and g.cloud_bridge.counters['up'] == k, 30.0), (g.uts.counters,
                                                                     g.cloud_bridge.counters)
    assert g.spin(lambda: g.cloud.counters['pulled'] == 1
                  and g.cloud.counters['pulls_unavailable'] == k - 1, 60.0), (
        g.cloud.counters, g.uts.counters, g.cloud.errors.text, g.uts.errors.text)
    runtime = g.cloud.runtime

    def record(i):
        with g.cloud._lock:
            return runtime.device(DEVICE).memory.get(f'{DEVICE}-{i}')

    assert g.spin(lambda: record(k).labelled, 30.0), 'the pulled sample was never relabelled'
    full = record(k)
    assert full.pull == 'done' and full.indices is None and full.tokens.shape[0] == 65
    assert full.label == 'red' and full.label_tokens == 65
    for i in range(1, k):
        gone = record(i)
        assert gone.pull == 'unavailable' and gone.indices is not None
        assert gone.label == 'red' and gone.label_tokens == gone.indices.numel() < 65
    # The pulled answer carried exactly the tokens not sent before, packed like the uplink.
    assert g.spin(lambda: sum(m.pulled for m in g.got['uplink']) == k
                  and g.uts.counters['pulls_served'] + g.uts.counters['pulls_missed'] == k
                  and g.device_bridge.counters['pulled_up'] == k, 10.0), g.uts.counters
    sent = {m.sample_id: m for m in g.got['uplink'] if not m.pulled}
    pulled = {m.sample_id: m for m in g.got['uplink'] if m.pulled}
    assert set(pulled) == {f'{DEVICE}-{i}' for i in range(1, k + 1)}
    rest, first = pulled[f'{DEVICE}-{k}'], sent[f'{DEVICE}-{k}']
    assert sorted(set(rest.kept_indices) | set(first.kept_indices)) == list(range(65))
    assert not set(rest.kept_indices) & set(first.kept_indices)
    assert rest.dtype == first.dtype and len(rest.payload) > 0
    assert all(not len(pulled[f'{DEVICE}-{i}'].kept_indices) for i in range(1, k))
    assert g.uts.counters['pulls_served'] == 1 and g.uts.counters['pulls_missed'] == k - 1
    assert g.device_bridge.counters['pulled_up'] == k
    assert g.cloud_bridge.counters['requests_down'] >= 1
    assert g.cloud.counters['pull_bytes'] > 0

    # A round now: trained, gated, refused; reported with the gate's figures, nothing sent.
    with g.cloud._lock:
        runtime.cfg.min_samples = 1
    refused = AdaptationStatus.STATE_REFUSED
    assert g.spin(lambda: any(s.state == refused for s in g.got['cloud_adaptation']), 120.0), (
        g.cloud.counters, g.cloud.errors.text)
    status = next(s for s in g.got['cloud_adaptation'] if s.state == refused)
    detail = json.loads(status.detail)
    assert detail['outcome'] == 'refused' and detail['gate']['ship'] is False
    assert 'needs >= 100' in detail['gate']['reason'] and 'new' in detail['gate']['slices']
    assert status.model_version == f'{DEVICE}:v0'
    assert status.model_hash == g.device.runtime.base_hash
    assert g.cloud.counters['refused'] == 1 and g.cloud.counters['downlink_bytes'] == 0
    # The device hears of it through the link; its model stays as it was.
    assert g.spin(lambda: any(s.state == refused for s in g.got['cloud_status']), 30.0)
    assert g.device.runtime.version == 0 and g.device.counters['deltas_applied'] == 0
    # Gate, pull and memory figures on /diagnostics, both sides.
    assert g.spin(lambda: g.diagnostics('/cloud/cloud_node').get(f'{DEVICE}.refused') == '1'
                  and g.diagnostics(f'/{DEVICE}/uts_node').get('pulls_served') == '1', 10.0)
    cloud_diag = g.diagnostics('/cloud/cloud_node')
    assert 'needs >= 100' in cloud_diag[f'{DEVICE}.gate']
    derived = runtime.device(DEVICE).counters['derived_questions']  # the cloud's own
    assert cloud_diag[f'{DEVICE}.memory_records'] == str(k + derived)
    assert int(cloud_diag[f'{DEVICE}.memory_bytes']) > 0 and cloud_diag['pulled'] == '1'
    uts_diag = g.diagnostics(f'/{DEVICE}/uts_node')
    assert uts_diag['pulls_missed'] == str(k - 1) and uts_diag['ring_samples'] == '1'


class _Signer:
    """Seals deltas over a device's exact weights, as the cloud's round does."""

    def __init__(self, base: dict, key) -> None:
        from cdcca_ros.core import dwc

        self.ef = dwc.ErrorFeedback(base)
        self.key = key
        self.version = 0

    def to(self, weights: dict):
        """A signed delta taking the device from what it holds to ``weights``."""
        from cdcca_ros.core import dwc
        from cdcca_ros.core.updates import seal_delta

        codec = dwc.get_codec('fp16')
        base_hash = self.ef.view_hash()
        delta = dwc.compute_delta(weights, self.ef.view)
        compressed = dwc.compress(delta, codec)
        self.ef.commit(delta, compressed.decoded)
        self.version += 1
        return seal_delta(self.key, device_id=DEVICE, round=self.version,
                          base_version=self.version - 1, base_hash=base_hash,
                          new_version=self.version, new_hash=self.ef.view_hash(),
                          codec=codec.name, payload=compressed.payload)


def _weights_hash(runtime) -> str:
    from cdcca_ros.core import wire

    return wire.state_dict_hash(runtime.model.trainable_state_dict())


def test_rollback_orders_over_the_link(graph, models, tmp_path):
    """The cloud's signed order crosses the link, is verified and carried out, the device's
    report comes back up and the cloud mirrors it; a forged and a replayed order are refused
    with the model untouched."""
    import torch
    from cdcca_ros.msg import AdaptationStatus

    from cdcca_ros.core import wire
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.updates import seal_rollback
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.guard_msgs import rollback_to_msg

    # The device runs v1, an update of its base (v0) it verified and applied.
    runtime = DeviceRuntime(bundled.load(str(models['student'])), DEVICE, models['public'],
                            tmp_path / 'device_rt')
    h0 = runtime.base_hash
    signer = _Signer(runtime.weights.tensors, models['private'])
    gen = torch.Generator().manual_seed(0)
    runtime.apply(signer.to({k: v + 0.05 * torch.randn(v.shape, generator=gen)
                             for k, v in runtime.weights.tensors.items()}))
    h1 = runtime.base_hash
    assert runtime.version == 1 and h1 != h0
    g = graph(device_params={'uts.enabled': False}, cloud_params={}, device_runtime=runtime)
    statuses = g.got['device_status']

    def order(key):
        return seal_rollback(key, device_id=DEVICE, from_version=1, from_hash=h1, to_hash=h0,
                             new_version=2, reason='v1 answers 12.0 points worse than v0')

    # Forged: signed by another key. Refused, counted, reported; the model is untouched.
    forged, _ = wire.generate_keypair()
    g.order_pub.publish(rollback_to_msg(order(forged)))
    assert g.spin(lambda: g.device.counters['rollbacks_rejected'] == 1, 30.0), g.device.counters
    assert runtime.version == 1 and runtime.base_hash == h1 and _weights_hash(runtime) == h1
    assert g.spin(lambda: any(s.state == AdaptationStatus.STATE_REJECTED for s in statuses),
                  10.0)
    rejected = next(s for s in statuses if s.state == AdaptationStatus.STATE_REJECTED)
    assert json.loads(rejected.detail)['reason'] == 'unknown_key'
    assert rejected.model_version == f'{DEVICE}:v1' and rejected.model_hash == h1

    # The cloud orders it: over the link, verified, carried out, reported back up, mirrored.
    valid = order(models['private'])
    g.cloud.order_rollback(valid, {'reason': valid.reason})
    assert g.spin(lambda: runtime.version == 2, 30.0), (g.device.counters, g.device.errors.text)
    assert runtime.base_hash == h0 and _weights_hash(runtime) == h0
    rolled = AdaptationStatus.STATE_ROLLED_BACK
    assert g.spin(lambda: any(s.state == rolled for s in statuses), 10.0)
    report = next(s for s in statuses if s.state == rolled)
    assert report.model_version == f'{DEVICE}:v2' and report.model_hash == h0
    assert json.loads(report.detail)['kind'] == 'ordered'
    assert g.spin(lambda: g.cloud.counters['rollbacks_confirmed'] == 1, 30.0), (
        g.cloud.counters, g.cloud.errors.text)
    assert g.spin(lambda: any(s.state == rolled for s in g.got['device_reports']), 10.0)
    ordered = [s for s in g.got['cloud_adaptation']
               if s.state == AdaptationStatus.STATE_ROLLBACK_ORDERED]
    assert len(ordered) == 1 and ordered[0].model_hash == h0
    with g.cloud._lock:
        state = g.cloud.runtime.device(DEVICE)
        assert state.version == 2 and state.hash == h0 and not g.cloud._awaiting

    # Replayed: the same signed order again. Refused (the device no longer runs v1).
    g.order_pub.publish(rollback_to_msg(valid))
    assert g.spin(lambda: g.device.counters['rollbacks_rejected'] == 2, 30.0), g.device.counters
    assert runtime.version == 2 and _weights_hash(runtime) == h0
    assert g.device.counters['rollbacks_applied'] == 1

    def refusals():
        return [s for s in statuses if s.state == AdaptationStatus.STATE_REJECTED]

    assert g.spin(lambda: len(refusals()) == 2, 10.0), statuses
    assert json.loads(refusals()[-1].detail)['reason'] == 'replay'


def test_local_entropy_rollback_is_reported(ros_context, models, tmp_path):
    """The device's own guard rolls back an update whose answers turn much less sure, and the
    node reports it like an ordered rollback (reason, restored hash)."""
    from cdcca_ros.msg import AdaptationStatus
    from cdcca_ros.srv import Ask
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from cdcca_ros.nodes.common import RELIABLE_QOS
    from cdcca_ros.nodes.device_node import DeviceNode

    device = DeviceNode(context=ros_context, parameter_overrides=_params({
        'model': str(models['student']), 'cloud_public_key': str(models['public_pem']),
        'state_dir': str(tmp_path / 'device'), 'uts.enabled': False,
        'guard.entropy_window': 3,
        'max_update_ratio': 0.0}))  # off: v1 is a deliberately large change (norm x 30)
    spinner = Spinner(ros_context, [device])
    client = Node('entropy_client', context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(client)
    statuses = []
    client.create_subscription(AdaptationStatus, 'adaptation_status', statuses.append,
                               RELIABLE_QOS)
    ask = client.create_client(Ask, 'ask')

    def answers(n):
        for image in models['images'][:n]:
            future = ask.call_async(Ask.Request(question=QUESTION, use_image=True,
                                                image=_image_msg(image)))
            assert spin_until([executor], future.done, 30.0)
            assert future.result().success, future.result().message

    try:
        assert spin_until([executor], lambda: device.ready and ask.service_is_ready(), 60.0)
        assert spin_until([executor], lambda: device._status_pub.get_subscription_count(), 10.0)
        runtime = device.runtime
        base = {k: v.clone() for k, v in runtime.weights.tensors.items()}
        signer = _Signer(base, models['private'])
        # v1: a sharper output norm makes the answers sure (mean entropy ~0.2 nats) ...
        sharp = dict(base)
        norm = 'language_model.model.decoder.final_layer_norm.weight'
        sharp[norm] = base[norm] * 30
        runtime.apply(signer.to(sharp))
        h1 = runtime.base_hash
        answers(3)
        # ... v2 returns to the base, whose answers are near the vocabulary's maximum entropy.
        runtime.apply(signer.to(base))
        answers(3)
        rolled = AdaptationStatus.STATE_ROLLED_BACK
        assert spin_until([executor], lambda: any(s.state == rolled for s in statuses), 10.0), (
            device.counters, runtime.status())
        report = next(s for s in statuses if s.state == rolled)
        detail = json.loads(report.detail)
        assert detail['kind'] == 'local' and detail['from_version'] == 2
        assert 'entropy' in report.message and report.model_hash == h1
        assert report.model_version == f'{DEVICE}:v3' and runtime.version == 3
        assert runtime.base_hash == h1 and device.counters['local_rollbacks'] == 1
    finally:
        executor.shutdown()
        client.destroy_node()
        spinner.close()
