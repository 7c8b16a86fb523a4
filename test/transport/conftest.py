"""Fixtures of the link tests: certificates, free ports, routers and peers in subprocesses.

Everything runs on 127.0.0.1. Every subprocess is registered with a fixture that kills it at
the end of the test, also when the test fails.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cdcca_ros.transport.certs import create_certificates

REPO = Path(__file__).resolve().parents[2]
DEVICES = ('robot1', 'robot2', 'robot3')


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


@pytest.fixture(scope='session')
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA + router + cloud + robot1..3 certificates, and an 'intruder' from another CA."""
    root = tmp_path_factory.mktemp('certs')
    create_certificates(root / 'pki', devices=DEVICES)
    create_certificates(root / 'rogue', devices=['robot1', 'intruder'])
    return root / 'pki'


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    return env


class Proc:
    """A subprocess whose stdout JSON lines are collected by a reader thread."""

    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=_env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # Zenoh's own log lines, if any
            if isinstance(ev, dict):
                with self._lock:
                    self.events.append(ev)

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line)

    def send(self, **cmd: Any) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd) + '\n')
        self.popen.stdin.flush()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get('ev') == kind]

    def wait_for(self, kind: str, count: int = 1, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        if not wait_until(lambda: len(self.of(kind)) >= count or self.popen.poll() is not None,
                          timeout_s):
            raise AssertionError(f'{self.name}: {len(self.of(kind))}/{count} {kind!r} events '
                                 f'after {timeout_s}s; stderr: {"".join(self.stderr)[-2000:]}')
        if len(self.of(kind)) < count:
            raise AssertionError(f'{self.name} exited ({self.popen.returncode}): '
                                 f'{"".join(self.stderr)[-2000:]}')
        return self.of(kind)

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        before = len(self.of('stats'))
        self.send(op='stats')
        return self.wait_for('stats', before + 1, timeout_s)[-1]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def quit(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            try:
                self.send(op='quit')
                self.popen.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


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


def raw_session(certs_dir: Path, name: str, port: int) -> Any:
    """A bare Zenoh client session with ``name``'s certificate (for attacks and injection)."""
    import zenoh

    from cdcca_ros.transport.config import SessionConfig, to_zenoh_config

    conf = SessionConfig([f'tls/localhost:{port}'], certs_dir, name, open_timeout_ms=2000)
    return zenoh.open(to_zenoh_config(conf.to_dict()))


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
