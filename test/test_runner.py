"""The runner as a service manager uses it: SIGTERM stops the whole set, a node that cannot work
stops it too, bad arguments are one line, and only the parts asked for start.

These start real node processes (the device set) on the test's own ROS domain.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import Output, alive, children

from cdcca_ros.nodes.sets import SETS

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _runner(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Output]:
    cmd = [sys.executable, '-m', 'cdcca_ros.runner', 'device',
           f'device.state_dir:={tmp_path / "state"}', 'camera.width:=64', 'camera.height:=48',
           'camera.fps:=2.0', *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return proc, Output(proc)


def test_sigterm_stops_every_node_of_the_set(tmp_path):
    """systemd and `docker stop` send SIGTERM: no node of the set may outlive the runner."""
    port = _free_port()  # nothing listens: the bridge runs with its link down
    proc, out = _runner(tmp_path, f'device_bridge.connect:=tcp/127.0.0.1:{port}',
                        f'device_bridge.spool_dir:={tmp_path / "spool"}')
    try:
        assert out.wait_for('ready in', 90.0), out.text  # the device node loaded its model
        nodes = children(proc.pid)
        assert len(nodes) == len(SETS['device']), (nodes, out.text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30.0) == 0, out.text
        deadline = time.monotonic() + 5.0
        while any(alive(pid) for pid in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in nodes if alive(pid)], out.text
        assert 'Traceback' not in out.text, out.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_node_that_cannot_load_stops_the_set(tmp_path):
    proc, out = _runner(tmp_path, 'use_bridge:=false', 'device.model:=/nonexistent/student')
    try:
        code = proc.wait(timeout=60.0)
        time.sleep(0.2)  # the output thread catches up
        assert code != 0, out.text
        fatal = [line for line in out.lines if 'FATAL' in line]
        assert len(fatal) == 1 and '/nonexistent/student' in fatal[0], out.text
        assert 'device_node exited with code 1; stopping the others' in out.text
        assert not children(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize('args,needle', [
    (['camera.fps:=0'], "camera.fps='0': 0.0 is out of range [0.1, 240]"),
    (['-p', 'device.max_new_tokens=0'], "0 is out of range [1, 256]"),
    (['device.uts.keep_ratio:=2'], 'out of range [0, 1]'),
    (['device.max_new_tokens:=many'], "'many' is not an integer"),
    (['device.max_new_token:=5'], "unknown parameter 'max_new_token' (did you mean "
                                  "'max_new_tokens'?); known: device_id, model"),
    (['use_camera:=false', 'camera.fps:=5'], 'camera is not started (use_camera is false)'),
    (['use_bridge:=maybe'], "use_bridge must be true or false, got 'maybe'"),
])
def test_bad_arguments_are_one_line_naming_the_range_or_the_names(args, needle):
    proc = subprocess.run([sys.executable, '-m', 'cdcca_ros.runner', 'device', *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert 'is not a int' not in proc.stderr


def test_only_the_parts_asked_for_start():
    def dry(*args: str) -> list[str]:
        return subprocess.run([sys.executable, '-m', 'cdcca_ros.runner', 'device', '--dry-run',
                               *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              check=True).stdout.strip().splitlines()

    everything = dry()
    assert [c.split()[2] for c in everything] == [
        'cdcca_ros.nodes.camera_node', 'cdcca_ros.nodes.device_node',
        'cdcca_ros.nodes.cloud_bridge_node']
    # Your own camera driver, no cloud yet: the device node alone, reading the driver's topic.
    own = dry('use_camera:=false', 'use_bridge:=false', 'image_topic:=/camera/color/image_raw')
    assert len(own) == 1 and 'cdcca_ros.nodes.device_node' in own[0]
    assert 'image:=/camera/color/image_raw' in own[0]
    assert dry('--no-camera', '--no-bridge', '--image-topic', '/camera/color/image_raw') == own
    # With the synthetic camera, both ends of the topic move together.
    both = dry('image_topic:=frames')
    assert 'image_raw:=frames' in both[0] and 'image:=frames' in both[1]
