"""Key expressions: device-id validation and the per-device key layout."""
from __future__ import annotations

import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.transport.keys import LinkKeys, parse_key, validate_device_id, validate_prefix

BAD_IDS = ['', 'a/b', 'robot*', 'r$1', 'r#1', 'r?1', '@admin', ' robot', 'robot 1', '..',
           '-robot', 'x' * 64, 'robot\n']


@pytest.mark.parametrize('device_id', BAD_IDS)
def test_bad_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ConfigError, match='device id'):
        validate_device_id(device_id)


@pytest.mark.parametrize('device_id', ['robot1', 'R2-D2', 'arm_left.0', 'x' * 63])
def test_good_device_ids_pass(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize('prefix', ['', 'a//b', 'a/*', 'a/**', '/a', 'a/', 'a b'])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match='prefix'):
        validate_prefix(prefix)


def test_device_keys_name_the_device_and_split_by_direction() -> None:
    k = LinkKeys.for_device('robot1', 'fleet/a')
    assert (k.up_data, k.up_ack) == ('fleet/a/robot1/up/data', 'fleet/a/robot1/up/ack')
    assert (k.down_data, k.down_ack, k.down_version) == (
        'fleet/a/robot1/down/data', 'fleet/a/robot1/down/ack', 'fleet/a/robot1/down/version')
    # Everything a device publishes sits under `up`, everything it reads under `down`:
    # that is what the router's access-control rules rely on.
    assert k.up == 'fleet/a/robot1/up/**' and k.down == 'fleet/a/robot1/down/**'
    assert LinkKeys.all_devices().up == 'cdcca/*/up/**'


@pytest.mark.parametrize('key, expected', [
    ('cdcca/robot1/up/data', ('robot1', 'up', 'data')),
    ('cdcca/robot2/down/version', ('robot2', 'down', 'version')),
])
def test_parse_key_round_trips(key: str, expected: tuple[str, str, str]) -> None:
    assert parse_key(key) == expected


@pytest.mark.parametrize('key', ['cdcca/robot1/up', 'other/robot1/up/data',
                                 'cdcca/robot1/sideways/data', 'cdcca/r$1/up/data',
                                 'cdcca/robot1/up/data/extra'])
def test_parse_key_refuses_foreign_keys(key: str) -> None:
    with pytest.raises(ConfigError):
        parse_key(key)
