"""device_node: the on-device MLLM answers questions about the latest camera frame.

Topics (relative names: namespaces and remapping apply):
    in  image (sensor_msgs/Image, sensor-data QoS): the camera; remap to any image topic
    in  question (cdcca_ros/Question)             out answer (cdcca_ros/Answer)
                                                  out caption (cdcca_ros/Answer)
    in  dwc_delta (cdcca_ros/DwcDelta)            out model_version (std_msgs/String, latched)
    in  rollback_order (cdcca_ros/RollbackOrder, reliable + transient local)
    out annotated_image (sensor_msgs/Image)       out adaptation_status (AdaptationStatus)
    out /diagnostics
Services: ask (cdcca_ros/Ask), rollback (cdcca_ros/Rollback).
Actions: ask (cdcca_ros/action/Ask): the answer streamed token by token as feedback, cancelable
within one token (:mod:`cdcca_ros.nodes.ask_action`).

The image callback only stores the latest frame. Questions on the topic are answered in a
worker thread; the ``ask`` service answers in its own callback. What follows an answer
(publishing ``answer``, drawing and publishing ``annotated_image``, giving the sample to UTS)
goes through one queue, in answer order and without dropping any; after a service answer on a
one-thread executor it is left to a task of that executor, so the response goes out first and
no other thread competes for the GIL while it is sent. UTS runs in the same process
(``uts.enabled``, see :mod:`cdcca_ros.nodes.uts_node`) because stage 2 needs the device model
itself.

Captions: a question :func:`~cdcca_ros.core.captions.describe.is_describe` matches
(``describe``, on the topic, the service or the action) is answered with a caption of the frame
by the model's caption head (:meth:`DeviceRuntime.caption`: the coverage routes it as an
answer; entropy Eq. 2 over every step of the caption); with ``caption_rate_hz`` > 0 the node
also captions the latest frame at that rate and publishes it on ``caption`` (a timer queues
the work for the question worker; one pending at a time, a tick that finds one is skipped).
Both are offered to UTS like answers while ``uts.captions`` is on (default): UTS selects a
caption on its whole-sequence entropy against a threshold of its own
(``uts.caption_entropy_threshold``), and a selected one goes up with its ``describe`` question,
which is how the cloud tells it from an answer. The cloud's caption rounds train on them
(:mod:`cdcca_ros.core.captions.round`) and ship an ordinary delta of the adapter, which is
verified and applied here like any other.

Rollbacks: a signed ``rollback_order`` from the cloud's live audit is verified and carried out
by :meth:`DeviceRuntime.apply_rollback` in the delta worker (one change of the model at a time);
the device's own entropy guard (``guard.entropy_*``) may roll an update back after an answer.
Both are reported on ``adaptation_status`` as ``rolled_back`` with the restored adapter's hash
in ``model_hash`` and the reason (the cloud learns of them through the bridges); a forged,
replayed or stale order is ``rejected``, counted, and changes nothing.

The process spins on the executor named by the ``executor`` parameter (see
:class:`cdcca_ros.nodes.common.NodeSpinner`): ``events`` (default) has the shortest service
round trip but one thread, so callbacks that arrive while ``ask`` computes wait until it returns
(none of them computes: they store a frame or queue work, and catch up at once);
``multi_threaded`` runs ``ask`` in its own callback group beside them.

A model that cannot load (a wrong path, a CUDA device this torch lacks) is one FATAL line and a
non-zero exit, so the runner or launch stops the set instead of a node answering "model not
ready" forever. Questions on the topic are read with a keep-all reliable subscription: a flood
is never dropped silently by DDS, it reaches the bounded question queue, where what does not fit
is counted (``questions_dropped``), as are questions it could not answer
(``questions_unanswered``, the reason in the log) and losses the middleware reports
(``questions_lost``). Runtime parameters (``ros2 param set``): ``max_new_tokens``,
``frame_max_age_ms``, ``annotate``, ``caption_rate_hz`` and the ``uts.*`` selection settings
(``uts.captions`` and ``uts.caption_entropy_threshold`` included); the rest is read-only.
"""
from __future__ import annotations

import gc
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from cdcca_ros.camera.convert import annotate, image_to_msg, msg_to_rgb
from cdcca_ros.core.captions.describe import DESCRIBE
from cdcca_ros.core.coverage import CoverageConfig, anchor_tokens_of
from cdcca_ros.core.device.answers import AnsweredSample
from cdcca_ros.core.device_runtime import DeviceRuntime
from cdcca_ros.core.entropy_guard import EntropyGuardConfig
from cdcca_ros.core.updates import RollbackEnvelope
from cdcca_ros.errors import (
    CdccaError,
    DeltaRejectedError,
    GenerationCancelled,
    ModelLoadError,
    PromptTooLongError,
)
from cdcca_ros.models.base import StepCallback
from cdcca_ros.msg import AdaptationStatus, Answer, DwcDelta, Question, RollbackOrder
from cdcca_ros.nodes.ask_action import AskActionServer
from cdcca_ros.nodes.common import (
    ANSWER_QOS,
    DELTA_QOS,
    ERROR,
    LATCHED_QOS,
    OK,
    RELIABLE_QOS,
    SENSOR_QOS,
    WARN,
    Diagnostics,
    LastError,
    NodeSpinner,
    declare_table,
    destroy_on_error,
    runs_one_callback_at_a_time,
    version_label,
)
from cdcca_ros.nodes.delta_msgs import DeltaReassembler
from cdcca_ros.nodes.guard_msgs import detail_json, msg_to_rollback
from cdcca_ros.nodes.lifecycle import ManagedNode
from cdcca_ros.nodes.process import exit_code, failed, one_line, route_logging, run_node
from cdcca_ros.srv import Ask, Rollback

SampleListener = Callable[[AnsweredSample, Header, np.ndarray], None]

# Questions: reliable and keep-all, so DDS never overwrites one the node has not taken yet; the
# node's own bounded queue is where a flood is cut, and counted.
QUESTION_QOS = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                          history=QoSHistoryPolicy.KEEP_ALL)


_CAPTION_TICK = object()  # queued by the caption timer: caption the latest frame


class _Answered(NamedTuple):
    """What :meth:`DeviceNode.answer` leaves to be published after it returns."""

    msg: Answer
    header: Header
    rgb: np.ndarray
    sample: AnsweredSample
    question: str
    uplink: bool
    caption_topic: bool = False  # published on `caption` instead of `answer`


def frame_rgb(msg: Image) -> np.ndarray:
    """The RGB array of an image message: a read-only view of its buffer when packed rgb8.

    The model only reads the frame, so the usual camera case skips the 0.9 MB copy that
    :func:`msg_to_rgb` makes for a 640x480 frame; every other message (other encodings, row
    padding, a size that does not add up) goes through :func:`msg_to_rgb`, which validates and
    converts it or raises :class:`~cdcca_ros.errors.ImageConversionError`.
    """
    if (msg.encoding == 'rgb8' and msg.height > 0 and msg.width > 0
            and msg.is_bigendian in (0, 1)  # the converter's check, on the fast path too
            and msg.step == msg.width * 3 and len(msg.data) == msg.step * msg.height):
        view = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.width, 3)
        view.flags.writeable = False  # a view of the message: nobody may draw on it
        return view
    return msg_to_rgb(msg)


def entropy_guard_config(params: dict[str, Any]) -> EntropyGuardConfig | None:
    """The device's local entropy guard from ``guard.*``; None when it is off."""
    return EntropyGuardConfig.from_params(params)


def build_runtime(params: dict[str, Any]) -> DeviceRuntime:
    """Load the model and the trust store (pinned cloud key or root + key lists) named by the
    node's parameters."""
    from cdcca_ros.core.trust import load_trust
    from cdcca_ros.models import bundled

    state_dir = params['state_dir'] or str(Path.home() / '.cdcca' / params['device_id'])
    trust = load_trust(root_key=params['trust_root'], pinned_key=params['cloud_public_key'],
                       key_list=params['key_list'], state_dir=state_dir,
                       max_clock_skew_s=params['max_clock_skew_s'])
    from cdcca_ros.models.caption_head import has_head, load_head

    model = bundled.load(params['model'], None if params['quantization'] == 'none'
                         else params['quantization'], params['torch_device'])
    model_dir = bundled.resolve(params['model'])
    head = load_head(model_dir) if has_head(model_dir) else None
    return DeviceRuntime(model, params['device_id'], trust, state_dir,
                         probe_question=params['probe_question'],
                         max_new_tokens=params['max_new_tokens'],
                         trace_probe=params['probe_trace'],
                         shadow_probe=params['probe_shadow'],
                         entropy_guard=entropy_guard_config(params),
                         coverage=CoverageConfig.from_params(params),
                         anchor_tokens=anchor_tokens_of(model_dir), caption_head=head,
                         max_probe_tv=(params['max_probe_tv'] if params['max_probe_tv'] < 1.0
                                       else None),
                         max_update_ratio=params['max_update_ratio'] or None)


class DeviceNode(ManagedNode):
    """Thin ROS adapter over :class:`DeviceRuntime`; a managed (lifecycle) node.

    Lifecycle (:mod:`cdcca_ros.nodes.lifecycle`): configure checks the torch device and loads
    the model (or takes ``runtime``, given by a test or a benchmark), activate starts
    answering (topic, service, action), deactivate stops answering and keeps the model (model
    updates and rollbacks still apply), cleanup unloads it, shutdown persists the adapter in
    use and unloads. ``autostart`` (default) runs configure and activate at start.
    """

    @destroy_on_error
    def __init__(self, runtime: DeviceRuntime | None = None, **kwargs: Any) -> None:
        super().__init__('device_node', **kwargs)
        self.params = declare_table(self, 'device_node', on_change=self._on_param)
        self.fatal_error: str | None = None
        if not self.params['cloud_public_key']:
            self.get_logger().warning(
                'cloud_public_key is empty: every model update from the cloud will be refused '
                '(give the cloud\'s cloud_public.pem to receive updates)')
        self._given_runtime = runtime
        self.runtime: DeviceRuntime | None = None  # set by configure, cleared by cleanup
        self._active = threading.Event()  # set by activate: answering
        self.listeners: list[SampleListener] = []
        #: Called with the runtime after configure and with None after cleanup / shutdown.
        self.runtime_listeners: list[Callable[[DeviceRuntime | None], None]] = []
        #: Called with the accepted ``uts.*`` changes of a parameter set (before it applies).
        self.param_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._latest: Image | None = None
        self._latest_lock = threading.Lock()
        self._questions: queue.Queue[Any] = queue.Queue(maxsize=100)  # Question or a tick
        self._deltas: queue.Queue[Any] = queue.Queue(maxsize=4)
        # Unbounded: every answer is published; answers are far slower than publishing them.
        self._answered: queue.SimpleQueue[_Answered] = queue.SimpleQueue()
        self._publish_lock = threading.Lock()  # one drainer at a time keeps answer order
        max_delta = self.params['max_delta_bytes']
        self._reassembler = DeltaReassembler(max_delta, max_pending_bytes=2 * max_delta)
        self.counters = {'answers': 0, 'rejected_images': 0, 'questions': 0,
                         'questions_dropped': 0, 'questions_unanswered': 0,
                         'questions_lost': 0, 'questions_refused': 0,
                         'deltas_applied': 0, 'deltas_rejected': 0, 'deltas_other_device': 0,
                         'errors': 0, 'rollback_orders': 0, 'rollbacks_applied': 0,
                         'rollbacks_rejected': 0, 'local_rollbacks': 0}
        self._local_seen = 0  # runtime.local_rollbacks reported so far
        self._local_lock = threading.Lock()
        self.errors = LastError()
        self._queue_max = {'question': 0, 'delta': 0}  # longest each queue got (diagnostics)
        self._stop = threading.Event()

        self._answer_pub = self.create_publisher(Answer, 'answer', ANSWER_QOS)
        self._caption_pub = self.create_publisher(Answer, 'caption', ANSWER_QOS)
        self._caption_timer: Any = None
        self._caption_pending = threading.Event()  # a periodic caption is queued
        self.counters['captions'] = 0
        self.counters['captions_skipped'] = 0
        self._annotated_pub = self.create_publisher(Image, 'annotated_image', SENSOR_QOS)
        self._version_pub = self.create_publisher(String, 'model_version', LATCHED_QOS)
        self._status_pub = self.create_publisher(AdaptationStatus, 'adaptation_status',
                                                 RELIABLE_QOS)
        self._diag = Diagnostics(self, hardware_id=self.params['device_id'])
        self.create_subscription(Image, 'image', self._on_image, SENSOR_QOS)
        self.create_subscription(
            Question, 'question', self._on_question, QUESTION_QOS,
            event_callbacks=SubscriptionEventCallbacks(message_lost=self._on_questions_lost))
        self.create_subscription(DwcDelta, 'dwc_delta', self._on_delta, DELTA_QOS)
        self.create_subscription(RollbackOrder, 'rollback_order', self._on_rollback_order,
                                 DELTA_QOS)
        # The service waits for the model: its own group, so on the multi-threaded executor
        # images keep flowing meanwhile.
        self.create_service(Ask, 'ask', self._on_ask,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_service(Rollback, 'rollback', self._on_rollback,
                            callback_group=MutuallyExclusiveCallbackGroup())
        # The same question as an action: the answer streamed token by token, cancelable.
        self._ask_action = AskActionServer(self)
        self.create_timer(1.0, self._report)
        self._set_caption_rate(self.params['caption_rate_hz'])

        self._threads = [threading.Thread(target=self._question_worker, daemon=True),
                         threading.Thread(target=self._delta_worker, daemon=True)]
        for t in self._threads:
            t.start()
        if self.params['autostart']:
            # A model to load: in a thread, so the node serves its services meanwhile.
            self.autostart(in_thread=runtime is None, stopping=self._stop.is_set)

    # ---------------------------------------------------------------- model
    @property
    def ready(self) -> bool:
        return self.runtime is not None

    # ---------------------------------------------------------------- lifecycle
    def _configure(self) -> None:
        """Check the torch device and load the model (or take the one given)."""
        runtime = self._given_runtime
        if runtime is None:
            from cdcca_ros.models.registry import check_torch_device

            check_torch_device(self.params['torch_device'])
            t0 = time.perf_counter()
            try:
                runtime = build_runtime(self.params)
            except Exception as err:  # noqa: BLE001 - whatever stops the load, it is refused
                raise ModelLoadError(f'model {self.params["model"]!r} cannot be loaded on '
                                     f'{self.params["torch_device"]!r}: {one_line(err)}'
                                     ) from err
            if self._stop.is_set():
                raise ModelLoadError('stopped while loading')  # nothing to publish on
            self.get_logger().info(f'model {self.params["model"]} ready in '
                                   f'{time.perf_counter() - t0:.1f} s, version '
                                   f'{version_label(runtime.device_id, runtime.version)}')
        runtime.max_new_tokens = self.params['max_new_tokens']  # set meanwhile, maybe
        self.runtime = runtime
        for listener in list(self.runtime_listeners):
            listener(runtime)
        self._publish_version()

    def _activate(self) -> None:
        self._active.set()

    def _deactivate(self) -> None:
        self._active.clear()  # an answer in progress completes

    def _unload(self) -> None:
        runtime, self.runtime = self.runtime, None
        self._active.clear()
        for listener in list(self.runtime_listeners):
            listener(None)
        if runtime is not None:
            with runtime.lock:  # the answer in progress, if any, ends first
                pass
            if not runtime.flush(timeout=30.0):
                raise CdccaError(f'the adapter in use (v{runtime.version}) could not be '
                                 'persisted within 30 s')
        gc.collect()

    def _cleanup(self) -> None:
        self._unload()

    def _shutdown(self) -> None:
        self._unload()  # the adapter in use is on disk before this returns

    def accepting_questions(self) -> bool:
        """Whether questions are answered now (configured and active)."""
        return self._active.is_set() and self.runtime is not None

    def _publish_version(self) -> None:
        rt = self.runtime
        if rt is None:
            return
        self._version_pub.publish(String(data=version_label(rt.device_id, rt.version)))

    def _on_param(self, changes: dict[str, Any]) -> None:
        """Apply runtime parameter changes (checked against the table already)."""
        uts = {k: v for k, v in changes.items() if k.startswith('uts.')}
        for listener in list(self.param_listeners) if uts else ():
            listener(uts)  # UTS checks and applies its own (ConfigError refuses the set)
        if 'max_new_tokens' in changes and self.runtime is not None:
            self.runtime.max_new_tokens = changes['max_new_tokens']
        if 'caption_rate_hz' in changes:
            self._set_caption_rate(changes['caption_rate_hz'])
        # frame_max_age_ms and annotate are read from self.params at each use.

    # ---------------------------------------------------------------- answering
    def _on_image(self, msg: Image) -> None:
        with self._latest_lock:
            self._latest = msg

    def _on_question(self, msg: Question) -> None:
        self.counters['questions'] += 1
        try:
            self._questions.put_nowait(msg)
            self._queue_max['question'] = max(self._queue_max['question'],
                                              self._questions.qsize())
        except queue.Full:
            self.counters['questions_dropped'] += 1
            self.get_logger().warning('question queue full: dropping questions',
                                      throttle_duration_sec=5.0)

    def _set_caption_rate(self, rate_hz: float) -> None:
        """(Re)start the periodic caption timer at ``rate_hz`` (0: stop it)."""
        if self._caption_timer is not None:
            self.destroy_timer(self._caption_timer)
            self._caption_timer = None
        if rate_hz > 0:
            self._caption_timer = self.create_timer(1.0 / rate_hz, self._on_caption_tick)

    def _on_caption_tick(self) -> None:
        """Queue a caption of the latest frame for the worker (never computed here)."""
        if self._caption_pending.is_set():
            self.counters['captions_skipped'] += 1
            return
        try:
            self._questions.put_nowait(_CAPTION_TICK)
            self._caption_pending.set()
        except queue.Full:
            self.counters['captions_skipped'] += 1

    def _on_questions_lost(self, info: Any) -> None:
        self.counters['questions_lost'] += int(info.total_count_change)

    def _question_worker(self) -> None:
        while not self._stop.is_set():
            try:
                q = self._questions.get(timeout=0.2)
            except queue.Empty:
                continue
            if q is _CAPTION_TICK:
                self._periodic_caption()
                continue
            try:
                _, error = self.answer(q.question_id, q.question, list(q.choices),
                                       q.image if q.use_image else None)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any question
                error = self._unexpected('question', err)
            if error:
                self.counters['questions_unanswered'] += 1
                self.get_logger().warning(f'question {q.question_id!r} not answered: {error}',
                                          throttle_duration_sec=5.0)

    def _periodic_caption(self) -> None:
        """Caption the latest frame onto ``caption`` (the worker's side of a tick)."""
        try:
            _, error = self.answer('', DESCRIBE, [], None, caption_topic=True)
        except Exception as err:  # noqa: BLE001 - the worker must outlive any caption
            error = self._unexpected('caption', err)
        finally:
            self._caption_pending.clear()
        if error:
            self.get_logger().warning(f'no caption: {error}', throttle_duration_sec=5.0)

    def _unexpected(self, where: str, err: BaseException) -> str:
        """Count and log an error no check foresaw (the node keeps serving)."""
        self.counters['errors'] += 1
        text = self.errors.set('unexpected', f'{where} failed unexpectedly: '
                                             f'{type(err).__name__}: {err}'[:500])
        self.get_logger().error(text)
        return text

    def answer(self, question_id: str, question: str, choices: list[str],
               image: Image | None, uplink: bool = True, *,
               publish_later: bool = False, caption_topic: bool = False,
               on_step: StepCallback | None = None) -> tuple[Answer | None, str]:
        """Answer about ``image`` or the latest frame; returns the Answer (or None and why).

        ``on_step`` streams the generation (the ``ask`` action, :mod:`.ask_action`); a
        :class:`~cdcca_ros.errors.GenerationCancelled` it raises ends the answer as
        ``(None, 'canceled ...')``.

        The Answer is published, the annotated image drawn and published and the sample given
        to the listeners (UTS; when ``uplink``) in answer order: before this returns, or with
        ``publish_later`` in a task of the node's executor when that runs one callback at a
        time (the task then runs after the calling callback has returned). A multi-threaded
        executor would run the task beside the caller at once, so there it is done here too.

        A ``describe`` question is captioned (module docstring) and given to UTS like an
        answer when ``uts.captions`` is on; ``caption_topic`` publishes the Answer on
        ``caption`` instead of ``answer``.
        """
        runtime = self.runtime
        if runtime is None:
            return None, f'model not ready (device_node {self.lifecycle_state})'
        if not self._active.is_set():
            return None, 'device_node is inactive: activate it to answer (lifecycle)'
        if not question.strip():
            self.counters['questions_refused'] += 1
            return None, ('empty question: ask about the image, e.g. "what color is the '
                          'circle?" (README: questions the bundled model understands)')
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
            text = self.errors.set('image', f'image rejected: {err}')
            self.get_logger().error(text)
            return None, text
        try:
            sample = runtime.answer(rgb, question, choices, on_step=on_step)
        except GenerationCancelled as err:
            return None, str(err)
        except PromptTooLongError as err:
            self.counters['questions_refused'] += 1
            text = self.errors.set('question', f'question refused: {err}')
            self.get_logger().error(text)
            return None, text
        except (CdccaError, RuntimeError, ValueError) as err:
            self.counters['errors'] += 1
            text = self.errors.set('answer', f'answer failed: {err}')
            self.get_logger().error(text)
            return None, text
        self.errors.clear('image', 'answer')  # a good frame, answered: those errors are over
        if len(runtime.local_rollbacks) > self._local_seen:
            self._report_local_rollbacks(runtime)
        msg = Answer(header=Header(frame_id=image.header.frame_id),
                     question_id=question_id or uuid.uuid4().hex[:12], question=question,
                     answer=sample.text, choice_index=sample.choice_index,
                     confidence=sample.confidence, entropy_mean=sample.entropy_mean,
                     entropy_max=sample.entropy_max,
                     model_version=version_label(runtime.device_id, sample.version),
                     latency_ms=sample.latency_ms)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.image_stamp = image.header.stamp
        self.counters['captions' if caption_topic else 'answers'] += 1
        # A caption is offered to UTS like an answer, unless uts.captions is off.
        offer = uplink and (not sample.caption or self.params['uts.captions'])
        self._answered.put(_Answered(msg, image.header, rgb, sample, question, offer,
                                     caption_topic))
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
                    self.get_logger().error(self.errors.set(
                        'publish', f'publishing answer {done.msg.question_id!r} failed: {err}'))

    def _publish_answered(self, done: _Answered) -> None:
        (self._caption_pub if done.caption_topic else self._answer_pub).publish(done.msg)
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

    def _on_rollback_order(self, msg: RollbackOrder) -> None:
        if msg.device_id != self.params['device_id']:
            return  # addressed to another device sharing this graph
        self.counters['rollback_orders'] += 1
        try:
            order = msg_to_rollback(msg)
        except CdccaError as err:
            self._reject_order(f'rollback order refused: {err}', msg.from_version,
                               msg.new_version, 'undecodable')
            return
        try:
            self._deltas.put_nowait(order)
        except queue.Full:
            self._reject_order('delta queue full: rollback order dropped', msg.from_version,
                               msg.new_version, 'queue_full')

    def _apply_order(self, order: RollbackEnvelope) -> None:
        """Carry out a verified rollback order, or refuse it (model untouched)."""
        rt = self.runtime
        if rt is None:
            self._reject_order('rollback order arrived before the model was ready',
                               order.from_version, order.new_version, 'not_ready')
            return
        try:
            version = rt.apply_rollback(order)
        except DeltaRejectedError as err:
            reason = getattr(err, 'reason', '') or 'rejected'
            self._reject_order(f'rollback order refused: {err}', order.from_version,
                               order.new_version, reason)
            return
        self.counters['rollbacks_applied'] += 1
        self.errors.clear('rollback')
        self.get_logger().warning(f'rolled back v{order.from_version} -> v{version} on the '
                                  f'cloud\'s order: {order.reason}')
        self._publish_version()
        self._status(AdaptationStatus.STATE_ROLLED_BACK, rt.round,
                     f'ordered by the cloud: {order.reason}',
                     model_hash=rt.base_hash,
                     detail=detail_json({'kind': 'ordered', 'from_version': order.from_version,
                                         'from_hash': order.from_hash,
                                         'version': version, 'reason': order.reason}))

    def _reject_order(self, why: str, from_version: int, new_version: int, reason: str) -> None:
        self.counters['rollbacks_rejected'] += 1
        self.get_logger().error(self.errors.set('rollback', why))
        rt = self.runtime
        self._status(AdaptationStatus.STATE_REJECTED, rt.round if rt else 0,
                     why, model_hash=rt.base_hash if rt else '',
                     detail=detail_json({'kind': 'rollback_order', 'reason': reason,
                                         'from_version': int(from_version),
                                         'new_version': int(new_version)}))

    def _report_local_rollbacks(self, runtime: DeviceRuntime) -> None:
        """Publish the entropy guard's rollbacks not reported yet."""
        with self._local_lock:
            events = runtime.local_rollbacks[self._local_seen:]
            self._local_seen += len(events)
        for event in events:
            self.counters['local_rollbacks'] += 1
            self._publish_version()
            self._status(AdaptationStatus.STATE_ROLLED_BACK, runtime.round,
                         f'local entropy guard: {event["reason"]}', model_hash=event['hash'],
                         version=event['version'],
                         detail=detail_json({'kind': 'local', **event}))

    def _delta_worker(self) -> None:
        while not self._stop.is_set():
            try:
                envelope = self._deltas.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(envelope, RollbackEnvelope):
                self._apply_order(envelope)
                continue
            waited = 0.0
            while self.runtime is None and not self._stop.is_set() and waited < 600.0:
                self._stop.wait(0.2)  # a delta that arrives while the model loads waits
                waited += 0.2
            runtime = self.runtime
            if runtime is None:
                self._reject('delta arrived before the model was ready', envelope.round)
                continue
            try:
                report = runtime.apply(envelope)
            except DeltaRejectedError as err:
                self._reject(f'delta rejected: {err}', envelope.round)
                continue
            except Exception as err:  # noqa: BLE001 - the worker must outlive any delta
                self._reject(self._unexpected('delta apply', err), envelope.round)
                continue
            self.counters['deltas_applied'] += 1
            self.errors.clear('delta')
            self.get_logger().info(
                f'applied round {report.round}: v{report.old_version} -> v{report.new_version}, '
                f'{report.payload_bytes} B ({report.bits_per_param:.2f} bit/param), '
                f'{report.apply_ms:.1f} ms (lock held {report.swap_ms:.1f} ms)')
            self._publish_version()
            self._status(AdaptationStatus.STATE_APPLIED, report.round, 'ok',
                         model_hash=runtime.base_hash,
                         downlink_bytes=report.payload_bytes,
                         bits_per_param=report.bits_per_param, apply_ms=report.apply_ms)

    def _reject(self, why: str, round_: int) -> None:
        self.counters['deltas_rejected'] += 1
        self.get_logger().error(self.errors.set('delta', why))
        self._status(AdaptationStatus.STATE_REJECTED, round_, why)

    def _status(self, state: str, round_: int, message: str, version: int | None = None,
                **fields: Any) -> None:
        if version is None and self.runtime is not None:
            version = self.runtime.version
        msg = AdaptationStatus(device_id=self.params['device_id'], node='device', round=round_,
                               state=state, message=message[:500],
                               model_version=('' if version is None else
                                              version_label(self.params['device_id'], version)),
                               accuracy_before=float('nan'), accuracy_after=float('nan'),
                               **fields)
        msg.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(msg)

    def _on_rollback(self, request: Rollback.Request,
                     response: Rollback.Response) -> Rollback.Response:
        rt = self.runtime
        if rt is None:
            response.success = False
            response.message = f'model not ready (device_node {self.lifecycle_state})'
            return response
        try:
            version = rt.rollback()
        except CdccaError as err:
            response.success, response.message = False, str(err)
        else:
            label = version_label(rt.device_id, version)
            response.success, response.message = True, f'restored as {label}'
            self._publish_version()
            self._status(AdaptationStatus.STATE_ROLLED_BACK, rt.round,
                         response.message, model_hash=rt.base_hash,
                         detail=detail_json({'kind': 'service', 'version': version}))
        response.model_version = version_label(rt.device_id, rt.version)
        return response

    # ---------------------------------------------------------------- health
    def _report(self, lifecycle_state: str | None = None) -> None:
        state = lifecycle_state or self.lifecycle_state
        values: dict[str, Any] = dict(self.counters)
        values.update(self.errors.values())
        values.update(lifecycle_state=state, last_transition=self.last_transition)
        values.update(self._reassembler.status())
        for name, q in (('question', self._questions), ('delta', self._deltas)):
            values[f'{name}_queue'], values[f'{name}_queue_max'] = q.qsize(), self._queue_max[name]
            values[f'{name}_queue_bound'] = q.maxsize
        with self._latest_lock:
            values['have_frame'] = self._latest is not None
        rt = self.runtime
        if rt is None:
            level, text = ((ERROR, 'model failed to load') if self.fatal_error else
                           (WARN, 'loading model') if state == 'configuring' else
                           (WARN, f'{state}: no model loaded'))
            values['last_error'] = (self.fatal_error or values['last_error']
                                    or self.transition_error)
        else:
            values.update(rt.status())
            level, text = ((WARN, 'ready, see last_error') if values['last_error'] else
                           (OK, 'ready') if state == 'active' else
                           (OK, f'{state}: model loaded, not answering'))
        self._diag.publish(level, text, values)

    def destroy_node(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)  # (a model still loading is not waited for: autostart's thread)
        self._drain_answered()  # whatever the executor had not published yet
        self._ask_action.destroy()
        super().destroy_node()


def spin_device(args: list[str] | None, with_uts: bool) -> int:
    """Create device_node (and the in-process UTS node) and spin them on the executor the
    ``executor`` parameter names (inside :func:`run_node`); returns the exit code."""
    device = DeviceNode()
    unroute = route_logging(device)
    nodes: list[Node] = [device]
    try:
        if with_uts and device.params['uts.enabled']:
            from cdcca_ros.nodes.uts_node import UtsNode
            nodes.append(UtsNode(device))
        spinner = NodeSpinner(nodes, device.params['executor'], num_threads=4,
                              stop_when=failed(device))
        if spinner.kind != device.params['executor']:
            device.get_logger().warning(
                f'executor {device.params["executor"]!r} is not available in this rclpy: '
                f'spinning on {spinner.kind!r}')
        try:
            spinner.spin()
        except ExternalShutdownException:
            pass
    finally:
        unroute()
        for n in reversed(nodes):
            n.destroy_node()
    return exit_code(nodes)


def main(args: list[str] | None = None) -> None:
    sys.exit(run_node('device_node', lambda argv: spin_device(argv, with_uts=True), args,
                      table='device_node', doc=__doc__, quiet=True))


if __name__ == '__main__':
    main()
