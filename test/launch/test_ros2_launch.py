"""The launch files under real ``ros2 launch`` (the vendored upstream launch, launch_ros, ros2cli).

Three launches share one graph, as robots and a cloud server on one network would: robot A
(``device.launch.py`` in its own namespace, its camera remapped to another topic, a YAML file
replacing the device node's), robot B (``device.launch.py``, another namespace, no bridge) and
the one-machine demo (``demo.launch.py``, its own two namespaces). Robot B starts with
``autostart:=false``: its device node waits, unconfigured, for a lifecycle manager (here the
test, through lifecycle_msgs). The test process is an ordinary ROS client: it reads the graph,
the parameters, calls ``ask``, and finally sends the launches SIGINT (Ctrl-C) and checks that
every node ends cleanly. The launches start once for
the module; the tests read from them in order, the last one stops them.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

import processes  # noqa: E402 (test/: process helpers)
from ros_graph import spin_until  # noqa: E402

START_S = 180.0  # three launches, four models, two cores
ACK = 'user interrupted with ctrl-c (SIGINT)'  # what launch logs when its handler runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _signal_masks(pid: int) -> str:
    """Each thread's pending, blocked, ignored and caught signal masks (``/proc``)."""
    lines = []
    for task in sorted(Path(f'/proc/{pid}/task').glob('*')):
        try:
            status = (task / 'status').read_text().splitlines()
        except OSError:
            continue
        fields = dict(ln.split(':', 1) for ln in status if ':' in ln)
        sig = [fields.get(k, '?').strip() for k in ('SigPnd', 'ShdPnd', 'SigBlk', 'SigIgn',
                                                    'SigCgt')]
        lines.append(f'  thread {task.name}: pnd/shdpnd/blk/ign/cgt {" ".join(sig)}')
    return '\n'.join(lines)


class Launch:
    """One ``ros2 launch`` process and its output, read in a thread."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.args = args
        self.log = log
        self.lines: list[str] = []
        self.proc = subprocess.Popen(['ros2', 'launch', 'cdcca_ros', *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self.log.open('w') as out:
            for line in self.proc.stdout:
                self.lines.append(line)
                out.write(line)
                out.flush()

    @property
    def text(self) -> str:
        return ''.join(self.lines)

    def tail(self, n: int = 40) -> str:
        return f'--- {" ".join(self.args[:2])}\n' + ''.join(self.lines[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in processes.children(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
        self.proc.wait()
        self._thread.join(timeout=5.0)


def _params_file(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    return path


SMALL_CAMERA = ('camera.width:=64', 'camera.height:=48', 'camera.fps:=4.0',
                'camera.synthetic.schedule:=source:600')


@pytest.fixture(scope='module')
def launched(ros2_launch_env, tmp_path_factory):
    """Robot A, robot B and the demo under ``ros2 launch``, and a client node on the graph."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    tmp = tmp_path_factory.mktemp('launch')
    # PYTHONFAULTHANDLER: a launch stuck after SIGINT is sent SIGABRT and prints every
    # thread's Python stack into its output before the test fails (see the SIGINT test).
    env = dict(ros2_launch_env, HOME=str(tmp / 'home'), PYTHONUNBUFFERED='1',
               PYTHONFAULTHANDLER='1')
    port = _free_port()  # nothing listens there: the bridges run with their link down
    link = f'tcp/127.0.0.1:{port}'
    device_yaml = _params_file(tmp / 'robot_a_device.yaml', {
        'device_id': 'robotA', 'state_dir': str(tmp / 'state_a'), 'max_new_tokens': 4,
        'uts.entropy_threshold': 0.3})
    launches = {
        'A': Launch(env, tmp / 'robot_a.log', 'device.launch.py', 'device_ns:=robotA',
                    'image_topic:=/robot_a_cam/front', f'device.params_file:={device_yaml}',
                    'device_bridge.device_id:=robotA', f'device_bridge.connect:={link}',
                    f'device_bridge.spool_dir:={tmp / "spool_a"}', *SMALL_CAMERA),
        'B': Launch(env, tmp / 'robot_b.log', 'device.launch.py', 'device_ns:=robotB',
                    'use_bridge:=false', 'autostart:=false', 'device.device_id:=robotB',
                    f'device.state_dir:={tmp / "state_b"}', *SMALL_CAMERA),
        'D': Launch(env, tmp / 'demo.log', 'demo.launch.py', 'device_ns:=robotD',
                    'cloud_ns:=cloudD', 'device.device_id:=robotD',
                    f'device.state_dir:={tmp / "state_d"}', 'device_bridge.device_id:=robotD',
                    f'device_bridge.connect:={link}', f'device_bridge.spool_dir:={tmp / "sp"}',
                    'cloud_bridge.devices:=robotD', f'cloud_bridge.connect:={link}',
                    f'cloud_bridge.store_dir:={tmp / "store"}',
                    f'cloud.state_dir:={tmp / "cloud"}', *SMALL_CAMERA),
    }
    context = Context()
    rclpy.init(context=context)
    client = Node('launch_test_client', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client)
    try:
        yield {'launches': launches, 'client': client, 'executor': executor, 'tmp': tmp}
    finally:
        for launch in launches.values():
            launch.kill()
        executor.shutdown()
        client.destroy_node()
        rclpy.shutdown(context=context)


EXPECTED_NODES = {
    'A': {('/robotA', 'camera_node'), ('/robotA', 'device_node'), ('/robotA', 'uts_node'),
          ('/robotA', 'device_bridge')},
    'B': {('/robotB', 'camera_node'), ('/robotB', 'device_node'), ('/robotB', 'uts_node')},
    'D': {('/robotD', 'camera_node'), ('/robotD', 'device_node'), ('/robotD', 'uts_node'),
          ('/robotD', 'device_bridge'), ('/cloudD', 'cloud_node'), ('/cloudD', 'cloud_bridge')},
}


def _graph_nodes(client) -> list[tuple[str, str]]:
    return [(ns, name) for name, ns in client.get_node_names_and_namespaces()]


def test_every_node_comes_up_once_with_its_name_and_namespace(launched):
    client, executor = launched['client'], launched['executor']
    wanted = set().union(*EXPECTED_NODES.values())
    ok = spin_until([executor], lambda: wanted <= set(_graph_nodes(client)), START_S, 0.2)
    launches = launched['launches'].values()
    assert ok, (sorted(wanted - set(_graph_nodes(client))),
                '\n'.join(launch.tail() for launch in launches))
    nodes = _graph_nodes(client)
    ours = [n for n in nodes if n[0] in ('/robotA', '/robotB', '/robotD', '/cloudD')]
    assert sorted(ours) == sorted(wanted)  # each once: no node renamed after another
    for launch in launches:
        assert launch.proc.poll() is None, launch.tail()


def _get_params(launched, node: str, names: list[str]) -> dict:
    from rclpy.parameter import parameter_value_to_python
    from rclpy.parameter_client import AsyncParameterClient

    client, executor = launched['client'], launched['executor']
    params = AsyncParameterClient(client, node)
    assert spin_until([executor], params.services_are_ready, 60.0), node
    future = params.get_parameters(names)
    assert spin_until([executor], future.done, 20.0), node
    return {n: parameter_value_to_python(v) for n, v in zip(names, future.result().values)}


def test_parameters_come_from_the_yaml_override_and_the_arguments(launched):
    # Robot A's device node: the given YAML replaced config/device_node.yaml, the rest is
    # the table's; the camera's fps is a launch argument.
    assert _get_params(launched, '/robotA/device_node',
                       ['device_id', 'max_new_tokens', 'uts.entropy_threshold', 'model']) == {
        'device_id': 'robotA', 'max_new_tokens': 4, 'uts.entropy_threshold': 0.3,
        'model': 'bundled:student'}
    # Robot B kept config/device_node.yaml (max_new_tokens 6) with one argument on top.
    assert _get_params(launched, '/robotB/device_node', ['device_id', 'max_new_tokens']) == {
        'device_id': 'robotB', 'max_new_tokens': 6}
    assert _get_params(launched, '/robotA/camera_node', ['fps', 'width']) == {
        'fps': 4.0, 'width': 64}
    assert _get_params(launched, '/robotA/device_bridge', ['role', 'device_id']) == {
        'role': 'device', 'device_id': 'robotA'}
    assert _get_params(launched, '/cloudD/cloud_bridge', ['role', 'devices']) == {
        'role': 'cloud', 'devices': 'robotD'}


def test_the_image_remap_joins_camera_and_device_on_the_given_topic(launched):
    client, executor = launched['client'], launched['executor']
    topic = '/robot_a_cam/front'

    def joined() -> bool:
        pubs = {(i.node_namespace, i.node_name) for i in client.get_publishers_info_by_topic(
            topic)}
        subs = {(i.node_namespace, i.node_name)
                for i in client.get_subscriptions_info_by_topic(topic)}
        return ('/robotA', 'camera_node') in pubs and ('/robotA', 'device_node') in subs
    assert spin_until([executor], joined, 30.0)
    # Robot B kept the default: its own namespace's `image`.
    assert ('/robotB', 'device_node') in {
        (i.node_namespace, i.node_name)
        for i in client.get_subscriptions_info_by_topic('/robotB/image')}


def _ask(launched, service: str, question: str):
    from cdcca_ros.srv import Ask

    client, executor = launched['client'], launched['executor']
    ask = client.create_client(Ask, service)
    try:
        assert spin_until([executor], ask.service_is_ready, 60.0), service
        deadline = time.monotonic() + START_S
        while True:  # the model may still be loading, or no frame arrived yet
            future = ask.call_async(Ask.Request(question=question))
            assert spin_until([executor], future.done, 60.0), service
            response = future.result()
            waiting = response.message.startswith('model not ready (device_node configuring') \
                or response.message == 'no camera frame received yet'
            if response.success or time.monotonic() > deadline or not waiting:
                return response
            time.sleep(0.5)
    finally:
        client.destroy_client(ask)


def _lifecycle(launched, node: str, transition: int | None = None) -> str:
    """Trigger ``transition`` on ``node`` (lifecycle_msgs), then return its state's label."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    client, executor = launched['client'], launched['executor']
    if transition is not None:
        change = client.create_client(ChangeState, f'{node}/change_state')
        assert spin_until([executor], change.service_is_ready, 60.0), node
        future = change.call_async(ChangeState.Request(transition=Transition(id=transition)))
        assert spin_until([executor], future.done, START_S), node
        assert future.result().success, '\n'.join(
            x.tail() for x in launched['launches'].values())
        client.destroy_client(change)
    get = client.create_client(GetState, f'{node}/get_state')
    assert spin_until([executor], get.service_is_ready, 60.0), node
    future = get.call_async(GetState.Request())
    assert spin_until([executor], future.done, 30.0), node
    client.destroy_client(get)
    return future.result().current_state.label


def test_autostart_false_leaves_the_device_node_to_a_lifecycle_manager(launched):
    from lifecycle_msgs.msg import Transition

    node = '/robotB/device_node'
    assert _lifecycle(launched, node) == 'unconfigured'
    refused = _ask(launched, '/robotB/ask', 'how many objects are there?')
    assert not refused.success and 'unconfigured' in refused.message
    assert _lifecycle(launched, node, Transition.TRANSITION_CONFIGURE) == 'inactive'
    assert _lifecycle(launched, node, Transition.TRANSITION_ACTIVATE) == 'active'
    # Robot A started on its own (autostart, the default).
    assert _lifecycle(launched, '/robotA/device_node') in ('configuring', 'active')


def test_ask_answers_on_each_robot(launched):
    for robot in ('robotA', 'robotB', 'robotD'):
        response = _ask(launched, f'/{robot}/ask', 'how many objects are there?')
        assert response.success, (robot, response.message,
                                  '\n'.join(x.tail() for x in launched['launches'].values()))
        assert response.answer.answer.strip()
        assert response.answer.model_version == f'{robot}:v0'
    empty = _ask(launched, '/robotA/ask', '   ')
    assert not empty.success and 'empty question' in empty.message


def test_sigint_stops_every_node_cleanly(launched):
    """Ctrl-C: launch passes SIGINT on, every node ends on its own, exit code 0."""
    launches = launched['launches']
    children = {key: processes.children(launch.proc.pid) for key, launch in launches.items()}
    for key, launch in launches.items():
        assert len(children[key]) == len({n for ns, n in EXPECTED_NODES[key]} - {'uts_node'}), (
            key, launch.tail())
        launch.proc.send_signal(signal.SIGINT)
    for key, launch in launches.items():
        # A launch that has not even logged the interrupt after 20 s never ran its SIGINT
        # handler (seen twice on a loaded machine: no line at all after the signal, so the
        # nodes never got it); Ctrl-C again, as a user would. A second SIGINT that launch did
        # receive is ignored by it, so the nodes' own shutdown is judged as before.
        deadline = time.monotonic() + 20.0
        while (ACK not in launch.text and launch.proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.2)
        if ACK not in launch.text and launch.proc.poll() is None:
            launch.proc.send_signal(signal.SIGINT)
        try:
            code = launch.proc.wait(timeout=60.0)
        except subprocess.TimeoutExpired:
            # Seen about one full run in four on a loaded machine, launch's own log ending at
            # 'process started'; where its main thread is stuck is the open question: the
            # faulthandler's dump of every thread goes into the failure.
            masks = _signal_masks(launch.proc.pid)  # SIGINT (bit 2) pending, blocked, ignored?
            launch.proc.send_signal(signal.SIGABRT)
            try:
                launch.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                pass
            launch._thread.join(timeout=5.0)
            for pid in children[key]:  # orphaned by the abort: the fixture no longer sees them
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(f'{key}: ros2 launch still running 60 s after SIGINT (then SIGABRT, its '
                        f'stacks at the end); signal masks per thread:\n{masks}\n'
                        f'{launch.tail(120)}')
        assert code == 0, launch.tail()
        launch._thread.join(timeout=10.0)
        assert not [pid for pid in children[key] if processes.alive(pid)], launch.tail()
        finished = launch.text.count('process has finished cleanly')
        assert finished == len(children[key]), launch.tail()
        assert 'Traceback' not in launch.text and 'was required' not in launch.text, (
            launch.tail())


def _ros2_launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['ros2', 'launch', 'cdcca_ros', *args], env=env, text=True,
                          capture_output=True, timeout=120)


def test_a_misspelt_argument_stops_the_launch_with_the_known_ones(ros2_launch_env):
    done = _ros2_launch(ros2_launch_env, 'device.launch.py', 'camera.fsp:=5')
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "unknown argument 'camera.fsp' (did you mean 'camera.fps'?)" in out
    assert 'process started' not in out  # refused before any node started


def test_show_args_prints_one_default_per_argument(ros2_launch_env):
    done = _ros2_launch(ros2_launch_env, 'device.launch.py', '--show-args')
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.split("\n\n    '")[1:]
    assert len(blocks) > 40
    for block in blocks:
        assert block.count('default') == 1, block
    assert "'camera.fps':\n        frames per second" in done.stdout
    assert "(default: '10.0')" in done.stdout and '__unset__' not in done.stdout
