"""Tests of cdcca_ros.core.uplink.image: the frame as JPEG, decoded safely on the cloud."""
from __future__ import annotations

import numpy as np
import pytest

from cdcca_ros.core.uplink.image import decode_jpeg, encode_jpeg
from cdcca_ros.errors import ConfigError, WireError


def frame(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize('quality', [30, 90])
def test_round_trip_keeps_size_and_content(quality):
    rgb = frame()
    data = encode_jpeg(rgb, quality)
    back = decode_jpeg(data)
    assert back.shape == rgb.shape and back.dtype == np.uint8
    error = np.abs(back.astype(int) - rgb.astype(int)).mean()
    assert error < (12 if quality == 30 else 4)
    assert len(encode_jpeg(rgb, 30)) < len(encode_jpeg(rgb, 90))


def test_bad_frames_and_qualities_are_refused():
    with pytest.raises(ConfigError, match='RGB'):
        encode_jpeg(np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError, match='quality'):
        encode_jpeg(frame(), 0)


def test_received_bytes_that_are_no_jpeg_raise_wire_errors():
    data = encode_jpeg(frame())
    for bad in (b'', b'\x89PNG....', data[:20], data[:2] + b'\x00' * 40):
        with pytest.raises(WireError):
            decode_jpeg(bad)
    with pytest.raises(WireError, match='pixels'):
        decode_jpeg(data, max_pixels=100)
