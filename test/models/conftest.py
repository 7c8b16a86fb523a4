"""Tiny offline models shared by the model-layer tests (one build per family and module)."""
from __future__ import annotations

import numpy as np
import pytest

FAMILIES = ('blip2', 'llava', 'qwen2_vl')

VOCAB = ['what', 'colour', 'shape', 'is', 'the', 'how', 'many', 'are', 'there', 'red', 'green',
         'blue', 'yellow', 'circle', 'square', 'triangle', 'one', 'two', 'three', 'yes', 'no',
         '?']

QUESTIONS = ['what colour is the shape?', 'how many shapes are there?']


@pytest.fixture(scope='session', autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread, above all on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def images() -> list[np.ndarray]:
    """Two frames at different camera resolutions (the model resizes)."""
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    small[30:90, 40:120] = (255, 0, 0)  # a red block, so the two images differ in structure
    return [big, small]


@pytest.fixture(scope='module', params=FAMILIES)
def model(request: pytest.FixtureRequest):
    """A tiny model per family; tests must leave it as they found it (no LoRA added)."""
    from cdcca_ros.models import build_tiny

    return build_tiny(request.param, VOCAB)


@pytest.fixture
def make_model():
    """Factory of fresh tiny models, for tests that change the model."""
    from cdcca_ros.models import build_tiny

    def make(family: str, **sizes):
        return build_tiny(family, VOCAB, **sizes)

    return make


@pytest.fixture(scope='session')
def questions() -> list[str]:
    """Two questions of different lengths (exercises left padding)."""
    return list(QUESTIONS)
