"""ROS plumbing shared by the nodes: parameters from the tables, QoS profiles, diagnostics,
executors."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.context import Context
from rclpy.executors import (
    Executor,
    ExternalShutdownException,
    MultiThreadedExecutor,
    SingleThreadedExecutor,
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
from cdcca_ros.nodes.dds_profile import DDS_PROFILE, use_dds_profile  # noqa: F401 - re-export
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


EXECUTORS: tuple[str, ...] = next(
    p.choices or () for p in TABLES['device_node'] if p.name == 'executor')
"""Executors a node process can spin on (the choices of the device node's ``executor``)."""

EVENTS_SLICE_S = 0.25
"""Longest single wait of the EventsExecutor loop: bounds how long a stop request waits."""


def events_executor_factory() -> Callable[..., Executor] | None:
    """rclpy's ``EventsExecutor`` (``rclpy.experimental``), or None where this rclpy has none."""
    try:
        from rclpy.experimental.events_executor import EventsExecutor  # noqa: PLC0415
    except ImportError:
        return None
    return EventsExecutor


def runs_one_callback_at_a_time(executor: Executor | None) -> bool:
    """Whether ``executor`` runs its callbacks and tasks on one thread, one after another.

    On such an executor a task created inside a callback runs only after that callback has
    returned (and, for a service, after its response was sent).
    """
    return isinstance(executor, SingleThreadedExecutor) or (
        executor is not None and type(executor).__name__ == 'EventsExecutor')


class NodeSpinner:
    """Spins nodes on one executor of a named kind, in the calling thread or a background one.

    Kinds (:data:`EXECUTORS`):

    * ``events``: rclpy's EventsExecutor. The middleware's callbacks queue the events, which
      run in arrival order on one thread with no wait set rebuilt in Python per wake-up: a
      service round trip is 0.5-1 ms shorter than on the multi-threaded executor here
      (``node_overhead`` bench). One thread: a callback that computes delays the others until
      it returns. Where this rclpy has no EventsExecutor, ``multi_threaded`` is used instead
      (``kind`` says which ran).
    * ``multi_threaded``: ``MultiThreadedExecutor(num_threads)``; callback groups decide what
      may run in parallel.
    * ``single_threaded``: ``SingleThreadedExecutor``.

    The EventsExecutor is driven through ``spin_once`` with a timeout rather than ``spin()``:
    in the rclpy 9.1.2 (Kilted) wheels its ``spin()`` busy-loops on a full core without
    dispatching any callback, while ``spin_once`` dispatches one event per call and sleeps when
    idle.
    """

    def __init__(self, nodes: Sequence[Node], kind: str = 'multi_threaded', *,
                 context: Context | None = None, num_threads: int = 4) -> None:
        """Create the executor and add ``nodes`` to it.

        Raises:
            ConfigError: ``kind`` is not one of :data:`EXECUTORS`, or ``num_threads`` < 1.
        """
        if kind not in EXECUTORS:
            raise ConfigError(f'unknown executor {kind!r}; known: {", ".join(EXECUTORS)}')
        if num_threads < 1:
            raise ConfigError(f'num_threads must be >= 1, got {num_threads}')
        factory = events_executor_factory() if kind == 'events' else None
        if kind == 'events' and factory is None:
            kind = 'multi_threaded'
        self.kind = kind
        self.context = context if context is not None else nodes[0].context if nodes else None
        if kind == 'events':
            self.executor: Executor = factory(context=self.context)
        elif kind == 'multi_threaded':
            self.executor = MultiThreadedExecutor(num_threads=num_threads, context=self.context)
        else:
            self.executor = SingleThreadedExecutor(context=self.context)
        for node in nodes:
            self.executor.add_node(node)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ok(self) -> bool:
        return not self._stop.is_set() and (self.context is None or self.context.ok())

    def spin(self) -> None:
        """Run callbacks until :meth:`shutdown` or until the context shuts down."""
        if self.kind != 'events':
            self.executor.spin()
            return
        try:
            while self._ok():
                self.executor.spin_once(timeout_sec=EVENTS_SLICE_S)
        except ExternalShutdownException:
            pass

    def start(self) -> NodeSpinner:
        """Spin in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError('this NodeSpinner is already spinning in a thread')
        self._thread = threading.Thread(target=self.spin, name=f'spin-{self.kind}',
                                        daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout_sec: float = 5.0) -> None:
        """Stop spinning (and join the thread of :meth:`start`); the nodes stay alive."""
        self._stop.set()
        self.executor.shutdown(timeout_sec=timeout_sec)
        if self._thread is not None:
            self._thread.join(timeout=timeout_sec)
