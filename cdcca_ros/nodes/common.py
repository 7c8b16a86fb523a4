"""ROS plumbing shared by the nodes: parameters from the tables, QoS profiles, diagnostics."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.node import Node
from rclpy.qos import (
    QoSDurabilityPolicy,
    QoSHistoryPolicy,
    QoSProfile,
    QoSReliabilityPolicy,
    qos_profile_sensor_data,
)

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes.tables import TABLES, Param

SENSOR_QOS = qos_profile_sensor_data
# Commands, answers and uplink samples: reliable, a bounded queue.
RELIABLE_QOS = QoSProfile(depth=50, reliability=QoSReliabilityPolicy.RELIABLE,
                          history=QoSHistoryPolicy.KEEP_LAST)
# The current model version and the last delta: latched, so late joiners see them.
LATCHED_QOS = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL,
                         history=QoSHistoryPolicy.KEEP_LAST)
# Delta chunks: reliable and deep enough to hold every chunk of a payload.
DELTA_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                       durability=QoSDurabilityPolicy.TRANSIENT_LOCAL,
                       history=QoSHistoryPolicy.KEEP_LAST)


def _descriptor(param: Param) -> ParameterDescriptor:
    desc = ParameterDescriptor(description=param.description)
    if param.choices:
        desc.additional_constraints = 'one of: ' + ', '.join(param.choices)
    if param.type is int and (param.low is not None or param.high is not None):
        desc.integer_range = [IntegerRange(from_value=int(param.low if param.low is not None
                                                          else -2**63),
                                           to_value=int(param.high if param.high is not None
                                                        else 2**63 - 1), step=0)]
    if param.type is float and (param.low is not None or param.high is not None):
        desc.floating_point_range = [FloatingPointRange(
            from_value=float(param.low if param.low is not None else -1e308),
            to_value=float(param.high if param.high is not None else 1e308), step=0.0)]
    return desc


def declare_table(node: Node, table_name: str,
                  on_change: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Declare every parameter of ``table_name`` on ``node``, validated, and return the values.

    The validation callback is registered before the declarations, so defaults and overrides
    from YAML or the command line are checked too. A bad value makes the declaration fail with
    a message naming the parameter and the value.

    Args:
        node: the node.
        table_name: key of :data:`cdcca_ros.nodes.tables.TABLES`.
        on_change: called with (name, value) after a later accepted change.
    """
    table = {p.name: p for p in TABLES[table_name]}
    declared: set[str] = set()

    def check(params) -> SetParametersResult:
        for p in params:
            spec = table.get(p.name)
            if spec is None:
                continue
            try:
                spec.check(p.value)
            except ConfigError as err:
                return SetParametersResult(successful=False, reason=str(err))
        for p in params:
            if p.name in declared and on_change is not None:
                on_change(p.name, p.value)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(check)
    values = {}
    for spec in table.values():
        try:
            param = node.declare_parameter(spec.name, spec.default, _descriptor(spec))
        except Exception as err:  # rclpy raises InvalidParameterValueException et al.
            raise ConfigError(f'{node.get_name()}: {err}') from err
        declared.add(spec.name)
        values[spec.name] = spec.check(param.value)
    return values


class Diagnostics:
    """Publishes one DiagnosticStatus per node on /diagnostics (rqt_robot_monitor reads it)."""

    def __init__(self, node: Node, hardware_id: str = '') -> None:
        self._node = node
        self._hardware_id = hardware_id
        self._pub = node.create_publisher(DiagnosticArray, '/diagnostics', 10)

    def publish(self, level: bytes | int, message: str,
                values: dict[str, Any]) -> DiagnosticStatus:
        """Publish a status; ``level`` is DiagnosticStatus.OK/WARN/ERROR/STALE."""
        status = DiagnosticStatus(
            level=level if isinstance(level, bytes) else bytes([level]),
            name=f'{self._node.get_namespace().rstrip("/")}/{self._node.get_name()}',
            message=message, hardware_id=self._hardware_id,
            values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._pub.publish(array)
        return status


OK = DiagnosticStatus.OK
WARN = DiagnosticStatus.WARN
ERROR = DiagnosticStatus.ERROR
