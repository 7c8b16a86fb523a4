"""Shared fixtures of the bench tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope='module')
def tiny_specs(tmp_path_factory) -> tuple[str, str]:
    """A tiny teacher/student pair saved once per module (every bench process loads it)."""
    from cdcca_ros.bench.common import build_tiny_pair

    root = tmp_path_factory.mktemp('tiny')
    teacher, student = build_tiny_pair(0)
    teacher.save(root / 'teacher')
    student.save(root / 'student')
    return str(root / 'teacher'), str(root / 'student')
