"""ROS plumbing shared by the nodes: parameters from the tables, QoS profiles, diagnostics,
errors, executors (the process around a node is in :mod:`cdcca_ros.nodes.process`)."""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy._rclpy_pybind11 import RCLError
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
from cdcca_ros.nodes.tables import TABLES, Param, unknown_parameters

SENSOR_QOS = qos_profile_sensor_data
# Commands, answers and uplink samples: reliable, a bounded queue.
RELIABLE_QOS = QoSProfile(depth=50, reliability=QoSReliabilityPolicy.RELIABLE,
                          history=QoSHistoryPolicy.KEEP_LAST)
# Uplink samples between the ROS nodes and the link: reliable and KEEP_ALL, so a burst (a
# spool drained after an outage) is held back by the reader instead of overwriting samples
# it has not taken yet. Compatible with KEEP_LAST readers and writers (history is not
# negotiated), which keep their own depth.
UPLINK_QOS = QoSProfile(depth=50, reliability=QoSReliabilityPolicy.RELIABLE,
                        history=QoSHistoryPolicy.KEEP_ALL)
# Answers: reliable and deep. A writer's KEEP_LAST history drops its oldest sample when a
# reader has not acknowledged it yet; at a burst of back-to-back questions a shallow history
# could drop an answer a slow reader had not acknowledged. Never KEEP_ALL: a stalled reader
# must not block the device's answering.
ANSWER_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
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
    # Read-only unless the node applies a change while it runs: a set of a read-only parameter
    # is refused by rclpy with the reason, instead of reporting success and changing nothing.
    desc = ParameterDescriptor(description=param.description, read_only=not param.runtime)
    constraints = []
    if param.choices:
        constraints.append('one of: ' + ', '.join(param.choices))
    if not param.runtime:
        constraints.append('read-only: fixed when the node starts (restart to change)')
    desc.additional_constraints = '; '.join(constraints)
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


ROS_PARAMETERS = ('use_sim_time', 'start_type_description_service')
"""Parameters rclpy declares on every node by itself."""


def _is_ros_parameter(name: str) -> bool:
    return name in ROS_PARAMETERS or name.startswith('qos_overrides.')


def _check_overrides(node: Node, table_name: str, table: dict[str, Param]) -> None:
    """Refuse overrides (command line, YAML) that name no parameter of the table or carry a bad
    value, with one line each; an integer given for a float parameter becomes a float."""
    from rclpy.parameter import Parameter  # noqa: PLC0415

    overrides = getattr(node, '_parameter_overrides', None)
    if not isinstance(overrides, dict):
        return
    unknown = [n for n in overrides if n not in table and not _is_ros_parameter(n)]
    if unknown:
        raise unknown_parameters(table_name, unknown)
    for name, param in list(overrides.items()):
        spec = table.get(name)
        if spec is None:
            continue
        try:
            value = spec.check(param.value)
        except ConfigError as err:
            raise ConfigError(f'{node.get_name()}: {err}') from err
        if spec.type is float and not isinstance(param.value, float):
            overrides[name] = Parameter(name, value=value)  # fps:=5 means 5.0


def declare_table(node: Node, table_name: str,
                  on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Declare every parameter of ``table_name`` on ``node``, validated, and return the values.

    Overrides are checked first (an unknown name or a bad value raises :class:`ConfigError`
    naming it, the range or the known names). The validation callback is registered before the
    declarations, so defaults are checked too. Parameters the table marks ``runtime`` can then
    be set through the standard parameter services: each value is checked, ``on_change`` applies
    the accepted changes (it may refuse them by raising ConfigError, whose message becomes the
    reason), and the returned dict is updated in place. The others are declared read-only.

    Args:
        node: the node.
        table_name: key of :data:`cdcca_ros.nodes.tables.TABLES`.
        on_change: called with ``{name: value}`` of one accepted set (before it takes effect).

    Raises:
        ConfigError: an unknown override, a bad value, or a declaration rclpy refused.
    """
    table = {p.name: p for p in TABLES[table_name]}
    _check_overrides(node, table_name, table)
    values: dict[str, Any] = {}
    declaring = [True]

    def check(params) -> SetParametersResult:
        changes = {}
        for p in params:
            spec = table.get(p.name)
            if spec is None:
                continue
            try:
                changes[p.name] = spec.check(p.value)
            except ConfigError as err:
                return SetParametersResult(successful=False, reason=str(err))
        if declaring[0] or not changes:
            return SetParametersResult(successful=True)
        if on_change is not None:
            try:
                on_change(changes)
            except ConfigError as err:
                return SetParametersResult(successful=False, reason=str(err))
        values.update(changes)
        node.get_logger().info('parameters changed: ' + ', '.join(
            f'{k}={v!r}' for k, v in changes.items()))
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(check)
    for spec in table.values():
        try:
            param = node.declare_parameter(spec.name, spec.default, _descriptor(spec))
        except Exception as err:  # rclpy raises InvalidParameterValueException et al.
            text = ' '.join(str(err).split())
            raise ConfigError(f'{node.get_name()}: parameter {spec.name!r}: {text}') from err
        values[spec.name] = spec.check(param.value)
    declaring[0] = False
    return values


def destroy_on_error(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate a node's ``__init__``: when it raises (a bad parameter), the half-built node is
    destroyed at once, so the context's shutdown never meets it half-initialised."""
    @functools.wraps(init)
    def wrapper(self: Node, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            try:
                Node.destroy_node(self)
            except Exception:  # noqa: BLE001 - Node.__init__ itself may have failed
                pass
            raise
    return wrapper


class LastError:
    """A node's recent errors by kind, each cleared by a later success of its kind or by age.

    Diagnostics show the most recent active error and its age; a node is at WARN only while one
    is active, so one rejected frame does not leave it there for good (the counters keep the
    history).
    """

    def __init__(self, hold_s: float = 60.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._lock = threading.Lock()
        self._errors: dict[str, tuple[str, float]] = {}

    def set(self, kind: str, text: str) -> str:
        """Record ``text`` as the latest error of ``kind``; returns ``text``."""
        with self._lock:
            self._errors[kind] = (text, self._clock())
        return text

    def clear(self, *kinds: str) -> None:
        """A success of these kinds: their errors are over."""
        with self._lock:
            for kind in kinds:
                self._errors.pop(kind, None)

    def latest(self) -> tuple[str, float | None]:
        """The most recent active error and its age in seconds, or ('', None)."""
        now = self._clock()
        with self._lock:
            for kind, (_, at) in list(self._errors.items()):
                if now - at > self.hold_s:
                    del self._errors[kind]
            if not self._errors:
                return '', None
            text, at = max(self._errors.values(), key=lambda e: e[1])
        return text, now - at

    @property
    def text(self) -> str:
        return self.latest()[0]

    def values(self) -> dict[str, Any]:
        """``last_error`` and ``last_error_age_s`` for a diagnostics status."""
        text, age = self.latest()
        return {'last_error': text, 'last_error_age_s': '' if age is None else f'{age:.1f}'}


def version_label(device_id: str, version: int | str) -> str:
    """The one format of an adapter version everywhere it is shown: ``<device>:v<N>``."""
    return f'{device_id}:v{version}'


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
                 context: Context | None = None, num_threads: int = 4,
                 stop_when: Callable[[], bool] | None = None) -> None:
        """Create the executor and add ``nodes`` to it.

        ``stop_when``, checked between slices of at most :data:`EVENTS_SLICE_S`, ends
        :meth:`spin` when it returns True (e.g. :func:`failed`).

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
        self._stop_when = stop_when
        self._thread: threading.Thread | None = None

    def _ok(self) -> bool:
        return (not self._stop.is_set() and (self.context is None or self.context.ok())
                and not (self._stop_when is not None and self._stop_when()))

    def spin(self) -> None:
        """Run callbacks until :meth:`shutdown`, ``stop_when`` or the context's shutdown."""
        try:
            while self._ok():
                self.executor.spin_once(timeout_sec=EVENTS_SLICE_S)
        except ExternalShutdownException:
            pass
        except RCLError:
            if self.context is None or self.context.ok():
                raise
            # SIGINT/SIGTERM shut the context down between the check and the wait: done.

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


def spin_node(node: Node) -> None:
    """``rclpy.spin(node)`` until the context shuts down (SIGINT, SIGTERM), however the
    shutdown lands: as :class:`ExternalShutdownException`, or as the ``RCLError`` of a wait
    set built on a context shut down a moment before."""
    try:
        rclpy.spin(node)
    except ExternalShutdownException:
        pass
    except RCLError:
        if node.context.ok():
            raise
