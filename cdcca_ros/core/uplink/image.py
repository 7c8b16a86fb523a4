"""The image uplink mode: a selected frame travels as a JPEG (``sensor_msgs/CompressedImage``).

For teacher/student pairs that do not share a vision encoder the cloud cannot use the device's
tokens; it gets the frame instead and runs its own encoder(s) on it. It is also the fair
baseline of the token uplink: the bytes the token packings have to beat.

Decoding uses OpenCV's JPEG decoder on bytes that crossed the network, with the size checked
from the JPEG header before any pixel is decoded; nothing is unpickled.
"""
from __future__ import annotations

import numpy as np

from cdcca_ros.errors import ConfigError, WireError

JPEG_FORMAT = 'jpeg'
DEFAULT_QUALITY = 90
MAX_PIXELS = 8192 * 8192


def encode_jpeg(rgb: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """JPEG bytes of an RGB ``uint8 [H, W, 3]`` frame at ``quality`` (1-100).

    Raises:
        ConfigError: Not an RGB uint8 frame, or a quality outside 1..100.
    """
    import cv2

    frame = np.asarray(rgb)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or not frame.size:
        raise ConfigError(f'encode_jpeg needs an RGB uint8 [H, W, 3] frame, got '
                          f'{frame.shape} {frame.dtype}')
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f'JPEG quality must be in 1..100, got {quality}')
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ConfigError(f'OpenCV could not encode a {frame.shape} frame as JPEG')
    return buf.tobytes()


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the first start-of-frame marker of a JPEG stream."""
    if data[:2] != b'\xff\xd8':
        raise WireError('image uplink: not a JPEG stream (no SOI marker)')
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise WireError('image uplink: corrupt JPEG marker sequence')
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], 'big')
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                break
            return (int.from_bytes(data[pos + 5:pos + 7], 'big'),
                    int.from_bytes(data[pos + 7:pos + 9], 'big'))
        if length < 2:
            raise WireError('image uplink: corrupt JPEG segment length')
        pos += 2 + length
    raise WireError('image uplink: JPEG stream without a frame header')


def decode_jpeg(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` of JPEG ``data`` received from the network.

    Raises:
        WireError: Not a JPEG, larger than ``max_pixels``, or it does not decode.
    """
    import cv2

    raw = bytes(data)
    height, width = _jpeg_size(raw)
    if height < 1 or width < 1 or height * width > max_pixels:
        raise WireError(f'image uplink: a {width}x{height} JPEG (at most {max_pixels} pixels)')
    bgr = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (height, width):
        raise WireError('image uplink: the JPEG stream does not decode')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
