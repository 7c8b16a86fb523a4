"""device_node: the on-device MLLM answers questions about the latest camera frame.

Topics (relative names: namespaces and remapping apply):
    in  image (sensor_msgs/Image, sensor-data QoS): the camera; remap to any image topic
    in  question (cdcca_ros/Question)             out answer (cdcca_ros/Answer)
    in  dwc_delta (cdcca_ros/DwcDelta)            out model_version (std_msgs/String, latched)
    out annotated_image (sensor_msgs/Image)       out adaptation_status (AdaptationStatus)
    out /diagnostics
Services: ask (cdcca_ros/Ask), rollback (cdcca_ros/Rollback).

The image callback only stores the latest frame. Questions on the topic are answered in a
worker thread; the ``ask`` service answers in its own callback. What follows an answer
(publishing ``answer``, drawing and publishing ``annotated_image``, giving the sample to UTS)
goes through one queue, in answer order and without dropping any; after a service answer on a
one-thread executor it is left to a task of that executor, so the response goes out first and
no other thread competes for the GIL while it is sent. UTS runs in the same process
(``uts.enabled``, see :mod:`cdcca_ros.nodes.uts_node`) because stage 2 needs the device model
itself.

The process spins on the executor named by the ``executor`` parameter (see
:class:`cdcca_ros.nodes.common.NodeSpinner`): ``events`` (default) has the shortest service
round trip but one thread, so callbacks that arrive while ``ask`` computes wait until it returns
(none of them computes: they store a frame or queue work, and catch up at once);
``multi_threaded`` runs ``ask`` in its own callback group beside them.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from cdcca_ros.camera.convert import annotate, image_to_msg, msg_to_rgb
from cdcca_ros.core.device_runtime import AnsweredSample, DeviceRuntime
from cdcca_ros.errors import CdccaError, DeltaRejectedError, PromptTooLongError
from cdcca_ros.msg import AdaptationStatus, Answer, DwcDelta, Question
from cdcca_ros.nodes.common import (
    DELTA_QOS,
    ERROR,
    LATCHED_QOS,
    OK,
    RELIABLE_QOS,
    SENSOR_QOS,
    WARN,
    Diagnostics,
    NodeSpinner,
    declare_table,
    runs_one_callback_at_a_time,
    use_dds_profile,
)
from cdcca_ros.nodes.delta_msgs import DeltaReassembler
from cdcca_ros.srv import Ask, Rollback

SampleListener = Callable[[AnsweredSample, Header, np.ndarray], None]


class _Answered(NamedTuple):
    """What :meth:`DeviceNode.answer` leaves to be published after it returns."""

    msg: Answer
    header: Header
    rgb: np.ndarray
    sample: AnsweredSample
    question: str
    uplink: bool


def frame_rgb(msg: Image) -> np.ndarray:
    """The RGB array of an image message: a read-only view of its buffer when packed rgb8.

    The model only reads the frame, so the usual camera case skips the 0.9 MB copy that
    :func:`msg_to_rgb` makes for a 640x480 frame; every other message (other encodings, row
    padding, a size that does not add up) goes through :func:`msg_to_rgb`, which validates and
    converts it or raises :class:`~cdcca_ros.errors.ImageConversionError`.
    """
    if (msg.encoding == 'rgb8' and msg.height > 0 and msg.width > 0
            and msg.step == msg.width * 3 and len(msg.data) == msg.step * msg.height):
        view = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.width, 3)
        view.flags.writeable = False  # a view of the message: nobody may draw on it
        return view
    return msg_to_rgb(msg)


def build_runtime(params: dict[str, Any]) -> DeviceRuntime:
    """Load the model and the trust store (pinned cloud key or root + key lists) named by the
    node's parameters."""
    from cdcca_ros.core.trust import load_trust
    from cdcca_ros.models import bundled

    state_dir = params['state_dir'] or str(Path.home() / '.cdcca' / params['device_id'])
    trust = load_trust(root_key=params['trust_root'], pinned_key=params['cloud_public_key'],
                       key_list=params['key_list'], state_dir=state_dir,
                       max_clock_skew_s=params['max_clock_skew_s'])
    model = bundled.load(params['model'], None if params['quantization'] == 'none'
                         else params['quantization'], params['torch_device'])
    return DeviceRuntime(model, params['device_id'], trust, state_dir,
                         probe_question=params['probe_question'],
                         max_new_tokens=params['max_new_tokens'],
                         trace_probe=params['probe_trace'],
                         shadow_probe=params['probe_shadow'],
                         max_probe_tv=(params['max_probe_tv'] if params['max_probe_tv'] < 1.0
                                       else None),
                         max_update_ratio=params['max_update_ratio'] or None)


class DeviceNode(Node):
    """Thin ROS adapter over :class:`DeviceRuntime`."""

    def __init__(self, runtime: DeviceRuntime | None = None, **kwargs: Any) -> None:
        super().__init__('device_node', **kwargs)
        self.params = declare_table(self, 'device_node')
        self.runtime: DeviceRuntime | None = runtime
        self.listeners: list[SampleListener] = []
        self._latest: Image | None = None
        self._latest_lock = threading.Lock()
        self._questions: queue.Queue[Question] = queue.Queue(maxsize=100)
        self._deltas: queue.Queue[Any] = queue.Queue(maxsize=4)
        # Unbounded: every answer is published; answers are far slower than publishing them.
        self._answered: queue.SimpleQueue[_Answered] = queue.SimpleQueue()
        self._publish_lock = threading.Lock()  # one drainer at a time keeps answer order
        max_delta = self.params['max_delta_bytes']
        self._reassembler = DeltaReassembler(max_delta, max_pending_bytes=2 * max_delta)
        self.counters = {'answers': 0, 'rejected_images': 0, 'questions_dropped': 0,
                         'questions_refused': 0, 'deltas_applied': 0, 'deltas_rejected': 0,
                         'deltas_other_device': 0, 'errors': 0}
        self._last_error = ''
        self._load_failed = False
        self._queue_max = {'question': 0, 'delta': 0}  # longest each queue got (diagnostics)
        self._stop = threading.Event()

        self._answer_pub = self.create_publisher(Answer, 'answer', RELIABLE_QOS)
        self._annotated_pub = self.create_publisher(Image, 'annotated_image', SENSOR_QOS)
        self._version_pub = self.create_publisher(String, 'model_version', LATCHED_QOS)
        self._status_pub = self.create_publisher(AdaptationStatus, 'adaptation_status',
                                                 RELIABLE_QOS)
        self._diag = Diagnostics(self, hardware_id=self.params['device_id'])
        self.create_subscription(Image, 'image', self._on_image, SENSOR_QOS)
        self.create_subscription(Question, 'question', self._on_question, RELIABLE_QOS)
        self.create_subscription(DwcDelta, 'dwc_delta', self._on_delta, DELTA_QOS)
        # The service waits for the model: its own group, so on the multi-threaded executor
        # images keep flowing meanwhile.
        self.create_service(Ask, 'ask', self._on_ask,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_service(Rollback, 'rollback', self._on_rollback,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._report)

        self._threads = [threading.Thread(target=self._question_worker, daemon=True),
                         threading.Thread(target=self._delta_worker, daemon=True)]
        if self.runtime is None:
            self._threads.append(threading.Thread(target=self._load, daemon=True))
        else:
            self._publish_version()
        for t in self._threads:
            t.start()

    # ---------------------------------------------------------------- model
    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            self.runtime = build_runtime(self.params)
            self.get_logger().info(f'model {self.params["model"]} ready in '
                                   f'{time.perf_counter() - t0:.1f} s, version '
                                   f'{self.runtime.version}')
            self._publish_version()
        except (CdccaError, OSError, ValueError) as err:
            self._last_error = f'model load failed: {err}'
            self._load_failed = True
            self.get_logger().error(self._last_error)

    def _publish_version(self) -> None:
        rt = self.runtime
        self._version_pub.publish(String(data=f'{rt.device_id}:v{rt.version}:{rt.base_hash[:16]}'))

    # ---------------------------------------------------------------- answering
    def _on_image(self, msg: Image) -> None:
        with self._latest_lock:
            self._latest = msg

    def _on_question(self, msg: Question) -> None:
        try:
            self._questions.put_nowait(msg)
            self._queue_max['question'] = max(self._queue_max['question'],
                                              self._questions.qsize())
        except queue.Full:
            self.counters['questions_dropped'] += 1
            self.get_logger().warning('question queue full: dropped a question')

    def _question_worker(self) -> None:
        while not self._stop.is_set():
            try:
                q = self._questions.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                _, error = self.answer(q.question_id, q.question, list(q.choices),
                                       q.image if q.use_image else None)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any question
                error = self._unexpected('question', err)
            if error:
                self.get_logger().warning(f'question {q.question_id[:64]!r} not answered: '
                                          f'{error}')

    def _unexpected(self, where: str, err: BaseException) -> str:
        """Count and log an error no check foresaw (the node keeps serving)."""
        self.counters['errors'] += 1
        self._last_error = f'{where} failed unexpectedly: {type(err).__name__}: {err}'[:500]
        self.get_logger().error(self._last_error)
        return self._last_error

    def answer(self, question_id: str, question: str, choices: list[str],
               image: Image | None, uplink: bool = True, *,
               publish_later: bool = False) -> tuple[Answer | None, str]:
        """Answer about ``image`` or the latest frame; returns the Answer (or None and why).

        The Answer is published, the annotated image drawn and published and the sample given
        to the listeners (UTS; when ``uplink``) in answer order: before this returns, or with
        ``publish_later`` in a task of the node's executor when that runs one callback at a
        time (the task then runs after the calling callback has returned). A multi-threaded
        executor would run the task beside the caller at once, so there it is done here too.
        """
        if self.runtime is None:
            return None, 'model not ready'
        if image is None:
            with self._latest_lock:
                image = self._latest
            if image is None:
                return None, 'no camera frame received yet'
            age_ms = (self.get_clock().now().nanoseconds
                      - (image.header.stamp.sec * 10**9 + image.header.stamp.nanosec)) / 1e6
            if age_ms > self.params['frame_max_age_ms']:
                return None, f'latest frame is {age_ms:.0f} ms old'
        try:
            rgb = frame_rgb(image)
        except CdccaError as err:
            self.counters['rejected_images'] += 1
            self._last_error = f'image rejected: {err}'
            self.get_logger().error(self._last_error)
            return None, self._last_error
        try:
            sample = self.runtime.answer(rgb, question, choices)
        except PromptTooLongError as err:
            self.counters['questions_refused'] += 1
            self._last_error = f'question refused: {err}'
            self.get_logger().error(self._last_error)
            return None, self._last_error
        except (CdccaError, RuntimeError, ValueError) as err:
            self.counters['errors'] += 1
            self._last_error = f'answer failed: {err}'
            self.get_logger().error(self._last_error)
            return None, self._last_error
        msg = Answer(header=Header(frame_id=image.header.frame_id),
                     question_id=question_id or uuid.uuid4().hex[:12], question=question,
                     answer=sample.text, choice_index=sample.choice_index,
                     confidence=sample.confidence, entropy_mean=sample.entropy_mean,
                     entropy_max=sample.entropy_max,
                     model_version=f'{self.runtime.device_id}:v{sample.version}',
                     latency_ms=sample.latency_ms)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.image_stamp = image.header.stamp
        self.counters['answers'] += 1
        self._answered.put(_Answered(msg, image.header, rgb, sample, question, uplink))
        executor = self.executor
        if publish_later and runs_one_callback_at_a_time(executor):
            executor.create_task(self._drain_answered)
        else:
            self._drain_answered()
        return msg, ''

    def _drain_answered(self) -> None:
        """Publish what the queued answers produced, oldest first."""
        with self._publish_lock:
            while True:
                try:
                    done = self._answered.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._publish_answered(done)
                except (CdccaError, RuntimeError, ValueError) as err:
                    self.counters['errors'] += 1
                    self._last_error = (f'publishing answer {done.msg.question_id!r} failed: '
                                        f'{err}')
                    self.get_logger().error(self._last_error)

    def _publish_answered(self, done: _Answered) -> None:
        self._answer_pub.publish(done.msg)
        sample = done.sample
        if self.params['annotate'] and self._annotated_pub.get_subscription_count():
            lines = [f'Q: {done.question}', f'A: {sample.text} ({sample.confidence:.2f})',
                     f'H={sample.entropy_mean:.2f} v{sample.version}']
            self._annotated_pub.publish(image_to_msg(annotate(done.rgb, lines), 'rgb8', Image,
                                                     header=done.header))
        if done.uplink:
            for listener in self.listeners:
                listener(sample, done.header, done.rgb)

    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        try:
            answer, error = self.answer(request.question_id, request.question,
                                        list(request.choices),
                                        request.image if request.use_image else None,
                                        uplink=not request.no_uplink, publish_later=True)
        except Exception as err:  # noqa: BLE001 - a service callback must never kill the node
            answer, error = None, self._unexpected('ask', err)
        response.success = answer is not None
        response.message = error
        if answer is not None:
            response.answer = answer
        return response

    # ---------------------------------------------------------------- updates
    def _on_delta(self, msg: DwcDelta) -> None:
        if msg.device_id != self.params['device_id']:
            # Addressed to another device sharing this graph.
            self.counters['deltas_other_device'] += 1
            return
        self._reassembler.expire()
        try:
            envelope = self._reassembler.add(msg)
        except CdccaError as err:
            self._reject(f'delta chunk rejected: {err}', msg.round)
            return
        if envelope is not None:
            try:
                self._deltas.put_nowait(envelope)
                self._queue_max['delta'] = max(self._queue_max['delta'], self._deltas.qsize())
            except queue.Full:
                self._reject('delta queue full: delta dropped', msg.round)

    def _delta_worker(self) -> None:
        while not self._stop.is_set():
            try:
                envelope = self._deltas.get(timeout=0.2)
            except queue.Empty:
                continue
            while self.runtime is None and not self._load_failed and not self._stop.is_set():
                self._stop.wait(0.2)  # a delta that arrives while the model loads waits
            if self.runtime is None:
                self._reject('delta arrived but the model failed to load', envelope.round)
                continue
            try:
                report = self.runtime.apply(envelope)
            except DeltaRejectedError as err:
                self._reject(f'delta rejected: {err}', envelope.round)
                continue
            except Exception as err:  # noqa: BLE001 - the worker must outlive any delta
                self._reject(self._unexpected('delta apply', err), envelope.round)
                continue
            self.counters['deltas_applied'] += 1
            self.get_logger().info(
                f'applied round {report.round}: v{report.old_version} -> v{report.new_version}, '
                f'{report.payload_bytes} B ({report.bits_per_param:.2f} bit/param), '
                f'{report.apply_ms:.1f} ms (lock held {report.swap_ms:.1f} ms)')
            self._publish_version()
            self._status(AdaptationStatus.STATE_APPLIED, report.round, 'ok',
                         downlink_bytes=report.payload_bytes,
                         bits_per_param=report.bits_per_param, apply_ms=report.apply_ms)

    def _reject(self, why: str, round_: int) -> None:
        self.counters['deltas_rejected'] += 1
        self._last_error = why
        self.get_logger().error(why)
        self._status(AdaptationStatus.STATE_REJECTED, round_, why)

    def _status(self, state: str, round_: int, message: str, **fields: Any) -> None:
        msg = AdaptationStatus(device_id=self.params['device_id'], node='device', round=round_,
                               state=state, message=message[:500],
                               model_version=(f'v{self.runtime.version}' if self.runtime
                                              else ''),
                               accuracy_before=float('nan'), accuracy_after=float('nan'),
                               **fields)
        msg.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(msg)

    def _on_rollback(self, request: Rollback.Request,
                     response: Rollback.Response) -> Rollback.Response:
        if self.runtime is None:
            response.success, response.message = False, 'model not ready'
            return response
        try:
            version = self.runtime.rollback()
        except CdccaError as err:
            response.success, response.message = False, str(err)
        else:
            response.success, response.message = True, f'restored as v{version}'
            self._publish_version()
            self._status(AdaptationStatus.STATE_ROLLED_BACK, self.runtime.round,
                         response.message)
        response.model_version = f'v{self.runtime.version}'
        return response

    # ---------------------------------------------------------------- health
    def _report(self) -> None:
        values: dict[str, Any] = dict(self.counters)
        values['last_error'] = self._last_error
        values.update(self._reassembler.status())
        for name, q in (('question', self._questions), ('delta', self._deltas)):
            values[f'{name}_queue'], values[f'{name}_queue_max'] = q.qsize(), self._queue_max[name]
            values[f'{name}_queue_bound'] = q.maxsize
        with self._latest_lock:
            values['have_frame'] = self._latest is not None
        if self.runtime is None:
            level, text = (ERROR, 'model failed to load') if self._last_error else (
                WARN, 'loading model')
        else:
            values.update(self.runtime.status())
            level, text = (OK, 'ready') if not self._last_error else (WARN, 'ready, see '
                                                                            'last_error')
        self._diag.publish(level, text, values)

    def destroy_node(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        self._drain_answered()  # whatever the executor had not published yet
        super().destroy_node()


def spin_device(args: list[str] | None, with_uts: bool) -> None:
    """Run device_node (and the in-process UTS node) on the executor its parameter names."""
    use_dds_profile()
    try:
        with rclpy.init(args=args):
            device = DeviceNode()
            nodes: list[Node] = [device]
            if with_uts and device.params['uts.enabled']:
                from cdcca_ros.nodes.uts_node import UtsNode
                nodes.append(UtsNode(device))
            spinner = NodeSpinner(nodes, device.params['executor'], num_threads=4)
            if spinner.kind != device.params['executor']:
                device.get_logger().warning(
                    f'executor {device.params["executor"]!r} is not available in this rclpy: '
                    f'spinning on {spinner.kind!r}')
            try:
                spinner.spin()
            finally:
                for n in reversed(nodes):
                    n.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def main(args: list[str] | None = None) -> None:
    spin_device(args, with_uts=True)


if __name__ == '__main__':
    main()
