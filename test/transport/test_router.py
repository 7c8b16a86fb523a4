"""The router command: configuration, start-up, clean shutdown, a clear error on a busy port."""
from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from linktest_utils import Proc, free_port

from cdcca_ros.errors import LinkError
from cdcca_ros.transport.config import RouterConfig
from cdcca_ros.transport.router import Router, main


def test_print_config_shows_tls_and_per_device_rules(certs: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(['--certs', str(certs), '--listen', 'tls/127.0.0.1:7447', '--devices',
                 'robot1', 'robot2', '--print-config']) == 0
    conf = json.loads(capsys.readouterr().out)
    assert conf['mode'] == 'router' and conf['transport']['link']['tls']['enable_mtls']
    subjects = {s['id']: s['cert_common_names'] for s in conf['access_control']['subjects']}
    assert subjects == {'subject-robot1': ['robot1'], 'subject-robot2': ['robot2'],
                        'subject-cloud': ['cloud']}


@pytest.mark.parametrize('argv', [['--listen', 'tcp/127.0.0.1:7447'],
                                  ['--listen', 'tls/127.0.0.1:7447', '--devices', 'a/b']])
def test_bad_arguments_exit_2(certs: Path, argv: list[str]) -> None:
    assert main(['--certs', str(certs), *argv]) == 2


def test_a_busy_port_is_a_clear_error(certs: Path) -> None:
    port = free_port()
    with Router(RouterConfig(certs, [f'tls/127.0.0.1:{port}'], ['robot1'])):
        with pytest.raises(LinkError, match=f'cannot listen on .*{port}'):
            Router(RouterConfig(certs, [f'tls/127.0.0.1:{port}'], ['robot1']))


def test_router_process_stops_cleanly_on_sigterm(start_router: Callable[..., Proc]) -> None:
    router = start_router(free_port())
    router.popen.send_signal(signal.SIGTERM)
    assert router.popen.wait(10) == 0
