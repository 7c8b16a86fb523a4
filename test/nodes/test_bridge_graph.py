"""cloud_bridge_node, both roles, over a Zenoh router with mutual TLS on 127.0.0.1.

The robot's nodes live in /robot1 and the cloud's in /cloud: the only way between them is the
link. Uplink and downlink cross as CDR bytes; a sample claiming another device is refused, and
the cloud records what it received to MCAP. The guarded round's messages (token requests and
rollback orders down, the device's reports up) cross the same way, addressed per device.
"""
from __future__ import annotations

import socket

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.parameter import Parameter  # noqa: E402
from ros_graph import Spinner, spin_until  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def link_graph(ros_context_pair, tmp_path):
    from cdcca_ros.msg import AdaptationStatus, DwcDelta, RollbackOrder, TokenRequest, UtsTokens
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from cdcca_ros.nodes.cloud_bridge_node import CloudBridgeNode
    from cdcca_ros.nodes.common import DELTA_QOS, RELIABLE_QOS
    from cdcca_ros.transport.certs import create_certificates
    from cdcca_ros.transport.config import RouterConfig
    from cdcca_ros.transport.router import Router

    certs = tmp_path / 'certs'
    create_certificates(certs, devices=['robot1', 'robot2'], cloud='cloud',
                        router_hosts=['localhost', '127.0.0.1'])
    port = _free_port()
    router = Router(RouterConfig(certs_dir=certs, listen=[f'tls/127.0.0.1:{port}'],
                                 devices=['robot1', 'robot2']))
    ctx_robot, ctx_cloud = ros_context_pair
    common = [Parameter('connect', value=f'tls/localhost:{port}'),
              Parameter('certs_dir', value=str(certs))]
    device_bridge = CloudBridgeNode(context=ctx_robot, namespace='robot1', parameter_overrides=[
        *common, Parameter('role', value='device'), Parameter('device_id', value='robot1'),
        Parameter('spool_dir', value=str(tmp_path / 'spool'))])
    cloud_bridge = CloudBridgeNode(context=ctx_cloud, namespace='cloud', parameter_overrides=[
        *common, Parameter('role', value='cloud'), Parameter('devices', value='robot1,robot2'),
        Parameter('store_dir', value=str(tmp_path / 'store')),
        Parameter('record_mcap', value=str(tmp_path / 'uplink.mcap'))])
    spinners = [Spinner(ctx_robot, [device_bridge]), Spinner(ctx_cloud, [cloud_bridge])]
    robot = Node('robot_side', namespace='robot1', context=ctx_robot)
    cloud = Node('cloud_side', namespace='cloud', context=ctx_cloud)
    executors = [SingleThreadedExecutor(context=ctx_robot),
                 SingleThreadedExecutor(context=ctx_cloud)]
    executors[0].add_node(robot)
    executors[1].add_node(cloud)
    got = {'up': [], 'down': [], 'requests': [], 'orders': [], 'reports': []}
    cloud.create_subscription(UtsTokens, 'uts_tokens', got['up'].append, RELIABLE_QOS)
    robot.create_subscription(DwcDelta, 'dwc_delta', got['down'].append, DELTA_QOS)
    robot.create_subscription(TokenRequest, 'token_request', got['requests'].append,
                              RELIABLE_QOS)
    robot.create_subscription(RollbackOrder, 'rollback_order', got['orders'].append, DELTA_QOS)
    cloud.create_subscription(AdaptationStatus, 'device_status', got['reports'].append,
                              RELIABLE_QOS)
    g = {'up_pub': robot.create_publisher(UtsTokens, 'uts_tokens', RELIABLE_QOS),
         'down_pub': cloud.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS),
         'request_pub': cloud.create_publisher(TokenRequest, 'token_request', RELIABLE_QOS),
         'order_pub': cloud.create_publisher(RollbackOrder, 'rollback_order', DELTA_QOS),
         'report_pub': robot.create_publisher(AdaptationStatus, 'adaptation_status',
                                              RELIABLE_QOS),
         'got': got, 'executors': executors, 'device_bridge': device_bridge,
         'cloud_bridge': cloud_bridge, 'mcap': tmp_path / 'uplink.mcap', 'certs': certs,
         'port': port, 'tmp': tmp_path}
    try:
        assert spin_until(executors, lambda: all(
            g[name].get_subscription_count() > 0
            for name in ('up_pub', 'down_pub', 'request_pub', 'order_pub', 'report_pub')), 20.0)
        assert spin_until(executors, lambda: device_bridge.link.stats()['connected']
                          and cloud_bridge.link.stats()['connected'], 20.0), 'link never up'
        yield g
    finally:
        for e in executors:
            e.shutdown()
        robot.destroy_node()
        cloud.destroy_node()
        for s in spinners:
            s.close()
        router.close()


def _tokens(sample_id: str, device: str = 'robot1'):
    from cdcca_ros.msg import UtsTokens

    return UtsTokens(device_id=device, sample_id=sample_id, question='what color is it?',
                     device_answer='red', num_tokens=65, token_dim=4, kept_indices=[1, 5],
                     dtype='fp16', payload=bytes(range(16)))


def test_uplink_and_downlink_cross_the_link(link_graph):
    from cdcca_ros.msg import DwcDelta

    g = link_graph
    for i in range(5):
        g['up_pub'].publish(_tokens(f'robot1-{i}'))
    assert spin_until(g['executors'], lambda: len(g['got']['up']) == 5, 30.0), g['got']
    assert [m.sample_id for m in g['got']['up']] == [f'robot1-{i}' for i in range(5)]
    assert g['got']['up'][0] == _tokens('robot1-0')
    delta = DwcDelta(device_id='robot1', round=1, base_version='0', new_version='1',
                     chunk_count=1, total_size=3, chunk=b'abc', signature=bytes(64))
    g['down_pub'].publish(delta)
    other = DwcDelta(device_id='robot2', round=1, chunk_count=1, chunk=b'x')
    g['down_pub'].publish(other)
    assert spin_until(g['executors'], lambda: len(g['got']['down']) >= 1, 30.0)
    spin_until(g['executors'], lambda: False, 1.0)
    assert [d.device_id for d in g['got']['down']] == ['robot1']
    assert bytes(g['got']['down'][0].chunk) == b'abc'


def test_sample_claiming_another_device_is_refused(link_graph):
    g = link_graph
    g['up_pub'].publish(_tokens('spoof-1', device='robot2'))
    g['up_pub'].publish(_tokens('robot1-ok'))
    assert spin_until(g['executors'], lambda: len(g['got']['up']) >= 1, 30.0)
    assert [m.sample_id for m in g['got']['up']] == ['robot1-ok']
    assert g['device_bridge'].counters['refused'] == 1


def _full_tokens(i: int):
    """A sample with every field set to a value of its own (arrays, floats, nested stamp)."""
    from cdcca_ros.msg import UtsTokens

    msg = UtsTokens(device_id='robot1', sample_id=f'robot1-rec-{i}', model_version=f'robot1:v{i}',
                    vision_space='vit:d4:n10:g3x3:cls', question=f'is there a red square? {i}',
                    device_answer=['yes', 'no'][i % 2], entropy_mean=0.25 + i / 8,
                    entropy_max=1.5 + i, num_tokens=10, token_dim=4, grid_rows=3, grid_cols=3,
                    has_cls=bool(i % 2), kept_indices=[0, 3 + i, 9],
                    token_variance=[0.125, 0.5 + i, 3.0e-7], dtype='int8',
                    scales=[0.5, 0.25 * (i + 1), 1e-3],
                    payload=bytes((17 * i + k) % 256 for k in range(12)))
    msg.header.stamp.sec = 1_700_000_000 + i
    msg.header.stamp.nanosec = 123_456_789 + i
    msg.header.frame_id = f'camera_{i}'
    return msg


def _differences(sent, read, path: str = '') -> tuple[list[str], int]:
    """Fields of a rosbags-deserialised message that differ from the rclpy message sent, and
    how many leaf fields were compared."""
    import numpy as np

    diffs, compared = [], 0
    for name in sent.get_fields_and_field_types():
        a, b = getattr(sent, name), getattr(read, name)
        if hasattr(a, 'get_fields_and_field_types'):
            sub, n = _differences(a, b, f'{path}{name}.')
            diffs += sub
            compared += n
            continue
        compared += 1
        if isinstance(a, (bytes, list, tuple)) or hasattr(a, 'tolist'):
            same = list(a) == np.asarray(b).tolist()
        else:
            same = type(a)(b) == a and isinstance(b, type(a))
        if not same:
            diffs.append(f'{path}{name}: sent {a!r}, read {b!r}')
    return diffs, compared


def test_cloud_records_the_uplink_to_mcap(link_graph):
    """What the cloud records is a ROS 2 bag file: rosbags (an independent CDR implementation)
    reads every message back with the values the device sent, and so does the MCAP decoder."""
    from rosbags.highlevel import AnyReader

    from cdcca_ros.transport.recording import decode_recording

    g = link_graph
    sent = [_full_tokens(i) for i in range(6)]
    for msg in sent:
        g['up_pub'].publish(msg)
    assert spin_until(g['executors'], lambda: len(g['got']['up']) == len(sent), 30.0)
    g['cloud_bridge'].close()  # finishes the recording: the file gets its summary
    decoded = [m for _, m in decode_recording(g['mcap'])]
    assert [m.sample_id for m in decoded] == [m.sample_id for m in sent]
    assert bytes(decoded[0].payload) == bytes(sent[0].payload)
    with AnyReader([g['mcap']]) as reader:
        uplink = [c for c in reader.connections if c.topic == 'uts_tokens']
        assert [(c.msgtype, c.ext.serialization_format) for c in uplink] == [
            ('cdcca_ros/msg/UtsTokens', 'cdr')]
        # (Other channels, e.g. the devices' reports, hold other types: read on their own.)
        read = [reader.deserialize(raw, conn.msgtype)
                for conn, _, raw in reader.messages(connections=uplink)]
    assert len(read) == len(sent)
    total = 0
    for original, msg in zip(sent, read):
        diffs, compared = _differences(original, msg)
        assert diffs == [], diffs
        total += compared
    # Every leaf field of every message was compared (the header counts as its 3 leaves).
    leaves = len(type(sent[0]).get_fields_and_field_types()) - 1 + 3
    assert leaves >= 21 and total == len(sent) * leaves

def test_guard_messages_cross_to_their_device_only(link_graph):
    """Token requests and rollback orders go down to the device they name (another device's
    never reach it); the device's reports go up to the cloud's device_status."""
    from cdcca_ros.msg import AdaptationStatus, RollbackOrder, TokenRequest

    g = link_graph
    for device in ('robot2', 'robot1'):
        g['request_pub'].publish(TokenRequest(device_id=device, request_id=f'{device}-r',
                                              sample_ids=[f'{device}-4']))
        g['order_pub'].publish(RollbackOrder(device_id=device, from_version=3, new_version=4,
                                             from_hash='cd' * 32, to_hash='ab' * 32,
                                             reason='worse', signature=bytes(range(64))))
    report = AdaptationStatus(device_id='robot1', node='device', state='rolled_back',
                              model_version='v4', model_hash='ab' * 32, detail='{"kind":"x"}')
    g['report_pub'].publish(report)
    # Not a device report, or another device's: this bridge does not send them.
    g['report_pub'].publish(AdaptationStatus(device_id='robot1', node='cloud', state='x'))
    g['report_pub'].publish(AdaptationStatus(device_id='robot2', node='device', state='x'))
    got = g['got']
    assert spin_until(g['executors'], lambda: got['requests'] and got['orders']
                      and got['reports'], 30.0), got
    spin_until(g['executors'], lambda: False, 1.0)
    assert [(m.device_id, list(m.sample_ids)) for m in got['requests']] == [
        ('robot1', ['robot1-4'])]
    assert [m.device_id for m in got['orders']] == ['robot1']
    assert bytes(got['orders'][0].signature) == bytes(range(64))
    assert got['reports'] == [report]
    assert g['device_bridge'].counters['requests_down'] == 1
    assert g['device_bridge'].counters['orders_down'] == 1
    assert g['cloud_bridge'].counters['reports_up'] == 1


def test_cloud_refuses_a_report_claiming_another_device(link_graph):
    """A device that sends, on its own keys, a report or pulled tokens in another device's
    name (a bridge of its own, say) is refused by the cloud bridge: the link's key names the
    sender."""
    from cdcca_ros.msg import AdaptationStatus, UtsTokens
    from rclpy.serialization import serialize_message

    from cdcca_ros.nodes.cloud_bridge_node import link_config
    from cdcca_ros.transport.link import DeviceLink

    g = link_graph
    params = {'connect': f'tls/localhost:{g["port"]}', 'certs_dir': str(g['certs']),
              'max_payload_bytes': 1 << 20, 'spool_max_bytes': 1 << 20}
    rogue = DeviceLink('robot2', link_config(params, 'robot2'), g['tmp'] / 'rogue',
                       on_downlink=lambda m: None)
    try:
        rogue.send('adaptation_status', serialize_message(AdaptationStatus(
            device_id='robot1', node='device', state='rolled_back', model_version='v9')))
        rogue.send('uts_tokens', serialize_message(UtsTokens(device_id='robot1',
                                                             sample_id='robot1-1',
                                                             pulled=True)))
        rogue.send('adaptation_status', serialize_message(AdaptationStatus(
            device_id='robot2', node='device', state='applied', model_version='v1')))
        got = g['got']
        assert spin_until(g['executors'], lambda: got['reports'], 30.0)
        spin_until(g['executors'], lambda: False, 1.0)
        assert [(m.device_id, m.state) for m in got['reports']] == [('robot2', 'applied')]
        assert got['up'] == []
        assert g['cloud_bridge'].counters['refused'] == 2
    finally:
        rogue.close()


def test_link_state_changes_are_one_rosout_line_each_and_latched(ros_context_pair, tmp_path):
    """Router absent, then up, then gone: the bridge logs each change once on /rosout (where
    rqt_console reads), retries quietly in between, and cloud_status (latched) carries the
    state from the start."""
    from cdcca_ros.msg import AdaptationStatus
    from rcl_interfaces.msg import Log
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

    from cdcca_ros.nodes.cloud_bridge_node import CloudBridgeNode
    from cdcca_ros.nodes.common import LATCHED_QOS
    from cdcca_ros.transport.certs import create_certificates
    from cdcca_ros.transport.config import RouterConfig
    from cdcca_ros.transport.router import Router

    certs = tmp_path / 'certs'
    create_certificates(certs, devices=['robot1'], cloud='cloud',
                        router_hosts=['localhost', '127.0.0.1'])
    port = _free_port()
    ctx_robot, ctx_client = ros_context_pair
    observer = Node('observer', context=ctx_client)
    executor = SingleThreadedExecutor(context=ctx_client)
    executor.add_node(observer)
    lines: list[Log] = []
    rosout_qos = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                            durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
    observer.create_subscription(Log, '/rosout', lambda m: lines.append(m)
                                 if m.name == 'robot1.cloud_bridge_node' else None, rosout_qos)
    bridge = CloudBridgeNode(context=ctx_robot, namespace='robot1', parameter_overrides=[
        Parameter('connect', value=f'tls/localhost:{port}'),
        Parameter('certs_dir', value=str(certs)), Parameter('role', value='device'),
        Parameter('spool_dir', value=str(tmp_path / 'spool'))])
    spinner = Spinner(ctx_robot, [bridge])
    router = None
    states: list[str] = []
    try:
        def texts() -> list[str]:
            return [m.msg for m in lines]
        assert spin_until([executor], lambda: bridge.link.stats()['connect_failures'] >= 2,
                          30.0)
        # A late joiner still learns the state: the status is latched.
        observer.create_subscription(AdaptationStatus, '/robot1/cloud_status',
                                     lambda m: states.append(m.state), LATCHED_QOS)
        assert spin_until([executor], lambda: states == ['link_down'], 10.0), states
        assert spin_until([executor], lambda: len(lines) >= 1, 10.0)
        spin_until([executor], lambda: False, 1.0)
        assert len(texts()) == 1, texts()  # several failed attempts, one line
        assert texts()[0].startswith('link down: cannot connect to tls/localhost')
        assert 'certificate' in texts()[0]  # TLS is configured: the hint names it
        assert lines[0].level == Log.WARN

        router = Router(RouterConfig(certs_dir=certs, listen=[f'tls/127.0.0.1:{port}'],
                                     devices=['robot1']))
        assert spin_until([executor], lambda: bridge.link.stats()['connected'], 30.0)
        assert spin_until([executor], lambda: states[-1:] == ['link_up'], 10.0), states
        assert spin_until([executor], lambda: len(lines) >= 2, 10.0)
        router.close()
        router = None
        assert spin_until([executor], lambda: states[-1:] == ['link_down'], 30.0), states
        assert spin_until([executor], lambda: len(lines) >= 3, 10.0)
        spin_until([executor], lambda: False, 1.0)
        assert len(texts()) == 3, texts()
        assert 'link up' in texts()[1] and 'link down' in texts()[2], texts()
        assert states == ['link_down', 'link_up', 'link_down']
    finally:
        if router is not None:
            router.close()
        executor.shutdown()
        observer.destroy_node()
        spinner.close()


def test_tls_without_certificates_is_refused_at_start():
    from cdcca_ros.errors import ConfigError
    from cdcca_ros.nodes.cloud_bridge_node import link_config
    from cdcca_ros.nodes.tables import defaults, validate

    assert defaults('cloud_bridge_node')['connect'].startswith('tcp/')  # consistent defaults
    link_config(defaults('cloud_bridge_node'), 'robot1')  # plain TCP without certs: fine
    params = validate('cloud_bridge_node', {'connect': 'tls/cloud.example.org:7447'})
    with pytest.raises(ConfigError, match='is TLS but certs_dir is empty'):
        link_config(params, 'robot1')
    params = validate('cloud_bridge_node', {'certs_dir': '/etc/cdcca/certs'})
    with pytest.raises(ConfigError, match='is plain TCP but certs_dir is set'):
        link_config(params, 'robot1')
