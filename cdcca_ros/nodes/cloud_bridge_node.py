"""cloud_bridge_node: carries the uplink and downlink between the robot and the cloud over Zenoh.

DDS discovery does not cross the internet; a Zenoh router does (TLS with per-device
certificates, access control per device). Messages cross as their CDR bytes
(``rclpy.serialization``), never pickled.

role=device (on the robot, next to device_node):
    in  uts_tokens (UtsTokens)   -> spooled to disk, sent in order, acknowledged by the cloud
                                    (the pulled rest of samples' tokens too)
    in  adaptation_status        -> the device's reports, up the same way
    out dwc_delta (DwcDelta)     <- downlink addressed to this device only
    out token_request (TokenRequest)    <- the same
    out rollback_order (RollbackOrder, reliable + transient local) <- the same
    out cloud_status (AdaptationStatus, latched) <- the link's state (``link_up`` /
                                    ``link_down``, from the start) and the cloud's latest status
                                    for this device
role=cloud (next to cloud_node):
    out uts_tokens (UtsTokens)   <- uplink of every served device (checked: the device id in
                                    the message must be the link's sender)
    out device_status (AdaptationStatus) <- the devices' reports (checked the same way)
    in  dwc_delta, token_request, rollback_order -> to the device the message names
    in  adaptation_status        -> announced to that device (the cloud's own statuses)
Every message crosses on its own device's keys (``<prefix>/<device>/up|down/**``, the topic
inside the frame), so the router's per-device access control covers the new topics as it
covers the first two: a device can publish only under its own ``up`` keys and read only its
own ``down`` keys. Both roles report link status and counters on /diagnostics. Malformed bytes
are logged and counted; the bridge keeps running. Each change of the link's state is logged
once, on the node's ROS logger (so on /rosout); while the router cannot be reached the link
retries quietly.

Endpoints: ``tls/HOST:PORT`` needs ``certs_dir`` (mutual TLS); ``tcp/HOST:PORT`` is plain TCP
without it (one machine, a trusted LAN). Any other combination stops the node at start with one
FATAL line.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message

from cdcca_ros.errors import CdccaError, ConfigError
from cdcca_ros.msg import AdaptationStatus, DwcDelta, RollbackOrder, TokenRequest, UtsTokens
from cdcca_ros.nodes.common import (
    DELTA_QOS,
    ERROR,
    LATCHED_QOS,
    OK,
    RELIABLE_QOS,
    UPLINK_QOS,
    WARN,
    Diagnostics,
    LastError,
    declare_table,
    destroy_on_error,
    spin_node,
)
from cdcca_ros.nodes.process import route_logging, run_node

UPLINK_TOPIC = 'uts_tokens'
STATUS_TOPIC = 'adaptation_status'   # device -> cloud: the device's reports
DOWNLINK_TOPIC = 'dwc_delta'
REQUEST_TOPIC = 'token_request'
ORDER_TOPIC = 'rollback_order'
DEVICE_STATUS_TOPIC = 'device_status'  # where the cloud bridge publishes the devices' reports
# Link topic -> message type, each direction (the topic travels inside the link's frames).
UPLINK_TYPES: dict[str, type] = {UPLINK_TOPIC: UtsTokens, STATUS_TOPIC: AdaptationStatus}
DOWNLINK_TYPES: dict[str, type] = {DOWNLINK_TOPIC: DwcDelta, REQUEST_TOPIC: TokenRequest,
                                   ORDER_TOPIC: RollbackOrder}
SCHEMAS = {UPLINK_TOPIC: 'cdcca_ros/msg/UtsTokens',
           STATUS_TOPIC: 'cdcca_ros/msg/AdaptationStatus'}


def link_config(params: dict[str, Any], name: str):
    """The Zenoh link settings from the node's parameters."""
    from cdcca_ros.transport.config import SessionConfig
    from cdcca_ros.transport.link import LinkConfig

    connect = [e.strip() for e in params['connect'].split(',') if e.strip()]
    certs = params['certs_dir'] or None
    tls = [e for e in connect if e.startswith('tls/')]
    if tls and certs is None:
        raise ConfigError(f'connect {", ".join(tls)} is TLS but certs_dir is empty: give '
                          'certs_dir (a folder with ca.crt, <name>.crt and <name>.key from '
                          'python -m cdcca_ros.transport.certs), or connect over tcp/HOST:PORT '
                          '(plain TCP, one machine or a trusted LAN)')
    plain = [e for e in connect if e.startswith('tcp/')]
    if plain and certs is not None:
        raise ConfigError(f'connect {", ".join(plain)} is plain TCP but certs_dir is set: use '
                          'tls/HOST:PORT, or leave certs_dir empty for plain TCP')
    session = SessionConfig(connect=connect, certs_dir=certs, name=name,
                            allow_plain=certs is None)
    return LinkConfig(session=session, max_payload_bytes=params['max_payload_bytes'],
                      spool_max_bytes=max(params['spool_max_bytes'],
                                          params['max_payload_bytes']))


def _deserialize(data: bytes, msg_type: type) -> Any:
    try:
        return deserialize_message(data, msg_type)
    except Exception as err:  # rclpy raises several C-level error types on bad CDR
        raise CdccaError(f'cannot deserialize {len(data)} bytes as {msg_type.__name__}: '
                         f'{err}') from err


class CloudBridgeNode(Node):
    """Thin ROS adapter over :class:`DeviceLink` / :class:`CloudLink`."""

    @destroy_on_error
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('cloud_bridge_node', **kwargs)
        self.params = declare_table(self, 'cloud_bridge_node')
        self.role = self.params['role']
        self.counters = {'up': 0, 'down': 0, 'status': 0, 'malformed': 0, 'refused': 0,
                         'pulled_up': 0, 'reports_up': 0, 'requests_down': 0, 'orders_down': 0}
        self.errors = LastError()
        self._connected: bool | None = None
        self._status_pub = None
        self._lock = threading.Lock()
        self._diag = Diagnostics(self, hardware_id=f'bridge-{self.role}')
        home = Path.home() / '.cdcca'
        self.recorder = None
        if self.role == 'device':
            from cdcca_ros.transport.link import DeviceLink

            device_id = self.params['device_id']
            self._down_pubs = {
                DOWNLINK_TOPIC: self.create_publisher(DwcDelta, DOWNLINK_TOPIC, DELTA_QOS),
                REQUEST_TOPIC: self.create_publisher(TokenRequest, REQUEST_TOPIC, RELIABLE_QOS),
                ORDER_TOPIC: self.create_publisher(RollbackOrder, ORDER_TOPIC, DELTA_QOS)}
            self._status_pub = self.create_publisher(AdaptationStatus, 'cloud_status',
                                                     LATCHED_QOS)
            spool = self.params['spool_dir'] or str(home / device_id / 'spool')
            config = link_config(self.params, device_id)
            self._unroute = route_logging(self, f'cdcca_ros.transport.link.{device_id}')
            self._publish_link_state(False)  # latched: the state is known from the start
            # Deltas wait in the link's inbox until device_node subscribes.
            self.link = DeviceLink(device_id, config, spool,
                                   on_downlink=self._on_downlink, on_version=self._on_version,
                                   ready=lambda: self._has_reader(
                                       self._down_pubs[DOWNLINK_TOPIC]))
            self.create_subscription(UtsTokens, UPLINK_TOPIC, self._on_uplink_msg,
                                     UPLINK_QOS)
            self.create_subscription(AdaptationStatus, STATUS_TOPIC, self._on_report_msg,
                                     RELIABLE_QOS)
        else:
            from cdcca_ros.transport.link import CloudLink

            devices = [d.strip() for d in self.params['devices'].split(',') if d.strip()]
            self.devices = set(devices)
            self._up_pubs = {
                UPLINK_TOPIC: self.create_publisher(UtsTokens, UPLINK_TOPIC, UPLINK_QOS),
                STATUS_TOPIC: self.create_publisher(AdaptationStatus, DEVICE_STATUS_TOPIC,
                                                    RELIABLE_QOS)}
            store = self.params['store_dir'] or str(home / 'cloud' / 'link')
            config = link_config(self.params, 'cloud')
            self._unroute = route_logging(self, 'cdcca_ros.transport.link.cloud')
            # Samples wait in the link's inbox until cloud_node subscribes (e.g. while it
            # restarts): published without a subscriber they would be lost.
            self.link = CloudLink(config, store,
                                  on_uplink=self._on_uplink_bytes, devices=devices,
                                  recorder=self._open_recorder(),
                                  ready=lambda: self._has_reader(
                                      self._up_pubs[UPLINK_TOPIC]))
            self.create_subscription(DwcDelta, DOWNLINK_TOPIC,
                                     lambda m: self._on_down_msg(DOWNLINK_TOPIC, m), DELTA_QOS)
            self.create_subscription(TokenRequest, REQUEST_TOPIC,
                                     lambda m: self._on_down_msg(REQUEST_TOPIC, m),
                                     RELIABLE_QOS)
            self.create_subscription(RollbackOrder, ORDER_TOPIC,
                                     lambda m: self._on_down_msg(ORDER_TOPIC, m), DELTA_QOS)
            self.create_subscription(AdaptationStatus, STATUS_TOPIC,
                                     self._on_status_msg, RELIABLE_QOS)
        self.create_timer(1.0, self._report)

    def _has_reader(self, publisher: Any) -> bool:
        """Whether ``publisher`` has a subscriber, so that stored link messages can be handed
        over. Asked from the link's delivery thread: once Ctrl-C or SIGTERM has shut the
        context down (the node is being destroyed), the answer is no rather than an error,
        and the messages stay stored for the next start."""
        if not self.context.ok():
            return False
        try:
            return publisher.get_subscription_count() > 0
        except RCLError:
            if self.context.ok():
                raise
            return False

    def _open_recorder(self):
        if not self.params['record_mcap']:
            return None
        from cdcca_ros.nodes.msg_definitions import definition
        from cdcca_ros.transport.recording import McapRecorder

        self.recorder = McapRecorder(self.params['record_mcap'],
                                     {t: (n, definition(n)) for t, n in SCHEMAS.items()})
        return self.recorder

    def close(self) -> None:
        """Stop the link and finish the recording (idempotent)."""
        self.link.close()
        if self.recorder is not None:
            self.recorder.close()

    def _error(self, text: str, counter: str = 'malformed') -> None:
        with self._lock:
            self.counters[counter] += 1
        self.get_logger().error(self.errors.set(counter, text))

    def _publish_link_state(self, connected: bool) -> None:
        """Device role: the link's state on ``cloud_status`` (latched)."""
        if self._status_pub is None or connected == self._connected:
            return
        self._connected = connected
        endpoints = self.params['connect']
        state = AdaptationStatus.STATE_LINK_UP if connected else AdaptationStatus.STATE_LINK_DOWN
        msg = AdaptationStatus(
            device_id=self.params['device_id'], node='bridge', state=state,
            message=(f'connected to the router at {endpoints}' if connected else
                     f'no router at {endpoints}: uplink spooled to disk, retrying'),
            accuracy_before=float('nan'), accuracy_after=float('nan'))
        msg.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(msg)

    # ---------------------------------------------------------------- device role
    def _on_uplink_msg(self, msg: UtsTokens) -> None:
        if msg.device_id != self.params['device_id']:
            self._error(f'uplink sample {msg.sample_id!r} names device {msg.device_id!r}, this '
                        f'bridge is {self.params["device_id"]!r}: not sent', 'refused')
            return
        try:
            self.link.send(UPLINK_TOPIC, serialize_message(msg))
            self.counters['up'] += 1
            if msg.pulled:
                self.counters['pulled_up'] += 1
        except CdccaError as err:
            self._error(f'uplink sample {msg.sample_id!r} not sent: {err}', 'refused')

    def _on_report_msg(self, msg: AdaptationStatus) -> None:
        if msg.device_id != self.params['device_id'] or msg.node != 'device':
            return  # another device's, or not a device report: not this bridge's to send
        try:
            self.link.send(STATUS_TOPIC, serialize_message(msg))
            self.counters['reports_up'] += 1
        except CdccaError as err:
            self._error(f'device report {msg.state!r} not sent: {err}', 'refused')

    def _on_downlink(self, message) -> None:
        msg_type = DOWNLINK_TYPES.get(message.topic)
        if msg_type is None:
            self._error(f'downlink on unknown topic {message.topic!r} ignored', 'refused')
            return
        try:
            msg = _deserialize(message.payload, msg_type)
        except CdccaError as err:
            self._error(f'downlink message {message.seq}: {err}')
            return
        if msg.device_id != self.params['device_id']:
            self._error(f'downlink {message.topic} for {msg.device_id!r} reached '
                        f'{self.params["device_id"]!r}: dropped', 'refused')
            return
        self._down_pubs[message.topic].publish(msg)
        self.counters['down'] += 1
        if message.topic == REQUEST_TOPIC:
            self.counters['requests_down'] += 1
        elif message.topic == ORDER_TOPIC:
            self.counters['orders_down'] += 1

    def _on_version(self, payload: bytes) -> None:
        try:
            status = _deserialize(payload, AdaptationStatus)
        except CdccaError as err:
            self._error(f'version announcement: {err}')
            return
        self._status_pub.publish(status)
        self.counters['status'] += 1

    # ---------------------------------------------------------------- cloud role
    def _on_uplink_bytes(self, message) -> None:
        msg_type = UPLINK_TYPES.get(message.topic)
        if msg_type is None:
            self._error(f'uplink from {message.device!r} on unknown topic {message.topic!r}',
                        'refused')
            return
        try:
            msg = _deserialize(message.payload, msg_type)
        except CdccaError as err:
            self._error(f'uplink message {message.seq} from {message.device!r}: {err}')
            return
        # The link's key names the sender (the router admits it by certificate): a message
        # claiming another device is a forgery.
        if msg.device_id != message.device:
            self._error(f'uplink {message.topic} from {message.device!r} claims device '
                        f'{msg.device_id!r}: dropped', 'refused')
            return
        # The uplink QoS is KEEP_ALL: a burst is held back by the readers, never overwritten.
        self._up_pubs[message.topic].publish(msg)
        if message.topic == UPLINK_TOPIC:
            self.counters['up'] += 1
            if msg.pulled:
                self.counters['pulled_up'] += 1
        else:
            self.counters['reports_up'] += 1

    def _on_down_msg(self, topic: str, msg: Any) -> None:
        """A cloud message addressed to one device: onto that device's downlink."""
        if msg.device_id not in self.devices:
            self._error(f'{topic} for unknown device {msg.device_id!r} not sent', 'refused')
            return
        try:
            self.link.send(msg.device_id, topic, serialize_message(msg))
            self.counters['down'] += 1
            if topic == REQUEST_TOPIC:
                self.counters['requests_down'] += 1
            elif topic == ORDER_TOPIC:
                self.counters['orders_down'] += 1
        except CdccaError as err:
            self._error(f'{topic} for {msg.device_id!r} not sent: {err}', 'refused')

    def _on_status_msg(self, msg: AdaptationStatus) -> None:
        if msg.device_id in self.devices and msg.node != 'device':
            self.link.announce_version(msg.device_id, serialize_message(msg))
            self.counters['status'] += 1

    # ---------------------------------------------------------------- health
    def _report(self) -> None:
        stats = self.link.stats()
        connected = bool(stats.get('connected'))
        self._publish_link_state(connected)
        values = {**self.counters, **{k: v for k, v in stats.items()
                                      if not isinstance(v, dict)}}
        own = self.errors.values()
        values.update(own)
        if not connected and not own['last_error']:  # why the link is down
            values['last_error'] = stats.get('last_error') or ''
            values['last_error_age_s'] = stats.get('last_error_age_s') or ''
        level = OK if connected and not own['last_error'] else WARN if connected else ERROR
        self._diag.publish(level, 'link up' if connected else 'link down (spooling)', values)

    def destroy_node(self) -> None:
        self.close()
        self._unroute()
        super().destroy_node()


def _spin(args: list[str] | None) -> int:
    node = CloudBridgeNode()
    try:
        spin_node(node)
    finally:
        node.destroy_node()
    return 0


def main(args: list[str] | None = None) -> None:
    sys.exit(run_node('cloud_bridge_node', _spin, args, table='cloud_bridge_node',
                      doc=__doc__))


if __name__ == '__main__':
    main()
