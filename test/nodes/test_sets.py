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


@pytest.mark.parametrize('name', sorted(SETS))
def test_launch_files_produce_the_runner_nodes(name):
    """Where ROS 2 launch is installed: same nodes, names, namespaces and parameters."""
    pytest.importorskip('launch_ros', reason='ROS 2 launch is not installed (PyPI wheels)')
    import importlib.util

    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchContext

    spec = importlib.util.spec_from_file_location('lf', REPO / 'launch' / f'{name}.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ld = module.generate_launch_description()
    context = LaunchContext()
    for action in ld.entities:
        if isinstance(action, DeclareLaunchArgument):
            action.visit(context)
    nodes = [n for a in ld.entities if isinstance(a, OpaqueFunction)
             for n in a.execute(context)]
    expected = node_launches(name)
    assert [(n.node_executable, n.expanded_node_namespace) for n in nodes] == [
        (e.executable, '/' + e.namespace) for e in expected]
