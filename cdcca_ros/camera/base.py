"""Camera abstraction shared by every frame source (RealSense, OpenCV, synthetic).

A :class:`Camera` opens a device, delivers :class:`Frame` objects, and can run a background
reader thread that keeps only the newest frame, so a consumer never blocks the device and
never works on a stale picture (the drop-oldest buffer of image_pipeline, the ``read`` /
``read_latest`` split of lerobot). When a device fails while the reader runs, the reader closes
it and reopens it with exponential backoff until it comes back or the camera is disconnected:
an unplugged camera is an error in the stats and a retry, not a crash.

Subclasses implement three methods, all called with the device lock held, from one thread at
a time: :meth:`Camera._open`, :meth:`Camera._close` and :meth:`Camera._grab`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from cdcca_ros.errors import (
    CameraError,
    CameraTimeoutError,
    ConfigError,
    DeviceNotConnectedError,
    EndOfStreamError,
)

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One picture from a camera.

    Attributes:
        rgb: ``H x W x 3`` uint8 RGB image, C-contiguous.
        stamp_ns: host wall-clock time of the capture in nanoseconds (what a ROS header takes).
        depth: optional ``H x W`` uint16 depth in millimetres, aligned to ``rgb`` (0 = no data).
        meta: source-specific facts (frame index, device timestamp, synthetic ground truth...).
    """

    rgb: np.ndarray
    stamp_ns: int
    depth: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
                or rgb.shape[2] != 3:
            raise CameraError(
                f'Frame.rgb must be an HxWx3 uint8 array, got '
                f'{getattr(rgb, "dtype", type(rgb).__name__)} {getattr(rgb, "shape", "")}')
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise CameraError(f'Frame.rgb is empty: shape {rgb.shape}')
        if self.depth is not None:
            depth = self.depth
            if not isinstance(depth, np.ndarray) or depth.dtype != np.uint16 \
                    or depth.shape != rgb.shape[:2]:
                raise CameraError(
                    f'Frame.depth must be a uint16 array of shape {rgb.shape[:2]} (aligned to '
                    f'colour), got {getattr(depth, "dtype", type(depth).__name__)} '
                    f'{getattr(depth, "shape", "")}')
        if not isinstance(self.stamp_ns, int) or self.stamp_ns < 0:
            raise CameraError(f'Frame.stamp_ns must be a non-negative int, got {self.stamp_ns!r}')

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.rgb.shape[1])


@dataclass
class CameraStats:
    """Counters of one camera since it was created.

    Attributes:
        frames: frames delivered by the device.
        drops: frames the reader replaced before anyone read them.
        reconnects: successful reopenings after a failure.
        connect_failures: failed attempts to open the device (first connect and reconnects).
        read_errors: failed grabs (timeouts, unplugged device, decode errors).
        fps: frame rate measured over the last frames (0 until two frames arrived).
        last_error: message of the latest error, None if none happened.
        last_stamp_ns: stamp of the newest frame, 0 before the first.
    """

    frames: int = 0
    drops: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    read_errors: int = 0
    fps: float = 0.0
    last_error: str | None = None
    last_stamp_ns: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts to open a device.

    Attributes:
        initial_delay_s: wait after the first failure.
        max_delay_s: ceiling of the wait.
        factor: growth of the wait after each failure.
        max_attempts: attempts before giving up; None retries until stopped.
    """

    initial_delay_s: float = 0.5
    max_delay_s: float = 5.0
    factor: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not self.initial_delay_s >= 0:
            raise ConfigError(f'initial_delay_s must be >= 0, got {self.initial_delay_s}')
        if not self.max_delay_s >= self.initial_delay_s:
            raise ConfigError(
                f'max_delay_s ({self.max_delay_s}) must be >= initial_delay_s '
                f'({self.initial_delay_s})')
        if not self.factor >= 1.0:
            raise ConfigError(f'factor must be >= 1, got {self.factor}')
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError(f'max_attempts must be >= 1 or None, got {self.max_attempts}')

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (1-based)."""
        if failures < 1:
            return 0.0
        return min(self.max_delay_s, self.initial_delay_s * self.factor ** (failures - 1))

    def delays(self) -> Iterator[float]:
        """Waits between attempts; finite when ``max_attempts`` is set."""
        failures = 0
        while self.max_attempts is None or failures < self.max_attempts - 1:
            failures += 1
            yield self.delay(failures)


class Camera(ABC):
    """Base of every frame source: connection, reads, background reader, stats.

    Args:
        name: short name used in log lines and error messages.
        pace_fps: if set, frames are delivered no faster than this rate (for sources that would
            otherwise run as fast as they are decoded or generated: files, synthetic worlds).
        retry: backoff used when the reader thread reopens a failed device.
        read_timeout_ms: how long one grab may wait for the device.
    """

    def __init__(self, name: str, *, pace_fps: float | None = None,
                 retry: RetryPolicy | None = None, read_timeout_ms: float = 1000.0) -> None:
        if pace_fps is not None and not pace_fps > 0:
            raise ConfigError(f'{name}: pace_fps must be > 0 or None, got {pace_fps}')
        if not read_timeout_ms > 0:
            raise ConfigError(f'{name}: read_timeout_ms must be > 0, got {read_timeout_ms}')
        self.name = name
        self.retry = retry or RetryPolicy()
        self.read_timeout_ms = float(read_timeout_ms)
        self._pace_period_ns = int(1e9 / pace_fps) if pace_fps else 0
        self._next_due_ns = 0
        self._device_lock = threading.RLock()
        self._state = threading.Condition(threading.Lock())
        self._stats = CameraStats()
        self._arrivals: collections.deque[int] = collections.deque(maxlen=30)
        self._wanted = False   # connect() succeeded and disconnect() was not called
        self._online = False   # the device is open right now
        self._ended = False    # a finite source ran out of frames
        self._latest: Frame | None = None
        self._latest_mono_ns = 0
        self._seq = 0          # sequence number of _latest
        self._taken_seq = 0    # newest sequence number handed to a consumer
        self._stop = threading.Event()        # asks the reader thread to end
        self._interrupt = threading.Event()   # cuts a pacing pause short (stop, disconnect)
        self._thread: threading.Thread | None = None
        self._failures = 0     # consecutive failed reopenings in the reader

    # --- to implement -----------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None:
        """Open the device. Raise DeviceNotConnectedError if it is absent, CameraError else."""

    @abstractmethod
    def _close(self) -> None:
        """Release the device; must not raise and must be safe to call twice."""

    @abstractmethod
    def _grab(self, timeout_s: float) -> Frame:
        """Return the next frame, waiting at most ``timeout_s``.

        Raise CameraTimeoutError when nothing arrived, DeviceNotConnectedError when the device
        went away, EndOfStreamError when a finite source is exhausted, CameraError else.
        """

    def describe(self) -> str:
        """A few words that identify the device in messages (source, serial, schedule...)."""
        return self.name

    # --- public API -------------------------------------------------------------------------
    def __str__(self) -> str:
        return f'{type(self).__name__}({self.describe()})'

    @property
    def is_connected(self) -> bool:
        """True while the device is open (False while the reader is reconnecting)."""
        return self._wanted and self._online

    @property
    def stats(self) -> CameraStats:
        """A snapshot of the counters."""
        with self._state:
            return dataclasses.replace(self._stats)

    @property
    def reader_running(self) -> bool:
        """True while the background reader thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def connect(self) -> None:
        """Open the device once.

        Raises:
            DeviceNotConnectedError: the device is absent (counted in ``connect_failures``).
            CameraError: it could not be opened for another reason, or is already connected.
        """
        if self._wanted:
            raise CameraError(f'{self} is already connected')
        self._interrupt.clear()
        with self._device_lock:
            self._try_open()
        self._next_due_ns = 0
        self._ended = False
        with self._state:
            self._latest = None  # a frame from an earlier connection is never handed out
            self._taken_seq = self._seq
        self._wanted = True

    def disconnect(self) -> None:
        """Stop the reader and release the device; safe to call when not connected."""
        self._wanted = False
        self._interrupt.set()
        self.stop_reader()
        with self._device_lock:
            if self._online:
                self._online = False
                self._close()
        with self._state:
            self._state.notify_all()

    def __enter__(self) -> Camera:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.disconnect()

    def start_reader(self) -> None:
        """Start the background thread that keeps only the newest frame."""
        self._require_wanted()
        if self.reader_running:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._reader_loop, name=f'camera-{self.name}', daemon=True)
        self._thread.start()

    def stop_reader(self, timeout_s: float = 5.0) -> None:
        """Stop the background thread (no-op when it does not run)."""
        self._stop.set()
        self._interrupt.set()
        with self._state:
            self._state.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                _LOG.warning('%s: reader thread did not stop within %.1f s', self, timeout_s)
        self._thread = None
        if self._wanted:
            self._interrupt.clear()  # still connected: later synchronous reads pace again

    def read(self, timeout_ms: float | None = None) -> Frame:
        """Return a frame newer than any frame returned before, waiting for it.

        Without the reader thread the device is read directly; a failed read closes the
        device, and the next call tries to reopen it once (counted in ``reconnects``).

        Raises:
            DeviceNotConnectedError: not connected, or the device is gone.
            CameraTimeoutError: no new frame within ``timeout_ms``.
            EndOfStreamError: a finite source has no more frames.
        """
        self._require_wanted()
        timeout_s = (self.read_timeout_ms if timeout_ms is None else timeout_ms) / 1000.0
        if self.reader_running:
            return self._wait_new(timeout_s)
        with self._device_lock:
            if self._ended:
                raise EndOfStreamError(f'{self}: no more frames')
            if not self._online:
                self._try_open()
                with self._state:
                    self._stats.reconnects += 1
            try:
                frame = self._next_frame(timeout_s)
            except EndOfStreamError:
                self._ended = True
                raise
            except CameraError as err:
                self._record_read_error(err)
                if not isinstance(err, CameraTimeoutError):
                    self._online = False
                    self._close()
                raise
        self._publish(frame)
        with self._state:
            self._taken_seq = self._seq
        return frame

    def read_latest(self, max_age_ms: float = 500.0) -> Frame:
        """Return the newest frame without waiting for a new one (starts the reader if needed).

        Right after the reader starts this waits up to ``max_age_ms`` for its first frame.
        The same frame may be returned twice; frames nobody read are counted as drops.

        Raises:
            DeviceNotConnectedError: not connected, or the device is gone and being retried.
            CameraTimeoutError: the newest frame is older than ``max_age_ms``.
            EndOfStreamError: a finite source ended and its last frame is too old.
        """
        self._require_wanted()
        if not self.reader_running and not self._ended:
            self.start_reader()
        max_age_ns = int(max_age_ms * 1e6)
        deadline = time.monotonic() + max_age_ms / 1000.0
        with self._state:
            while self._latest is None and self._wanted and not self._ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._state.wait(remaining)
            frame, mono_ns = self._latest, self._latest_mono_ns
            age_ns = time.monotonic_ns() - mono_ns
            if frame is not None and age_ns <= max_age_ns:
                self._taken_seq = self._seq
                return frame
            last_error = self._stats.last_error
        self._raise_stale(frame, age_ns, max_age_ms, last_error)
        raise AssertionError('unreachable')  # _raise_stale always raises

    def frames(self, count: int | None = None, timeout_ms: float | None = None
               ) -> Iterator[Frame]:
        """Yield ``count`` successive new frames (forever when None) through :meth:`read`."""
        produced = 0
        while count is None or produced < count:
            yield self.read(timeout_ms)
            produced += 1

    # --- internals --------------------------------------------------------------------------
    def _require_wanted(self) -> None:
        if not self._wanted:
            raise DeviceNotConnectedError(f'{self} is not connected: call connect() first')

    def _try_open(self) -> None:
        """Open the device, translating and counting failures (device lock held)."""
        try:
            self._open()
        except CameraError as err:
            self._close()
            with self._state:
                self._stats.connect_failures += 1
                self._stats.last_error = str(err)
            raise
        self._online = True

    def _record_read_error(self, err: CameraError) -> None:
        with self._state:
            self._stats.read_errors += 1
            self._stats.last_error = str(err)

    def _next_frame(self, timeout_s: float) -> Frame:
        """Grab one frame, first waiting for its slot when pacing (device lock held)."""
        if self._pace_period_ns:
            now = time.monotonic_ns()
            if self._next_due_ns > now:
                # An Event, not sleep(): disconnect() and stop_reader() cut a long pause short.
                if self._interrupt.wait((self._next_due_ns - now) / 1e9):
                    raise DeviceNotConnectedError(f'{self}: stopped while waiting for a frame')
                now = time.monotonic_ns()
            # Slots follow the schedule, but a late grab does not cause a burst to catch up.
            self._next_due_ns = max(now, self._next_due_ns) + self._pace_period_ns
        return self._grab(timeout_s)

    def _publish(self, frame: Frame) -> None:
        now = time.monotonic_ns()
        with self._state:
            if self._latest is not None and self._seq > self._taken_seq:
                self._stats.drops += 1
            self._latest = frame
            self._latest_mono_ns = now
            self._seq += 1
            self._stats.frames += 1
            self._stats.last_stamp_ns = frame.stamp_ns
            self._arrivals.append(now)
            if len(self._arrivals) >= 2:
                span = self._arrivals[-1] - self._arrivals[0]
                self._stats.fps = (len(self._arrivals) - 1) * 1e9 / span if span > 0 else 0.0
            self._state.notify_all()

    def _wait_new(self, timeout_s: float) -> Frame:
        deadline = time.monotonic() + timeout_s
        with self._state:
            while self._seq <= self._taken_seq or self._latest is None:
                if not self._wanted:
                    raise DeviceNotConnectedError(f'{self} was disconnected while reading')
                if self._ended:
                    raise EndOfStreamError(f'{self}: no more frames')
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = 'online' if self._online else 'reconnecting'
                    raise CameraTimeoutError(
                        f'{self}: no new frame within {timeout_s * 1000:.0f} ms ({state}, last '
                        f'error: {self._stats.last_error})')
                self._state.wait(remaining)
            self._taken_seq = self._seq
            return self._latest

    def _raise_stale(self, frame: Frame | None, age_ns: int, max_age_ms: float,
                     last_error: str | None) -> None:
        if self._ended:
            raise EndOfStreamError(f'{self}: no more frames')
        if not self._wanted:
            raise DeviceNotConnectedError(f'{self} was disconnected')
        if not self._online:
            raise DeviceNotConnectedError(
                f'{self} is not delivering frames and is being reconnected '
                f'(last error: {last_error})')
        if frame is None:
            raise CameraTimeoutError(
                f'{self}: no frame within {max_age_ms:.0f} ms of starting the reader')
        raise CameraTimeoutError(
            f'{self}: newest frame is {age_ns / 1e6:.0f} ms old, more than max_age_ms='
            f'{max_age_ms:.0f} (last error: {last_error})')

    def _reader_loop(self) -> None:
        timeout_s = self.read_timeout_ms / 1000.0
        while not self._stop.is_set():
            with self._device_lock:
                if not self._online and not self._reopen_once():
                    continue
                try:
                    frame = self._next_frame(timeout_s)
                except EndOfStreamError:
                    self._ended = True
                    with self._state:
                        self._state.notify_all()
                    return
                except Exception as exc:  # noqa: BLE001 - see below
                    # A backend that raises something other than CameraError (a driver bug, an
                    # SDK exception we did not translate) must not kill the reader silently and
                    # leave the node publishing nothing: treat it as a failed read and reopen.
                    if self._stop.is_set():
                        return
                    err = exc if isinstance(exc, CameraError) else CameraError(
                        f'{self}: unexpected {type(exc).__name__}: {exc}')
                    if err is not exc:
                        _LOG.exception('%s: unexpected error in the reader', self)
                    self._record_read_error(err)
                    _LOG.warning('%s: read failed (%s); reopening the device', self, err)
                    self._online = False
                    self._close()
                    with self._state:
                        self._state.notify_all()
                    self._failures = 0
                    continue
            self._publish(frame)

    def _reopen_once(self) -> bool:
        """One reconnect attempt after the backoff wait; False when it failed or was stopped."""
        self._failures += 1
        if self._stop.wait(self.retry.delay(self._failures)):
            return False
        try:
            self._try_open()
        except CameraError as err:
            _LOG.info('%s: reconnect attempt %d failed: %s', self, self._failures, err)
            return False
        self._failures = 0
        with self._state:
            self._stats.reconnects += 1
        _LOG.info('%s: reconnected', self)
        return True


def connect_with_retry(camera: Camera, policy: RetryPolicy | None = None, *,
                       stop: threading.Event | None = None,
                       on_failure: Callable[[int, CameraError], None] | None = None) -> int:
    """Call ``camera.connect()`` until it succeeds, waiting with backoff between attempts.

    Args:
        camera: the camera to connect.
        policy: backoff and attempt limit; defaults to ``camera.retry``.
        stop: set it to give up early (for example on node shutdown).
        on_failure: called with (attempt number, error) after each failed attempt (logging).

    Returns:
        The number of attempts it took.

    Raises:
        CameraError: the last error once ``policy.max_attempts`` attempts failed, or
            DeviceNotConnectedError when ``stop`` was set first.
    """
    policy = policy or camera.retry
    attempt = 0
    delays = policy.delays()
    while True:
        attempt += 1
        try:
            camera.connect()
            return attempt
        except CameraError as err:
            if on_failure is not None:
                on_failure(attempt, err)
            _LOG.info('%s: connect attempt %d failed: %s', camera, attempt, err)
            wait = next(delays, None)
            if wait is None:
                raise
            if stop is not None:
                if stop.wait(wait):
                    raise DeviceNotConnectedError(
                        f'{camera}: gave up connecting after {attempt} attempt(s): stopped '
                        f'(last error: {err})') from err
            else:
                time.sleep(wait)
