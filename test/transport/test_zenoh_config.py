"""Zenoh configurations: router (mTLS + access control) and device/cloud sessions."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.transport.config import (
    RouterConfig,
    SessionConfig,
    access_control_rules,
    to_zenoh_config,
)


def test_router_listens_on_tls_with_mutual_auth_and_denies_by_default(certs: Path) -> None:
    conf = RouterConfig(certs, ['tls/127.0.0.1:7447'], ['robot1', 'robot2']).to_dict()
    assert conf['mode'] == 'router'
    assert conf['listen']['endpoints'] == ['tls/127.0.0.1:7447']
    tls = conf['transport']['link']['tls']
    assert tls['enable_mtls'] is True
    assert tls['listen_certificate'] == str(certs / 'router.crt')
    assert tls['root_ca_certificate'] == str(certs / 'ca.crt')
    acl = conf['access_control']
    assert acl['enabled'] and acl['default_permission'] == 'deny'
    assert conf['scouting']['multicast']['enabled'] is False
    to_zenoh_config(conf)  # Zenoh itself accepts every key


def test_each_device_gets_only_its_own_keys() -> None:
    acl = access_control_rules(['robot1', 'robot2'], ['cloud'])
    rules = {r['id']: r for r in acl['rules']}
    for dev in ('robot1', 'robot2'):
        policy = next(p for p in acl['policies'] if p['id'] == f'policy-{dev}')
        subject = next(s for s in acl['subjects'] if s['id'] == policy['subjects'][0])
        assert subject['cert_common_names'] == [dev]
        keys = {k for rid in policy['rules'] for k in rules[rid]['key_exprs']}
        assert keys == {f'cdcca/{dev}/up/**', f'cdcca/{dev}/down/**'}
        publish = [rules[r] for r in policy['rules'] if 'put' in rules[r]['messages']
                   and rules[r]['flows'] == ['ingress']]
        assert [r['key_exprs'] for r in publish] == [[f'cdcca/{dev}/up/**']]
    cloud = next(r for r in acl['rules'] if r['id'] == 'cloud-all')
    assert cloud['key_exprs'] == ['cdcca/**'] and set(cloud['flows']) == {'ingress', 'egress'}


def test_session_is_a_tls_client_without_scouting(certs: Path) -> None:
    sc = SessionConfig(['tls/localhost:7447'], certs, 'robot1', retry_init_ms=100,
                       retry_max_ms=800, extra={'transport.link.tx.batch_size': 8192})
    conf = sc.to_dict()
    assert conf['mode'] == 'client'
    assert conf['connect']['retry'] == {'period_init_ms': 100, 'period_max_ms': 800,
                                        'period_increase_factor': 2.0}
    tls = conf['transport']['link']['tls']
    assert tls['connect_certificate'] == str(certs / 'robot1.crt')
    assert tls['enable_mtls'] is True and tls['verify_name_on_connect'] is True
    assert conf['scouting'] == {'multicast': {'enabled': False}, 'gossip': {'enabled': False}}
    assert conf['transport']['shared_memory']['enabled'] is False
    assert conf['timestamping']['enabled'] is True
    assert conf['transport']['link']['tx']['batch_size'] == 8192
    to_zenoh_config(conf)


@pytest.mark.parametrize('kwargs, match', [
    ({'connect': ['tcp/localhost:7447']}, 'plain TCP'),
    ({'connect': ['localhost:7447']}, 'tls/HOST:PORT'),
    ({'connect': []}, 'empty'),
    ({'certs_dir': None}, 'certs_dir'),
    ({'retry_init_ms': 5000, 'retry_max_ms': 100}, 'retry_init_ms'),
    ({'name': 'bad/name'}, 'device id'),
    ({'lease_ms': 10}, 'lease_ms'),
])
def test_bad_session_configs_are_refused(certs: Path, kwargs: dict, match: str) -> None:
    base = {'connect': ['tls/localhost:7447'], 'certs_dir': certs, 'name': 'robot1'}
    with pytest.raises(ConfigError, match=match):
        SessionConfig(**{**base, **kwargs})


def test_a_certificate_for_another_name_is_refused(certs: Path, tmp_path: Path) -> None:
    shutil.copytree(certs, tmp_path / 'pki')
    for ext in ('crt', 'key'):
        (tmp_path / 'pki' / f'robot1.{ext}').unlink()
        shutil.copy(certs / f'robot2.{ext}', tmp_path / 'pki' / f'robot1.{ext}')
    with pytest.raises(ConfigError, match="for 'robot2', not 'robot1'"):
        SessionConfig(['tls/localhost:7447'], tmp_path / 'pki', 'robot1').to_dict()
    with pytest.raises(ConfigError, match='TLS files missing'):
        SessionConfig(['tls/localhost:7447'], tmp_path / 'pki', 'robot7').to_dict()


def test_router_refuses_a_name_both_device_and_cloud(certs: Path) -> None:
    with pytest.raises(ConfigError, match='both devices and cloud'):
        RouterConfig(certs, ['tls/127.0.0.1:1'], ['cloud'])
