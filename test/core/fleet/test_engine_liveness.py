"""The engine tells a worker process on this host is gone before Ray reports it (no Ray)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from cdcca_ros.core.fleet.engine import _process_gone


def test_a_worker_process_is_known_gone_when_it_exited_or_is_a_zombie_on_this_host():
    here = socket.gethostname()
    assert not _process_gone(os.getpid(), here)
    assert not _process_gone(os.getpid(), 'another-host')  # Ray's report counts there
    assert not _process_gone(0, here)  # not started yet
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    deadline = time.monotonic() + 30.0
    while not _process_gone(child.pid, here) and time.monotonic() < deadline:
        time.sleep(0.01)  # exited, not reaped yet: a zombie
    assert _process_gone(child.pid, here)
    child.wait()
    assert _process_gone(child.pid, here)  # reaped: no such process
