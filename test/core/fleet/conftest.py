"""Tiny models and round settings shared by the fleet tests (short rounds that ship)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope='session')
def tiny_dirs(tmp_path_factory):
    """A random tiny teacher and student (shared ViT), saved where any process loads them."""
    from cdcca_ros.bench.common import build_tiny_pair

    root = tmp_path_factory.mktemp('fleet-models')
    teacher, student = build_tiny_pair(0)
    teacher.save(root / 'teacher')
    student.save(root / 'student')
    return {'teacher': str(root / 'teacher'), 'student': str(root / 'student')}


@pytest.fixture(scope='module')
def tiny_tokens(tiny_dirs):
    """Vision tokens of a few synthetic fog images and their questions."""
    from cdcca_ros.models import bundled
    from cdcca_ros.sim.world import World

    student = bundled.load(tiny_dirs['student'])
    samples = World(5).samples('fog', 48, 64, start=1_700_000)
    with torch.no_grad():
        tokens = student.vision_tokens([s.image for s in samples])
    return tokens, [s.question for s in samples], student.vision_space()

