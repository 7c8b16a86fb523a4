"""What the launch files share: launch arguments from the parameter tables, nodes from sets.

Imported only by ``launch/*.launch.py`` (it needs ``launch`` and ``launch_ros``, which a normal
ROS 2 install has and the PyPI wheels do not). The pure part -- which arguments a set declares,
their defaults, which given names are misspelt -- is in :mod:`cdcca_ros.nodes.sets`.

What real ``ros2 launch`` needs beyond the runner:

* ``Node(name=...)`` becomes a process-wide ``-r __node:=NAME`` that renames *every* node of
  the process (device_node hosts uts_node). Nodes are renamed with a node-specific rule
  (``-r EXECUTABLE:__node:=NAME``) instead, exactly as the runner does.
* Launch ignores arguments nobody declared; a misspelt one (``camera.fsp:=5``) would change
  nothing, silently. The names given on the command line are recorded before the declarations
  run, and one that looks like ours but is not declared stops the launch with the known ones.
* An argument's default is what the node gets without it (the YAML's value, else the table's),
  shown once by ``--show-args``; only arguments actually given override the YAML files.
"""
from __future__ import annotations

from typing import Any

from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, Shutdown
from launch.events.process import ProcessExited
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes.sets import (
    NodeLaunch,
    launch_arguments,
    node_launches,
    unknown_arguments,
)
from launch import LaunchContext, LaunchDescription

STOP_GRACE_S = 20.0
"""Seconds a node has to end after Ctrl-C before launch escalates to SIGTERM (launch's default
is 5, then SIGKILL 5 s later). A node that holds models releases them, joins its threads and
closes its DDS participant; on a loaded robot computer that can take longer than 5 s, and a
SIGKILL then loses what the node was writing (an adapter being committed, a spool)."""


def arguments(set_name: str) -> list[DeclareLaunchArgument]:
    """One launch argument per node parameter (``<node>.<param>``), plus the set's switches."""
    return [DeclareLaunchArgument(arg.name, default_value=arg.default,
                                  description=arg.description)
            for arg in launch_arguments(set_name)]


def _on_exit(label: str):
    """A node that exits while the set runs (one FATAL line: it can never work) stops the set,
    as the runner does; exits during a shutdown are the shutdown itself."""
    def handler(event: ProcessExited, context: LaunchContext) -> list[Any] | None:
        if context.is_shutdown:
            return None
        reason = f'{label} exited with code {event.returncode}; stopping the others'
        return [LogInfo(msg=reason), Shutdown(reason=reason)]
    return handler


def node_action(launch: NodeLaunch) -> Node:
    """The launch_ros ``Node`` that starts ``launch`` as the runner's command line does."""
    label = f'{launch.namespace}/{launch.name}'.lstrip('/')
    rename = launch.rename_rule()
    return Node(package='cdcca_ros', executable=launch.executable,
                namespace=launch.namespace, output='screen',
                ros_arguments=rename or None,
                parameters=[p for p in (launch.params_file, launch.parameters) if p],
                remappings=list(launch.remappings), on_exit=_on_exit(label),
                sigterm_timeout=str(STOP_GRACE_S))


def _nodes(context: LaunchContext, set_name: str, given: set[str]) -> list[Node]:
    declared = {arg.name for arg in launch_arguments(set_name)}
    unknown = unknown_arguments(set_name, given - declared)
    if unknown is not None:
        raise unknown  # launch prints it as one line and exits non-zero
    values = {name: LaunchConfiguration(name).perform(context) for name in declared}
    try:
        launches = node_launches_from_arguments(set_name, values, given)
    except ConfigError as err:
        raise ConfigError(f'{set_name}.launch.py: {err}') from err
    return [node_action(launch) for launch in launches]


def node_launches_from_arguments(set_name: str, values: dict[str, str],
                                 given: set[str]) -> list[NodeLaunch]:
    """The node launches for launch-argument ``values``; only the ``given`` parameter arguments
    override (the others keep the YAML's values)."""
    switches = {}
    overrides, files = {}, {}
    for name, value in values.items():
        key, dot, param = name.partition('.')
        if not dot:
            switches[name] = value
        elif param == 'params_file':
            if value:
                files[key] = value
        elif name in given:
            overrides[name] = value
    return node_launches(set_name, overrides, params_files=files, **switches)


def description(set_name: str) -> LaunchDescription:
    """The launch description of a node set."""
    given: set[str] = set()

    def record_given(context: LaunchContext) -> None:
        # Runs before the declarations set their defaults: what is there now was given.
        given.update(context.launch_configurations)

    return LaunchDescription([OpaqueFunction(function=record_given), *arguments(set_name),
                              OpaqueFunction(function=_nodes, args=[set_name, given])])
