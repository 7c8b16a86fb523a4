"""The sources pass the project's linter (ruff, configured in pyproject.toml)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which('ruff')
    if ruff is None:
        pytest.skip('ruff is not installed in this environment')
    proc = subprocess.run([ruff, 'check', 'cdcca_ros', 'test', 'tools', 'launch'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
