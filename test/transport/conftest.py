"""Fixtures of the link tests: certificates, free ports, routers and peers in subprocesses.

Everything runs on 127.0.0.1. Every subprocess is registered with a fixture that kills it at
the end of the test, also when the test fails.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from linktest_utils import DEVICES, Proc, free_port, raw_session, wait_until  # noqa: F401

from cdcca_ros.transport.certs import create_certificates


@pytest.fixture(scope='session')
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA + router + cloud + robot1..3 certificates, and an 'intruder' from another CA."""
    root = tmp_path_factory.mktemp('certs')
    create_certificates(root / 'pki', devices=DEVICES)
    create_certificates(root / 'rogue', devices=['robot1', 'intruder'])
    return root / 'pki'


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every subprocess a test starts; all killed at teardown."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def start_router(procs: list[Proc], certs: Path) -> Callable[..., Proc]:
    """Start ``python -m cdcca_ros.transport.router`` and wait for its READY line."""

    def start(port: int, devices: tuple[str, ...] = DEVICES) -> Proc:
        p = Proc(['-m', 'cdcca_ros.transport.router', '--certs', str(certs), '--listen',
                  f'tls/127.0.0.1:{port}', '--devices', *devices], 'router')
        procs.append(p)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                line = p.lines.get(timeout=0.2)
            except queue.Empty:
                if p.popen.poll() is not None:
                    break
                continue
            if line.startswith('READY'):
                return p
        raise AssertionError(f'router did not start: {"".join(p.stderr)[-2000:]}')

    return start


@pytest.fixture
def start_peer(procs: list[Proc], certs: Path, tmp_path: Path) -> Callable[..., Proc]:
    """Start ``python -m cdcca_ros.transport.peer`` (device or cloud) and wait for 'ready'."""

    def start(role: str, port: int, name: str, store: Path | None = None,
              extra: tuple[str, ...] = ()) -> Proc:
        store = store or tmp_path / name
        args = ['-m', 'cdcca_ros.transport.peer', role, '--id', name, '--certs', str(certs),
                '--connect', f'tls/localhost:{port}', '--dir', str(store),
                '--retry-init-ms', '100', '--retry-max-ms', '400', '--open-timeout-ms', '500',
                '--ack-timeout', '1.0', *extra]
        p = Proc(args, name)
        procs.append(p)
        p.wait_for('ready')
        return p

    return start


@pytest.fixture
def router_port(certs: Path) -> Iterator[int]:
    """An in-process router (TLS + access control for robot1..3) on a fresh port."""
    from cdcca_ros.transport.config import RouterConfig
    from cdcca_ros.transport.router import Router

    port = free_port()
    with Router(RouterConfig(certs, [f'tls/127.0.0.1:{port}'], DEVICES)):
        yield port


@pytest.fixture
def link_config(certs: Path) -> Callable[..., Any]:
    """``link_config(port, name, **overrides)``: a LinkConfig tuned for fast tests."""
    from cdcca_ros.transport.config import SessionConfig
    from cdcca_ros.transport.link import LinkConfig

    def make(port: int, name: str, certs_dir: Path | None = None, **kw: Any) -> LinkConfig:
        session = SessionConfig([f'tls/localhost:{port}'], certs_dir or certs, name,
                                retry_init_ms=100, retry_max_ms=400, open_timeout_ms=500)
        opts = {'chunk_size': 1024, 'max_payload_bytes': 64 << 10, 'spool_max_bytes': 1 << 20,
                'ack_timeout_s': 1.0, 'chunk_timeout_s': 1.0, 'version_period_s': 0.5,
                'tick_s': 0.02, **kw}
        return LinkConfig(session, **opts)

    return make


@pytest.fixture
def links() -> Iterator[list[Any]]:
    """Links (and other closeables) a test opens; closed at teardown."""
    opened: list[Any] = []
    yield opened
    for link in reversed(opened):
        link.close()


@pytest.fixture
def raw() -> Iterator[Callable[[Path, str, int], Any]]:
    """``raw(certs_dir, name, port)``: bare sessions, closed at teardown."""
    sessions: list[Any] = []

    def make(certs_dir: Path, name: str, port: int) -> Any:
        sessions.append(raw_session(certs_dir, name, port))
        return sessions[-1]

    yield make
    for s in sessions:
        s.close()
