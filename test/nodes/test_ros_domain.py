"""One ROS domain per run: picked free and locked, explicit ids honoured, the caller's
environment restored (cdcca_ros/nodes/ros_domain.py and the suite's own set-up)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes import ros_domain
from cdcca_ros.nodes.ros_domain import (
    DomainLease,
    domain_in_use,
    isolated_ros_env,
    participant_ports,
    pick_domain,
    resolve_domain,
)


def test_participant_ports_follow_the_rtps_mapping() -> None:
    # 7400 + 250 * domain + 10 + 2 * participant (discovery), + 1 for user traffic.
    assert participant_ports(0, 0) == (7410, 7411)
    assert participant_ports(101, 3) == (7400 + 25250 + 10 + 6, 7400 + 25250 + 11 + 6)
    # Domain 101's first participants stay below Linux's ephemeral range (32768...).
    assert participant_ports(101, ros_domain.PROBED_PARTICIPANTS)[1] < 32768


def test_the_run_holds_one_safe_domain(ros_domain_lease) -> None:
    lease = ros_domain_lease
    assert os.environ['ROS_DOMAIN_ID'] == str(lease.domain_id)
    assert os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
    assert 'ROS_STATIC_PEERS' not in os.environ
    if lease.how == 'picked':
        assert lease.domain_id in ros_domain.PICKED_DOMAINS and lease.locked
        # Another process cannot take the run's domain while it runs.
        code = ('import sys; from cdcca_ros.nodes.ros_domain import _try_lock; '
                'print(_try_lock(int(sys.argv[1]), None) is None)')
        out = subprocess.run([sys.executable, '-c', code, str(lease.domain_id)],
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == 'True'


def test_pick_skips_locked_and_busy_domains(tmp_path) -> None:
    held = pick_domain(range(10, 14), lock_dir=tmp_path, start=0)
    assert (held.domain_id, held.how, held.locked) == (10, 'picked', True)
    assert held.lock_path == tmp_path / 'cdcca-ros-domain-10.lock'
    # A DDS participant that took no lock: its discovery port is bound.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        try:
            busy.bind(('0.0.0.0', participant_ports(11, 2)[0]))
        except OSError:
            pytest.skip('domain 11 is in use on this machine')
        assert domain_in_use(11) and not domain_in_use(12)
        nxt = pick_domain(range(10, 14), lock_dir=tmp_path, start=0)
        assert nxt.domain_id == 12
    with pytest.raises(ConfigError, match='no free ROS domain id in 10..10'):
        pick_domain(range(10, 11), lock_dir=tmp_path)
    held.release()
    assert not held.locked
    again = pick_domain(range(10, 11), lock_dir=tmp_path)
    assert again.domain_id == 10
    again.release()
    nxt.release()


@pytest.mark.parametrize('env,expected', [
    ({'CDCCA_TEST_DOMAIN_ID': '61', 'ROS_DOMAIN_ID': '5'}, (61, 'from CDCCA_TEST_DOMAIN_ID')),
    ({'CDCCA_TEST_DOMAIN_ID': ' ', 'ROS_DOMAIN_ID': '5'}, (5, 'from ROS_DOMAIN_ID')),
    ({'ROS_DOMAIN_ID': '150'}, (150, 'from ROS_DOMAIN_ID')),  # explicit: honoured as given
])
def test_explicit_domain_ids_are_honoured(tmp_path, env, expected) -> None:
    lease = resolve_domain(env, lock_dir=tmp_path)
    assert (lease.domain_id, lease.how) == expected
    lease.release()


@pytest.mark.parametrize('value,needle', [('x7', 'not a ROS domain id'), ('-1', 'outside'),
                                          ('233', 'outside')])
def test_bad_domain_ids_are_refused(tmp_path, value, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_domain({'ROS_DOMAIN_ID': value}, lock_dir=tmp_path)
    with pytest.raises(ConfigError, match='outside'):
        with isolated_ros_env(-1, {}):
            pass


def test_isolated_env_restores_the_callers_values() -> None:
    env = {'ROS_DOMAIN_ID': '7', 'ROS_STATIC_PEERS': '10.0.0.1', 'OTHER': 'x'}
    with isolated_ros_env(42, env) as domain_id:
        assert domain_id == 42
        assert env == {'ROS_DOMAIN_ID': '42', 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
                       'OTHER': 'x'}
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = '/tmp/profile.xml'  # set inside the block
    assert env == {'ROS_DOMAIN_ID': '7', 'ROS_STATIC_PEERS': '10.0.0.1', 'OTHER': 'x'}
    # Also when the block fails, and with a picked domain (its lock given back after).
    with pytest.raises(RuntimeError), isolated_ros_env(None, env) as picked:
        assert picked in ros_domain.PICKED_DOMAINS
        raise RuntimeError('boom')
    assert env == {'ROS_DOMAIN_ID': '7', 'ROS_STATIC_PEERS': '10.0.0.1', 'OTHER': 'x'}
    lease = DomainLease(picked, 'test', _file=ros_domain._try_lock(picked, None))
    assert lease.locked  # released by the block
    lease.release()
