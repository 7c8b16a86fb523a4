"""ROS overhead of answering (issue 4): the ``ask`` service vs the model layer, same model.

A client publishes each camera frame (640x480) on ``image``, then times one ``ask`` round trip
about the latest frame; the same frame is answered directly (``DeviceRuntime.answer`` over the
same model). Both are interleaved sample by sample, each timed on its second answer in a row
(warm caches, as on a robot where only the node computes), and the figure is the ratio of the
medians. Set-ups (``--modes``; the first gives the summary figure):

* ``process`` (the summary figure): the real ``device_node`` executable in its own process
  (``python -m cdcca_ros.nodes.device_node --ros-args -p model:=...``, its default executor
  unless ``--executor`` names another, UTS off so only the answer path is timed) against a
  direct worker, a fresh process too (:func:`direct_worker`: loads the model the node's way
  and times ``DeviceRuntime.answer`` inside itself), both with the same torch thread count.
  Both are started ``--restarts`` times over slices of the samples: model time alone differs
  by up to +-10% between two processes, for the life of each, so one pair per run would make
  that difference part of the figure.
* ``inprocess``: ``DeviceNode`` around the very runtime that answers directly, spun in a
  thread of this process on the same kind of executor, the client in a second rclpy context.
  Client and node share the GIL, so this overstates the overhead; it also splits the round
  trip into the node's handler and the rest (DDS, executors).
* ``floor``: what any rclpy service costs here. An empty ``ask`` server in its own process
  (same executor kind) whose handler busy-waits as long as the direct answer took, then
  returns a fixed Answer; the same client calls it the same way (second call in a row). Its
  round trip minus the handler time is the transport floor: DDS and the two processes
  waking up. ``--floor-ms`` adds handlers of other lengths (the floor's ratio for slower
  models).
* ``larger``: the process set-up again with a larger random BLIP-2 student (224 px ViT,
  6 + 2 + 6 layers, see :data:`LARGER`; built and saved in the work folder): the ratio for a
  model whose answer takes ~200 ms here, not the bundled student's ~10.

Both sides are honest about what a user gets: the node runs as shipped, and the client is an
ordinary rclpy client that waits the efficient way, ``spin_until_future_complete`` on rclpy's
EventsExecutor (``--client events``, the default; ``single_threaded`` is the classic
SingleThreadedExecutor). The node still does all it promises per answer (latest frame, age
check, Answer published, annotated image when watched); on a one-thread executor the publishing
is a task of that executor, run right after the response is sent.

Also measured: ``ask`` with the frame inside the request (``use_image``: 921,600 bytes more per
call on DDS). Traffic stays on this machine: a domain id of its own (``--domain-id``, else a
free one in 1..101), localhost-only discovery, and the nodes' Fast DDS profile for this
process too (it publishes the frames); the caller's environment is restored afterwards.
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
    timed_ms,
    world_samples,
)
from cdcca_ros.errors import ConfigError

NAME = 'node_overhead'
DESCRIPTION = 'answer latency through the ROS ask service vs DeviceRuntime.answer (same model)'
TARGETS = (Target('ros_over_direct', '<=', 1.10, 'issue 4'),)
WARMUP = 3
CALL_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0
MODES = ('process', 'inprocess', 'floor', 'larger')
# The ``larger`` student: Blip2MLLM.build_tiny sizes (random weights, LoRA like the bundled).
LARGER = {'image_size': 224, 'patch_size': 16, 'vision_hidden': 384, 'vision_layers': 6,
          'vision_heads': 6, 'qformer_hidden': 256, 'qformer_layers': 2, 'qformer_heads': 4,
          'num_query_tokens': 32, 'lm_hidden': 512, 'lm_layers': 6, 'lm_heads': 8}
FLOOR_TEXT = 'a red box'
CLIENTS = ('events', 'single_threaded')
KEYS = ('direct', 'ros', 'ros_image', 'handler', 'model_ros', 'model_direct')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--samples', type=int, default=None,
                        help='timed samples per mode (default 100, quick 4)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID (default: a free one in 1..101)')
    parser.add_argument('--modes', default='process,inprocess,floor,larger',
                        help='set-ups to measure (see the module docstring); the first gives '
                             'the summary figure')
    parser.add_argument('--executor', default=None,
                        help='device_node executor (its executor parameter); default: the '
                             "node's default")
    parser.add_argument('--client', default='events', choices=CLIENTS,
                        help='executor the client waits on (default events)')
    parser.add_argument('--restarts', type=int, default=None,
                        help='process and larger modes: fresh node and direct processes this '
                             'many times, samples split between them (default 4, quick 1)')
    parser.add_argument('--floor-ms', default='30,100',
                        help='floor mode: handler times (ms) measured besides the direct '
                             'answer time, comma-separated')


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


def _in_this_process(runtime: Any) -> Callable[[int, Any], tuple[float, str, float]]:
    """Direct answers by ``runtime`` here: ``(ms of the second of two answers, its text,
    its model latency)``."""
    def direct(i: int, s: Any) -> tuple[float, str, float]:
        runtime.answer(s.image, s.question)
        t0 = time.perf_counter()
        answer = runtime.answer(s.image, s.question)
        return ms_since(t0), answer.text, answer.latency_ms
    return direct


def _loop(client: _Client, samples: list[Any], direct: Callable[[int, Any], tuple[float, str,
                                                                                   float]],
          has_frame: Callable[[Any], bool] | None, handler_ms: list[float]) -> dict[str, Any]:
    """Time every sample: direct, ask about the latest frame, ask with the frame inside.

    ``direct(i, sample)`` answers sample ``i`` the direct way (see :func:`_in_this_process`,
    :class:`_DirectWorker`). ``has_frame(stamp)`` tells when the node holds the published
    frame; None: the ask is repeated (untimed) until the answer names the frame's stamp.
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
        t_direct, direct_text, direct_model_ms = direct(i, s)
        t_img, response_img = client.call(Ask.Request(question=s.question, use_image=True,
                                                      image=msg))
        if not (response.success and response_img.success):
            out['failures'].append(f'sample {i}: {response.message or response_img.message}')
            continue
        if response.answer.image_stamp != stamp:
            out['stale'] += 1  # answered about an older frame: not comparable
            continue
        out['mismatches'] += int(response.answer.answer != direct_text)
        if i < WARMUP:
            continue
        out['direct'].append(t_direct)
        out['ros'].append(t_ros)
        out['ros_image'].append(t_img)
        out['handler'].append(t_handler)
        out['model_ros'].append(float(response.answer.latency_ms))
        out['model_direct'].append(direct_model_ms)
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

        out = _loop(client, samples, _in_this_process(runtime), has_frame, handler_ms)
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


def _reap(proc: subprocess.Popen, terminate: bool = True, timeout_s: float = 10.0) -> None:
    """Stop a child process (SIGTERM unless ``terminate`` is False), killing it when it
    does not exit within ``timeout_s``."""
    if terminate:
        proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def bench_samples(seed: int, count: int) -> list[Any]:
    """The frames and questions answered (source and drifted domains, interleaved)."""
    from cdcca_ros.sim.domains import DRIFTED, SOURCE

    domains = (SOURCE,) + DRIFTED
    per_domain = -(-count // len(domains))
    return world_samples(seed, domains, per_domain, camera_size())[:count]


def direct_worker(spec: str, seed: int, count: int, max_new_tokens: int) -> None:
    """The direct side of the ``process`` mode, in a fresh process like the node's.

    Loads ``spec`` as the node does, rebuilds the bench's samples, prints ``ready``; then
    for every line ``i`` on stdin answers sample ``i`` twice and prints one JSON line:
    the second answer's wall time, its text and its model latency.
    """
    import json

    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models import bundled

    samples = bench_samples(seed, count)
    direct = _in_this_process(DeviceRuntime(bundled.load(spec), 'robot1',
                                            max_new_tokens=max_new_tokens))
    print('ready', flush=True)
    for line in sys.stdin:
        i = int(line)
        ms, text, model_ms = direct(i, samples[i])
        print(json.dumps({'ms': ms, 'text': text, 'model_ms': model_ms}), flush=True)


class _DirectWorker:
    """:func:`direct_worker` in a subprocess; call it as ``direct(i, sample)``."""

    def __init__(self, spec: str, seed: int, count: int, max_new_tokens: int,
                 env: dict[str, str], log: Path) -> None:
        cmd = [sys.executable, '-c', 'import sys; from cdcca_ros.bench.node_overhead import '
               'direct_worker; direct_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), '
               'int(sys.argv[4]))', spec, str(seed), str(count), str(max_new_tokens)]
        self._log = open(log, 'wb')  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, text=True)
        line = self._readline()
        if line.strip() != 'ready':
            raise RuntimeError(f'direct worker did not start (exit {self.proc.poll()}): '
                               f'{log.read_text(errors="replace")[-2000:]}')

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def __call__(self, i: int, sample: Any) -> tuple[float, str, float]:
        import json

        assert self.proc.stdin is not None
        self.proc.stdin.write(f'{i}\n')
        self.proc.stdin.flush()
        line = self._readline()
        if not line:
            raise RuntimeError(f'direct worker died (exit {self.proc.poll()})')
        doc = json.loads(line)
        return float(doc['ms']), str(doc['text']), float(doc['model_ms'])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its end of input: the worker returns
        _reap(self.proc, terminate=False)
        self._log.close()


def _measure_process(samples: list[Any], seed: int, spec: str, workdir: Path, threads: int,
                     executor_kind: str, client_kind: str, restarts: int,
                     max_new_tokens: int) -> dict[str, Any]:
    """The device_node executable and a direct worker, each in a fresh process, ``restarts``
    times over consecutive slices of ``samples`` (each slice starts with its warm-up)."""
    out: dict[str, Any] = {}
    bounds = [round(k * len(samples) / restarts) for k in range(restarts + 1)]
    for r in range(restarts):
        part = _process_round(samples, range(bounds[r], bounds[r + 1]), seed, spec,
                              workdir / f'round-{r}', threads, executor_kind, client_kind,
                              max_new_tokens)
        for key, value in part.items():
            if isinstance(value, list):
                out.setdefault(key, []).extend(value)
            elif isinstance(value, int):
                out[key] = out.get(key, 0) + value
            else:
                out[key] = value
    out['restarts'] = restarts
    return out


def _process_round(samples: list[Any], indices: range, seed: int, spec: str, workdir: Path,
                   threads: int, executor_kind: str, client_kind: str,
                   max_new_tokens: int) -> dict[str, Any]:
    from cdcca_ros.srv import Ask

    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / 'device_node.log'
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, '-m', 'cdcca_ros.nodes.device_node', '--ros-args',
           '-p', f'model:={spec}', '-p', f'state_dir:={workdir / "process-state"}',
           '-p', 'uts.enabled:=false', '-p', f'executor:={executor_kind}',
           '-p', f'max_new_tokens:={max_new_tokens}', '--log-level', 'warn']
    with open(log, 'wb') as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    client = worker = None
    first = samples[indices[0]]
    try:
        worker = _DirectWorker(spec, seed, len(samples), max_new_tokens, env,
                               workdir / 'direct_worker.log')
        client = _Client(client_kind)
        ready = client.spin_until(client.ask.service_is_ready, START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready and time.monotonic() < deadline and proc.poll() is None:
            # The node loads its model in the background: ask about a frame until it answers.
            client.frame(first.image)
            client.spin_until(lambda: False, 0.05)
            _, r = client.call(Ask.Request(question=first.question))
            if r.success:
                break
        else:
            raise RuntimeError(f'device_node did not come up (exit {proc.poll()}): '
                               f'{log.read_text(errors="replace")[-2000:]}')
        offset = indices[0]
        out = _loop(client, [samples[i] for i in indices],
                    lambda i, s: worker(offset + i, s), None, [])
        out['executor'], out['client'] = executor_kind, client.kind
        return out
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            worker.close()
        _reap(proc)


def floor_server(busy_ms: float, executor_kind: str) -> None:
    """An empty ``ask`` server (the ``floor`` mode runs it in its own process): every call
    busy-waits ``busy_ms`` in its handler, then returns a fixed Answer."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node

    from cdcca_ros.nodes.common import NodeSpinner
    from cdcca_ros.srv import Ask

    rclpy.init()
    node = Node('floor_server')
    busy_s = busy_ms / 1000.0

    def handle(request: Any, response: Any) -> Any:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_s:
            pass
        response.success = True
        response.answer.answer = FLOOR_TEXT
        response.answer.latency_ms = ms_since(t0)
        return response

    node.create_service(Ask, 'ask', handle)
    try:
        NodeSpinner([node], executor_kind).spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def _measure_floor(busy_ms: list[float], n: int, executor_kind: str, client_kind: str,
                   workdir: Path) -> dict[float, dict[str, list[float]]]:
    """Round trips to :func:`floor_server` per handler time: ``{busy: {'ms', 'overhead'}}``."""
    from cdcca_ros.srv import Ask

    out: dict[float, dict[str, list[float]]] = {}
    for busy in busy_ms:
        log = workdir / f'floor-{busy:.1f}.log'
        cmd = [sys.executable, '-c', 'import sys; from cdcca_ros.bench.node_overhead import '
               'floor_server; floor_server(float(sys.argv[1]), sys.argv[2])',
               f'{busy:.3f}', executor_kind]
        with open(log, 'wb') as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        client = None
        try:
            client = _Client(client_kind)
            if not client.spin_until(client.ask.service_is_ready, START_TIMEOUT_S):
                raise RuntimeError(f'floor server did not come up (exit {proc.poll()}): '
                                   f'{log.read_text(errors="replace")[-2000:]}')
            request = Ask.Request(question='what color is the object?')
            for _ in range(WARMUP):
                client.call(request)
            ms: list[float] = []
            overhead: list[float] = []
            for _ in range(n):
                client.call(request)  # timed on the second call in a row, as the node
                t, response = client.call(request)
                ms.append(t)
                overhead.append(t - float(response.answer.latency_ms))
            out[busy] = {'ms': ms, 'overhead': overhead}
        finally:
            if client is not None:
                client.close()
            _reap(proc)
    return out


def _larger_student(workdir: Path, seed: int) -> str:
    """Build (once) and save the ``larger`` student; returns its folder."""
    path = workdir / 'larger-student'
    if not path.exists():
        import torch

        from cdcca_ros.models import build_tiny
        from cdcca_ros.models.base import TrainableConfig
        from cdcca_ros.sim.questions import vocabulary

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_tiny('blip2', vocabulary(), seed=seed + 3, dropout=0.0, **LARGER)
        model.configure_trainable(TrainableConfig(
            lora_r=4, lora_alpha=8, lora_targets=('q_proj', 'k_proj', 'v_proj', 'out_proj',
                                                  'fc1', 'fc2', 'query', 'key', 'value')))
        model.save(str(path))
    return str(path)


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
    if not modes or modes[0] not in ('process', 'inprocess'):
        raise ConfigError('--modes: the first mode (the summary figure) must be process or '
                          'inprocess')
    executors = next(p.choices for p in TABLES['device_node'] if p.name == 'executor') or ()
    executor_kind = ctx.args.executor or device_params()['executor']
    if executor_kind not in executors:
        raise ConfigError(f'--executor: unknown executor {executor_kind!r}; known: '
                          f'{", ".join(executors)}')
    from cdcca_ros.nodes.dds_profile import use_dds_profile
    from cdcca_ros.nodes.ros_domain import isolated_ros_env

    # The graphs run in a domain of the bench's own, set in this process's environment (rclpy
    # reads it at init, the node and worker processes inherit it) and restored after.
    with isolated_ros_env(ctx.args.domain_id) as domain_id:
        # The client publishes 640x480 frames, as the camera node does: same Fast DDS profile.
        use_dds_profile()
        return _run(ctx, modes, executor_kind, domain_id)


def _run(ctx: BenchContext, modes: list[str], executor_kind: str,
         domain_id: int) -> BenchResult:
    import rclpy

    from cdcca_ros.core.device_runtime import DeviceRuntime

    n = ctx.args.samples or (4 if ctx.quick else 100)
    restarts = ctx.args.restarts or (1 if ctx.quick else 4)
    if restarts < 1 or n < restarts:
        raise ConfigError(f'--restarts must be in 1..samples ({n}), got {restarts}')
    samples = bench_samples(ctx.seed, n + WARMUP * restarts)
    params = device_params()
    runtime = DeviceRuntime(ctx.models.student(), 'robot1',
                            max_new_tokens=params['max_new_tokens'])
    measured: dict[str, dict[str, Any]] = {}
    floor: dict[float, dict[str, list[float]]] = {}
    larger_info: dict[str, Any] = {}
    for mode in modes:
        if mode == 'process':
            measured[mode] = _measure_process(samples, ctx.seed, ctx.models.spec('student'),
                                              ctx.workdir / 'process', int(ctx.args.threads),
                                              executor_kind, ctx.args.client, restarts,
                                              params['max_new_tokens'])
        elif mode == 'inprocess':
            measured[mode] = _measure_inprocess(samples[:n + WARMUP], runtime, ctx.workdir,
                                                executor_kind, ctx.args.client)
        elif mode == 'floor':
            direct = (median(measured['process']['direct']) if 'process' in measured
                      else median([timed_ms(lambda s=s: runtime.answer(s.image, s.question))[0]
                                   for s in samples[:n]]))
            extra = [float(x) for x in str(ctx.args.floor_ms).split(',') if x.strip()]
            floor = _measure_floor([direct] + extra, n, executor_kind, ctx.args.client,
                                   ctx.workdir)
        else:  # larger: half the samples (its answers take ~20x longer)
            spec = _larger_student(ctx.workdir, ctx.seed)
            n_big = max(restarts * (WARMUP + 2), len(samples) // 2)
            measured[mode] = _measure_process(samples[:n_big], ctx.seed, spec,
                                              ctx.workdir / 'larger', int(ctx.args.threads),
                                              executor_kind, ctx.args.client, restarts,
                                              params['max_new_tokens'])
            larger_info['spec'] = spec
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
    if floor:
        busy_direct = next(iter(floor))
        floor_overhead = median(floor[busy_direct]['overhead'])
        summary['floor_overhead_ms'] = floor_overhead
        # The best any rclpy service could give for an answer this long on this machine.
        summary['floor_over_direct'] = ratio(med_direct + floor_overhead, med_direct)
        summary['ros_over_floor'] = ratio(median(first['ros']), med_direct + floor_overhead)
        detail['floor'] = {}
        for busy, f in floor.items():
            o = median(f['overhead'])
            rows.append([f'[floor] empty ask service, {busy:.1f} ms handler', median(f['ms']),
                         ratio(busy + o, busy)])
            detail['floor'][f'{busy:.3f}'] = {'ms': describe_ms(f['ms']),
                                               'overhead_ms': describe_ms(f['overhead']),
                                               'ratio': ratio(busy + o, busy)}
            if busy != busy_direct:
                summary[f'floor_over_handler_{busy:g}ms'] = ratio(busy + o, busy)
    if 'larger' in measured:
        summary['larger_direct_ms'] = median(measured['larger']['direct'])
        detail['larger_student'] = {'sizes': LARGER, **larger_info}
    detail['answer_mismatches'] = sum(m['mismatches'] for m in measured.values())
    return BenchResult(
        summary=summary, headers=['path', 'median ms', 'x direct'], rows=rows, detail=detail,
        notes=[f'{summary["samples"]} frames {camera_size()[0]}x{camera_size()[1]} per mode, '
               f'rmw {rmw}; direct and ask interleaved, each timed warm, ratio of medians; '
               f'summary figure: {modes[0]} mode, paired-bootstrap 5-95% interval '
               + ('-' if not summary['ros_over_direct_interval'] else '{:.3f}..{:.3f}'.format(
                   *summary['ros_over_direct_interval'])),
               'process: the device_node executable (UTS off) in its own process; inprocess: '
               'DeviceNode in this process, sharing the GIL with the client (an upper bound); '
               'floor: an empty ask service whose handler busy-waits as long as an answer '
               '(what DDS and waking two processes cost here); larger: process with a larger '
               'random student',
               f'node executor {first["executor"]}, client waits on '
               f'{"EventsExecutor" if first["client"] == "events" else "SingleThreadedExecutor"}'
               ' (spin_until_future_complete); the node publishes Answer (and the annotated '
               'image when watched) with every answer, after the response on a one-thread '
               'executor',
               f'the node\'s answers differed from the direct ones on '
               f'{detail["answer_mismatches"]} frames (expected 0: same weights, same frame)'])
