"""Every image encoding cv_bridge reads, through the real sensor_msgs/Image class and its CDR.

Each encoding round-trips (array -> message -> serialized bytes -> message -> array, both byte
orders), and each with a colour meaning decodes to the RGB a camera of that kind saw: drivers
publish rgba8/bgra8 (ZED, GStreamer), 16-bit colour and mono, Bayer mosaics and YUV 4:2:2
(usb_cam's yuv422_yuy2).
"""
from __future__ import annotations

import numpy as np
import pytest

sensor_msgs = pytest.importorskip('sensor_msgs.msg', reason='ROS 2 message packages missing')

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402

from cdcca_ros.camera import encodings  # noqa: E402
from cdcca_ros.camera.convert import (  # noqa: E402
    ENCODINGS,
    image_to_msg,
    msg_to_image,
    msg_to_rgb,
)
from cdcca_ros.errors import ImageConversionError  # noqa: E402

Image = sensor_msgs.Image
H, W = 6, 8  # even: YUV 4:2:2 and Bayer mosaics need pixel pairs


def _random(encoding: str, seed: int = 0) -> np.ndarray:
    spec = ENCODINGS[encoding]
    rng = np.random.default_rng(seed)
    shape = encodings.array_shape(spec, H, W)
    if spec.dtype.kind == 'f':
        return rng.standard_normal(shape).astype(spec.dtype)
    info = np.iinfo(spec.dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=spec.dtype)


def _over_the_wire(msg):
    return deserialize_message(serialize_message(msg), Image)


def _rgb(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding', sorted(ENCODINGS))
def test_every_encoding_round_trips_through_sensor_msgs(encoding):
    image = _random(encoding)
    msg = image_to_msg(image, encoding, Image)
    assert isinstance(msg, Image) and msg.encoding == encoding and msg.is_bigendian == 0
    back = msg_to_image(_over_the_wire(msg))
    assert back.dtype == image.dtype and back.shape == image.shape
    np.testing.assert_array_equal(back, image)
    if image.dtype.itemsize > 1:  # the same pixels sent big-endian by another machine
        msg.is_bigendian = 1
        msg.data = image.astype(image.dtype.newbyteorder('>')).tobytes()
        np.testing.assert_array_equal(msg_to_image(_over_the_wire(msg)), image)


def _expected_rgb(encoding: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image stored as ``encoding``, the RGB it shows) for the exact colour encodings."""
    alpha = np.full((H, W, 1), 77, np.uint8)
    gray = rgb[..., 0]
    wide = rgb.astype(np.uint16) * 257  # 8 -> 16 bit: v * 65535 / 255
    grey_rgb = np.repeat(gray[..., None], 3, axis=2)
    return {
        'rgb8': (rgb, rgb), 'bgr8': (rgb[..., ::-1], rgb),
        'rgba8': (np.concatenate([rgb, alpha], 2), rgb),
        'bgra8': (np.concatenate([rgb[..., ::-1], alpha], 2), rgb),
        'rgb16': (wide, rgb), 'bgr16': (wide[..., ::-1], rgb),
        'rgba16': (np.concatenate([wide, alpha.astype(np.uint16)], 2), rgb),
        'bgra16': (np.concatenate([wide[..., ::-1], alpha.astype(np.uint16)], 2), rgb),
        'mono8': (gray, grey_rgb), 'mono16': (gray.astype(np.uint16) * 257, grey_rgb),
        # Generic OpenCV types read as OpenCV's order where a colour image is asked for.
        '8UC1': (gray, grey_rgb), '8UC3': (rgb[..., ::-1], rgb),
        '8UC4': (np.concatenate([rgb[..., ::-1], alpha], 2), rgb),
    }[encoding]


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'rgb16', 'bgr16',
                                      'rgba16', 'bgra16', 'mono8', 'mono16', '8UC1', '8UC3',
                                      '8UC4'])
def test_colour_encodings_decode_to_the_rgb_they_show(encoding):
    stored, shows = _expected_rgb(encoding, _rgb())
    msg = _over_the_wire(image_to_msg(np.ascontiguousarray(stored), encoding, Image))
    out = msg_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, shows)


def _yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited-range Y, U, V of an RGB image (what a YUV camera encodes)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    return tuple(np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))


@pytest.mark.parametrize('encoding', ['yuv422', 'yuv422_yuy2'])
def test_yuv422_decodes_to_the_camera_colours(encoding):
    # Pixel pairs share one chroma sample in 4:2:2: give both pixels of a pair one colour.
    rgb = np.repeat(_rgb()[:, ::2], 2, axis=1)
    y, u, v = _yuv(rgb)
    chroma = np.where(np.arange(W) % 2 == 0, u, v)  # U for the pair's first pixel, V second
    packed = (np.stack([chroma, y], axis=2) if encoding == 'yuv422'  # UYVY
              else np.stack([y, chroma], axis=2))                     # YUYV
    msg = _over_the_wire(image_to_msg(np.ascontiguousarray(packed), encoding, Image))
    out = msg_to_rgb(msg)
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 4
    grey = msg_to_image(msg, 'mono8')
    np.testing.assert_array_equal(grey, y)  # luma is the grey image
    with pytest.raises(ImageConversionError, match='OpenCV cannot convert'):
        odd = image_to_msg(np.ascontiguousarray(packed[:, :W - 1]), encoding, Image)
        msg_to_rgb(odd)  # 4:2:2 needs an even width


# Which of the 2x2 cells holds R, G, G, B in each mosaic (row-major).
BAYER = {'rggb': 'RGGB', 'bggr': 'BGGR', 'gbrg': 'GBRG', 'grbg': 'GRBG'}


@pytest.mark.parametrize('bits', [8, 16])
@pytest.mark.parametrize('pattern', sorted(BAYER))
def test_bayer_mosaics_demosaic_to_the_scene_colour(pattern, bits):
    colour = np.array([200, 90, 30])  # a flat scene: every pixel this RGB
    scale = 257 if bits == 16 else 1
    dtype = np.uint16 if bits == 16 else np.uint8
    cells = {'R': colour[0], 'G': colour[1], 'B': colour[2]}
    mosaic = np.empty((H, W), dtype)
    for i, letter in enumerate(BAYER[pattern]):
        mosaic[i // 2::2, i % 2::2] = cells[letter] * scale
    encoding = f'bayer_{pattern}{bits}'
    out = msg_to_rgb(_over_the_wire(image_to_msg(mosaic, encoding, Image)))
    inner = out[2:-2, 2:-2].reshape(-1, 3)  # demosaicing guesses at the border
    assert np.abs(inner.astype(int) - colour).max() <= 1, (encoding, inner[:2])


@pytest.mark.parametrize('source,desired,expect', [
    ('rgb8', 'mono16', lambda im: None),
    ('mono16', 'mono8', lambda im: None),
    ('8UC1', '16UC1', lambda im: im.astype(np.uint16) * 257),  # cv_bridge scales 8 -> 16 bit
    ('16UC1', 'mono16', lambda im: im),                        # depth passes unchanged
    ('32FC1', '64FC1', lambda im: im.astype(np.float64)),
    ('16SC3', '32FC3', lambda im: im.astype(np.float32)),
])
def test_depth_and_generic_conversions(source, desired, expect):
    image = _random(source, seed=4)
    out = msg_to_image(_over_the_wire(image_to_msg(image, source, Image)), desired)
    assert out.dtype == ENCODINGS[desired].dtype
    assert out.shape == encodings.array_shape(ENCODINGS[desired], H, W)
    expected = expect(image)
    if expected is not None:
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('source,desired,needle', [
    ('16UC1', 'rgb8', 'no colour meaning'),      # depth is not a picture
    ('32FC1', 'bgr8', 'no colour meaning'),
    ('rgb8', '32FC1', 'channel'),
    ('8UC2', '8UC3', 'channel'),
    ('rgb8', 'yuv422_yuy2', 'nothing converts into Bayer or YUV'),
    ('bayer_grbg8', 'bgra8', 'Bayer converts to mono/RGB/BGR only'),
])
def test_conversions_cv_bridge_refuses_are_refused(source, desired, needle):
    msg = image_to_msg(_random(source), source, Image)
    with pytest.raises(ImageConversionError, match=needle):
        msg_to_image(msg, desired)


def test_unknown_encodings_name_what_is_supported():
    msg = image_to_msg(_random('rgb8'), 'rgb8', Image)
    msg.encoding = 'nv21'
    with pytest.raises(ImageConversionError, match="unknown encoding 'nv21'.*yuv422_yuy2"):
        msg_to_rgb(msg)
