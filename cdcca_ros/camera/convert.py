"""Image <-> ROS image message conversion, without importing rclpy or sensor_msgs.

The functions work on message-like objects: a raw image has ``height``, ``width``,
``encoding``, ``is_bigendian``, ``step`` and ``data`` (``sensor_msgs/Image``); a compressed one
has ``format`` and ``data`` (``sensor_msgs/CompressedImage``). Messages are built through a
``factory`` argument, so a node passes ``sensor_msgs.msg.Image`` and a test may pass a class of
its own.

Every message is validated before anything is decoded (encoding known, step large enough and
aligned, data exactly ``step * height`` bytes, ``is_bigendian`` 0 or 1, compressed bytes of the
declared format), and every problem raises :class:`~cdcca_ros.errors.ImageConversionError`
naming the bad values. The encodings are those ROS 2's ``cv_bridge`` reads, converted with the
same OpenCV codes (:mod:`cdcca_ros.camera.encodings`), here without cv_bridge, which the PyPI
ROS 2 wheels do not have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from cdcca_ros.camera.encodings import (
    GENERIC_DEPTHS,
    NAMED,
    Encoding,
    array_shape,
    check_conversion,
    convert,
    lookup,
)
from cdcca_ros.errors import ImageConversionError

ENCODINGS: dict[str, Encoding] = {
    **NAMED, **{f'{depth}C{n}': lookup(f'{depth}C{n}') for depth in GENERIC_DEPTHS
                for n in range(1, 5)}}
"""Every raw encoding understood (by name), with its channel count and element type."""

COMPRESSED_FORMATS = ('jpeg', 'png')
"""Compressed formats understood (``jpg`` is accepted as a spelling of ``jpeg``)."""

_MAGIC = {'jpeg': b'\xff\xd8\xff', 'png': b'\x89PNG\r\n\x1a\n'}
#: Largest compressed image decoded (the camera node's largest frame): a header claiming more
#: is refused before OpenCV allocates for it.
MAX_COMPRESSED_PIXELS = 8192 * 8192
_COLOUR = ('rgb8', 'bgr8', 'mono8')
_DEPTH = ('16UC1', 'mono16')


def _check_encoding(encoding: object, what: str = 'encoding') -> Encoding:
    return lookup(encoding, what)


def _check_array(image: object, encoding: str) -> np.ndarray:
    """Check that ``image`` can be stored as ``encoding``; return it as HxW[xC]."""
    spec = _check_encoding(encoding)
    if not isinstance(image, np.ndarray):
        raise ImageConversionError(
            f'image must be a numpy array, got {type(image).__name__}')
    if image.dtype != spec.dtype:
        raise ImageConversionError(
            f'encoding {encoding!r} needs dtype {spec.dtype}, got {image.dtype}')
    if spec.channels == 1 and image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if (spec.channels > 1 and (image.ndim != 3 or image.shape[2] != spec.channels)) \
            or (spec.channels == 1 and image.ndim != 2):
        raise ImageConversionError(
            f'encoding {encoding!r} needs a {spec.shape_text} array, got shape {image.shape}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageConversionError(f'image is empty: shape {image.shape}')
    if not image.flags.c_contiguous:
        raise ImageConversionError(
            f'image of shape {image.shape} is not C-contiguous (strides {image.strides}); '
            'pass np.ascontiguousarray(image)')
    return image


def image_to_msg(image: np.ndarray, encoding: str, factory: Callable[[], Any], *,
                 header: Any = None) -> Any:
    """Build a raw image message (``sensor_msgs/Image`` shape) from an array.

    Args:
        image: an array of the encoding's shape and type (HxWx3 uint8 for rgb8/bgr8, HxWx4
            for rgba8, HxWx2 uint8 for yuv422, HxW uint16 for mono16/16UC1, ...).
        encoding: one of :data:`ENCODINGS`; the array is stored as is, not converted.
        factory: makes an empty message, e.g. ``sensor_msgs.msg.Image``.
        header: set as ``msg.header`` when given.

    Raises:
        ImageConversionError: unknown encoding, wrong dtype/shape, empty or non-contiguous.
    """
    image = _check_array(image, encoding)
    spec = ENCODINGS[encoding]
    msg = factory()
    msg.height = int(image.shape[0])
    msg.width = int(image.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(spec.dtype.itemsize > 1 and spec.dtype.byteorder == '>')
    msg.step = int(image.shape[1] * spec.channels * spec.dtype.itemsize)
    msg.data = image.tobytes()
    if header is not None:
        msg.header = header
    return msg


def _field(msg: Any, name: str) -> Any:
    try:
        return getattr(msg, name)
    except AttributeError as err:
        raise ImageConversionError(
            f'{type(msg).__name__} has no field {name!r}: not an image message') from err


def _as_bytes(data: Any, what: str) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError as err:
        raise ImageConversionError(
            f'{what}.data of type {type(data).__name__} is not a byte buffer') from err
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast('B') if view.c_contiguous else memoryview(bytes(view))
    return view


def _int_field(msg: Any, name: str) -> int:
    value = _field(msg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ImageConversionError(f'image {name} must be a non-negative int, got {value!r}')
    return int(value)


def _raw_array(msg: Any) -> tuple[np.ndarray, str]:
    """Validate a raw image message and return (HxW[xC] array copy, encoding)."""
    encoding = _field(msg, 'encoding')
    spec = _check_encoding(encoding)
    height = _int_field(msg, 'height')
    width = _int_field(msg, 'width')
    step = _int_field(msg, 'step')
    bigendian = _field(msg, 'is_bigendian')
    if bigendian not in (0, 1):
        raise ImageConversionError(f'is_bigendian must be 0 or 1, got {bigendian!r}')
    if height == 0 or width == 0:
        raise ImageConversionError(f'image is empty: {height}x{width} ({encoding})')
    row = width * spec.channels * spec.dtype.itemsize
    if step < row:
        raise ImageConversionError(
            f'step {step} is smaller than width {width} x {spec.channels} channel(s) x '
            f'{spec.dtype.itemsize} byte(s) = {row} for {encoding!r}')
    if step % spec.dtype.itemsize:
        raise ImageConversionError(
            f'step {step} is not a multiple of the {spec.dtype.itemsize}-byte element of '
            f'{encoding!r}')
    data = _as_bytes(_field(msg, 'data'), 'image')
    if len(data) != step * height:
        raise ImageConversionError(
            f'data has {len(data)} bytes, expected step {step} x height {height} = '
            f'{step * height} for a {width}x{height} {encoding!r} image')
    rows = np.frombuffer(data, dtype=np.uint8).reshape(height, step)[:, :row]
    dtype = spec.dtype.newbyteorder('>' if bigendian else '<')
    image = rows.view(dtype).reshape(array_shape(spec, height, width))
    # A copy in native byte order: never a view into the message's buffer.
    return np.ascontiguousarray(image.astype(spec.dtype, copy=True)), encoding


def msg_to_image(msg: Any, desired_encoding: str = 'passthrough') -> np.ndarray:
    """Decode a raw image message into a new C-contiguous array.

    Args:
        msg: object with height, width, encoding, is_bigendian, step, data.
        desired_encoding: 'passthrough' or an encoding to convert to (the conversions
            cv_bridge makes; see :mod:`cdcca_ros.camera.encodings`).

    Raises:
        ImageConversionError: the message is malformed or cannot be converted as asked.
    """
    encoding = _field(msg, 'encoding')
    check_conversion(encoding, desired_encoding)  # before decoding anything
    image, encoding = _raw_array(msg)
    return np.ascontiguousarray(convert(image, encoding, desired_encoding))


def msg_to_rgb(msg: Any) -> np.ndarray:
    """Decode a colour, mono, Bayer or YUV message (or a generic 8UC1/8UC3/8UC4, read as
    mono8/bgr8/bgra8) into an HxWx3 uint8 RGB array."""
    return msg_to_image(msg, 'rgb8')


def _normalise_format(fmt: object) -> str:
    """'jpeg'/'jpg'/'png', or image_transport's 'rgb8; jpeg compressed bgr8' -> jpeg/png."""
    if not isinstance(fmt, str):
        raise ImageConversionError(f'compressed format must be a string, got {fmt!r}')
    text = fmt.lower()
    if ';' in text:
        text = text.split(';', 1)[1]
    words = text.replace(',', ' ').split()
    found = {('jpeg' if word == 'jpg' else word) for word in words} & set(COMPRESSED_FORMATS)
    if len(found) != 1:
        raise ImageConversionError(
            f'unknown compressed format {fmt!r}; supported: {", ".join(COMPRESSED_FORMATS)}')
    return found.pop()


def image_to_compressed(image: np.ndarray, fmt: str, factory: Callable[[], Any], *,
                        encoding: str = 'rgb8', quality: int = 90,
                        header: Any = None) -> Any:
    """Build a compressed image message (``sensor_msgs/CompressedImage`` shape).

    Args:
        image: array stored as ``encoding`` (see :func:`image_to_msg`).
        fmt: 'jpeg' (or 'jpg') or 'png'; written to ``msg.format`` as 'jpeg' / 'png'.
        factory: makes an empty message, e.g. ``sensor_msgs.msg.CompressedImage``.
        encoding: how ``image`` is stored (any encoding of 8 or 16-bit unsigned values);
            16-bit encodings only as png.
        quality: JPEG quality 1..100 (ignored for png).
        header: set as ``msg.header`` when given.

    Raises:
        ImageConversionError: bad image, unknown format, 16-bit JPEG, or encoder failure.
    """
    kind = _normalise_format(fmt)
    image = _check_array(image, encoding)
    spec = ENCODINGS.get(encoding) or lookup(encoding)
    if not 1 <= int(quality) <= 100:
        raise ImageConversionError(f'JPEG quality must be in 1..100, got {quality}')
    if spec.bits == 16 and kind != 'png':
        raise ImageConversionError(
            f'{encoding!r} (16 bit) can only be compressed as png, not {fmt!r}')
    if spec.channels > 1 or spec.layout.startswith('bayer'):
        # OpenCV's encoders expect BGR (16-bit colour stays 16-bit in a png).
        image = convert(image, encoding, 'bgr16' if spec.bits == 16 else 'bgr8')
    elif spec.dtype not in (np.uint8, np.uint16):
        raise ImageConversionError(f'{encoding!r} cannot be compressed (8 or 16-bit unsigned '
                                   'images only)')
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if kind == 'jpeg' else []
    ok, buf = cv2.imencode('.jpg' if kind == 'jpeg' else '.png', image, params)
    if not ok:
        raise ImageConversionError(f'OpenCV failed to encode a {image.shape} image as {kind}')
    msg = factory()
    msg.format = kind
    msg.data = buf.tobytes()
    if header is not None:
        msg.header = header
    return msg


def compressed_to_image(msg: Any, desired_encoding: str = 'rgb8') -> np.ndarray:
    """Decode a compressed image message.

    Args:
        msg: object with ``format`` and ``data``.
        desired_encoding: 'passthrough' (bgr8, mono8 or 16UC1 as decoded) or an encoding.

    Raises:
        ImageConversionError: unknown format, bytes not of that format, undecodable data, or
            a conversion that is not possible.
    """
    kind = _normalise_format(_field(msg, 'format'))
    data = _as_bytes(_field(msg, 'data'), 'compressed image')
    magic = _MAGIC[kind]
    if len(data) < len(magic) or bytes(data[:len(magic)]) != magic:
        raise ImageConversionError(
            f'compressed data ({len(data)} bytes, starting {bytes(data[:8])!r}) is not '
            f'{kind} as its format {_field(msg, "format")!r} says')
    size = _declared_size(bytes(data[:65536]), kind)
    if size is not None and size[0] * size[1] > MAX_COMPRESSED_PIXELS:
        raise ImageConversionError(
            f'{kind} header declares {size[0]}x{size[1]} pixels, more than '
            f'{MAX_COMPRESSED_PIXELS}')
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageConversionError(f'OpenCV could not decode {len(data)} bytes of {kind}')
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.dtype == np.uint16:
        source = '16UC1' if image.ndim == 2 else 'bgr16'
    elif image.dtype == np.uint8:
        source = 'mono8' if image.ndim == 2 else 'bgr8'
    else:
        raise ImageConversionError(
            f'decoded {kind} has unsupported layout {image.dtype} {image.shape}')
    return np.ascontiguousarray(convert(image, source, desired_encoding))


def _declared_size(head: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or the first JPEG start-of-frame, or None when the
    header cannot be read (OpenCV then refuses the data itself)."""
    if kind == 'png':
        if len(head) < 24 or head[12:16] != b'IHDR':
            return None
        return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    pos = 2
    while pos + 9 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(head[pos + 2:pos + 4], 'big')
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            height = int.from_bytes(head[pos + 5:pos + 7], 'big')
            width = int.from_bytes(head[pos + 7:pos + 9], 'big')
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only; anything else would come out as garbage.
    return ''.join(ch if 32 <= ord(ch) < 127 else '?' for ch in text)


def annotate(image: Any, lines: Sequence[str], *, font_scale: float | None = None,
             color: tuple[int, int, int] = (255, 255, 255),
             background: tuple[int, int, int] = (0, 0, 0), alpha: float = 0.6,
             margin: int = 6) -> np.ndarray:
    """Draw text lines in the top-left corner of an RGB image (the annotated-answer view).

    Args:
        image: HxWx3 uint8 RGB array, or a :class:`~cdcca_ros.camera.base.Frame`.
        lines: text lines, top to bottom; too wide lines are cut with '...'.
        font_scale: OpenCV font scale; None scales with the image height.
        color: RGB text colour.
        background: RGB colour of the box behind the text.
        alpha: opacity of that box (0 = none, 1 = opaque).
        margin: pixels between the box edge and the text.

    Returns:
        A new array; the input is not modified.
    """
    rgb = getattr(image, 'rgb', image)
    rgb = _check_array(np.ascontiguousarray(rgb) if isinstance(rgb, np.ndarray) else rgb,
                       'rgb8')
    if not 0.0 <= alpha <= 1.0:
        raise ImageConversionError(f'alpha must be in [0, 1], got {alpha}')
    out = rgb.copy()
    height, width = out.shape[:2]
    texts = [_ascii(str(line)) for line in lines if str(line)]
    if not texts:
        return out
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = font_scale if font_scale is not None else max(0.35, height / 960.0)
    thickness = max(1, int(round(scale * 1.5)))
    usable = max(1, width - 3 * margin)

    def fit(text: str) -> str:
        if cv2.getTextSize(text, font, scale, thickness)[0][0] <= usable:
            return text
        while text and cv2.getTextSize(text + '...', font, scale, thickness)[0][0] > usable:
            text = text[:-1]
        return text + '...'

    texts = [fit(text) for text in texts]
    sizes = [cv2.getTextSize(text, font, scale, thickness) for text in texts]
    line_h = max(h + base for (_, h), base in sizes) + margin // 2
    box_w = min(width, max(w for (w, _), _ in sizes) + 2 * margin)
    box_h = min(height, line_h * len(texts) + margin)
    if alpha > 0:
        region = out[:box_h, :box_w].astype(np.float32)
        region = region * (1.0 - alpha) + np.asarray(background, np.float32) * alpha
        out[:box_h, :box_w] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
    for index, text in enumerate(texts):
        baseline_y = margin + line_h * index + sizes[index][0][1]
        if baseline_y > height:
            break
        cv2.putText(out, text, (margin, baseline_y), font, scale, tuple(int(c) for c in color),
                    thickness, cv2.LINE_AA)
    return out
