"""What the launch files share: launch arguments from the parameter tables, nodes from sets.

Imported only by ``launch/*.launch.py`` (it needs ``launch`` and ``launch_ros``, which a normal
ROS 2 install has and the PyPI wheels do not).
"""
from __future__ import annotations

from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from cdcca_ros.nodes.sets import DEFAULT_IMAGE_TOPIC, OPTIONAL, SETS, node_launches
from cdcca_ros.nodes.tables import TABLES
from launch import LaunchContext, LaunchDescription

UNSET = '__unset__'


def arguments(set_name: str) -> list[DeclareLaunchArgument]:
    """One launch argument per node parameter (``<node>.<param>``), plus namespaces/files.

    Parameter arguments default to "unset", so the YAML file in config/ keeps precedence over
    the table defaults unless the argument is given; the description shows the table default.
    """
    args = [DeclareLaunchArgument('device_ns', default_value='robot1',
                                  description='namespace of the device-side nodes'),
            DeclareLaunchArgument('cloud_ns', default_value='cloud',
                                  description='namespace of the cloud-side nodes')]
    keys = {spec.key for spec in SETS[set_name]}
    if 'camera' in keys:
        args.append(DeclareLaunchArgument(
            'use_camera', default_value='true',
            description='start camera_node (false: your own driver publishes the frames)'))
    if keys & {'device_bridge', 'cloud_bridge'}:
        args.append(DeclareLaunchArgument(
            'use_bridge', default_value='true',
            description='start the cloud bridge(s) (false: no cloud link)'))
    if 'device' in keys:
        args.append(DeclareLaunchArgument(
            'image_topic', default_value=DEFAULT_IMAGE_TOPIC,
            description='the device node\'s image input (relative: in the device namespace)'))
    seen = set()
    for spec in SETS[set_name]:
        args.append(DeclareLaunchArgument(
            f'{spec.key}.params_file', default_value='',
            description=f'YAML replacing config/{spec.table}.yaml'))
        for param in TABLES[spec.table]:
            name = f'{spec.key}.{param.name}'
            if name in seen or param.name in dict(spec.fixed):
                continue
            seen.add(name)
            args.append(DeclareLaunchArgument(
                name, default_value=UNSET,
                description=f'{param.description} (default: {param.default!r})'))
    return args


def _nodes(context: LaunchContext, set_name: str) -> list[Node]:
    overrides, files = {}, {}
    for spec in SETS[set_name]:
        path = LaunchConfiguration(f'{spec.key}.params_file').perform(context)
        if path:
            files[spec.key] = path
        for param in TABLES[spec.table]:
            if param.name in dict(spec.fixed):
                continue
            value = LaunchConfiguration(f'{spec.key}.{param.name}').perform(context)
            if value != UNSET:
                overrides[f'{spec.key}.{param.name}'] = value
    keys = {spec.key for spec in SETS[set_name]}
    switches = {switch: LaunchConfiguration(switch).perform(context)
                for key, switch in OPTIONAL.items() if key in keys}
    if 'device' in keys:
        switches['image_topic'] = LaunchConfiguration('image_topic').perform(context)
    launches = node_launches(set_name, overrides,
                             device_ns=LaunchConfiguration('device_ns').perform(context),
                             cloud_ns=LaunchConfiguration('cloud_ns').perform(context),
                             params_files=files, **switches)
    # A node that exits (one FATAL line: it can never work) stops the set, as the runner does.
    return [Node(package='cdcca_ros', executable=launch.executable, name=launch.name,
                 namespace=launch.namespace, output='screen',
                 parameters=[p for p in (launch.params_file, launch.parameters) if p],
                 remappings=list(launch.remappings),
                 on_exit=Shutdown(reason=f'{launch.name} exited'))
            for launch in launches]


def description(set_name: str) -> LaunchDescription:
    """The launch description of a node set."""
    return LaunchDescription([*arguments(set_name),
                              OpaqueFunction(function=_nodes, args=[set_name])])
