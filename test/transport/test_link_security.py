"""Security of the link: mutual TLS admits only the CA's certificates, and access control
keeps each device to its own keys. Denials are silent in Zenoh, so the tests check what
arrived, against a control that shows the same session does get through where allowed."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zenoh
from linktest_utils import wait_until

from cdcca_ros.transport.framing import split_message
from cdcca_ros.transport.link import CloudLink, DeviceLink


def _client_conf(port: int, tls: dict[str, Any] | None, proto: str = 'tls') -> Any:
    conf: dict[str, Any] = {
        'mode': 'client', 'connect': {'endpoints': [f'{proto}/localhost:{port}'],
                                      'timeout_ms': 500, 'exit_on_failure': True},
        'scouting': {'multicast': {'enabled': False}, 'gossip': {'enabled': False}}}
    if tls is not None:
        conf['transport'] = {'link': {'tls': tls}}
    return zenoh.Config.from_json5(json.dumps(conf))


@pytest.mark.parametrize('case', ['no client certificate', 'certificate from another CA',
                                  'plain tcp to the tls port'])
def test_clients_without_a_valid_certificate_cannot_connect(router_port: int, certs: Path,
                                                            case: str) -> None:
    # Control: the same client configuration with robot1's valid certificate connects, so
    # the refusal below is the router's and not a port where nobody listens.
    zenoh.open(_client_conf(router_port, {
        'root_ca_certificate': str(certs / 'ca.crt'),
        'connect_certificate': str(certs / 'robot1.crt'),
        'connect_private_key': str(certs / 'robot1.key'), 'enable_mtls': True})).close()
    rogue = certs.parent / 'rogue'
    if case == 'no client certificate':
        conf = _client_conf(router_port, {'root_ca_certificate': str(certs / 'ca.crt')})
    elif case == 'certificate from another CA':
        conf = _client_conf(router_port, {
            'root_ca_certificate': str(certs / 'ca.crt'),
            'connect_certificate': str(rogue / 'robot1.crt'),
            'connect_private_key': str(rogue / 'robot1.key'), 'enable_mtls': True})
    else:
        conf = _client_conf(router_port, None, proto='tcp')
    with pytest.raises(zenoh.ZError):
        zenoh.open(conf).close()


def test_a_device_with_a_foreign_certificate_reports_why_and_delivers_nothing(
        router_port: int, certs: Path, link_config: Callable[..., Any], links: list[Any],
        tmp_path: Path) -> None:
    # robot1's files replaced by robot1 certificates from another CA (same common name).
    pki = tmp_path / 'pki'
    shutil.copytree(certs, pki)
    for ext in ('crt', 'key'):
        (pki / f'robot1.{ext}').unlink()
        shutil.copy(certs.parent / 'rogue' / f'robot1.{ext}', pki / f'robot1.{ext}')
    up: list[Any] = []
    links.append(CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up.append,
                           ['robot1']))
    dev = DeviceLink('robot1', link_config(router_port, 'robot1', certs_dir=pki),
                     tmp_path / 'r1', lambda m: None)
    links.append(dev)
    dev.send('/t', b'should never arrive')
    assert wait_until(lambda: dev.stats()['connect_failures'] >= 2, 10)
    st = dev.stats()
    assert not st['connected'] and not st['cloud_reachable'] and st['sent'] == 0
    assert 'cannot connect' in st['last_error'] and 'certificate' in st['last_error']
    assert st['spooled_messages'] == 1  # kept for when the certificate is fixed
    assert up == []


def test_another_devices_certificate_can_neither_publish_nor_read_its_keys(
        router_port: int, certs: Path, link_config: Callable[..., Any], links: list[Any],
        raw: Callable[..., Any], tmp_path: Path) -> None:
    up: list[Any] = []
    cloud = CloudLink(link_config(router_port, 'cloud'), tmp_path / 'cloud', up.append,
                      ['robot1', 'robot2'])
    down1: list[Any] = []
    dev1 = DeviceLink('robot1', link_config(router_port, 'robot1'), tmp_path / 'r1',
                      down1.append)
    links += [cloud, dev1]
    # The attacker holds robot2's (valid) certificate and targets robot1's keys.
    spy = raw(certs, 'robot2', router_port)
    forger = raw(certs, 'robot2', router_port)  # apart, so its own puts don't loop back to spy
    stolen: list[str] = []
    spy.declare_subscriber('cdcca/robot1/down/**', lambda s: stolen.append(str(s.key_expr)))
    spy.declare_subscriber('cdcca/robot1/**', lambda s: stolen.append(str(s.key_expr)))
    spy.declare_subscriber('cdcca/**', lambda s: stolen.append(str(s.key_expr)))
    own: list[str] = []
    spy.declare_subscriber('cdcca/robot2/down/**', lambda s: own.append(str(s.key_expr)))
    forged = list(split_message(b'forged uplink', chunk_size=1024, epoch=1 << 62, seq=1,
                                floor=1, created_ns=0, topic='/cdcca/uts_tokens'))[0]
    assert wait_until(lambda: cloud.stats()['devices']['robot1']['device_reachable'], 10)
    for _ in range(3):
        forger.put('cdcca/robot1/up/data', forged)
        forger.put('cdcca/robot1/up/ack', forged)
        forger.put('cdcca/robot2/up/data', b'garbage on its own key')  # control: allowed
    dev1.send('/cdcca/uts_tokens', b'real uplink')
    for i in range(3):
        cloud.send('robot1', '/cdcca/dwc_delta', b'for robot1 only %d' % i)
    cloud.send('robot2', '/cdcca/dwc_delta', b'for robot2')
    assert wait_until(lambda: len(down1) == 3 and len(up) == 1, 10)
    # Controls: robot2's own keys work both ways, so its sessions were connected...
    assert wait_until(lambda: cloud.stats()['rx_errors'] == 3, 5)
    assert wait_until(lambda: 'cdcca/robot2/down/data' in own, 5)
    time.sleep(0.3)
    # ...yet nothing it forged reached the cloud, and it saw none of robot1's traffic.
    assert [(m.device, m.payload) for m in up] == [('robot1', b'real uplink')]
    # (Its wide subscriptions see its own downlink, dispatched locally by its session.)
    assert [k for k in stolen if not k.startswith('cdcca/robot2/down/')] == []
    assert [m.payload for m in down1] == [b'for robot1 only %d' % i for i in range(3)]
