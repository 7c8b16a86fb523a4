"""The package's interfaces: CDR round trips and publish/subscribe over real DDS."""
from __future__ import annotations

import array
import math

import pytest

msg = pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')
srv = pytest.importorskip('cdcca_ros.srv')

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from ros_graph import spin_until  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402


def _header(frame: str = 'camera_color_optical_frame') -> Header:
    h = Header(frame_id=frame)
    h.stamp.sec, h.stamp.nanosec = 1_700_000_000, 123_456_789
    return h


def _image() -> Image:
    return Image(header=_header(), height=2, width=3, encoding='rgb8', step=9,
                 data=bytes(range(18)))


def _question():
    return msg.Question(header=_header(), question_id='q-7', question='what color is the square?',
                        choices=['red', 'green', 'blue', 'yellow'], use_image=True,
                        image=_image())


def _answer():
    a = msg.Answer(header=_header(), question_id='q-7', question='what color is the square?',
                   answer='green', choice_index=1, confidence=0.75, entropy_mean=0.375,
                   entropy_max=1.25, model_version='robot1-v3', latency_ms=12.5)
    a.image_stamp.sec = 1_700_000_000
    return a


def _uts_tokens():
    return msg.UtsTokens(
        header=_header(), device_id='robot1', sample_id='robot1-42', model_version='robot1-v3',
        vision_space='blip2:d64:n65:g8x8:cls', question='how many objects are there?',
        device_answer='three', entropy_mean=1.5, entropy_max=2.0, num_tokens=65, token_dim=4,
        grid_rows=8, grid_cols=8, has_cls=True, kept_indices=[0, 3, 17],
        token_variance=[0.5, 0.25, 0.125], dtype=msg.UtsTokens.DTYPE_INT8,
        scales=[0.015625, 0.03125, 0.0625], payload=bytes(range(12)))


def _dwc_delta():
    return msg.DwcDelta(
        header=_header('cloud'), device_id='robot1', round=3, base_version='robot1-v2',
        base_hash='ab' * 32, new_version='robot1-v3', new_hash='cd' * 32, codec='sparse',
        codec_params='{"density": 0.05, "bits": 2}', num_params=123_456, total_size=4096,
        payload_sha256='ef' * 32, chunk_index=1, chunk_count=4, chunk=bytes(range(256)) * 4,
        signature=bytes(range(64)))


def _adaptation_status():
    return msg.AdaptationStatus(
        header=_header('device'), device_id='robot1', node='device', round=3,
        state=msg.AdaptationStatus.STATE_APPLIED, message='ok', model_version='robot1-v3',
        uplink_samples=17, uplink_bytes=9_000, downlink_bytes=4_096, bits_per_param=0.75,
        apply_ms=3.5, losses=[1.0, 0.5, 0.25, 0.125], accuracy_before=0.5, accuracy_after=0.75)


def _pulled_tokens():
    m = _uts_tokens()
    m.pulled, m.audit, m.kept_indices = True, False, [1, 2]
    return m


def _refused_status():
    return msg.AdaptationStatus(
        header=_header('cloud'), device_id='robot1', node='cloud', round=4,
        state=msg.AdaptationStatus.STATE_REFUSED, message='new data gains +0.0 points',
        model_version='v3', model_hash='cd' * 32, losses=[1.0, 0.5, 0.25, 0.125],
        accuracy_before=0.5, accuracy_after=0.5, detail='{"gate":{"ship":false}}')


def _token_request():
    return msg.TokenRequest(header=_header('cloud'), device_id='robot1', request_id='ab12-7',
                            sample_ids=['robot1-3', 'robot1-9'])


def _rollback_order():
    return msg.RollbackOrder(header=_header('cloud'), device_id='robot1', from_version=3,
                             from_hash='cd' * 32, to_hash='ab' * 32, new_version=4,
                             reason='v3 answers 12.0 points worse than v2',
                             signature=bytes(range(64)))


MESSAGES = {
    'Question': _question,
    'Answer': _answer,
    'UtsTokens': _uts_tokens,
    'PulledUtsTokens': _pulled_tokens,
    'DwcDelta': _dwc_delta,
    'AdaptationStatus': _adaptation_status,
    'RefusedStatus': _refused_status,
    'TokenRequest': _token_request,
    'RollbackOrder': _rollback_order,
}


@pytest.mark.parametrize('name', sorted(MESSAGES))
def test_message_cdr_round_trip(name):
    original = MESSAGES[name]()
    data = serialize_message(original)
    assert isinstance(data, bytes) and len(data) > 0
    back = deserialize_message(data, type(original))
    assert back == original
    assert back is not original
    # A changed field must change the bytes: the comparison above is not vacuous.
    assert serialize_message(type(original)()) != data


def test_uint8_arrays_carry_raw_bytes():
    tokens = _uts_tokens()
    back = deserialize_message(serialize_message(tokens), msg.UtsTokens)
    assert bytes(back.payload) == bytes(range(12))
    assert list(back.kept_indices) == [0, 3, 17]
    assert isinstance(back.kept_indices, array.array)


def test_kept_indices_are_uint16():
    tokens = _uts_tokens()
    tokens.kept_indices = [0, 65535]
    back = deserialize_message(serialize_message(tokens), msg.UtsTokens)
    assert back.kept_indices.typecode == 'H' and list(back.kept_indices) == [0, 65535]
    with pytest.raises((AssertionError, ValueError, OverflowError)):
        tokens.kept_indices = [65536]


def test_uplink_bytes_are_the_cdr_bytes_of_the_token_fields():
    from cdcca_ros.core.uts import uplink_bytes

    full = _uts_tokens()
    empty = _uts_tokens()
    empty.kept_indices, empty.scales, empty.payload = [], [], b''
    counted = uplink_bytes(len(full.payload), len(full.scales), len(full.kept_indices))
    elements = counted - 3 * 4  # the empty message keeps the three 4-byte counts
    grown = len(serialize_message(full)) - len(serialize_message(empty))
    assert elements == 12 + 3 * 4 + 3 * 2
    assert abs(grown - elements) <= 3 * 2  # alignment padding only


def test_constants_are_defined():
    from cdcca_ros.core.uts import PACK_DTYPES

    dtypes = (msg.UtsTokens.DTYPE_FP16, msg.UtsTokens.DTYPE_INT8, msg.UtsTokens.DTYPE_INT4,
              msg.UtsTokens.DTYPE_ECQ)
    assert dtypes == PACK_DTYPES
    states = {msg.AdaptationStatus.STATE_ROUND_DONE, msg.AdaptationStatus.STATE_APPLIED,
              msg.AdaptationStatus.STATE_REJECTED, msg.AdaptationStatus.STATE_ROLLED_BACK,
              msg.AdaptationStatus.STATE_REFUSED, msg.AdaptationStatus.STATE_ROLLBACK_ORDERED}
    assert len(states) == 6
    assert msg.AdaptationStatus.STATE_REFUSED == 'refused'
    assert msg.AdaptationStatus.STATE_ROLLBACK_ORDERED == 'rollback_ordered'


def test_nan_survives_serialization():
    status = _adaptation_status()
    status.accuracy_after = math.nan
    back = deserialize_message(serialize_message(status), msg.AdaptationStatus)
    assert math.isnan(back.accuracy_after)


@pytest.mark.parametrize('service', ['Ask', 'Rollback'])
def test_service_request_response_round_trip(service):
    srv_type = getattr(srv, service)
    if service == 'Ask':
        request = srv_type.Request(question_id='q-1', question='what shape is the red object?',
                                   choices=[], use_image=True, image=_image())
        response = srv_type.Response(success=True, message='', answer=_answer())
    else:
        request = srv_type.Request()
        response = srv_type.Response(success=True, message='restored', model_version='v1')
    for original in (request, response):
        back = deserialize_message(serialize_message(original), type(original))
        assert back == original


@pytest.mark.parametrize('name', sorted(MESSAGES))
def test_publish_subscribe_over_dds(ros_context_pair, name):
    """One node publishes, a node in another context (its own DDS participant) receives."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

    ctx_pub, ctx_sub = ros_context_pair
    original = MESSAGES[name]()
    qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                     durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
    pub_node = Node('pub_' + name.lower(), context=ctx_pub)
    sub_node = Node('sub_' + name.lower(), context=ctx_sub)
    received = []
    try:
        publisher = pub_node.create_publisher(type(original), 'roundtrip', qos)
        sub_node.create_subscription(type(original), 'roundtrip', received.append, qos)
        executors = [SingleThreadedExecutor(context=ctx_pub),
                     SingleThreadedExecutor(context=ctx_sub)]
        executors[0].add_node(pub_node)
        executors[1].add_node(sub_node)
        assert spin_until(executors, lambda: publisher.get_subscription_count() > 0, 15.0), \
            'the subscriber was never discovered'
        publisher.publish(original)
        assert spin_until(executors, lambda: len(received) > 0, 10.0), 'nothing arrived'
        assert received[0] == original
        for executor in executors:
            executor.shutdown()
    finally:
        pub_node.destroy_node()
        sub_node.destroy_node()


def test_service_call_over_dds(ros_context_pair):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    ctx_srv, ctx_cli = ros_context_pair
    server = Node('ask_server', context=ctx_srv)
    client_node = Node('ask_client', context=ctx_cli)
    try:
        def handle(request, response):
            response.success = True
            response.answer = _answer()
            response.answer.question = request.question
            return response

        server.create_service(srv.Ask, 'ask', handle)
        client = client_node.create_client(srv.Ask, 'ask')
        executors = [SingleThreadedExecutor(context=ctx_srv),
                     SingleThreadedExecutor(context=ctx_cli)]
        executors[0].add_node(server)
        executors[1].add_node(client_node)
        assert spin_until(executors, client.service_is_ready, 15.0), 'service never discovered'
        future = client.call_async(srv.Ask.Request(question='is there a blue circle?'))
        assert spin_until(executors, future.done, 10.0), 'no response'
        response = future.result()
        assert response.success
        assert response.answer.question == 'is there a blue circle?'
        assert response.answer.answer == 'green'
        for executor in executors:
            executor.shutdown()
    finally:
        server.destroy_node()
        client_node.destroy_node()


def _ask_action_parts():
    from cdcca_ros.action import Ask

    goal = Ask.Goal(question_id='q-9', question='where is the diamond?', choices=['left'],
                    use_image=True, image=_image(), no_uplink=True)
    feedback = Ask.Feedback(step=2, token=' left', token_id=17, probability=0.875,
                            entropy=0.25, partial_answer='left', final=True)
    result = Ask.Result(success=True, message='', answer=_answer(), steps=3, cancel_step=0)
    return goal, feedback, result


@pytest.mark.parametrize('part', ['Goal', 'Feedback', 'Result'])
def test_ask_action_round_trip(part):
    """The Ask action's goal, feedback and result cross CDR unchanged; the action's own
    message types (what the feedback topic and the result service carry) do too."""
    from cdcca_ros.action import Ask

    goal, feedback, result = _ask_action_parts()
    original = {'Goal': goal, 'Feedback': feedback, 'Result': result}[part]
    data = serialize_message(original)
    assert deserialize_message(data, type(original)) == original
    assert serialize_message(type(original)()) != data
    wrapped = Ask.Impl.FeedbackMessage(feedback=feedback)
    assert deserialize_message(serialize_message(wrapped), type(wrapped)) == wrapped
