"""Image <-> message conversion: round trips over sizes x encodings, malformed input rejected.

The tables run on the real ``sensor_msgs`` Image and CompressedImage (and std_msgs Header)
wherever they import (always under ``make test``); a pure-Python checkout without the ROS
wheels runs them on duck types with the same fields. A duck type also carries the few values
the real classes refuse to hold (``data=None``), which other message sources (bags) may still
deliver.
"""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest

from cdcca_ros.camera import convert
from cdcca_ros.camera.base import Frame
from cdcca_ros.camera.convert import (
    annotate,
    compressed_to_image,
    image_to_compressed,
    image_to_msg,
    msg_to_image,
    msg_to_rgb,
)
from cdcca_ros.errors import ImageConversionError


class DuckImage:
    """The fields of sensor_msgs/Image, nothing else (no ROS wheels; values the real class
    refuses)."""

    def __init__(self) -> None:
        self.header: object = None
        self.height = 0
        self.width = 0
        self.encoding = ''
        self.is_bigendian = 0
        self.step = 0
        self.data: object = b''


class DuckCompressed:
    """The fields of sensor_msgs/CompressedImage."""

    def __init__(self) -> None:
        self.header: object = None
        self.format = ''
        self.data: object = b''


try:
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import CompressedImage as Compressed
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    HEADER: object = Header(frame_id='camera_color_optical_frame', stamp=Time(sec=3, nanosec=4))
except ImportError:  # no ROS wheels: the fields alone
    Image, Compressed, HEADER = DuckImage, DuckCompressed, 'hdr'  # type: ignore[misc]


def _as_duck(msg: object) -> DuckImage:
    """A duck copy of a raw message's fields (to hold what the real class refuses)."""
    duck = DuckImage()
    for name in vars(DuckImage()):
        setattr(duck, name, getattr(msg, name))
    return duck


SIZES = [(1, 1), (3, 5), (48, 64), (480, 640)]
ENCODINGS = ['rgb8', 'bgr8', 'mono8', '16UC1', 'mono16']


def make_image(encoding: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spec = convert.ENCODINGS[encoding]
    shape = (height, width) if spec.channels == 1 else (height, width, spec.channels)
    if spec.dtype.kind == 'f':
        return rng.standard_normal(shape).astype(spec.dtype)
    info = np.iinfo(spec.dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=spec.dtype)


@pytest.mark.parametrize('encoding', ENCODINGS)
@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_raw_round_trip(encoding: str, size: tuple[int, int]) -> None:
    image = make_image(encoding, *size)
    msg = image_to_msg(image, encoding, Image, header=HEADER)
    spec = convert.ENCODINGS[encoding]
    assert (msg.height, msg.width, msg.encoding) == (size[0], size[1], encoding)
    assert msg.step == size[1] * spec.channels * spec.dtype.itemsize
    assert len(msg.data) == msg.step * msg.height
    assert msg.header == HEADER
    back = msg_to_image(msg)
    assert back.dtype == image.dtype and back.shape == image.shape
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, image)


def test_decoded_array_is_a_copy_not_a_view_of_the_message() -> None:
    image = make_image('rgb8', 4, 6)
    msg = image_to_msg(image, 'rgb8', Image)
    msg.data = bytearray(msg.data)  # writable (the real class keeps an array.array)
    back = msg_to_image(msg)
    view = memoryview(msg.data)
    view[:] = bytes(len(view))
    np.testing.assert_array_equal(back, image)


def test_array_array_data_like_rclpy_messages() -> None:
    image = make_image('16UC1', 5, 7)
    msg = image_to_msg(image, '16UC1', Image)
    msg.data = array.array('B', msg.data)  # what sensor_msgs.msg.Image stores
    np.testing.assert_array_equal(msg_to_image(msg), image)


def test_the_tables_run_on_the_real_message_classes() -> None:
    pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')
    from sensor_msgs.msg import CompressedImage
    from sensor_msgs.msg import Image as RosImage

    assert (Image, Compressed) == (RosImage, CompressedImage)
    msg = image_to_msg(make_image('rgb8', 2, 3), 'rgb8', Image)
    assert isinstance(msg.data, array.array)  # rclpy's storage, not bytes
    with pytest.raises(TypeError):
        msg.data = None  # the real class refuses what the duck below carries


@pytest.mark.parametrize('encoding', ENCODINGS)
def test_padded_rows_are_skipped(encoding: str) -> None:
    image = make_image(encoding, 6, 5)
    spec = convert.ENCODINGS[encoding]
    row = 5 * spec.channels * spec.dtype.itemsize
    step = row + 6
    padded = np.full((6, step), 0xAB, dtype=np.uint8)
    padded[:, :row] = np.frombuffer(image.tobytes(), np.uint8).reshape(6, row)
    msg = image_to_msg(image, encoding, Image)
    msg.step, msg.data = step, padded.tobytes()
    np.testing.assert_array_equal(msg_to_image(msg), image)


def test_big_endian_depth() -> None:
    image = make_image('16UC1', 4, 3)
    msg = image_to_msg(image, '16UC1', Image)
    msg.is_bigendian, msg.data = 1, image.astype('>u2').tobytes()
    back = msg_to_image(msg)
    assert back.dtype == np.uint16 and back.dtype.isnative
    np.testing.assert_array_equal(back, image)


@pytest.mark.parametrize('source,desired,expected', [
    ('rgb8', 'bgr8', lambda im: im[..., ::-1]),
    ('bgr8', 'rgb8', lambda im: im[..., ::-1]),
    ('rgb8', 'mono8', lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)),
    ('mono8', 'rgb8', lambda im: np.repeat(im[..., None], 3, axis=2)),
    ('16UC1', 'mono16', lambda im: im),
    ('rgb8', 'passthrough', lambda im: im),
])
def test_colour_conversions(source: str, desired: str, expected) -> None:
    image = make_image(source, 7, 9, seed=3)
    msg = image_to_msg(image, source, Image)
    np.testing.assert_array_equal(msg_to_image(msg, desired), expected(image))


def test_msg_to_rgb_from_bgr() -> None:
    image = make_image('bgr8', 3, 4)
    np.testing.assert_array_equal(msg_to_rgb(image_to_msg(image, 'bgr8', Image)),
                                  image[..., ::-1])


def _valid_msg(encoding: str = 'rgb8') -> object:
    return image_to_msg(make_image(encoding, 4, 5), encoding, Image)


def _set(**fields):
    def mutate(msg: object) -> object:
        for key, value in fields.items():
            setattr(msg, key, value)
        return msg
    return mutate


MALFORMED = [
    ('unknown-encoding', 'rgb8', _set(encoding='yuv444_weird'), "'yuv444_weird'"),
    ('data-one-byte-short', 'rgb8', lambda m: _set(data=m.data[:-1])(m), '59 bytes'),
    ('data-one-byte-long', 'mono8', lambda m: _set(data=bytes(m.data) + b'x')(m),
     '21 bytes'),
    ('step-below-row', 'rgb8', _set(step=14), 'step 14'),
    ('step-not-element-aligned', '16UC1', lambda m: _set(step=11, data=b'\0' * 44)(m),
     'step 11'),
    ('zero-height', 'rgb8', _set(height=0, data=b''), '0x5'),
    ('negative-width', 'rgb8', _set(width=-5), '-5'),
    ('float-step', 'rgb8', _set(step=15.0), '15.0'),
    ('bad-bigendian', '16UC1', _set(is_bigendian=2), 'is_bigendian'),
    ('data-not-bytes', 'mono8', lambda m: _set(data=None)(_as_duck(m)), 'NoneType'),
    ('encoding-not-str', 'mono8', _set(encoding=8), '8'),
]


@pytest.mark.parametrize('encoding,mutate,needle',
                         [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_raw_messages_are_rejected(encoding: str, mutate, needle: str) -> None:
    msg = mutate(_valid_msg(encoding))
    with pytest.raises(ImageConversionError, match=None) as info:
        msg_to_image(msg)
    assert needle in str(info.value)


def test_message_without_fields_is_rejected() -> None:
    class NotAnImage:
        height = width = step = 1
        encoding = 'mono8'
        is_bigendian = 0

    with pytest.raises(ImageConversionError, match="no field 'data'"):
        msg_to_image(NotAnImage())


@pytest.mark.parametrize('source,desired', [('16UC1', 'rgb8'), ('rgb8', '16UC1'),
                                            ('32FC1', 'mono8'), ('rgb8', 'yuv422'),
                                            ('bayer_rggb8', 'rgba8'), ('mono8', 'bayer_bggr8')])
def test_impossible_conversions_are_rejected(source: str, desired: str) -> None:
    msg = _valid_msg(source)
    with pytest.raises(ImageConversionError, match=desired):
        msg_to_image(msg, desired)


BAD_ARRAYS = [
    ('non-contiguous', lambda: make_image('rgb8', 8, 8)[:, ::2], 'rgb8', 'C-contiguous'),
    ('wrong-dtype', lambda: np.zeros((4, 4, 3), np.float32), 'rgb8', 'float32'),
    ('mono-for-rgb', lambda: np.zeros((4, 4), np.uint8), 'rgb8', '(4, 4)'),
    ('rgba', lambda: np.zeros((4, 4, 4), np.uint8), 'bgr8', '(4, 4, 4)'),
    ('uint8-depth', lambda: np.zeros((4, 4), np.uint8), '16UC1', 'uint16'),
    ('empty', lambda: np.zeros((0, 4, 3), np.uint8), 'rgb8', 'empty'),
    ('unknown-encoding', lambda: np.zeros((4, 4, 3), np.uint8), '9UC3', "'9UC3'"),
    ('yuv-needs-two-channels', lambda: np.zeros((4, 4, 3), np.uint8), 'yuv422', 'HxWx2'),
    ('not-an-array', lambda: [[1, 2], [3, 4]], 'mono8', 'list'),
]


@pytest.mark.parametrize('make,encoding,needle', [c[1:] for c in BAD_ARRAYS],
                         ids=[c[0] for c in BAD_ARRAYS])
def test_bad_arrays_are_rejected(make, encoding: str, needle: str) -> None:
    with pytest.raises(ImageConversionError) as info:
        image_to_msg(make(), encoding, Image)
    assert needle in str(info.value)


def test_single_channel_hxwx1_is_accepted_as_mono() -> None:
    image = make_image('mono8', 3, 4)
    msg = image_to_msg(image[..., None], 'mono8', Image)
    np.testing.assert_array_equal(msg_to_image(msg), image)


# --- compressed --------------------------------------------------------------------------------
def smooth_rgb(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1),
                     (xx + yy) * 127 // max(1, width + height - 2)], axis=2).astype(np.uint8)


@pytest.mark.parametrize('size', [(8, 8), (48, 64), (480, 640)], ids=str)
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'mono8', '16UC1'])
def test_png_round_trip_is_exact(encoding: str, size: tuple[int, int]) -> None:
    image = make_image(encoding, *size, seed=5)
    msg = image_to_compressed(image, 'png', Compressed, encoding=encoding)
    assert msg.format == 'png' and bytes(msg.data[:4]) == b'\x89PNG'
    desired = 'passthrough' if encoding == '16UC1' else encoding
    np.testing.assert_array_equal(compressed_to_image(msg, desired), image)


@pytest.mark.parametrize('fmt', ['jpeg', 'jpg'])
@pytest.mark.parametrize('size', [(16, 16), (480, 640)], ids=str)
def test_jpeg_round_trip_is_close(fmt: str, size: tuple[int, int]) -> None:
    image = smooth_rgb(*size)
    msg = image_to_compressed(image, fmt, Compressed, quality=95, header=HEADER)
    assert msg.format == 'jpeg' and msg.header == HEADER
    back = compressed_to_image(msg, 'rgb8')
    assert back.shape == image.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - image.astype(int)).mean() < 3.0
    assert len(msg.data) < image.nbytes  # it did compress


def test_image_transport_format_string_is_understood() -> None:
    image = smooth_rgb(16, 16)
    msg = image_to_compressed(image, 'png', Compressed)
    msg.format = 'rgb8; png compressed bgr8'
    np.testing.assert_array_equal(compressed_to_image(msg, 'rgb8'), image)


def test_compressed_decode_to_other_encodings() -> None:
    image = smooth_rgb(12, 10)
    msg = image_to_compressed(image, 'png', Compressed)
    np.testing.assert_array_equal(compressed_to_image(msg, 'bgr8'), image[..., ::-1])
    np.testing.assert_array_equal(compressed_to_image(msg, 'passthrough'), image[..., ::-1])


def _png_msg() -> object:
    return image_to_compressed(smooth_rgb(8, 8), 'png', Compressed)


def _jpeg_msg() -> object:
    return image_to_compressed(smooth_rgb(8, 8), 'jpeg', Compressed)


BAD_COMPRESSED = [
    ('unknown-format', lambda: _set(format='tiff')(_png_msg()), "'tiff'"),
    ('two-formats', lambda: _set(format='png jpeg')(_png_msg()), "'png jpeg'"),
    ('declared-png-is-jpeg', lambda: _set(format='png')(_jpeg_msg()), 'is not png'),
    ('declared-jpeg-is-png', lambda: _set(format='jpeg')(_png_msg()), 'is not jpeg'),
    ('truncated', lambda: _set(data=_png_msg().data[:20])(_png_msg()), 'could not decode'),
    ('empty', lambda: _set(data=b'')(_png_msg()), '0 bytes'),
    ('format-not-str', lambda: _set(format=None)(_png_msg()), 'None'),
]


@pytest.mark.parametrize('make,needle', [c[1:] for c in BAD_COMPRESSED],
                         ids=[c[0] for c in BAD_COMPRESSED])
def test_bad_compressed_messages_are_rejected(make, needle: str) -> None:
    with pytest.raises(ImageConversionError) as info:
        compressed_to_image(make())
    assert needle in str(info.value)


@pytest.mark.parametrize('image,fmt,kwargs,needle', [
    (np.zeros((4, 4), np.uint16), 'jpeg', {'encoding': '16UC1'}, 'only be compressed as png'),
    (np.zeros((4, 4, 3), np.uint8), 'jpeg', {'quality': 0}, 'quality'),
    (np.zeros((4, 4, 3), np.uint8), 'bmp', {}, "'bmp'"),
    (np.zeros((4, 4, 3), np.uint8)[:, ::2], 'png', {}, 'C-contiguous'),
])
def test_bad_compression_requests_are_rejected(image, fmt: str, kwargs, needle: str) -> None:
    with pytest.raises(ImageConversionError) as info:
        image_to_compressed(image, fmt, Compressed, **kwargs)
    assert needle in str(info.value)


# --- annotate -----------------------------------------------------------------------------------
def test_annotate_draws_text_in_the_corner_and_leaves_the_input_alone() -> None:
    image = np.full((240, 320, 3), 128, np.uint8)
    before = image.copy()
    out = annotate(image, ['answer: red', 'confidence 0.91 (v3)'], color=(255, 255, 0))
    np.testing.assert_array_equal(image, before)
    assert out.shape == image.shape and out.dtype == np.uint8 and out is not image
    corner = out[:60, :200]
    assert (corner[..., 0] > 240).any() and (corner[..., 1] > 240).any()  # yellow text
    assert (corner < 100).any()                                          # dark box
    np.testing.assert_array_equal(out[120:, 200:], before[120:, 200:])    # elsewhere untouched


def test_annotate_accepts_frames_long_and_non_ascii_lines() -> None:
    frame = Frame(rgb=np.zeros((48, 64, 3), np.uint8), stamp_ns=1)
    out = annotate(frame, ['x' * 500, 'température ✓', ''])
    assert out.shape == (48, 64, 3)
    assert out.any()
    np.testing.assert_array_equal(annotate(frame, []), frame.rgb)


def test_annotate_rejects_non_rgb() -> None:
    with pytest.raises(ImageConversionError):
        annotate(np.zeros((8, 8), np.uint8), ['hi'])
    with pytest.raises(ImageConversionError, match='alpha'):
        annotate(np.zeros((8, 8, 3), np.uint8), ['hi'], alpha=2.0)


@pytest.mark.parametrize('kind', ['png', 'jpeg'])
def test_compressed_header_claiming_a_huge_image_is_refused_before_decoding(kind):
    """A PNG IHDR or JPEG start-of-frame claiming 60000x60000 pixels: refused at once (OpenCV
    would allocate for it first; the fuzz bench saw one such input take 22 s)."""
    import struct
    import zlib

    import cv2

    from cdcca_ros.camera.convert import compressed_to_image
    from cdcca_ros.errors import ImageConversionError

    rgb = np.zeros((24, 32, 3), np.uint8)
    data = bytearray(cv2.imencode('.png' if kind == 'png' else '.jpg', rgb)[1].tobytes())
    if kind == 'png':
        data[16:24] = struct.pack('>II', 60000, 60000)
        data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    else:
        sof = data.index(b'\xff\xc0')
        data[sof + 5:sof + 9] = struct.pack('>HH', 60000, 60000)

    class Msg:
        format = kind
    Msg.data = bytes(data)
    with pytest.raises(ImageConversionError, match='header declares 60000x60000'):
        compressed_to_image(Msg())
