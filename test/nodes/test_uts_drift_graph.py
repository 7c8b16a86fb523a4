"""On the bundled student, a drifted-domain stream yields markedly more uplink than the source.

Two streams of the same length go through device_node + uts_node on a real graph with the
node's default UTS settings: source-domain frames, then drifted-domain frames. The student was
trained on the source domain only, so its answers there are confident (low Eq. 2 entropy) and
stage 1 passes few of them.
"""
from __future__ import annotations

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from ros_graph import Spinner, spin_until  # noqa: E402

N = 40


def test_drifted_stream_uplinks_markedly_more_than_source(ros_context_pair, tmp_path):
    from cdcca_ros.msg import UtsTokens
    from cdcca_ros.srv import Ask
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.nodes.uts_node import UtsNode
    from cdcca_ros.sim.domains import SOURCE, domain_names
    from cdcca_ros.sim.world import World

    ctx_robot, ctx_client = ros_context_pair
    device = DeviceNode(context=ctx_robot, parameter_overrides=[
        Parameter('model', value='bundled:student'),
        Parameter('state_dir', value=str(tmp_path / 'state'))])
    uts = UtsNode(device, context=ctx_robot)
    # What UTS finished (selected or not): the worker calls process() once per sample.
    done: list[bool] = []
    process = uts.process

    def counted(*args):
        try:
            msg = process(*args)
        except Exception:
            done.append(False)
            raise
        done.append(msg is not None)
        return msg
    uts.process = counted
    robot = Spinner(ctx_robot, [device, uts])
    client = Node('drift_client', context=ctx_client)
    executor = SingleThreadedExecutor(context=ctx_client)
    executor.add_node(client)
    tokens = []
    client.create_subscription(UtsTokens, 'uts_tokens', tokens.append, 100)
    ask = client.create_client(Ask, 'ask')

    def stream(domain: str) -> int:
        before, answered, dropped = len(tokens), len(done), uts.counters['dropped']
        for s in World(7).samples(domain, N, image_size=(640, 480)):
            future = ask.call_async(Ask.Request(question=s.question, use_image=True,
                                                image=image_to_msg(s.image, 'rgb8', Image)))
            assert spin_until([executor], future.done, 60.0)
            assert future.result().success, future.result().message
        # UTS has processed (or dropped) every answer of the stream, and every message it
        # published has arrived (reliable QoS).
        assert spin_until([executor], lambda: len(done) - answered + uts.counters['dropped']
                          - dropped == N, 60.0), (len(done) - answered, uts.counters)
        assert uts.counters['dropped'] == dropped, uts.counters
        selected = sum(done[answered:])
        assert spin_until([executor], lambda: len(tokens) - before == selected, 30.0), (
            len(tokens) - before, selected)
        # Stage 1's choice: the audit samples (uts.audit_fraction) go up whatever the
        # uncertainty, at the same rate on every domain.
        return sum(not t.audit for t in tokens[before:])

    try:
        assert spin_until([executor], ask.service_is_ready, 30.0)
        assert spin_until([executor], lambda: device.ready, 60.0), device.errors.text
        source = stream(SOURCE)
        drifted = [d for d in domain_names() if d != SOURCE]
        shifted = stream(drifted[0]) + stream(drifted[1])
        assert uts.counters['dropped'] == 0 and uts.counters['errors'] == 0
        assert all(isinstance(t, UtsTokens) for t in tokens) and len(tokens) == sum(done)
        # Markedly fewer on the source domain: per sample, at most half the drifted rate.
        assert source / N <= 0.5 * (shifted / (2 * N)), (source, shifted)
        assert shifted > 0
    finally:
        executor.shutdown()
        client.destroy_node()
        robot.close()
