"""ROS overhead of answering (issue 4): the ``ask`` service vs the model layer, same model.

``device_node`` runs on a real graph (its own rclpy context, a multi-threaded executor in a
background thread, as the node tests run it) around a :class:`DeviceRuntime`; a client in a
second context (its own DDS participant) publishes each camera frame on ``image``, waits until
the node holds it, and then times one ``ask`` round trip about the latest frame. The same
runtime answers the same frame directly (``DeviceRuntime.answer``); both are interleaved
sample by sample, alternating which goes first, and the figure is the ratio of the medians.

Also measured: ``ask`` with the frame inside the request (``use_image``: 921,600 bytes more per
call on DDS). The client shares the node's process (and GIL), so the overhead is, if anything,
overstated. UTS is not attached (``uts_node`` works off the answer path, in its own thread).
Traffic stays on this machine: a domain id of its own and localhost-only discovery.
"""
from __future__ import annotations

import argparse
import os
import time
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

NAME = 'node_overhead'
DESCRIPTION = 'answer latency through the ROS ask service vs DeviceRuntime.answer (same model)'
TARGETS = (Target('ros_over_direct', '<=', 1.10, 'issue 4'),)
WARMUP = 3
CALL_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--samples', type=int, default=None,
                        help='timed samples (default 60, quick 4)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID (default: 120 + pid %% 100)')


def _isolate_ros(domain_id: int | None) -> int:
    """Own domain id and localhost-only discovery, set before any rclpy context starts."""
    did = domain_id if domain_id is not None else 120 + os.getpid() % 100
    os.environ['ROS_DOMAIN_ID'] = str(did)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.pop('ROS_STATIC_PEERS', None)
    return did


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring)."""
    domain_id = _isolate_ros(ctx.args.domain_id)
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.nodes.common import SENSOR_QOS
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.sim.domains import DRIFTED, SOURCE
    from cdcca_ros.srv import Ask

    n = ctx.args.samples or (4 if ctx.quick else 60)
    domains = (SOURCE,) + DRIFTED
    per_domain = -(-(n + WARMUP) // len(domains))
    samples = world_samples(ctx.seed, domains, per_domain, camera_size())[:n + WARMUP]
    params = device_params()
    runtime = DeviceRuntime(ctx.models.student(), 'robot1',
                            max_new_tokens=params['max_new_tokens'])

    ctx_robot, ctx_client = Context(), Context()
    rclpy.init(context=ctx_robot)
    rclpy.init(context=ctx_client)
    device = client = None
    robot_exec = client_exec = None
    thread = None
    direct_ms: list[float] = []
    ros_ms: list[float] = []
    ros_image_ms: list[float] = []
    mismatches = 0
    failures: list[str] = []
    try:
        import threading

        device = DeviceNode(runtime, context=ctx_robot, parameter_overrides=[
            Parameter('state_dir', value=str(ctx.workdir / 'state'))])
        robot_exec = MultiThreadedExecutor(num_threads=4, context=ctx_robot)
        robot_exec.add_node(device)
        thread = threading.Thread(target=robot_exec.spin, daemon=True)
        thread.start()
        client = Node('bench_client', context=ctx_client)
        client_exec = SingleThreadedExecutor(context=ctx_client)
        client_exec.add_node(client)
        image_pub = client.create_publisher(Image, 'image', SENSOR_QOS)
        ask = client.create_client(Ask, 'ask')

        def spin_until(cond: Any, timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                client_exec.spin_once(timeout_sec=0.01)
                if cond():
                    return True
            return cond()

        if not spin_until(ask.service_is_ready, 30.0):
            raise RuntimeError('the ask service of device_node was not found in 30 s')
        if not spin_until(lambda: image_pub.get_subscription_count() > 0, 30.0):
            raise RuntimeError('device_node never subscribed to image')

        def call(request: Any) -> tuple[float, Any]:
            t0 = time.perf_counter()
            future = ask.call_async(request)
            client_exec.spin_until_future_complete(future, timeout_sec=CALL_TIMEOUT_S)
            elapsed = ms_since(t0)
            if not future.done():
                raise RuntimeError(f'ask did not answer within {CALL_TIMEOUT_S} s')
            return elapsed, future.result()

        for i, s in enumerate(samples):
            header = Header(frame_id='camera_color_optical_frame',
                            stamp=client.get_clock().now().to_msg())
            msg = image_to_msg(s.image, 'rgb8', Image, header=header)
            image_pub.publish(msg)

            def has_frame(stamp: Any = header.stamp) -> bool:
                latest = device._latest  # noqa: SLF001 - the bench waits for the node's buffer
                return latest is not None and latest.header.stamp == stamp

            if not spin_until(has_frame, 10.0):
                failures.append(f'frame {i} never reached device_node')
                continue
            t_direct = t_ros = 0.0
            direct = response = None
            for first in ((True, False) if i % 2 == 0 else (False, True)):
                if first:
                    t0 = time.perf_counter()
                    direct = runtime.answer(s.image, s.question)
                    t_direct = ms_since(t0)
                else:
                    t_ros, response = call(Ask.Request(question=s.question))
            t_img, response_img = call(Ask.Request(question=s.question, use_image=True,
                                                   image=msg))
            if not (response.success and response_img.success):
                failures.append(f'sample {i}: {response.message or response_img.message}')
                continue
            mismatches += int(response.answer.answer != direct.text)
            if i < WARMUP:
                continue
            direct_ms.append(t_direct)
            ros_ms.append(t_ros)
            ros_image_ms.append(t_img)
        rmw = rclpy.get_rmw_implementation_identifier() if hasattr(
            rclpy, 'get_rmw_implementation_identifier') else os.environ.get(
            'RMW_IMPLEMENTATION', '')
    finally:
        if robot_exec is not None:
            robot_exec.shutdown(timeout_sec=5.0)
        if client_exec is not None:
            client_exec.shutdown(timeout_sec=5.0)
        for node in (client, device):
            if node is not None:
                node.destroy_node()
        if thread is not None:
            thread.join(timeout=5.0)
        for c in (ctx_client, ctx_robot):
            if c.ok():
                rclpy.shutdown(context=c)

    med_direct = median(direct_ms)
    med_ros = median(ros_ms)
    med_img = median(ros_image_ms)
    paired = [r - d for r, d in zip(ros_ms, direct_ms, strict=True)]
    summary = {
        'ros_over_direct': ratio(med_ros, med_direct),
        'ros_image_over_direct': ratio(med_img, med_direct),
        'overhead_ms': median(paired),
        'direct_ms': med_direct,
        'ros_ms': med_ros,
        'samples': len(ros_ms),
        'failures': len(failures),
    }
    rows = [['DeviceRuntime.answer (direct)', med_direct, 1.0],
            ['ask service, latest frame', med_ros, summary['ros_over_direct']],
            ['ask service, frame in request', med_img, summary['ros_image_over_direct']]]
    return BenchResult(
        summary=summary, headers=['path', 'median ms', 'x direct'], rows=rows,
        detail={'direct_ms': describe_ms(direct_ms), 'ros_ms': describe_ms(ros_ms),
                'ros_image_ms': describe_ms(ros_image_ms),
                'paired_overhead_ms': describe_ms(paired), 'answer_mismatches': mismatches,
                'failures': failures[:20], 'rmw': rmw, 'ros_domain_id': domain_id,
                'frame_size': list(camera_size()), 'warmup_samples': WARMUP},
        notes=[f'{len(ros_ms)} frames {camera_size()[0]}x{camera_size()[1]}, rmw {rmw}; '
               'direct and ask interleaved (alternating order), ratio of medians',
               'client and node in one process (two DDS participants): the overhead is '
               'an upper bound of a separate client process',
               f'the node\'s answers differed from the direct ones on {mismatches} frames '
               '(expected 0: same model, same frame)'])
