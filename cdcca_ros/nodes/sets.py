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

from collections.abc import Mapping
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

    def ros_args(self) -> list[str]:
        """``--ros-args`` command-line arguments equivalent to this launch."""
        args = ['--ros-args']
        if self.name != self.executable:
            # Node-specific: other nodes in the process (uts_node) keep their names.
            args += ['-r', f'{self.executable}:__node:={self.name}']
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


def node_launches(set_name: str, overrides: Mapping[str, Any] | None = None, *,
                  device_ns: str = 'robot1', cloud_ns: str = 'cloud',
                  params_files: Mapping[str, str] | None = None,
                  use_config_files: bool = True, use_camera: bool | str = True,
                  use_bridge: bool | str = True,
                  image_topic: str = DEFAULT_IMAGE_TOPIC) -> list[NodeLaunch]:
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

    Raises:
        ConfigError: unknown set, node key or parameter, a bad value, or an override for a
            node the switches leave out.
    """
    if set_name not in SETS:
        raise ConfigError(f'unknown node set {set_name!r}; known: {", ".join(SETS)}')
    switches = {'use_camera': _switch(use_camera, 'use_camera'),
                'use_bridge': _switch(use_bridge, 'use_bridge')}
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
