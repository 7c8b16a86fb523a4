"""Node processes started directly, as a user does: what cannot work ends at once with one line.

A node that can never work (a model path that does not exist, a GPU this torch lacks, a value
out of range, a misspelt parameter, TLS without certificates) prints one FATAL line naming the
cause and exits non-zero within seconds, no traceback; ``--help`` prints usage and starts
nothing.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

REPO = Path(__file__).resolve().parents[2]


def _node(module: str, *ros_args: str, timeout_s: float = 60.0
          ) -> tuple[subprocess.CompletedProcess, float]:
    args = [sys.executable, '-m', f'cdcca_ros.nodes.{module}']
    if ros_args:
        args += ['--ros-args', *ros_args]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    return proc, time.monotonic() - t0


def _fatal_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    fatal = [line for line in out.splitlines() if 'FATAL' in line]
    assert len(fatal) == 1, out
    assert 'Traceback' not in out, out
    return fatal[0]


def test_an_impossible_model_path_exits_at_once_with_one_fatal_line(tmp_path):
    proc, took = _node('device_node', '-p', 'model:=/nonexistent/student',
                       '-p', f'state_dir:={tmp_path}')
    assert proc.returncode == 1
    line = _fatal_line(proc)
    assert "model '/nonexistent/student'" in line and 'does not exist' in line
    assert took < 45.0  # not "model not ready" forever (torch alone takes seconds to import)
    # An empty cloud_public_key means every update will be refused: one warning at start.
    out = proc.stdout + proc.stderr
    assert out.count('cloud_public_key is empty') == 1


def test_a_gpu_this_torch_lacks_is_refused_before_loading():
    import torch

    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    proc, _ = _node('device_node', '-p', 'torch_device:=cuda:0')
    assert proc.returncode == 1
    assert "torch_device 'cuda:0': no usable CUDA GPU" in _fatal_line(proc)


@pytest.mark.parametrize('module,arg,needle', [
    ('device_node', 'max_new_tokens:=0', "parameter 'max_new_tokens': 0 is out of range "
                                         "[1, 256]"),
    ('device_node', 'max_new_token:=5', "unknown parameter 'max_new_token' (did you mean "
                                        "'max_new_tokens'?); known: device_id"),
    ('camera_node', 'fps:=0.0', "parameter 'fps': 0.0 is out of range [0.1, 240]"),
    ('camera_node', 'fps:=five', "parameter 'fps': expected float, got 'five'"),
    ('cloud_bridge_node', 'connect:=tls/localhost:7447',
     'connect tls/localhost:7447 is TLS but certs_dir is empty'),
])
def test_bad_parameters_are_one_fatal_line(module, arg, needle):
    proc, _ = _node(module, '-p', arg)
    assert proc.returncode == 1
    assert needle in _fatal_line(proc)


def test_help_prints_usage_and_starts_nothing():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, '-m', 'cdcca_ros.nodes.device_node', '--help'],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and time.monotonic() - t0 < 30.0
    assert proc.stdout.startswith('usage: python -m cdcca_ros.nodes.device_node')
    assert 'max_new_tokens = 6  runtime' in proc.stdout and 'model = ' in proc.stdout
    assert '[INFO]' not in proc.stdout + proc.stderr  # no node was started
    wrong = subprocess.run([sys.executable, '-m', 'cdcca_ros.nodes.camera_node', 'fps:=5'],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and 'parameters go after --ros-args' in wrong.stderr
