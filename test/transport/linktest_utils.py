"""Helpers of the link tests (imported by conftest and the test modules)."""
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def raw_session(certs_dir: Path, name: str, port: int) -> Any:
    """A bare Zenoh client session with ``name``'s certificate (for attacks and injection)."""
    import zenoh

    from cdcca_ros.transport.config import SessionConfig, to_zenoh_config

    conf = SessionConfig([f'tls/localhost:{port}'], certs_dir, name, open_timeout_ms=2000)
    return zenoh.open(to_zenoh_config(conf.to_dict()))


