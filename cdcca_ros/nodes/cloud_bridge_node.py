"""cloud_bridge_node: carries the uplink and downlink between the robot and the cloud over Zenoh.

DDS discovery does not cross the internet; a Zenoh router does (TLS with per-device
certificates, access control per device). Messages cross as their CDR bytes
(``rclpy.serialization``), never pickled.

role=device (on the robot, next to device_node):
    in  uts_tokens (UtsTokens)   -> spooled to disk, sent in order, acknowledged by the cloud
    out dwc_delta (DwcDelta)     <- downlink addressed to this device only
    out cloud_status (AdaptationStatus, latched) <- the cloud's latest status for this device
role=cloud (next to cloud_node):
    out uts_tokens (UtsTokens)   <- uplink of every served device (checked: the device id in
                                    the message must be the link's sender)
    in  dwc_delta (DwcDelta)     -> to the device the message names
    in  adaptation_status        -> announced to that device
Both roles report link status and counters on /diagnostics. Malformed bytes are logged and
counted; the bridge keeps running.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message

from cdcca_ros.errors import CdccaError
from cdcca_ros.msg import AdaptationStatus, DwcDelta, UtsTokens
from cdcca_ros.nodes.common import (
    DELTA_QOS,
    ERROR,
    LATCHED_QOS,
    OK,
    RELIABLE_QOS,
    WARN,
    Diagnostics,
    declare_table,
    use_dds_profile,
)

UPLINK_TOPIC = 'uts_tokens'
DOWNLINK_TOPIC = 'dwc_delta'
SCHEMAS = {UPLINK_TOPIC: 'cdcca_ros/msg/UtsTokens'}


def link_config(params: dict[str, Any], name: str):
    """The Zenoh link settings from the node's parameters."""
    from cdcca_ros.transport.config import SessionConfig
    from cdcca_ros.transport.link import LinkConfig

    connect = [e.strip() for e in params['connect'].split(',') if e.strip()]
    certs = params['certs_dir'] or None
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('cloud_bridge_node', **kwargs)
        self.params = declare_table(self, 'cloud_bridge_node')
        self.role = self.params['role']
        self.counters = {'up': 0, 'down': 0, 'status': 0, 'malformed': 0, 'refused': 0}
        self._last_error = ''
        self._lock = threading.Lock()
        self._diag = Diagnostics(self, hardware_id=f'bridge-{self.role}')
        home = Path.home() / '.cdcca'
        self.recorder = None
        if self.role == 'device':
            from cdcca_ros.transport.link import DeviceLink

            device_id = self.params['device_id']
            self._delta_pub = self.create_publisher(DwcDelta, DOWNLINK_TOPIC, DELTA_QOS)
            self._status_pub = self.create_publisher(AdaptationStatus, 'cloud_status',
                                                     LATCHED_QOS)
            spool = self.params['spool_dir'] or str(home / device_id / 'spool')
            # Deltas wait in the link's inbox until device_node subscribes.
            self.link = DeviceLink(device_id, link_config(self.params, device_id), spool,
                                   on_downlink=self._on_downlink, on_version=self._on_version,
                                   ready=lambda: self._delta_pub.get_subscription_count() > 0)
            self.create_subscription(UtsTokens, UPLINK_TOPIC, self._on_uplink_msg,
                                     RELIABLE_QOS)
        else:
            from cdcca_ros.transport.link import CloudLink

            devices = [d.strip() for d in self.params['devices'].split(',') if d.strip()]
            self.devices = set(devices)
            self._tokens_pub = self.create_publisher(UtsTokens, UPLINK_TOPIC, RELIABLE_QOS)
            store = self.params['store_dir'] or str(home / 'cloud' / 'link')
            # Samples wait in the link's inbox until cloud_node subscribes (e.g. while it
            # restarts): published without a subscriber they would be lost.
            self.link = CloudLink(link_config(self.params, 'cloud'), store,
                                  on_uplink=self._on_uplink_bytes, devices=devices,
                                  recorder=self._open_recorder(),
                                  ready=lambda: self._tokens_pub.get_subscription_count() > 0)
            self.create_subscription(DwcDelta, DOWNLINK_TOPIC, self._on_delta_msg, DELTA_QOS)
            self.create_subscription(AdaptationStatus, 'adaptation_status',
                                     self._on_status_msg, RELIABLE_QOS)
        self.create_timer(1.0, self._report)

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
            self._last_error = text
        self.get_logger().error(text)

    # ---------------------------------------------------------------- device role
    def _on_uplink_msg(self, msg: UtsTokens) -> None:
        if msg.device_id != self.params['device_id']:
            self._error(f'uplink sample {msg.sample_id!r} names device {msg.device_id!r}, this '
                        f'bridge is {self.params["device_id"]!r}: not sent', 'refused')
            return
        try:
            self.link.send(UPLINK_TOPIC, serialize_message(msg))
            self.counters['up'] += 1
        except CdccaError as err:
            self._error(f'uplink sample {msg.sample_id!r} not sent: {err}', 'refused')

    def _on_downlink(self, message) -> None:
        if message.topic != DOWNLINK_TOPIC:
            self._error(f'downlink on unknown topic {message.topic!r} ignored', 'refused')
            return
        try:
            delta = _deserialize(message.payload, DwcDelta)
        except CdccaError as err:
            self._error(f'downlink message {message.seq}: {err}')
            return
        if delta.device_id != self.params['device_id']:
            self._error(f'downlink delta for {delta.device_id!r} reached '
                        f'{self.params["device_id"]!r}: dropped', 'refused')
            return
        self._delta_pub.publish(delta)
        self.counters['down'] += 1

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
        if message.topic != UPLINK_TOPIC:
            self._error(f'uplink from {message.device!r} on unknown topic {message.topic!r}',
                        'refused')
            return
        try:
            tokens = _deserialize(message.payload, UtsTokens)
        except CdccaError as err:
            self._error(f'uplink message {message.seq} from {message.device!r}: {err}')
            return
        if tokens.device_id != message.device:
            self._error(f'uplink from {message.device!r} claims device {tokens.device_id!r}: '
                        'dropped', 'refused')
            return
        self._tokens_pub.publish(tokens)
        self.counters['up'] += 1

    def _on_delta_msg(self, msg: DwcDelta) -> None:
        if msg.device_id not in self.devices:
            self._error(f'delta for unknown device {msg.device_id!r} not sent', 'refused')
            return
        try:
            self.link.send(msg.device_id, DOWNLINK_TOPIC, serialize_message(msg))
            self.counters['down'] += 1
        except CdccaError as err:
            self._error(f'delta for {msg.device_id!r} not sent: {err}', 'refused')

    def _on_status_msg(self, msg: AdaptationStatus) -> None:
        if msg.device_id in self.devices:
            self.link.announce_version(msg.device_id, serialize_message(msg))
            self.counters['status'] += 1

    # ---------------------------------------------------------------- health
    def _report(self) -> None:
        stats = self.link.stats()
        values = {**self.counters, **{k: v for k, v in stats.items()
                                      if not isinstance(v, dict)}}
        values['last_error'] = self._last_error or stats.get('last_error', '')
        connected = bool(stats.get('connected'))
        level = OK if connected and not self._last_error else WARN if connected else ERROR
        self._diag.publish(level, 'link up' if connected else 'link down (spooling)', values)

    def destroy_node(self) -> None:
        self.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    use_dds_profile()
    try:
        with rclpy.init(args=args):
            node = CloudBridgeNode()
            try:
                rclpy.spin(node)
            finally:
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


if __name__ == '__main__':
    main()
