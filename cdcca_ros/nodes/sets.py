"""Which nodes make up the device side, the cloud side and the one-machine demo.

The single source for both ways of starting them: the ROS 2 launch files (``launch/*.launch.py``)
and the project's own runner (``python -m cdcca_ros.runner``) both call :func:`node_launches`,
so the node set, names, namespaces, remappings and parameters cannot diverge.

Parameter precedence, lowest first: the table defaults (:mod:`cdcca_ros.nodes.tables`), the
node's YAML file (``config/<node>.yaml`` unless another file is given), then explicit overrides
(launch arguments ``<node>.<param>:=value`` or runner ``-p <node>.<param>=value``).

Start only the part you need, as realsense-ros's ``enable_*`` arguments do: ``use_camera``
(false: your own camera driver publishes the frames), ``use_bridge`` (false: no cloud link yet)
and ``image_topic`` (the topic the device node reads, and the synthetic camera publishes on).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes.tables import TABLES, unknown_parameters


@dataclass(frozen=True)
class NodeSpec:
    """One node of a set.

    Attributes:
        key: short name used for override prefixes (``camera``, ``device``, ...).
        name: node name.
        table: parameter table name (also the executable and default node name).
        module: Python module holding the node's ``main()``.
        side: ``device`` or ``cloud``: which namespace it lives in.
        fixed: parameters the set imposes (e.g. the bridge's role).
        remappings: topic remappings (from, to).
    """

    key: str
    name: str
    table: str
    module: str
    side: str
    fixed: tuple[tuple[str, Any], ...] = ()
    remappings: tuple[tuple[str, str], ...] = ()


CAMERA = NodeSpec('camera', 'camera_node', 'camera_node', 'cdcca_ros.nodes.camera_node', 'device',
                  remappings=(('image_raw', 'image'),))
DEVICE = NodeSpec('device', 'device_node', 'device_node', 'cdcca_ros.nodes.device_node', 'device')
DEVICE_BRIDGE = NodeSpec('device_bridge', 'device_bridge', 'cloud_bridge_node',
                         'cdcca_ros.nodes.cloud_bridge_node', 'device',
                         fixed=(('role', 'device'),))
CLOUD = NodeSpec('cloud', 'cloud_node', 'cloud_node', 'cdcca_ros.nodes.cloud_node', 'cloud')
CLOUD_BRIDGE = NodeSpec('cloud_bridge', 'cloud_bridge', 'cloud_bridge_node',
                        'cdcca_ros.nodes.cloud_bridge_node', 'cloud', fixed=(('role', 'cloud'),))

SETS: dict[str, tuple[NodeSpec, ...]] = {
    'device': (CAMERA, DEVICE, DEVICE_BRIDGE),
    'cloud': (CLOUD, CLOUD_BRIDGE),
    # Both sides on one machine, each in its own namespace, joined by the Zenoh link exactly
    # as over the internet (the bridges carry uts_tokens and the device's adaptation_status up,
    # dwc_delta, token_request and rollback_order down).
    'demo': (CAMERA, DEVICE, DEVICE_BRIDGE, CLOUD, CLOUD_BRIDGE),
}


OPTIONAL: dict[str, str] = {'camera': 'use_camera', 'device_bridge': 'use_bridge',
                             'cloud_bridge': 'use_bridge'}
"""Node keys a set can leave out, and the switch (launch argument / runner option) that does."""

DEFAULT_IMAGE_TOPIC = 'image'
"""The device node's image input (relative: in the device namespace)."""

LIFECYCLE_KEYS = frozenset({'device', 'cloud'})
"""Node keys of the managed (lifecycle) nodes: the ``autostart`` switch applies to them."""


@dataclass(frozen=True)
class NodeLaunch:
    """Everything needed to start one node, by launch_ros or by a subprocess."""

    name: str
    executable: str
    module: str
    namespace: str
    params_file: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()

    def rename_rule(self) -> list[str]:
        """The ``-r`` rule that gives the node its name, or [] when its own name is kept.

        Node-specific (``EXECUTABLE:__node:=NAME``): a plain ``__node:=NAME`` (what launch_ros
        makes of ``Node(name=...)``) would rename every node of the process (uts_node too).
        """
        if self.name == self.executable:
            return []
        return ['-r', f'{self.executable}:__node:={self.name}']

    def ros_args(self) -> list[str]:
        """``--ros-args`` command-line arguments equivalent to this launch."""
        args = ['--ros-args', *self.rename_rule()]
        if self.namespace:
            args += ['-r', f'__ns:=/{self.namespace.strip("/")}']
        if self.params_file:
            args += ['--params-file', self.params_file]
        for name, value in self.parameters.items():
            args += ['-p', f'{name}:={_ros_literal(value)}']
        for src, dst in self.remappings:
            args += ['-r', f'{src}:={dst}']
        return args


def _ros_literal(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        # Quote so that e.g. "0" stays a string parameter.
        return "'" + value.replace("'", "\\'") + "'"
    return repr(value)


def config_dir() -> Path:
    """The package's ``config/`` folder (installed share/ or the source tree)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / 'config',):
        if candidate.is_dir():
            return candidate
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory('cdcca_ros')) / 'config'
    except (ImportError, LookupError) as err:
        raise ConfigError('cannot find the cdcca_ros config/ folder') from err


def coerce(table: str, name: str, text: Any) -> Any:
    """Convert an override (a string from a command line, or a value) to the parameter type."""
    spec = {p.name: p for p in TABLES[table]}.get(name)
    if spec is None:
        raise unknown_parameters(table, [name])
    if not isinstance(text, str) or spec.type is str:
        return spec.check(text)
    if spec.type is bool:
        lowered = text.strip().lower()
        if lowered not in ('true', 'false'):
            raise ConfigError(f'parameter {name!r}: expected true or false, got {text!r}')
        return spec.check(lowered == 'true')
    try:
        value = spec.type(text)
    except ValueError as err:
        raise ConfigError(f'parameter {name!r}: {text!r} is not a{"n" if spec.type is int else ""}'
                          f' {"integer" if spec.type is int else "number"}') from err
    return spec.check(value)  # a ConfigError naming the range, never "not a number"


def _switch(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered not in ('true', 'false'):
        raise ConfigError(f'{name} must be true or false, got {value!r}')
    return lowered == 'true'


@dataclass(frozen=True)
class LaunchArgument:
    """One argument of a node set (a launch argument, or a runner ``NAME:=VALUE``).

    Attributes:
        name: ``<key>.<param>``, ``<key>.params_file`` or a set-level switch.
        default: what the nodes get without it, as launch text (``true``, ``10.0``, ...).
        description: one line for ``--show-args``.
    """

    name: str
    default: str
    description: str


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def _yaml_values(table: str) -> dict[str, Any]:
    """The values ``config/<table>.yaml`` sets (empty when it is missing or unreadable)."""
    import yaml

    try:
        data = yaml.safe_load((config_dir() / f'{table}.yaml').read_text()) or {}
    except (OSError, ConfigError, yaml.YAMLError):
        return {}
    params = data.get('/**', {}).get('ros__parameters', {}) if isinstance(data, dict) else {}
    return params if isinstance(params, dict) else {}


SWITCH_ARGUMENTS: dict[str, tuple[str, str]] = {
    'device_ns': ('robot1', 'namespace of the device-side nodes'),
    'cloud_ns': ('cloud', 'namespace of the cloud-side nodes'),
    'use_camera': ('true', 'start camera_node (false: your own driver publishes the frames)'),
    'use_bridge': ('true', 'start the cloud bridge(s) (false: no cloud link)'),
    'image_topic': (DEFAULT_IMAGE_TOPIC, 'the device node\'s image input (relative: in the '
                                         'device namespace)'),
    'autostart': ('true', 'configure and activate the lifecycle nodes (device_node, cloud_node) '
                          'at start (false: they wait for lifecycle_msgs transitions)'),
}
"""Set-level arguments: default and description."""


def set_switches(set_name: str) -> list[str]:
    """The set-level arguments of ``set_name`` (namespaces and the switches that apply)."""
    keys = {spec.key for spec in SETS[set_name]}
    names = ['device_ns', 'cloud_ns']
    if 'camera' in keys:
        names.append('use_camera')
    if keys & {'device_bridge', 'cloud_bridge'}:
        names.append('use_bridge')
    if 'device' in keys:
        names.append('image_topic')
    if keys & LIFECYCLE_KEYS:
        names.append('autostart')
    return names


def launch_arguments(set_name: str) -> list[LaunchArgument]:
    """Every argument of a set: its switches, then per node ``<key>.params_file`` and one per
    parameter (``<key>.<param>``), with the value the node gets without it as the default (the
    YAML's, else the table's) -- the one default ``--show-args`` prints."""
    if set_name not in SETS:
        raise ConfigError(f'unknown node set {set_name!r}; known: {", ".join(SETS)}')
    args = [LaunchArgument(name, *SWITCH_ARGUMENTS[name]) for name in set_switches(set_name)]
    for spec in SETS[set_name]:
        yaml_values = _yaml_values(spec.table)
        args.append(LaunchArgument(f'{spec.key}.params_file', '',
                                   f'YAML replacing config/{spec.table}.yaml'))
        fixed = dict(spec.fixed)
        for param in TABLES[spec.table]:
            if param.name in fixed:
                continue
            default = yaml_values.get(param.name, param.default)
            text = param.description
            text += f' (one of: {", ".join(param.choices)})' if param.choices else ''
            text += f' {param.range_text}' if param.range_text else ''
            if default != param.default:
                text += f'; config/{spec.table}.yaml sets it (table: {_text(param.default)})'
            args.append(LaunchArgument(f'{spec.key}.{param.name}', _text(default), text))
    return args


def unknown_arguments(set_name: str, names: Iterable[str]) -> ConfigError | None:
    """The error for given argument names a set does not declare, or None.

    Only names that look meant for this package count: ``<key>.<anything>`` with a node key of
    any set, or a close spelling of a known argument. A launch file that includes ours passes
    its own arguments through the same launch configurations, and those are not ours to refuse.
    """
    known = [arg.name for arg in launch_arguments(set_name)]
    all_keys = {spec.key for specs in SETS.values() for spec in specs}
    set_keys = [spec.key for spec in SETS[set_name]]
    parts, lists = [], {}
    for name in sorted(set(names) - set(known)):
        key, dot, _ = name.partition('.')
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if not (dot and key in all_keys) and not close:
            continue
        parts.append(f'{name!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
        if dot and key in set_keys:
            lists[key] = [k for k in known if k.startswith(f'{key}.')]
        elif dot and key in all_keys:
            lists['nodes'] = [f'{k}.*' for k in set_keys]
        else:
            lists['switches'] = set_switches(set_name)
    if not parts:
        return None
    plural = 's' if len(parts) > 1 else ''
    listed = '; '.join(f'known {what}: {", ".join(items)}' for what, items in lists.items())
    return ConfigError(f'unknown argument{plural} {", ".join(parts)} for the {set_name} set; '
                       f'{listed} (--show-args describes them all)')


def node_launches(set_name: str, overrides: Mapping[str, Any] | None = None, *,
                  device_ns: str = 'robot1', cloud_ns: str = 'cloud',
                  params_files: Mapping[str, str] | None = None,
                  use_config_files: bool = True, use_camera: bool | str = True,
                  use_bridge: bool | str = True,
                  image_topic: str = DEFAULT_IMAGE_TOPIC,
                  autostart: bool | str = True) -> list[NodeLaunch]:
    """The nodes of ``set_name`` with their parameters.

    Args:
        set_name: ``device``, ``cloud`` or ``demo``.
        overrides: ``{'<key>.<param>': value}`` (value may be a string to convert), e.g.
            ``{'camera.fps': '5', 'device.model': '/models/student'}``.
        device_ns: namespace of the device side ('' for none).
        cloud_ns: namespace of the cloud side ('' for none).
        params_files: per node key, a YAML file replacing ``config/<table>.yaml``.
        use_config_files: pass the YAML files at all.
        use_camera: start the camera node (false: another driver publishes the frames).
        use_bridge: start the cloud bridge(s) (false: no link).
        image_topic: the device node's image input (remapped from ``image``), where the
            camera node publishes when it runs; relative names are in the device namespace.
        autostart: false: the lifecycle nodes start unconfigured and wait for transitions
            (their ``autostart`` parameter; a ``<node>.autostart`` override wins).

    Raises:
        ConfigError: unknown set, node key or parameter, a bad value, or an override for a
            node the switches leave out.
    """
    if set_name not in SETS:
        raise ConfigError(f'unknown node set {set_name!r}; known: {", ".join(SETS)}')
    switches = {'use_camera': _switch(use_camera, 'use_camera'),
                'use_bridge': _switch(use_bridge, 'use_bridge'),
                'autostart': _switch(autostart, 'autostart')}
    image_topic = image_topic.strip()
    if not image_topic:
        raise ConfigError('image_topic is empty')
    all_keys = {s.key for s in SETS[set_name]}
    specs = tuple(s for s in SETS[set_name]
                  if s.key not in OPTIONAL or switches[OPTIONAL[s.key]])
    keys = {s.key for s in specs}
    per_node: dict[str, dict[str, Any]] = {s.key: {} for s in specs}
    for full, value in (overrides or {}).items():
        key, _, name = full.partition('.')
        if key in all_keys - keys and name:
            raise ConfigError(f'override {full!r}: {key} is not started '
                              f'({OPTIONAL[key]} is false)')
        if key not in keys or not name:
            raise ConfigError(f'override {full!r}: expected <node>.<param> with node one of '
                              f'{", ".join(sorted(keys))}')
        spec = next(s for s in specs if s.key == key)
        if name not in {p.name for p in TABLES[spec.table]}:
            raise unknown_parameters(spec.table, [name])
        try:
            per_node[key][name] = coerce(spec.table, name, value)
        except ConfigError as err:
            reason = str(err).removeprefix(f'parameter {name!r}: ')
            raise ConfigError(f'{full}={value!r}: {reason}') from err
    launches = []
    for spec in specs:
        params = dict(per_node[spec.key])
        if spec.key in LIFECYCLE_KEYS and not switches['autostart']:
            params.setdefault('autostart', False)
        for name, value in spec.fixed:
            if name in params and params[name] != value:
                raise ConfigError(f'{spec.key}.{name} is fixed to {value!r} in set {set_name!r}')
            params[name] = value
        params_file = None
        if use_config_files:
            params_file = (params_files or {}).get(spec.key) or str(config_dir() /
                                                                    f'{spec.table}.yaml')
        remappings = tuple((src, image_topic if dst == DEFAULT_IMAGE_TOPIC else dst)
                           for src, dst in spec.remappings)
        if spec.key == 'device' and image_topic != DEFAULT_IMAGE_TOPIC:
            remappings += ((DEFAULT_IMAGE_TOPIC, image_topic),)
        launches.append(NodeLaunch(
            name=spec.name, executable=spec.table, module=spec.module,
            namespace=device_ns if spec.side == 'device' else cloud_ns,
            params_file=params_file, parameters=params, remappings=remappings))
    return launches
