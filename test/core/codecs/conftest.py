"""Shared fixtures of the codec tests."""
from __future__ import annotations

import pytest
from sample_deltas import lora_like

from cdcca_ros.core import codecs


@pytest.fixture(scope='module')
def payloads() -> dict[str, bytes]:
    """One self-describing payload per registered codec, of a small LoRA-like delta."""
    delta = lora_like(hidden=32, layers=1)
    return {name: codecs.get_codec(name).encode(delta) for name in codecs.codec_names()}
