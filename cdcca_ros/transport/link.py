"""The device-cloud link: reliable, ordered, exactly-once messages over Zenoh.

:class:`DeviceLink` runs on a robot, :class:`CloudLink` on the cloud server; both talk to a
Zenoh router (:mod:`cdcca_ros.transport.router`) over mutual TLS. Each carries opaque bytes
(the CDR of a ROS message) tagged with a topic name; neither imports rclpy.

How "nothing lost, nothing duplicated, in order" is kept, in both directions:

1. The sender appends every message to its on-disk :class:`~.spool.Spool` first; the append
   gives the message its sequence number. The spool is bounded (oldest dropped, counted).
2. While the receiver is reachable (the Zenoh publisher's *matching status*: a subscriber of
   the other side is declared), the sender sends spooled messages in order, chunked into
   checked frames (:mod:`.framing`), up to a window of unacknowledged messages.
3. The receiver stores a message only if it is the next one expected from that sender
   (:class:`~.spool.Inbox`, one SQLite transaction for message + position), then acknowledges
   cumulatively. Duplicates are re-acknowledged, messages ahead of a gap are refused.
4. The sender deletes what is acknowledged. When the receiver becomes reachable again, or no
   acknowledgement came for ``ack_timeout_s``, it goes back to its oldest unacknowledged
   message and resends from there (go-back-N). After a restart it starts from the spool.
5. The application gets each stored message once, in order, from a delivery thread; a
   message leaves the inbox only after the callback returned. (A crash *inside* the callback
   hands the message over again after restart: exactly-once up to that window.)

The cloud also keeps the latest model-version announcement per device and repeats it
whenever the device (re)appears and every ``version_period_s`` (a "latched" value).
"""
from __future__ import annotations

import collections
import hashlib
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cdcca_ros.errors import (
    CdccaError,
    ConfigError,
    LinkError,
    PayloadTooLargeError,
    WireError,
)
from cdcca_ros.transport.config import SessionConfig, to_zenoh_config
from cdcca_ros.transport.framing import (
    HEADER_SIZE,
    KIND_ACK,
    KIND_DATA,
    KIND_VERSION,
    MAX_TOPIC_BYTES,
    Frame,
    Reassembler,
    ack_frame,
    decode_frame,
    split_message,
)
from cdcca_ros.transport.keys import (
    DEFAULT_PREFIX,
    LinkKeys,
    parse_key,
    validate_device_id,
    validate_prefix,
)
from cdcca_ros.transport.spool import Inbox, LatestStore, Spool, SpoolEntry

_log = logging.getLogger(__name__)


# Zenoh appends the Rust source location of an error (" at /path/x.rs:388."): not for users.
_ZENOH_SOURCE = re.compile(r'\s+at \S+\.rs:\d+\.?')


def logger_for(name: str) -> logging.Logger:
    """The logger of one end of the link (a child of this module's logger)."""
    return _log.getChild(name)

CLOUD_SOURCE = 'cloud'


@dataclass
class LinkConfig:
    """Parameters of a :class:`DeviceLink` or :class:`CloudLink`.

    Attributes:
        session: How to reach the router (endpoints, certificates, reconnection backoff).
        prefix: Key prefix shared with the router's access control.
        chunk_size: Bytes of message per frame.
        max_payload_bytes: Largest message; bigger ones are refused on send and on receipt.
        spool_max_bytes: Bound of each sender spool (oldest dropped beyond it).
        spool_max_messages: Optional bound on the number of spooled messages.
        durable: fsync the spool and inbox on every write (survive power loss).
        window_messages: Unacknowledged messages in flight at most.
        window_bytes: Unacknowledged bytes in flight at most (one message may exceed it).
        ack_timeout_s: Without acknowledgement progress this long, resend from the oldest.
        chunk_timeout_s: An incomplete chunk set is dropped after this long.
        version_period_s: Cloud: repeat each device's latest version this often (0: only
            when the device appears).
        tick_s: Period of the link's housekeeping.
    """

    session: SessionConfig
    prefix: str = DEFAULT_PREFIX
    chunk_size: int = 1 << 20
    max_payload_bytes: int = 64 << 20
    spool_max_bytes: int = 512 << 20
    spool_max_messages: int | None = None
    durable: bool = False
    window_messages: int = 64
    window_bytes: int = 16 << 20
    ack_timeout_s: float = 3.0
    chunk_timeout_s: float = 30.0
    version_period_s: float = 10.0
    tick_s: float = 0.05

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        limit = self.session.max_message_size - HEADER_SIZE - MAX_TOPIC_BYTES
        if not 256 <= self.chunk_size <= limit:
            raise ConfigError(f'chunk_size={self.chunk_size} must be in [256, {limit}] '
                              '(the session max_message_size minus frame overhead)')
        if self.max_payload_bytes < 1:
            raise ConfigError(f'max_payload_bytes={self.max_payload_bytes} must be positive')
        if self.spool_max_bytes < self.max_payload_bytes:
            raise ConfigError(f'spool_max_bytes={self.spool_max_bytes} is below '
                              f'max_payload_bytes={self.max_payload_bytes}: a maximal message '
                              'could never be spooled')
        if self.window_messages < 1 or self.window_bytes < 1:
            raise ConfigError(f'window_messages={self.window_messages} and '
                              f'window_bytes={self.window_bytes} must be positive')
        for name in ('ack_timeout_s', 'chunk_timeout_s', 'tick_s'):
            if getattr(self, name) <= 0:
                raise ConfigError(f'{name}={getattr(self, name)} must be positive')
        if self.version_period_s < 0:
            raise ConfigError(f'version_period_s={self.version_period_s} must be >= 0')
        if self.tick_s > self.ack_timeout_s:
            raise ConfigError(f'tick_s={self.tick_s} exceeds ack_timeout_s={self.ack_timeout_s}')


@dataclass(frozen=True)
class LinkMessage:
    """One message handed to the application.

    Attributes:
        device: The device it came from (cloud side) or was addressed to (device side).
        seq: Sender's sequence number (per sender, increasing).
        topic: Topic name given by the sender.
        payload: The bytes, as sent.
        created_ns: Sender's wall clock when the message was spooled.
        received_ns: Receiver's wall clock when the message was stored.
    """

    device: str
    seq: int
    topic: str
    payload: bytes
    created_ns: int
    received_ns: int


class Recorder(Protocol):
    """What :class:`CloudLink` needs to record received messages (see :mod:`.recording`)."""

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int,
              sequence: int = 0) -> None: ...


def _check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not topic or len(topic.encode('utf-8')) > MAX_TOPIC_BYTES:
        raise ConfigError(f'topic {topic!r} must be a non-empty string of at most '
                          f'{MAX_TOPIC_BYTES} UTF-8 bytes')
    return topic


class _Sender:
    """Go-back-N sender over one spool; driven by the link's engine thread only."""

    def __init__(self, spool: Spool, config: LinkConfig,
                 publish: Callable[[bytes], None]) -> None:
        self.spool = spool
        self.cfg = config
        self.publish = publish
        self.matched = False
        self.sent = self.resent = self.acked = self.go_backs = self.timeouts = 0
        self.stale_acks = 0
        self._through = 0  # highest seq sent since the last go-back
        self._max_sent = 0
        self._inflight: collections.deque[tuple[int, int]] = collections.deque()
        self._inflight_bytes = 0
        self._last_progress = 0.0
        self.last_ack_time: float | None = None

    def set_matched(self, matched: bool, now: float) -> None:
        if matched and not self.matched:
            self.go_back(now)
        self.matched = matched

    def go_back(self, now: float) -> None:
        """Resend from the oldest unacknowledged message at the next pump."""
        if self._inflight:
            self.go_backs += 1
        self._through = 0
        self._inflight.clear()
        self._inflight_bytes = 0
        self._last_progress = now

    def on_ack(self, epoch: int, seq: int, now: float) -> None:
        if epoch != self.spool.epoch:
            self.stale_acks += 1
            return
        self.acked += self.spool.ack_through(seq)
        self.last_ack_time = now
        progressed = False
        while self._inflight and self._inflight[0][0] <= seq:
            self._inflight_bytes -= self._inflight.popleft()[1]
            progressed = True
        if progressed:
            self._last_progress = now
        self._through = max(self._through, seq)

    def pump(self, now: float) -> None:
        if not self.matched:
            return
        if self._inflight and now - self._last_progress > self.cfg.ack_timeout_s:
            self.timeouts += 1
            self.go_back(now)
        floor = self.spool.first_seq()
        while (len(self._inflight) < self.cfg.window_messages
               and self._inflight_bytes < self.cfg.window_bytes):
            # A few at a time: payloads may be large, the window may be wide.
            free = self.cfg.window_messages - len(self._inflight)
            batch = self.spool.pending(self._through, limit=min(free, 8))
            if not batch:
                return
            for entry in batch:
                if self._inflight_bytes >= self.cfg.window_bytes:
                    return
                self._send_one(entry, floor or entry.seq, now)

    def _send_one(self, entry: SpoolEntry, floor: int, now: float) -> None:
        for frame in split_message(entry.payload, chunk_size=self.cfg.chunk_size,
                                   epoch=self.spool.epoch, seq=entry.seq, floor=floor,
                                   created_ns=entry.created_ns, topic=entry.topic):
            self.publish(frame)
        if entry.seq <= self._max_sent:
            self.resent += 1
        else:
            self.sent += 1
            self._max_sent = entry.seq
        if not self._inflight:
            self._last_progress = now
        self._inflight.append((entry.seq, len(entry.payload)))
        self._inflight_bytes += len(entry.payload)
        self._through = entry.seq

    def stats(self) -> dict[str, Any]:
        s = self.spool.stats()
        return {'sent': self.sent, 'resent': self.resent, 'acked': self.acked,
                'go_backs': self.go_backs, 'ack_timeouts': self.timeouts,
                'inflight': len(self._inflight), 'spooled_messages': s.messages,
                'spooled_bytes': s.bytes, 'dropped': s.dropped,
                'dropped_bytes': s.dropped_bytes, 'dropped_disk_full': s.dropped_disk_full,
                'peer_reachable': self.matched}


class _Receiver:
    """Reassembly + in-order dedup into the inbox; driven by the engine thread only."""

    def __init__(self, inbox: Inbox, config: LinkConfig) -> None:
        self.inbox = inbox
        self.reasm = Reassembler(config.max_payload_bytes, config.chunk_timeout_s)
        self.received = self.duplicates = self.out_of_order = self.skipped = 0
        self.stale = 0

    def on_frame(self, source: str, frame: Frame, now: float) -> tuple[int, int] | None:
        """Return ``(epoch, seq)`` to acknowledge, if any."""
        payload = self.reasm.add(source, frame, now)
        if payload is None:
            return None
        acc = self.inbox.offer(source, frame.epoch, frame.seq, frame.floor, frame.topic,
                               payload, frame.created_ns)
        self.skipped += acc.skipped
        if acc.status == 'accepted':
            self.received += 1
        elif acc.status == 'duplicate':
            self.duplicates += 1
        elif acc.status == 'gap':
            self.out_of_order += 1
        else:
            self.stale += 1
            return None
        return frame.epoch, acc.ack

    def stats(self) -> dict[str, Any]:
        return {'received': self.received, 'duplicates': self.duplicates,
                'out_of_order': self.out_of_order, 'skipped': self.skipped,
                'chunk_timeouts': self.reasm.timed_out, 'chunk_evictions': self.reasm.evicted,
                'reassembly_bytes': self.reasm.buffered_bytes}


class _LinkBase:
    """Session management, the engine thread and the delivery thread shared by both ends."""

    def __init__(self, config: LinkConfig, inbox_path: Path,
                 deliver: Callable[[LinkMessage], None], recorder: Recorder | None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.config = config
        config.session.to_dict()  # fail now, not in the thread: missing files, wrong cert CN
        #: This end's logger (``cdcca_ros.transport.link.<name>``), so a node can route it.
        self.log = logger_for(config.session.name)
        self._deliver_cb = deliver
        # Delivery waits while this says the application cannot take messages yet (no
        # subscriber on the ROS side: a message published then would be lost).
        self._ready = ready
        self._recorder = recorder
        self._inbox = Inbox(inbox_path, durable=config.durable)
        self._receiver = _Receiver(self._inbox, config)
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._deliver_wake = threading.Event()
        self._lock = threading.Lock()  # guards the counters below, read by stats()
        self._session: Any = None
        self._entities: list[Any] = []
        self._router_transports = 0
        self.reconnects = self.connect_failures = self.rx_errors = 0
        self.delivered = self.callback_errors = self.publish_errors = 0
        self._ever_connected = False
        self._last_error: str | None = None
        self._last_error_time: float | None = None
        self._threads: list[threading.Thread] = []
        # Acknowledgements are cumulative: within one batch of events only the last one per
        # peer matters, which saves puts and spool transactions under load.
        self._acks_out: dict[str, tuple[int, int]] = {}
        self._acks_in: dict[str, tuple[int, int]] = {}

    # --- lifecycle ------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        self._threads = [
            threading.Thread(target=self._run, name=f'{name}-engine', daemon=True),
            threading.Thread(target=self._deliver_loop, name=f'{name}-deliver', daemon=True)]
        for t in self._threads:
            t.start()
        self._deliver_wake.set()  # hand over what a previous run stored but did not deliver

    def close(self) -> None:
        """Stop the threads and close the session and the stores; idempotent.

        Spooled and undelivered messages stay on disk for the next start.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._events.put(('wake',))
        self._deliver_wake.set()
        for t in self._threads:
            t.join(timeout=self.config.session.open_timeout_ms / 1000 + 10)
        self._close_stores()

    def _close_stores(self) -> None:
        self._inbox.close()

    def __enter__(self) -> _LinkBase:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- errors and status -------------------------------------------------------------------
    def _error(self, err: BaseException | str, level: int = logging.WARNING) -> None:
        text = err if isinstance(err, str) else f'{type(err).__name__}: {err}'
        with self._lock:
            self._last_error = text
            self._last_error_time = time.monotonic()
        self.log.log(level, '%s', text)

    def _base_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        undelivered = self._inbox.undelivered_count()
        with self._lock:
            return {
                'connected': self._router_transports > 0,
                'reconnects': self.reconnects,
                'connect_failures': self.connect_failures,
                'rx_errors': self.rx_errors,
                'publish_errors': self.publish_errors,
                'delivered': self.delivered,
                'callback_errors': self.callback_errors,
                'undelivered': undelivered,
                'last_error': self._last_error,
                'last_error_age_s': None if self._last_error_time is None
                else round(now - self._last_error_time, 3),
            }

    # --- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        import zenoh

        sc = self.config.session
        backoff = sc.retry_init_ms / 1000
        streak = 0  # failed opens in a row
        try:
            while not self._stop.is_set():
                if self._session is None:
                    try:
                        self._open(zenoh)
                        backoff = sc.retry_init_ms / 1000
                        streak = 0
                    except (zenoh.ZError, CdccaError) as err:
                        with self._lock:
                            self.connect_failures += 1
                            streak += 1
                        # Zenoh reports every refusal (router down, TLS handshake or
                        # certificate rejected) as the same error: name the likely causes,
                        # the certificates only where TLS is configured. Logged once per
                        # streak of failures (the link retries quietly; stats count them).
                        hint = 'router down or unreachable'
                        if sc.certs_dir is not None:
                            hint += (', or TLS refused: check that the certificate is signed by '
                                     'the router\'s CA and the host matches its SANs')
                        reason = _ZENOH_SOURCE.sub('', str(err)).strip()
                        self._error(f'link down: cannot connect to {", ".join(sc.connect)} as '
                                    f'{sc.name!r}: {reason} ({hint}); retrying quietly, every '
                                    f'{sc.retry_max_ms / 1000:g} s at most',
                                    logging.WARNING if streak == 1 else logging.DEBUG)
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, sc.retry_max_ms / 1000)
                        continue
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - a link must outlive a bug in one step
                    self.log.exception('link engine step failed')
                    self._error(f'internal error: {type(err).__name__}: {err}', logging.ERROR)
                    self._stop.wait(self.config.tick_s)
        finally:
            self._close_session()

    def _open(self, zenoh: Any) -> None:
        session = zenoh.open(to_zenoh_config(self.config.session.to_dict()))
        self._session = session
        try:
            listener = session.info.declare_transport_events_listener(
                lambda ev: self._events.put(('transport', str(ev.kind).endswith('PUT'),
                                             str(ev.transport.whatami))), history=True)
            self._entities.append(listener)
            self._declare(session, zenoh)
        except (zenoh.ZError, CdccaError):
            self._close_session()
            raise
        self.log.debug('%s: session open to %s', self.config.session.name,
                       list(self.config.session.connect))

    def _close_session(self) -> None:
        for ent in reversed(self._entities):
            try:
                ent.undeclare()
            except Exception:  # noqa: BLE001 - best effort while closing; zenoh may be gone
                pass
        self._entities.clear()
        if self._session is not None and not self._session.is_closed():
            self._session.close()
        self._session = None

    def _step(self) -> None:
        try:
            ev: tuple[Any, ...] | None = self._events.get(timeout=self.config.tick_s)
        except queue.Empty:
            ev = None
        handled = 0
        while ev is not None and handled < 256:
            self._dispatch_safely(ev)
            handled += 1
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                ev = None
        now = time.monotonic()
        try:
            self._flush_acks(now)
            self._housekeeping(now)
        except (CdccaError, sqlite3.Error) as err:
            self._error(err, logging.ERROR)

    @staticmethod
    def _merge_ack(acks: dict[str, tuple[int, int]], peer: str, epoch: int, seq: int) -> None:
        prev = acks.get(peer)
        acks[peer] = (epoch, max(seq, prev[1])) if prev and prev[0] == epoch else (epoch, seq)

    def _flush_acks(self, now: float) -> None:
        acks_out, self._acks_out = self._acks_out, {}
        acks_in, self._acks_in = self._acks_in, {}
        for peer, (epoch, seq) in acks_in.items():
            self._sender_for(peer).on_ack(epoch, seq, now)
        for peer, (epoch, seq) in acks_out.items():
            publisher = self._ack_publisher(peer)
            if publisher is not None:
                self._put(publisher, ack_frame(epoch, seq))
        if acks_out:
            self._deliver_wake.set()

    def _dispatch_safely(self, ev: tuple[Any, ...]) -> None:
        now = time.monotonic()
        try:
            if ev[0] == 'frame':
                self._on_raw(ev[1], ev[2], now)
            elif ev[0] == 'transport':
                self._on_transport(ev[1], ev[2])
            elif ev[0] != 'wake':
                self._on_event(ev, now)
        except WireError as err:
            # Bad bytes from the network: count, report, keep running.
            with self._lock:
                self.rx_errors += 1
            self._error(err)
        except (CdccaError, sqlite3.Error) as err:
            self._error(err, logging.ERROR)

    def _on_transport(self, up: bool, whatami: str) -> None:
        if 'ROUTER' not in whatami.upper():
            return
        with self._lock:
            was_up = self._router_transports > 0
            if up:
                self._router_transports += 1
                if self._ever_connected:
                    self.reconnects += 1
                self._ever_connected = True
            else:
                self._router_transports = max(0, self._router_transports - 1)
        with self._lock:
            changed = (self._router_transports > 0) != was_up
        if changed:  # one line per change of state, not per transport
            self.log.info('%s: link %s (router %s)', self.config.session.name,
                          'up' if up else 'down', ', '.join(self.config.session.connect))

    def _on_raw(self, key: str, data: bytes, now: float) -> None:
        try:
            device, direction, channel = parse_key(key, self.config.prefix)
        except ConfigError as err:
            raise WireError(f'frame on an unexpected key: {err}') from err
        frame = decode_frame(data, self.config.max_payload_bytes)
        self._on_frame(device, direction, channel, frame, now)

    def _subscriber_callback(self, sample: Any) -> None:
        # Runs on a Zenoh thread: copy and queue, never block it.
        self._events.put(('frame', str(sample.key_expr), sample.payload.to_bytes()))

    def _put(self, publisher: Any, data: bytes) -> None:
        import zenoh

        try:
            publisher.put(data)
        except zenoh.ZError as err:
            with self._lock:
                self.publish_errors += 1
            raise LinkError(f'publishing on {publisher.key_expr} failed: {err}') from err

    def _wake(self) -> None:
        self._events.put(('wake',))

    # --- delivery thread -------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            self._deliver_wake.wait(0.5)
            self._deliver_wake.clear()
            try:
                self._deliver_extra()
                self._deliver_pending()
            except Exception as err:  # noqa: BLE001 - keep delivering after a store/recorder fault
                self.log.exception('link delivery failed')
                self._error(f'delivery failed: {type(err).__name__}: {err}', logging.ERROR)
                self._stop.wait(0.5)
                self._deliver_wake.set()  # try again

    def _deliver_pending(self) -> None:
        while not self._stop.is_set():
            if self._ready is not None and not self._ready():
                return  # stored messages wait (the loop comes back every 0.5 s)
            rows = self._inbox.undelivered(64)
            if not rows:
                return
            for row_id, e in rows:
                if self._stop.is_set():
                    return
                msg = LinkMessage(e.source if e.source != CLOUD_SOURCE else self._own_id(),
                                  e.seq, e.topic, e.payload, e.created_ns, e.received_ns)
                self._hand_over(msg)
                self._inbox.done(row_id)

    def _hand_over(self, msg: LinkMessage) -> None:
        if self._recorder is not None:
            try:
                self._recorder.write(msg.topic, msg.payload, msg.received_ns, msg.created_ns,
                                     msg.seq)
            except (CdccaError, OSError, ValueError) as err:
                self._error(f'recording seq {msg.seq} from {msg.device!r} failed: {err}')
        try:
            self._deliver_cb(msg)
        except Exception as err:  # noqa: BLE001 - the application's code must not kill the link
            with self._lock:
                self.callback_errors += 1
            self._error(f'callback failed on seq {msg.seq} from {msg.device!r} '
                        f'({msg.topic}): {type(err).__name__}: {err}', logging.ERROR)
            self.log.debug('callback traceback', exc_info=True)
        else:
            with self._lock:
                self.delivered += 1

    # --- overridden by each end --------------------------------------------------------------
    def _own_id(self) -> str:
        raise NotImplementedError

    def _declare(self, session: Any, zenoh: Any) -> None:
        raise NotImplementedError

    def _on_frame(self, device: str, direction: str, channel: str, frame: Frame,
                  now: float) -> None:
        raise NotImplementedError

    def _on_event(self, ev: tuple[Any, ...], now: float) -> None:
        raise NotImplementedError

    def _housekeeping(self, now: float) -> None:
        raise NotImplementedError

    def _deliver_extra(self) -> None:
        """Hook run by the delivery thread at each wake-up."""

    def _sender_for(self, peer: str) -> _Sender:
        raise NotImplementedError

    def _ack_publisher(self, peer: str) -> Any:
        raise NotImplementedError


class DeviceLink(_LinkBase):
    """The robot's end: uplink out (spooled), downlink and version announcements in.

    Args:
        device_id: This device's id (its certificate's common name).
        config: Link parameters; ``config.session.name`` must be ``device_id``.
        spool_dir: Folder of the uplink spool and the downlink inbox (kept across restarts).
        on_downlink: Called once per downlink message, in order, from the link's delivery
            thread.
        on_version: Called with the payload of each *new* version announcement.
    """

    def __init__(self, device_id: str, config: LinkConfig, spool_dir: str | Path,
                 on_downlink: Callable[[LinkMessage], None],
                 on_version: Callable[[bytes], None] | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.device_id = validate_device_id(device_id)
        if config.session.name != device_id:
            raise ConfigError(f'config.session.name={config.session.name!r} must be the '
                              f'device id {device_id!r} (its certificate)')
        self.keys = LinkKeys.for_device(device_id, config.prefix)
        spool_dir = Path(spool_dir)
        super().__init__(config, spool_dir / 'downlink_inbox.sqlite', on_downlink, None, ready)
        self._spool = Spool(spool_dir / 'uplink.sqlite', config.spool_max_bytes,
                            config.spool_max_messages, durable=config.durable)
        self._on_version = on_version
        self._pub_data: Any = None
        self._pub_ack: Any = None
        self._sender = _Sender(self._spool, config, self._publish_data)
        self._version_digest: bytes | None = None
        self._version_pending: bytes | None = None
        self.versions_seen = 0
        self._start(f'link-{device_id}')

    def send(self, topic: str, payload: bytes) -> int:
        """Queue one uplink message; return its sequence number.

        Returns at once: the message is on disk and goes out when the cloud is reachable.

        Raises:
            PayloadTooLargeError: over ``max_payload_bytes``.
            SpoolError: the spool cannot be written.
        """
        _check_topic(topic)
        if len(payload) > self.config.max_payload_bytes:
            raise PayloadTooLargeError(f'uplink message of {len(payload)} bytes on {topic!r} '
                                       f'exceeds max_payload_bytes='
                                       f'{self.config.max_payload_bytes}')
        seq = self._spool.append(topic, bytes(payload))
        self._wake()
        return seq

    def stats(self) -> dict[str, Any]:
        """Status and counters (for /diagnostics)."""
        out = {'device_id': self.device_id, **self._base_stats(), **self._sender.stats(),
               **self._receiver.stats(), 'versions_seen': self.versions_seen,
               'spool_epoch': self._spool.epoch}
        out['cloud_reachable'] = out.pop('peer_reachable')
        return out

    def _own_id(self) -> str:
        return self.device_id

    def _declare(self, session: Any, zenoh: Any) -> None:
        block = zenoh.CongestionControl.BLOCK
        self._entities.append(session.declare_subscriber(self.keys.down,
                                                         self._subscriber_callback))
        self._pub_data = session.declare_publisher(self.keys.up_data, congestion_control=block)
        # Acks jump the queue of bulk data (Zenoh keeps one queue per priority).
        self._pub_ack = session.declare_publisher(self.keys.up_ack, congestion_control=block,
                                                  priority=zenoh.Priority.INTERACTIVE_HIGH)
        self._entities += [self._pub_data, self._pub_ack]
        self._entities.append(self._pub_data.declare_matching_listener(
            lambda st: self._events.put(('match', bool(st.matching)))))
        self._events.put(('match', bool(self._pub_data.matching_status.matching)))

    def _close_session(self) -> None:
        self._pub_data = self._pub_ack = None
        super()._close_session()
        self._sender.set_matched(False, time.monotonic())

    def _publish_data(self, data: bytes) -> None:
        self._put(self._pub_data, data)

    def _on_event(self, ev: tuple[Any, ...], now: float) -> None:
        if ev[0] == 'match':
            was = self._sender.matched
            self._sender.set_matched(ev[1], now)
            if was != ev[1]:
                self.log.info('%s: cloud %s', self.device_id,
                              'reachable' if ev[1] else 'unreachable (uplink spooled)')

    def _on_frame(self, device: str, direction: str, channel: str, frame: Frame,
                  now: float) -> None:
        if device != self.device_id or direction != 'down':
            raise WireError(f'{self.device_id}: frame on a foreign key ({device}/{direction})')
        if channel == 'ack' and frame.kind == KIND_ACK:
            self._merge_ack(self._acks_in, CLOUD_SOURCE, frame.epoch, frame.seq)
        elif channel == 'data' and frame.kind == KIND_DATA:
            ack = self._receiver.on_frame(CLOUD_SOURCE, frame, now)
            if ack is not None:
                self._merge_ack(self._acks_out, CLOUD_SOURCE, *ack)
        elif channel == 'version' and frame.kind == KIND_VERSION:
            payload = self._receiver.reasm.add('version', frame, now)
            if payload is not None and hashlib.sha256(payload).digest() != self._version_digest:
                self._version_digest = hashlib.sha256(payload).digest()
                self._version_pending = payload
                self._deliver_wake.set()
        else:
            raise WireError(f'{self.device_id}: unexpected frame kind {frame.kind} on '
                            f'channel {channel!r}')

    def _sender_for(self, peer: str) -> _Sender:
        return self._sender

    def _ack_publisher(self, peer: str) -> Any:
        return self._pub_ack

    def _deliver_extra(self) -> None:
        payload, self._version_pending = self._version_pending, None
        if payload is None:
            return
        self.versions_seen += 1
        if self._on_version is not None:
            try:
                self._on_version(payload)
            except Exception as err:  # noqa: BLE001 - the application's code must not kill us
                with self._lock:
                    self.callback_errors += 1
                self._error(f'version callback failed: {type(err).__name__}: {err}')

    def _housekeeping(self, now: float) -> None:
        self._receiver.reasm.expire(now)
        if self._pub_data is not None:
            try:
                self._sender.pump(now)
            except LinkError as err:
                self._error(err)
                self._sender.go_back(now)

    def _close_stores(self) -> None:
        super()._close_stores()
        self._spool.close()


class _DeviceState:
    """The cloud's per-device sending side."""

    def __init__(self, device: str, spool: Spool, config: LinkConfig,
                 put: Callable[[Any, bytes], None]) -> None:
        self.device = device
        self.keys = LinkKeys.for_device(device, config.prefix)
        self.pub_data: Any = None
        self.pub_ack: Any = None
        self.pub_version: Any = None
        self.version_sent_at = 0.0
        self._put = put
        self.sender = _Sender(spool, config, self._publish)

    def _publish(self, data: bytes) -> None:
        self._put(self.pub_data, data)


class CloudLink(_LinkBase):
    """The cloud's end: uplink in from many devices, downlink and versions out per device.

    Args:
        config: Link parameters; ``config.session.name`` is the cloud's certificate name.
        store_dir: Folder of the uplink inbox (dedup state), the per-device downlink spools
            and the latest versions (kept across restarts).
        on_uplink: Called once per stored uplink message, in order per device, from the
            link's delivery thread.
        devices: Devices served (the router's access control must list them too).
        recorder: Optional sink (e.g. :class:`~.recording.McapRecorder`) that gets every
            stored uplink message before ``on_uplink``.
        ready: Stored uplink waits while this returns False (e.g. no subscriber yet).
    """

    def __init__(self, config: LinkConfig, store_dir: str | Path,
                 on_uplink: Callable[[LinkMessage], None], devices: Sequence[str],
                 recorder: Recorder | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.store_dir = Path(store_dir)
        devices = [validate_device_id(d) for d in devices]
        if len(set(devices)) != len(devices):
            raise ConfigError(f'devices {devices} holds duplicates')
        super().__init__(config, self.store_dir / 'uplink_inbox.sqlite', on_uplink, recorder,
                         ready)
        self._versions = LatestStore(self.store_dir / 'versions.sqlite', config.durable)
        self._devices: dict[str, _DeviceState] = {}
        self._devices_lock = threading.Lock()
        for dev in devices:
            self._add_state(dev)
        self._start('link-cloud')

    def _add_state(self, device: str) -> _DeviceState:
        spool = Spool(self.store_dir / 'downlink' / f'{device}.sqlite',
                      self.config.spool_max_bytes, self.config.spool_max_messages,
                      durable=self.config.durable)
        state = _DeviceState(device, spool, self.config, self._put)
        with self._devices_lock:
            self._devices[device] = state
        return state

    @property
    def devices(self) -> list[str]:
        with self._devices_lock:
            return list(self._devices)

    def add_device(self, device_id: str) -> None:
        """Start serving another device (the router must admit it too)."""
        validate_device_id(device_id)
        with self._devices_lock:
            if device_id in self._devices:
                return
        self._add_state(device_id)
        self._events.put(('declare', device_id))

    def _state(self, device_id: str) -> _DeviceState:
        with self._devices_lock:
            state = self._devices.get(device_id)
        if state is None:
            raise ConfigError(f'device {device_id!r} is not served by this cloud link '
                              f'(known: {sorted(self._devices)})')
        return state

    def send(self, device_id: str, topic: str, payload: bytes) -> int:
        """Queue one downlink message for ``device_id``; return its sequence number.

        Raises:
            ConfigError: unknown device.
            PayloadTooLargeError: over ``max_payload_bytes``.
            SpoolError: the spool cannot be written.
        """
        _check_topic(topic)
        state = self._state(device_id)
        if len(payload) > self.config.max_payload_bytes:
            raise PayloadTooLargeError(f'downlink message of {len(payload)} bytes for '
                                       f'{device_id!r} exceeds max_payload_bytes='
                                       f'{self.config.max_payload_bytes}')
        seq = state.sender.spool.append(topic, bytes(payload))
        self._wake()
        return seq

    def announce_version(self, device_id: str, payload: bytes) -> int:
        """Set the device's latest version announcement (kept and repeated); return its
        counter."""
        self._state(device_id)
        if len(payload) > self.config.chunk_size:
            raise PayloadTooLargeError(f'version announcement of {len(payload)} bytes exceeds '
                                       f'one chunk ({self.config.chunk_size})')
        counter = self._versions.put(device_id, bytes(payload))
        self._events.put(('version', device_id))
        return counter

    def stats(self) -> dict[str, Any]:
        """Status and counters, overall and per device (for /diagnostics)."""
        out = {**self._base_stats(), **self._receiver.stats(), 'devices': {}}
        with self._devices_lock:
            states = list(self._devices.values())
        for st in states:
            d = st.sender.stats()
            d['device_reachable'] = d.pop('peer_reachable')
            pos = self._inbox.position(st.device)
            d['uplink_stored_through'] = None if pos is None else pos[1]
            out['devices'][st.device] = d
        return out

    def _own_id(self) -> str:
        return CLOUD_SOURCE

    def _declare(self, session: Any, zenoh: Any) -> None:
        for dev in self.devices:
            self._declare_device(session, zenoh, self._state(dev))

    def _declare_device(self, session: Any, zenoh: Any, st: _DeviceState) -> None:
        if st.pub_data is not None:
            return  # already declared in this session
        block = zenoh.CongestionControl.BLOCK
        # One subscription per device: the router's access control lets a device learn only
        # of subscriptions within its own keys, so a wildcard one would hide the cloud.
        self._entities.append(session.declare_subscriber(st.keys.up, self._subscriber_callback))
        st.pub_data = session.declare_publisher(st.keys.down_data, congestion_control=block)
        st.pub_ack = session.declare_publisher(st.keys.down_ack, congestion_control=block,
                                               priority=zenoh.Priority.INTERACTIVE_HIGH)
        st.pub_version = session.declare_publisher(st.keys.down_version,
                                                   congestion_control=block)
        self._entities += [st.pub_data, st.pub_ack, st.pub_version]
        dev = st.device
        self._entities.append(st.pub_data.declare_matching_listener(
            lambda s: self._events.put(('match', dev, bool(s.matching)))))
        self._events.put(('match', dev, bool(st.pub_data.matching_status.matching)))

    def _close_session(self) -> None:
        now = time.monotonic()
        with self._devices_lock:
            states = list(self._devices.values())
        for st in states:
            st.pub_data = st.pub_ack = st.pub_version = None
            st.sender.set_matched(False, now)
        super()._close_session()

    def _on_event(self, ev: tuple[Any, ...], now: float) -> None:
        import zenoh

        if ev[0] == 'match':
            st = self._state(ev[1])
            was = st.sender.matched
            st.sender.set_matched(ev[2], now)
            if was != ev[2]:
                self.log.info('cloud: device %s %s', ev[1],
                              'reachable' if ev[2] else 'unreachable')
            if ev[2]:
                self._send_version(st, now)
        elif ev[0] == 'version':
            self._send_version(self._state(ev[1]), now)
        elif ev[0] == 'declare' and self._session is not None:
            self._declare_device(self._session, zenoh, self._state(ev[1]))

    def _send_version(self, st: _DeviceState, now: float) -> None:
        latest = self._versions.get(st.device)
        st.version_sent_at = now
        if latest is None or st.pub_version is None:
            return
        counter, payload = latest
        for frame in split_message(payload, chunk_size=self.config.chunk_size, epoch=0,
                                   seq=counter, floor=0, created_ns=time.time_ns(),
                                   topic='version', kind=KIND_VERSION):
            self._put(st.pub_version, frame)

    def _on_frame(self, device: str, direction: str, channel: str, frame: Frame,
                  now: float) -> None:
        st = self._state(device)
        if direction != 'up':
            raise WireError(f'cloud: frame on a downlink key of {device!r}')
        if channel == 'data' and frame.kind == KIND_DATA:
            ack = self._receiver.on_frame(device, frame, now)
            if ack is not None:
                self._merge_ack(self._acks_out, device, *ack)
        elif channel == 'ack' and frame.kind == KIND_ACK:
            self._merge_ack(self._acks_in, st.device, frame.epoch, frame.seq)
        else:
            raise WireError(f'cloud: unexpected frame kind {frame.kind} on channel '
                            f'{channel!r} from {device!r}')

    def _sender_for(self, peer: str) -> _Sender:
        return self._state(peer).sender

    def _ack_publisher(self, peer: str) -> Any:
        return self._state(peer).pub_ack

    def _housekeeping(self, now: float) -> None:
        self._receiver.reasm.expire(now)
        with self._devices_lock:
            states = list(self._devices.values())
        period = self.config.version_period_s
        for st in states:
            if st.pub_data is None:
                continue
            try:
                st.sender.pump(now)
                if period and st.sender.matched and now - st.version_sent_at > period:
                    self._send_version(st, now)
            except LinkError as err:
                self._error(err)
                st.sender.go_back(now)

    def _close_stores(self) -> None:
        super()._close_stores()
        self._versions.close()
        with self._devices_lock:
            for st in self._devices.values():
                st.sender.spool.close()
