"""ROS overhead of answering (issue 4): the ``ask`` service vs the model layer, same model.

A client publishes each camera frame (640x480) on ``image``, then times one ``ask`` round trip
about the latest frame; the same frame is answered directly by a :class:`DeviceRuntime` over
the same model (``DeviceRuntime.answer``). Both are interleaved sample by sample, each timed
on its second answer in a row (warm caches, as on a robot where only the node computes), and
the figure is the ratio of the medians. Two set-ups (``--modes``):

* ``process`` (the summary figure): the real ``device_node`` executable in its own process
  (``python -m cdcca_ros.nodes.device_node --ros-args -p model:=...``, its default executor
  unless ``--executor`` names another, UTS off so only the answer path is timed), the same
  torch thread count as the direct side; the client and the direct runtime live in this
  process. No GIL is shared.
* ``inprocess``: ``DeviceNode`` around the very runtime that answers directly, spun in a
  thread of this process on the same kind of executor, the client in a second rclpy context.
  Client and node share the GIL, so this overstates the overhead; it also splits the round
  trip into the node's handler and the rest (DDS, executors).

Both sides are honest about what a user gets: the node runs as shipped, and the client is an
ordinary rclpy client that waits the efficient way, ``spin_until_future_complete`` on rclpy's
EventsExecutor (``--client events``, the default; ``single_threaded`` is the classic
SingleThreadedExecutor). The node still does all it promises per answer (latest frame, age
check, Answer published, annotated image when watched); on a one-thread executor the publishing
is a task of that executor, run right after the response is sent.

Also measured: ``ask`` with the frame inside the request (``use_image``: 921,600 bytes more per
call on DDS). Traffic stays on this machine: a domain id of its own, localhost-only discovery.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdcca_ros.bench.common import (
    BenchContext,
    BenchResult,
    Target,
    camera_size,
    describe_ms,
    device_params,
    median,
    ms_since,
    ratio,
    world_samples,
)
from cdcca_ros.errors import ConfigError

NAME = 'node_overhead'
DESCRIPTION = 'answer latency through the ROS ask service vs DeviceRuntime.answer (same model)'
TARGETS = (Target('ros_over_direct', '<=', 1.10, 'issue 4'),)
WARMUP = 3
CALL_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0
MODES = ('process', 'inprocess')
CLIENTS = ('events', 'single_threaded')
KEYS = ('direct', 'ros', 'ros_image', 'handler', 'model_ros', 'model_direct')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--samples', type=int, default=None,
                        help='timed samples per mode (default 100, quick 4)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID (default: 120 + pid %% 100)')
    parser.add_argument('--modes', default='process,inprocess',
                        help='set-ups to measure (see the module docstring); the first gives '
                             'the summary figure')
    parser.add_argument('--executor', default=None,
                        help='device_node executor (its executor parameter); default: the '
                             "node's default")
    parser.add_argument('--client', default='events', choices=CLIENTS,
                        help='executor the client waits on (default events)')


def _isolate_ros(domain_id: int | None) -> int:
    """Own domain id and localhost-only discovery, set before any rclpy context starts."""
    did = domain_id if domain_id is not None else 120 + os.getpid() % 100
    os.environ['ROS_DOMAIN_ID'] = str(did)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.pop('ROS_STATIC_PEERS', None)
    return did


class _Client:
    """A client node in its own rclpy context: publishes frames, calls ``ask``.

    ``kind``: 'events' waits on rclpy's EventsExecutor (SingleThreadedExecutor where this rclpy
    has none; ``self.kind`` says which), 'single_threaded' on a SingleThreadedExecutor.
    """

    def __init__(self, kind: str = 'events') -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Image

        from cdcca_ros.nodes.common import SENSOR_QOS, events_executor_factory
        from cdcca_ros.srv import Ask

        if kind not in CLIENTS:
            raise ConfigError(f'--client: unknown client {kind!r}; known: {", ".join(CLIENTS)}')
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node('bench_client', context=self.context)
        factory = events_executor_factory() if kind == 'events' else None
        self.kind = kind if factory is not None or kind != 'events' else 'single_threaded'
        self.executor = (factory(context=self.context) if factory is not None
                         else SingleThreadedExecutor(context=self.context))
        self.executor.add_node(self.node)
        self.image_pub = self.node.create_publisher(Image, 'image', SENSOR_QOS)
        self.ask = self.node.create_client(Ask, 'ask')

    def spin_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.01)
            if cond():
                return True
        return cond()

    def call(self, request: Any) -> tuple[float, Any]:
        t0 = time.perf_counter()
        future = self.ask.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=CALL_TIMEOUT_S)
        elapsed = ms_since(t0)
        if not future.done():
            raise RuntimeError(f'ask did not answer within {CALL_TIMEOUT_S} s')
        return elapsed, future.result()

    def frame(self, rgb: Any) -> Any:
        """Publish ``rgb`` stamped now; returns the message."""
        from sensor_msgs.msg import Image
        from std_msgs.msg import Header

        from cdcca_ros.camera.convert import image_to_msg

        header = Header(frame_id='camera_color_optical_frame',
                        stamp=self.node.get_clock().now().to_msg())
        msg = image_to_msg(rgb, 'rgb8', Image, header=header)
        self.image_pub.publish(msg)
        return msg

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        if self.context.ok():
            rclpy.shutdown(context=self.context)


def _loop(client: _Client, samples: list[Any], runtime: Any,
          has_frame: Callable[[Any], bool] | None, handler_ms: list[float]) -> dict[str, Any]:
    """Time every sample: direct, ask about the latest frame, ask with the frame inside.

    ``has_frame(stamp)`` tells when the node holds the published frame; None: the ask is
    repeated (untimed) until the answer names the frame's stamp.
    """
    from cdcca_ros.srv import Ask

    out: dict[str, Any] = {k: [] for k in KEYS}
    out.update(mismatches=0, failures=[], stale=0)
    for i, s in enumerate(samples):
        msg = client.frame(s.image)
        stamp = msg.header.stamp
        # Frames go best effort (sensor QoS) and a 921 kB one can be lost: publish it again
        # until the node holds it (same stamp, so its age stays honest).
        deadline = time.monotonic() + 10.0
        arrived = False
        while not arrived and time.monotonic() < deadline:
            if has_frame is not None:
                arrived = client.spin_until(lambda st=stamp: has_frame(st), 0.2)
            else:
                client.spin_until(lambda: False, 0.01)
                _, r = client.call(Ask.Request(question=s.question))
                arrived = bool(r.success and r.answer.image_stamp == stamp)
            if not arrived:
                client.image_pub.publish(msg)
        if not arrived:
            out['failures'].append(f'frame {i} never reached device_node')
            continue
        # Each side is timed on its second answer in a row, so both run with warm caches as
        # on a robot where only the node computes (with two processes, whichever ran last
        # would otherwise have the cache to itself).
        if has_frame is not None:
            client.call(Ask.Request(question=s.question))
        handler_ms.clear()
        t_ros, response = client.call(Ask.Request(question=s.question))
        t_handler = handler_ms[-1] if handler_ms else math.nan
        runtime.answer(s.image, s.question)
        t0 = time.perf_counter()
        direct = runtime.answer(s.image, s.question)
        t_direct = ms_since(t0)
        t_img, response_img = client.call(Ask.Request(question=s.question, use_image=True,
                                                      image=msg))
        if not (response.success and response_img.success):
            out['failures'].append(f'sample {i}: {response.message or response_img.message}')
            continue
        if response.answer.image_stamp != stamp:
            out['stale'] += 1  # answered about an older frame: not comparable
            continue
        out['mismatches'] += int(response.answer.answer != direct.text)
        if i < WARMUP:
            continue
        out['direct'].append(t_direct)
        out['ros'].append(t_ros)
        out['ros_image'].append(t_img)
        out['handler'].append(t_handler)
        out['model_ros'].append(float(response.answer.latency_ms))
        out['model_direct'].append(direct.latency_ms)
    return out


def _measure_inprocess(samples: list[Any], runtime: Any, workdir: Path, executor_kind: str,
                       client_kind: str) -> dict[str, Any]:
    """DeviceNode around ``runtime`` on an ``executor_kind`` executor in a thread of ours."""
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from cdcca_ros.nodes.common import NodeSpinner
    from cdcca_ros.nodes.device_node import DeviceNode

    ctx_robot = Context()
    rclpy.init(context=ctx_robot)
    device = spinner = client = None
    try:
        device = DeviceNode(runtime, context=ctx_robot, parameter_overrides=[
            Parameter('state_dir', value=str(workdir / 'state'))])
        handler_ms: list[float] = []
        inner = device.answer

        def timed_answer(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                handler_ms.append(ms_since(t0))

        device.answer = timed_answer  # the service handler calls self.answer
        # As spin_device does, in a thread of ours.
        spinner = NodeSpinner([device], executor_kind, context=ctx_robot, num_threads=4).start()
        client = _Client(client_kind)
        if not client.spin_until(client.ask.service_is_ready, 30.0):
            raise RuntimeError('the ask service of device_node was not found in 30 s')

        def has_frame(stamp: Any) -> bool:
            latest = device._latest  # noqa: SLF001 - the bench waits for the node's buffer
            return latest is not None and latest.header.stamp == stamp

        out = _loop(client, samples, runtime, has_frame, handler_ms)
        out['executor'], out['client'] = spinner.kind, client.kind
        return out
    finally:
        if client is not None:
            client.close()
        if spinner is not None:
            spinner.shutdown(timeout_sec=5.0)
        if device is not None:
            device.destroy_node()
        if ctx_robot.ok():
            rclpy.shutdown(context=ctx_robot)


def _measure_process(samples: list[Any], runtime: Any, spec: str, workdir: Path,
                     threads: int, executor_kind: str, client_kind: str) -> dict[str, Any]:
    """The device_node executable in its own process, loading ``spec``."""
    from cdcca_ros.srv import Ask

    log = workdir / 'device_node.log'
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, '-m', 'cdcca_ros.nodes.device_node', '--ros-args',
           '-p', f'model:={spec}', '-p', f'state_dir:={workdir / "process-state"}',
           '-p', 'uts.enabled:=false', '-p', f'executor:={executor_kind}',
           '--log-level', 'warn']
    with open(log, 'wb') as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    client = None
    try:
        client = _Client(client_kind)
        ready = client.spin_until(client.ask.service_is_ready, START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready and time.monotonic() < deadline and proc.poll() is None:
            # The node loads its model in the background: ask about a frame until it answers.
            client.frame(samples[0].image)
            client.spin_until(lambda: False, 0.05)
            _, r = client.call(Ask.Request(question=samples[0].question))
            if r.success:
                break
        else:
            raise RuntimeError(f'device_node did not come up (exit {proc.poll()}): '
                               f'{log.read_text(errors="replace")[-2000:]}')
        out = _loop(client, samples, runtime, None, [])
        out['executor'], out['client'] = executor_kind, client.kind
        return out
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10.0)


def ratio_interval(num: list[float], den: list[float], seed: int,
                   rounds: int = 1000) -> list[float] | None:
    """Paired bootstrap 5-95% interval of ``median(num) / median(den)``."""
    import numpy as np

    if not num or len(num) != len(den):
        return None
    a, b = np.asarray(num), np.asarray(den)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(rounds, a.size))
    values = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return [float(np.percentile(values, 5)), float(np.percentile(values, 95))]


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring)."""
    from cdcca_ros.nodes.tables import TABLES

    modes = [m.strip() for m in str(ctx.args.modes).split(',') if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f'--modes: unknown mode {mode!r}; known: {", ".join(MODES)}')
    executors = next(p.choices for p in TABLES['device_node'] if p.name == 'executor') or ()
    executor_kind = ctx.args.executor or device_params()['executor']
    if executor_kind not in executors:
        raise ConfigError(f'--executor: unknown executor {executor_kind!r}; known: '
                          f'{", ".join(executors)}')
    domain_id = _isolate_ros(ctx.args.domain_id)
    import rclpy

    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.sim.domains import DRIFTED, SOURCE

    n = ctx.args.samples or (4 if ctx.quick else 100)
    domains = (SOURCE,) + DRIFTED
    per_domain = -(-(n + WARMUP) // len(domains))
    samples = world_samples(ctx.seed, domains, per_domain, camera_size())[:n + WARMUP]
    params = device_params()
    runtime = DeviceRuntime(ctx.models.student(), 'robot1',
                            max_new_tokens=params['max_new_tokens'])
    measured: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode == 'process':
            measured[mode] = _measure_process(samples, runtime, ctx.models.spec('student'),
                                              ctx.workdir, int(ctx.args.threads),
                                              executor_kind, ctx.args.client)
        else:
            measured[mode] = _measure_inprocess(samples, runtime, ctx.workdir, executor_kind,
                                                ctx.args.client)
    rmw = (rclpy.get_rmw_implementation_identifier()
           if hasattr(rclpy, 'get_rmw_implementation_identifier')
           else os.environ.get('RMW_IMPLEMENTATION', ''))

    first = measured[modes[0]]
    med_direct = median(first['direct'])
    summary: dict[str, Any] = {
        'ros_over_direct': ratio(median(first['ros']), med_direct),
        'ros_over_direct_interval': ratio_interval(first['ros'], first['direct'], ctx.seed),
        'ros_image_over_direct': ratio(median(first['ros_image']), med_direct),
        'overhead_ms': median([r - d for r, d in zip(first['ros'], first['direct'],
                                                    strict=True)]),
        'direct_ms': med_direct,
        'ros_ms': median(first['ros']),
        'mode': modes[0],
        'executor': first['executor'],
        'client': first['client'],
        'samples': len(first['ros']),
        'failures': sum(len(m['failures']) for m in measured.values()),
    }
    rows: list[list[Any]] = []
    detail: dict[str, Any] = {'rmw': rmw, 'ros_domain_id': domain_id,
                              'frame_size': list(camera_size()), 'warmup_samples': WARMUP,
                              'modes': {}}
    for mode, m in measured.items():
        d, r = median(m['direct']), median(m['ros'])
        if mode != modes[0]:
            summary[f'ros_over_direct_{mode}'] = ratio(r, d)
        rows += [[f'[{mode}] DeviceRuntime.answer (direct)', d, 1.0],
                 [f'[{mode}] ask service, latest frame', r, ratio(r, d)],
                 [f'[{mode}]   model time in the node', median(m['model_ros']),
                  ratio(median(m['model_ros']), d)]]
        if mode == 'inprocess':
            h = median(m['handler'])
            rows.append([f'[{mode}]   in the node\'s handler', h, ratio(h, d)])
        rows.append([f'[{mode}] ask service, frame in request', median(m['ros_image']),
                     ratio(median(m['ros_image']), d)])
        detail['modes'][mode] = {
            'direct_ms': describe_ms(m['direct']), 'ros_ms': describe_ms(m['ros']),
            'ros_image_ms': describe_ms(m['ros_image']),
            'model_ms_in_node': describe_ms(m['model_ros']),
            'model_ms_direct': describe_ms(m['model_direct']),
            'paired_overhead_ms': describe_ms([a - b for a, b in zip(
                m['ros'], m['direct'], strict=True)]),
            'answer_mismatches': m['mismatches'], 'stale_frames': m['stale'],
            'executor': m['executor'], 'client': m['client'],
            'failures': m['failures'][:20]}
        if mode == 'inprocess':
            detail['modes'][mode]['handler_ms'] = describe_ms(m['handler'])
            detail['modes'][mode]['transport_and_executor_ms'] = median(
                [a - b for a, b in zip(m['ros'], m['handler'], strict=True)])
    detail['answer_mismatches'] = sum(m['mismatches'] for m in measured.values())
    return BenchResult(
        summary=summary, headers=['path', 'median ms', 'x direct'], rows=rows, detail=detail,
        notes=[f'{summary["samples"]} frames {camera_size()[0]}x{camera_size()[1]} per mode, '
               f'rmw {rmw}; direct and ask interleaved, each timed warm, ratio of medians; '
               f'summary figure: {modes[0]} mode, paired-bootstrap 5-95% interval '
               + ('-' if not summary['ros_over_direct_interval'] else '{:.3f}..{:.3f}'.format(
                   *summary['ros_over_direct_interval'])),
               'process: the device_node executable (UTS off) in its own process; inprocess: '
               'DeviceNode in this process, sharing the GIL with the client (an upper bound)',
               f'node executor {first["executor"]}, client waits on '
               f'{"EventsExecutor" if first["client"] == "events" else "SingleThreadedExecutor"}'
               ' (spin_until_future_complete); the node publishes Answer (and the annotated '
               'image when watched) with every answer, after the response on a one-thread '
               'executor',
               f'the node\'s answers differed from the direct ones on '
               f'{detail["answer_mismatches"]} frames (expected 0: same weights, same frame)'])
