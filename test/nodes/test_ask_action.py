"""The ``ask`` action of device_node, from another process: the answer streamed token by token
(feedback per generated step, values the result agrees with) and a cancel that stops
generation within one token; the service keeps answering beside it.

The device node runs as its own process (a tiny student that never ends its answer early, so a
long answer leaves time to cancel); the test process is an ordinary action client.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.parameter import Parameter  # noqa: E402
from ros_graph import spin_until  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NS = 'askaction'
STEPS = 12


def _image(seed: int):
    from sensor_msgs.msg import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return Image(height=48, width=48, encoding='rgb8', step=48 * 3, data=rgb.tobytes())


@pytest.fixture(scope='module')
def device(tiny_student_dir, tmp_path_factory):
    """device_node in its own process, and a client node with action, service and parameter
    clients."""
    import rclpy
    from cdcca_ros.action import Ask as AskAction
    from cdcca_ros.srv import Ask
    from rclpy.action import ActionClient
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter_client import AsyncParameterClient

    tmp = tmp_path_factory.mktemp('ask_action')
    log = tmp / 'device.log'
    out = log.open('w')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'cdcca_ros.nodes.device_node', '--ros-args', '-r',
         f'__ns:=/{NS}', '-p', f'model:={tiny_student_dir}', '-p', f'state_dir:={tmp / "st"}',
         '-p', f'max_new_tokens:={STEPS}', '-p', 'uts.enabled:=false'],
        cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    context = Context()
    rclpy.init(context=context)
    client = Node('ask_action_client', namespace=NS, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client)
    from std_msgs.msg import String

    from cdcca_ros.nodes.common import LATCHED_QOS

    versions: list = []
    client.create_subscription(String, 'model_version', versions.append, LATCHED_QOS)
    g = {'client': client, 'executor': executor, 'log': log, 'proc': proc,
         'action': ActionClient(client, AskAction, 'ask'),
         'service': client.create_client(Ask, 'ask'),
         'params': AsyncParameterClient(client, f'/{NS}/device_node')}
    try:
        assert spin_until([executor], lambda: g['action'].server_is_ready()
                          and g['service'].service_is_ready()
                          and g['params'].services_are_ready(), 90.0), log.read_text()
        # The model is ready once its version is published (latched).
        assert spin_until([executor], lambda: bool(versions), 120.0), log.read_text()
        yield g
    finally:
        g['action'].destroy()
        executor.shutdown()
        client.destroy_node()
        rclpy.shutdown(context=context)
        proc.terminate()
        try:
            proc.wait(timeout=20.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def _send(g, question: str, image, feedback: list):
    from cdcca_ros.action import Ask

    goal = Ask.Goal(question=question, use_image=True, image=image, no_uplink=True)
    future = g['action'].send_goal_async(goal, feedback_callback=lambda m: feedback.append(
        m.feedback))
    assert spin_until([g['executor']], future.done, 30.0), g['log'].read_text()
    handle = future.result()
    assert handle.accepted
    result = handle.get_result_async()
    assert spin_until([g['executor']], result.done, 60.0), g['log'].read_text()
    return handle, result


def test_feedback_streams_every_step_and_agrees_with_the_result(device):
    from action_msgs.msg import GoalStatus
    from cdcca_ros.srv import Ask

    feedback: list = []
    _, future = _send(device, 'what color is the circle?', _image(1), feedback)
    response = future.result()
    assert response.status == GoalStatus.STATUS_SUCCEEDED, response.result.message
    result = response.result
    assert result.success and result.steps == len(feedback) >= 1
    assert [f.step for f in feedback] == list(range(len(feedback)))
    assert [f.final for f in feedback] == [False] * (len(feedback) - 1) + [True]
    # The stream adds up to the answer; the answer's figures are the stream's.
    assert ''.join(f.token for f in feedback).strip() == result.answer.answer
    assert feedback[-1].partial_answer == result.answer.answer
    assert result.answer.confidence == pytest.approx(
        math.exp(np.mean([math.log(f.probability) for f in feedback])), rel=1e-5)
    assert result.answer.entropy_mean == pytest.approx(
        np.mean([f.entropy for f in feedback]), rel=1e-5, abs=1e-7)
    assert result.answer.model_version == 'robot1:v0'
    assert all(0.0 < f.probability <= 1.0 for f in feedback)
    # The service answers the same question about the same image with the same answer.
    request = Ask.Request(question='what color is the circle?', use_image=True,
                          image=_image(1), no_uplink=True)
    call = device['service'].call_async(request)
    assert spin_until([device['executor']], call.done, 30.0)
    assert call.result().answer.answer == result.answer.answer
    assert call.result().answer.confidence == pytest.approx(result.answer.confidence)


def test_cancel_stops_generation_within_one_token(device):
    from action_msgs.msg import GoalStatus

    long = 256
    params = device['params']
    future = params.set_parameters([Parameter('max_new_tokens', value=long)])
    assert spin_until([device['executor']], future.done, 20.0)
    assert future.result().results[0].successful
    try:
        feedback: list = []
        handle, result = _send_and_cancel(device, feedback, after=3)
        response = result.result()
        assert response.status == GoalStatus.STATUS_CANCELED, response.result.message
        res = response.result
        assert not res.success and 'canceled' in res.message
        # Generation had produced cancel_step steps when the cancel was accepted, and went
        # on for at most the step in progress.
        assert 3 <= res.cancel_step <= res.steps <= res.cancel_step + 1 < long, (
            res.cancel_step, res.steps)
        assert len(feedback) == res.steps
        # The model is free again: the next goal answers in full.
        again: list = []
        _, done = _send(device, 'how many objects are there?', _image(2), again)
        assert done.result().status == GoalStatus.STATUS_SUCCEEDED
        assert done.result().result.steps == len(again) >= 1
    finally:
        restore = params.set_parameters([Parameter('max_new_tokens', value=STEPS)])
        spin_until([device['executor']], restore.done, 20.0)


def _send_and_cancel(g, feedback: list, after: int):
    from cdcca_ros.action import Ask

    goal = Ask.Goal(question='what shape is the red object?', use_image=True, image=_image(3),
                    no_uplink=True)
    sent = g['action'].send_goal_async(goal, feedback_callback=lambda m: feedback.append(
        m.feedback))
    assert spin_until([g['executor']], sent.done, 30.0)
    handle = sent.result()
    assert handle.accepted
    result = handle.get_result_async()
    assert spin_until([g['executor']], lambda: len(feedback) >= after or result.done(), 60.0)
    assert not result.done(), 'the answer ended before it could be canceled'
    cancel = handle.cancel_goal_async()
    assert spin_until([g['executor']], cancel.done, 30.0)
    assert len(cancel.result().goals_canceling) == 1
    assert spin_until([g['executor']], result.done, 30.0)
    return handle, result
