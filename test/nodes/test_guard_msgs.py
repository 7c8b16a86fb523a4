"""RollbackOrder <-> RollbackEnvelope, token requests, version strings, status details."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402

from cdcca_ros.errors import DeltaRejectedError, WireError  # noqa: E402


@pytest.mark.parametrize(('text', 'version'), [
    ('robot1:v3', 3), ('v3', 3), ('3', 3), ('robot1:v12:0123456789abcdef', 12),
    ('fleet-7/robot_2:v0', 0), ('', -1), ('robot1', -1), ('robot1:vx', -1), ('v-1', -1),
    ('robot1:v3:not-a-hash', -1)])
def test_parse_version(text, version):
    from cdcca_ros.nodes.guard_msgs import parse_version

    assert parse_version(text) == version


def test_a_rollback_order_crosses_as_cdr_and_still_verifies():
    from cdcca_ros.msg import RollbackOrder

    from cdcca_ros.core.updates import check_rollback, seal_rollback
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.nodes.guard_msgs import msg_to_rollback, rollback_to_msg

    private, public = generate_keypair()
    order = seal_rollback(private, device_id='robot1', from_version=3, from_hash='cd' * 32,
                          to_hash='ab' * 32, new_version=4, reason='v3 is 12 points worse')
    data = serialize_message(rollback_to_msg(order))
    back = msg_to_rollback(deserialize_message(data, RollbackOrder))
    assert back == order
    check_rollback(back, public, 'robot1', 3, 'cd' * 32, 'ab' * 32)  # raises if broken
    # Any field changed on the way breaks the signature.
    tampered = deserialize_message(data, RollbackOrder)
    tampered.new_version = 5
    with pytest.raises(DeltaRejectedError, match='does not verify'):
        check_rollback(msg_to_rollback(tampered), public, 'robot1', 3, 'cd' * 32, 'ab' * 32)


def test_token_request_carries_the_ids():
    from cdcca_ros.msg import TokenRequest

    from cdcca_ros.nodes.guard_msgs import token_request

    msg = token_request('robot1', 'ab-1', iter(['robot1-3', 'robot1-9']))
    back = deserialize_message(serialize_message(msg), TokenRequest)
    assert (back.device_id, back.request_id, list(back.sample_ids)) == (
        'robot1', 'ab-1', ['robot1-3', 'robot1-9'])


def test_detail_is_plain_json():
    from cdcca_ros.nodes.guard_msgs import detail_json, parse_detail

    text = detail_json({'gate': {'ship': np.bool_(False), 'n': np.int64(7),
                                 'gain': np.float32(2.5), 'p': math.nan, 'slices': ('a', 'b')}})
    assert json.loads(text) == {'gate': {'ship': False, 'n': 7, 'gain': 2.5, 'p': None,
                                         'slices': ['a', 'b']}}
    assert parse_detail(text)['gate']['n'] == 7 and parse_detail('') == {}
    for bad in ('[1, 2]', '{"a":'):
        with pytest.raises(WireError):
            parse_detail(bad)
