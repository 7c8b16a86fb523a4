"""device_node and cloud_node as managed nodes, driven from another process through the
standard ``lifecycle_msgs`` services (what ``ros2 lifecycle set`` and nav2's lifecycle manager
call), every transition, and what each state allows.

Both nodes run as their own processes with ``autostart:=false`` and tiny models (the cloud:
teacher = student = the tiny student, the paper's plain round); the test process is an
ordinary client: lifecycle services, ``ask`` (service and action), /diagnostics, a signed delta
to the device, samples to the cloud.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from ros_graph import spin_until  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEVICE_NS, CLOUD_NS, DEVICE_ID = 'lcdev', 'lccloud', 'lc1'


def _start(module: str, log, ns: str, *params: str) -> subprocess.Popen:
    args = [a for p in params for a in ('-p', p)]
    return subprocess.Popen([sys.executable, '-m', f'cdcca_ros.nodes.{module}', '--ros-args',
                             '-r', f'__ns:=/{ns}', '-p', 'autostart:=false', *args],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope='module')
def graph(tiny_student_dir, tmp_path_factory):
    import rclpy
    from cdcca_ros.action import Ask as AskAction
    from cdcca_ros.msg import DwcDelta, UtsTokens
    from cdcca_ros.srv import Ask
    from diagnostic_msgs.msg import DiagnosticArray
    from lifecycle_msgs.srv import ChangeState, GetState
    from rclpy.action import ActionClient
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import String

    from cdcca_ros.core import wire
    from cdcca_ros.nodes.common import DELTA_QOS, LATCHED_QOS, RELIABLE_QOS

    tmp = tmp_path_factory.mktemp('lifecycle')
    private, public = wire.generate_keypair()
    wire.save_public_key(public, tmp / 'cloud_public.pem')
    logs = {k: (tmp / f'{k}.log').open('w') for k in ('device', 'cloud')}
    procs = {
        'device': _start('device_node', logs['device'], DEVICE_NS, f'model:={tiny_student_dir}',
                         f'device_id:={DEVICE_ID}', f'state_dir:={tmp / "device"}',
                         f'cloud_public_key:={tmp / "cloud_public.pem"}', 'uts.enabled:=false',
                         'probe_trace:=false'),
        'cloud': _start('cloud_node', logs['cloud'], CLOUD_NS, f'teacher:={tiny_student_dir}',
                        f'student:={tiny_student_dir}', 'guard.enabled:=false',
                        f'state_dir:={tmp / "cloud"}', 'round.min_samples:=1',
                        'akd.steps:=2', 'dwc.refit_steps:=0'),
    }
    context = Context()
    rclpy.init(context=context)
    node = Node('lifecycle_test', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    got = {'diag': {}, 'versions': [], 'deltas': []}

    def on_diag(msg) -> None:
        for status in msg.status:
            got['diag'].setdefault(status.name, []).append(
                {v.key: v.value for v in status.values} | {'_message': status.message})
    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 100)
    node.create_subscription(String, f'/{DEVICE_NS}/model_version',
                             lambda m: got['versions'].append(m.data), LATCHED_QOS)
    node.create_subscription(DwcDelta, f'/{CLOUD_NS}/dwc_delta', got['deltas'].append,
                             DELTA_QOS)
    g = {'node': node, 'executor': executor, 'got': got, 'tmp': tmp, 'private': private,
         'logs': logs, 'procs': procs,
         'change': {k: node.create_client(ChangeState, f'/{ns}/{k}_node/change_state')
                    for k, ns in (('device', DEVICE_NS), ('cloud', CLOUD_NS))},
         'get': {k: node.create_client(GetState, f'/{ns}/{k}_node/get_state')
                 for k, ns in (('device', DEVICE_NS), ('cloud', CLOUD_NS))},
         'ask': node.create_client(Ask, f'/{DEVICE_NS}/ask'),
         'action': ActionClient(node, AskAction, f'/{DEVICE_NS}/ask'),
         'delta_pub': node.create_publisher(DwcDelta, f'/{DEVICE_NS}/dwc_delta', DELTA_QOS),
         'sample_pub': node.create_publisher(UtsTokens, f'/{CLOUD_NS}/uts_tokens',
                                             RELIABLE_QOS)}
    try:
        clients = [*g['change'].values(), *g['get'].values(), g['ask']]
        assert spin_until([executor], lambda: all(c.service_is_ready() for c in clients)
                          and g['action'].server_is_ready(), 120.0), _logs(g)
        yield g
    finally:
        g['action'].destroy()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()


def _logs(g) -> str:
    return '\n'.join(f'--- {k}\n' + (g['tmp'] / f'{k}.log').read_text()[-3000:]
                     for k in ('device', 'cloud'))


def _call(g, client, request, timeout_s: float = 120.0):
    future = client.call_async(request)
    assert spin_until([g['executor']], future.done, timeout_s), _logs(g)
    return future.result()


def _state(g, which: str) -> str:
    from lifecycle_msgs.srv import GetState

    return _call(g, g['get'][which], GetState.Request()).current_state.label


def _change(g, which: str, transition: int) -> bool:
    """One transition through lifecycle_msgs/ChangeState; its success."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    return _call(g, g['change'][which],
                 ChangeState.Request(transition=Transition(id=transition))).success


def _reported(g, which: str, state: str, transition: str) -> None:
    """/diagnostics shows the node in ``state`` after ``transition`` (reported at once)."""
    ns = DEVICE_NS if which == 'device' else CLOUD_NS
    name = f'/{ns}/{which}_node'

    def seen() -> bool:
        return any(s.get('lifecycle_state') == state
                   and s.get('last_transition', '').startswith(transition)
                   for s in g['got']['diag'].get(name, []))
    assert spin_until([g['executor']], seen, 10.0), g['got']['diag'].get(name, [])[-3:]


def _image():
    from sensor_msgs.msg import Image

    rgb = np.random.default_rng(7).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return Image(height=48, width=48, encoding='rgb8', step=48 * 3, data=rgb.tobytes())


def _ask(g):
    from cdcca_ros.srv import Ask

    return _call(g, g['ask'], Ask.Request(question='what color is the circle?',
                                          use_image=True, image=_image(), no_uplink=True))


def _goal_accepted(g) -> bool:
    from cdcca_ros.action import Ask

    future = g['action'].send_goal_async(Ask.Goal(question='how many objects are there?',
                                                  use_image=True, image=_image()))
    assert spin_until([g['executor']], future.done, 30.0)
    handle = future.result()
    if handle.accepted:
        result = handle.get_result_async()
        assert spin_until([g['executor']], result.done, 60.0)
        assert result.result().result.success, result.result().result.message
    return handle.accepted


def _delta_msgs(g, tiny_student_dir):
    """A signed delta v0 -> v1 for the device's tiny student, made the cloud's way."""
    import torch

    from cdcca_ros.core import dwc
    from cdcca_ros.core.updates import seal_delta
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.delta_msgs import envelope_to_msgs

    base = bundled.load(str(tiny_student_dir)).trainable_state_dict()
    ef = dwc.ErrorFeedback(base)
    base_hash = ef.view_hash()
    gen = torch.Generator().manual_seed(3)
    trained = {k: v + torch.randn(v.shape, generator=gen) * 1e-3 for k, v in base.items()}
    delta = dwc.compute_delta(trained, ef.view)
    codec = dwc.get_codec('fp16')
    packed = dwc.compress(delta, codec)
    ef.commit(delta, packed.decoded)
    env = seal_delta(g['private'], device_id=DEVICE_ID, round=1, base_version=0,
                     base_hash=base_hash, new_version=1, new_hash=ef.view_hash(),
                     codec=codec.name, payload=packed.payload)
    return envelope_to_msgs(env, 32768)


def test_device_node_every_transition_and_what_each_state_allows(graph, tiny_student_dir):
    from lifecycle_msgs.msg import Transition

    g = graph
    assert _state(g, 'device') == 'unconfigured'
    refused = _ask(g)
    assert not refused.success and 'model not ready (device_node unconfigured)' in refused.message
    assert not _goal_accepted(g)
    assert not _change(g, 'device', Transition.TRANSITION_ACTIVATE)  # not from unconfigured

    # configure: the model loads; the node answers nothing yet.
    assert _change(g, 'device', Transition.TRANSITION_CONFIGURE), _logs(g)
    assert _state(g, 'device') == 'inactive'
    _reported(g, 'device', 'inactive', 'configure: ok')
    assert spin_until([g['executor']], lambda: g['got']['versions'][-1:] == [f'{DEVICE_ID}:v0'],
                      10.0)
    refused = _ask(g)
    assert not refused.success and 'inactive' in refused.message
    assert not _goal_accepted(g)

    # activate: the service and the action answer.
    assert _change(g, 'device', Transition.TRANSITION_ACTIVATE)
    _reported(g, 'device', 'active', 'activate: ok')
    answer = _ask(g)
    assert answer.success and answer.answer.model_version == f'{DEVICE_ID}:v0', answer.message
    assert _goal_accepted(g)

    # deactivate: no answers, the model stays loaded: a model update still applies.
    assert _change(g, 'device', Transition.TRANSITION_DEACTIVATE)
    _reported(g, 'device', 'inactive', 'deactivate: ok')
    assert 'inactive' in _ask(g).message
    for msg in _delta_msgs(g, tiny_student_dir):
        g['delta_pub'].publish(msg)
    assert spin_until([g['executor']], lambda: g['got']['versions'][-1:] == [f'{DEVICE_ID}:v1'],
                      60.0), (g['got']['versions'], _logs(g))

    # cleanup: unloaded; configure again: the persisted adapter (v1) comes back.
    assert _change(g, 'device', Transition.TRANSITION_CLEANUP)
    assert _state(g, 'device') == 'unconfigured'
    _reported(g, 'device', 'unconfigured', 'cleanup: ok')
    assert 'model not ready' in _ask(g).message
    assert _change(g, 'device', Transition.TRANSITION_CONFIGURE)
    assert _change(g, 'device', Transition.TRANSITION_ACTIVATE)
    again = _ask(g)
    assert again.success and again.answer.model_version == f'{DEVICE_ID}:v1'

    # shutdown (from active): the adapter in use is on disk, the node is finalized.
    assert _change(g, 'device', Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert _state(g, 'device') == 'finalized'
    _reported(g, 'device', 'finalized', 'shutdown: ok')
    assert not _ask(g).success
    from safetensors import safe_open

    with safe_open(str(g['tmp'] / 'device' / 'adapter.safetensors'), 'pt') as f:
        assert f.metadata()['version'] == '1'
    assert g['procs']['device'].poll() is None  # finalized, still up until it is stopped


def _sample(g, tiny_student_dir, i: int):
    from cdcca_ros.msg import UtsTokens

    from cdcca_ros.core.uts import pack_tokens
    from cdcca_ros.models import bundled

    model = bundled.load(str(tiny_student_dir))
    tokens = model.vision_tokens([np.asarray(_image().data, np.uint8).reshape(48, 48, 3)])[0]
    packed = pack_tokens(tokens.float(), 'fp16')
    return UtsTokens(device_id=DEVICE_ID, sample_id=f'{DEVICE_ID}-lc-{i}',
                     question='what color is the circle?', device_answer='red',
                     num_tokens=int(tokens.shape[0]), token_dim=int(tokens.shape[1]),
                     kept_indices=list(range(int(tokens.shape[0]))), dtype='fp16',
                     payload=packed.data)


def _cloud_figures(g) -> dict:
    reports = g['got']['diag'].get(f'/{CLOUD_NS}/cloud_node', [])
    return reports[-1] if reports else {}


def test_cloud_node_every_transition_and_what_each_state_allows(graph, tiny_student_dir):
    from lifecycle_msgs.msg import Transition

    g = graph
    assert _state(g, 'cloud') == 'unconfigured'
    # No model: the cloud does not take the uplink (the cloud bridge keeps it meanwhile).
    subscribed = g['sample_pub'].get_subscription_count
    assert spin_until([g['executor']], lambda: _cloud_figures(g), 20.0)
    assert subscribed() == 0

    # configure: models loaded; samples are kept, no round runs while inactive.
    assert _change(g, 'cloud', Transition.TRANSITION_CONFIGURE), _logs(g)
    _reported(g, 'cloud', 'inactive', 'configure: ok')
    assert spin_until([g['executor']], lambda: subscribed() == 1, 20.0)
    g['sample_pub'].publish(_sample(g, tiny_student_dir, 1))
    pending = f'{DEVICE_ID}.pending'
    assert spin_until([g['executor']], lambda: _cloud_figures(g).get(pending) == '1', 20.0)
    seen = len(g['got']['diag'][f'/{CLOUD_NS}/cloud_node'])
    # Three more reports (1 s apart) with the round due (min_samples 1) and none started.
    assert spin_until([g['executor']], lambda: len(
        g['got']['diag'][f'/{CLOUD_NS}/cloud_node']) >= seen + 3, 20.0)
    assert _cloud_figures(g)['rounds'] == '0' and _cloud_figures(g)[pending] == '1'
    assert not g['got']['deltas']

    # activate: the due round runs and ships a delta.
    assert _change(g, 'cloud', Transition.TRANSITION_ACTIVATE)
    _reported(g, 'cloud', 'active', 'activate: ok')
    assert spin_until([g['executor']], lambda: _cloud_figures(g).get('rounds') == '1', 120.0), (
        {k: v for k, v in _cloud_figures(g).items() if k.startswith(DEVICE_ID)}, _logs(g))
    assert g['got']['deltas'] or spin_until([g['executor']], lambda: bool(g['got']['deltas']),
                                            20.0)

    # deactivate, cleanup: unloaded, the uplink no longer taken.
    assert _change(g, 'cloud', Transition.TRANSITION_DEACTIVATE)
    _reported(g, 'cloud', 'inactive', 'deactivate: ok')
    assert _change(g, 'cloud', Transition.TRANSITION_CLEANUP)
    _reported(g, 'cloud', 'unconfigured', 'cleanup: ok')
    assert spin_until([g['executor']], lambda: subscribed() == 0, 20.0)
    assert _cloud_figures(g).get('samples_rejected') == '0'

    # configure resumes the device's state from its checkpoint; shutdown persists it.
    assert _change(g, 'cloud', Transition.TRANSITION_CONFIGURE)
    assert spin_until([g['executor']], lambda: subscribed() == 1, 20.0)
    g['sample_pub'].publish(_sample(g, tiny_student_dir, 3))
    assert spin_until([g['executor']], lambda: _cloud_figures(g).get(pending) == '1', 20.0), (
        {k: v for k, v in _cloud_figures(g).items() if k.startswith(DEVICE_ID)}, _logs(g))
    state_file = g['tmp'] / 'cloud' / DEVICE_ID / 'state.json'
    before = json.loads(state_file.read_text())
    assert _change(g, 'cloud', Transition.TRANSITION_INACTIVE_SHUTDOWN)
    _reported(g, 'cloud', 'finalized', 'shutdown: ok')
    after = json.loads(state_file.read_text())
    assert after['version'] == before['version'] >= 1
    assert after['samples_seen'] == before['samples_seen'] + 1  # the sample since: saved
