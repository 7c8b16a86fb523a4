"""Node sets, runner and launch files come from one definition and agree."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes.sets import SETS, node_launches
from cdcca_ros.nodes.tables import TABLES, validate
from cdcca_ros.runner import command, parse_overrides

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('table', sorted(TABLES))
def test_defaults_pass_their_own_validation(table):
    values = validate(table, {})
    assert set(values) == {p.name for p in TABLES[table]}


@pytest.mark.parametrize('table', sorted(TABLES))
def test_config_yaml_matches_the_table(table):
    data = yaml.safe_load((REPO / 'config' / f'{table}.yaml').read_text())
    params = data['/**']['ros__parameters']
    assert params, 'empty config file'
    # Every key is a known parameter with a valid value.
    validate(table, params)


def test_bad_values_are_refused_with_the_name():
    with pytest.raises(ConfigError, match="'fps'"):
        validate('camera_node', {'fps': -1.0})
    with pytest.raises(ConfigError, match='source'):
        validate('camera_node', {'source': 'webcam9000'})
    with pytest.raises(ConfigError, match='unknown parameter'):
        validate('device_node', {'nope': 1})
    with pytest.raises(ConfigError, match='fixed'):
        node_launches('device', {'device_bridge.role': 'cloud'})
    with pytest.raises(ConfigError, match='node set'):
        node_launches('robot9')


def test_overrides_are_typed_and_reach_the_command_line():
    launches = node_launches('device', parse_overrides(
        ['camera.fps=5', 'camera.opencv.device=0', 'device.uts.enabled=false']))
    camera = next(n for n in launches if n.executable == 'camera_node')
    device = next(n for n in launches if n.executable == 'device_node')
    assert camera.parameters == {'fps': 5.0, 'opencv.device': '0'}
    assert device.parameters == {'uts.enabled': False}
    cmd = command(camera)
    assert cmd[:3] == [sys.executable, '-m', 'cdcca_ros.nodes.camera_node']
    assert "opencv.device:='0'" in cmd and 'fps:=5.0' in cmd
    assert 'image_raw:=image' in cmd and '__ns:=/robot1' in cmd
    assert cmd[cmd.index('--params-file') + 1].endswith('config/camera_node.yaml')


def test_autostart_false_reaches_the_lifecycle_nodes_only():
    launches = {n.name: n for n in node_launches('demo', autostart='false')}
    assert launches['device_node'].parameters == {'autostart': False}
    assert launches['cloud_node'].parameters == {'autostart': False}
    assert 'autostart' not in launches['camera_node'].parameters
    # A per-node override wins over the set's switch; the default passes nothing.
    launches = {n.name: n for n in node_launches('demo', {'cloud.autostart': 'true'},
                                                 autostart=False)}
    assert launches['cloud_node'].parameters == {'autostart': True}
    assert all('autostart' not in n.parameters for n in node_launches('demo'))
    out = subprocess.run([sys.executable, '-m', 'cdcca_ros.runner', 'device', '--dry-run',
                          '--no-autostart'], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert [line for line in out.splitlines() if 'autostart:=false' in line] == [
        line for line in out.splitlines() if 'cdcca_ros.nodes.device_node' in line]


def test_demo_set_puts_each_side_in_its_namespace():
    launches = node_launches('demo')
    sides = {(n.name, n.namespace) for n in launches}
    assert ('device_node', 'robot1') in sides and ('cloud_node', 'cloud') in sides
    roles = {n.name: n.parameters.get('role') for n in launches if 'bridge' in n.name}
    assert roles == {'device_bridge': 'device', 'cloud_bridge': 'cloud'}


def test_runner_dry_run_prints_one_command_per_node():
    out = subprocess.run([sys.executable, '-m', 'cdcca_ros.runner', 'demo', '--dry-run',
                          '-p', 'camera.fps=2'], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().splitlines()
    assert len(out) == len(SETS['demo'])
    assert 'fps:=2.0' in out[0]


@pytest.mark.parametrize('name', sorted(SETS))
def test_launch_files_derive_from_the_sets(name):
    """Each launch file builds its description from the same set the runner uses."""
    source = (REPO / 'launch' / f'{name}.launch.py').read_text()
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, 'id', '') == 'description']
    assert len(calls) == 1 and calls[0].args[0].value == name


def _meaning(ros_args: list[str]) -> dict:
    """What ``--ros-args ...`` asks of a node: renames, namespace, parameters (files read,
    ``-p`` values parsed as YAML, as rcl does), remappings."""
    out = {'rules': [], 'params': {}, 'files': []}
    i = 0
    while i < len(ros_args):
        arg = ros_args[i]
        if arg == '--ros-args':
            i += 1
            continue
        value = ros_args[i + 1]
        if arg == '-r':
            out['rules'].append(value)
        elif arg == '-p':
            name, _, text = value.partition(':=')
            out['params'][name] = yaml.safe_load(text)
        elif arg == '--params-file':
            if Path(value).name.startswith('launch_params_'):  # launch_ros's dict, as a file
                data = yaml.safe_load(Path(value).read_text())
                assert list(data) == ['/**'], data  # every node of the process, as -p does
                out['params'].update(data['/**']['ros__parameters'])
            else:
                out['files'].append(value)
        else:
            raise AssertionError(f'unexpected ROS argument {arg!r} in {ros_args}')
        i += 2
    out['rules'].sort()
    return out


def _launch_file_commands(name: str, arguments: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(executable, ROS arguments) of every node ``launch/<name>.launch.py`` starts with
    ``arguments``, from the real launch description with its substitutions performed."""
    import importlib.util

    from launch.actions import OpaqueFunction
    from launch.utilities import perform_substitutions

    from launch import LaunchContext

    spec = importlib.util.spec_from_file_location('lf', REPO / 'launch' / f'{name}.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ld = module.generate_launch_description()
    context = LaunchContext()
    context.launch_configurations.update(arguments)  # as `ros2 launch ... NAME:=VALUE` does
    nodes = []
    for action in ld.entities:
        result = action.visit(context)
        if isinstance(action, OpaqueFunction):
            nodes += result or []
    commands = []
    for node in nodes:
        # launch_ros fills in the namespace (and writes the parameter dict to a file) only when
        # the action executes; do that part of execute() here, without starting a process.
        node._perform_substitutions(context)
        context.extend_locals({'ros_specific_arguments': {
            'ns': f'__ns:={node.expanded_node_namespace}'}})
        cmd = [perform_substitutions(context, part) for part in node.cmd]
        commands.append((node.node_executable, cmd[cmd.index('--ros-args'):]))
    return commands


@pytest.mark.parametrize('name, arguments, overrides', [
    ('device', {}, {}),
    ('cloud', {}, {}),
    ('demo', {}, {}),
    ('device', {'device_ns': 'robot7', 'image_topic': '/cam/front', 'camera.fps': '5',
                'device.max_new_tokens': '3', 'device_bridge.connect': 'tcp/10.0.0.1:7447'},
     {'camera.fps': '5', 'device.max_new_tokens': '3',
      'device_bridge.connect': 'tcp/10.0.0.1:7447'}),
])
def test_launch_files_produce_the_runner_nodes(launch_importable, name, arguments, overrides):
    """With real launch (vendored): the launch file starts the runner's nodes with the same
    names, namespaces, parameters and remappings; a node's own name is never replaced by a
    process-wide ``__node:=`` (that would rename uts_node in device_node's process)."""
    commands = _launch_file_commands(name, arguments)
    switches = {k: v for k, v in arguments.items() if '.' not in k}
    expected = node_launches(name, overrides, **switches)
    assert [exe for exe, _ in commands] == [e.executable for e in expected]
    for (exe, ros_args), launch in zip(commands, expected):
        got, want = _meaning(ros_args), _meaning(launch.ros_args())
        assert got == want, exe
        assert not any(rule.startswith('__node:=') for rule in got['rules']), got
    if name != 'cloud':
        device = _meaning(next(args for exe, args in commands if exe == 'device_node'))
        assert f'__ns:=/{switches.get("device_ns", "robot1")}' in device['rules']
    if arguments:
        camera = _meaning(commands[0][1])
        assert camera['params'] == {'fps': 5.0} and 'image_raw:=/cam/front' in camera['rules']


def test_launch_files_refuse_misspelt_arguments(launch_importable):
    """A misspelt argument would change nothing, silently: the launch stops and names the
    known ones; the arguments of a launch file that includes ours are not ours to refuse."""
    with pytest.raises(ConfigError, match=r"'camera.fsp' \(did you mean 'camera.fps'\?\).*"
                                          r"known camera: .*camera.fps"):
        _launch_file_commands('device', {'camera.fsp': '5'})
    with pytest.raises(ConfigError, match=r"'use_camra'.*known switches: .*use_camera"):
        _launch_file_commands('device', {'use_camra': 'false'})
    with pytest.raises(ConfigError, match=r"'cloud.akd.steps'.*known nodes: camera\.\*"):
        _launch_file_commands('device', {'cloud.akd.steps': '3'})
    assert len(_launch_file_commands('device', {'map': 'office.yaml', 'use_sim_time': 'true'})
               ) == len(SETS['device'])


def test_launch_arguments_show_one_default_each():
    """``--show-args`` prints launch's own ``(default: ...)``: the description carries none, and
    the default is what the node gets without the argument (the YAML's value first)."""
    from cdcca_ros.nodes.sets import launch_arguments

    args = {a.name: a for a in launch_arguments('device')}
    assert all('default' not in a.description for a in args.values())
    assert args['camera.fps'].default == '10.0' and args['use_camera'].default == 'true'
    yaml_values = yaml.safe_load((REPO / 'config' / 'device_node.yaml').read_text())
    assert args['device.uts.keep_ratio'].default == str(
        yaml_values['/**']['ros__parameters']['uts.keep_ratio'])
    assert 'device_bridge.role' not in args  # fixed by the set
    assert '(one of: synthetic, realsense, opencv)' in args['camera.source'].description
