"""Shared fixtures of the core tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope='module', autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread per test module: the small models run fastest so on 2 cores, and the
    module's figures do not depend on what else the machine runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
