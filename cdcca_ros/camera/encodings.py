"""The image encodings of ``sensor_msgs/Image`` and the conversions between them, with OpenCV.

Every encoding ROS 2's ``cv_bridge`` reads is read here too, with the same OpenCV conversion
codes, so an image converts to the same pixels whichever of the two does it:

* colour: ``rgb8``, ``bgr8``, ``rgba8`` (ZED, many GStreamer sources), ``bgra8``, ``rgb16``,
  ``bgr16``, ``rgba16``, ``bgra16``, ``mono8``, ``mono16``;
* Bayer mosaics: ``bayer_rggb8``, ``bayer_bggr8``, ``bayer_gbrg8``, ``bayer_grbg8`` and their
  ``16`` variants (demosaiced);
* packed YUV 4:2:2: ``yuv422`` (UYVY) and ``yuv422_yuy2`` (YUYV, usb_cam's default);
* generic OpenCV types ``8UC1`` .. ``64FC4`` (``8U``, ``8S``, ``16U``, ``16S``, ``32S``, ``32F``,
  ``64F``; one to four channels; a bare ``32F`` means one channel), ``16UC1`` being depth in
  millimetres.

Conversion rules are cv_bridge's: colour encodings convert into each other (8 <-> 16 bit scaled
by 255/65535); Bayer and YUV convert into mono, RGB and BGR (YUV also into RGBA/BGRA); a generic
type converts only to a type with as many channels (a change of depth). One deliberate
extension: a colour image asked of a generic ``8UC1`` / ``8UC3`` / ``8UC4`` reads it as
``mono8`` / ``bgr8`` / ``bgra8`` (OpenCV's channel order; drivers that publish these are OpenCV
pipelines), where cv_bridge refuses; ``16UC1`` and ``mono16`` (both depth-like) pass into each
other unchanged.

Arrays are ``HxW`` for one channel and ``HxWxC`` otherwise, of the encoding's element type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

from cdcca_ros.errors import ImageConversionError


@dataclass(frozen=True)
class Encoding:
    """One image encoding.

    Attributes:
        name: the ``sensor_msgs/Image.encoding`` string.
        channels: channels per pixel (2 for packed YUV 4:2:2: one luma and one chroma byte).
        dtype: element type (native byte order).
        layout: how the channels are to be read: ``gray``, ``rgb``, ``bgr``, ``rgba``,
            ``bgra``, ``yuv422`` (UYVY), ``yuv422_yuy2`` (YUYV), ``bayer_<pattern>``, or
            ``generic`` (an OpenCV type without a colour meaning).
    """

    name: str
    channels: int
    dtype: np.dtype
    layout: str

    @property
    def is_colour(self) -> bool:
        """cv_bridge's "colour format": colour, mono, Bayer or YUV (not a generic type)."""
        return self.layout != 'generic'

    @property
    def bits(self) -> int:
        return self.dtype.itemsize * 8

    @property
    def shape_text(self) -> str:
        return 'HxW' if self.channels == 1 else f'HxWx{self.channels}'


def _named() -> dict[str, Encoding]:
    table: dict[str, Encoding] = {}
    for bits, dtype in ((8, np.uint8), (16, np.uint16)):
        for layout, channels in (('rgb', 3), ('bgr', 3), ('rgba', 4), ('bgra', 4)):
            name = f'{layout}{bits}'
            table[name] = Encoding(name, channels, np.dtype(dtype), layout)
        table[f'mono{bits}'] = Encoding(f'mono{bits}', 1, np.dtype(dtype), 'gray')
        for pattern in ('rggb', 'bggr', 'gbrg', 'grbg'):
            name = f'bayer_{pattern}{bits}'
            table[name] = Encoding(name, 1, np.dtype(dtype), f'bayer_{pattern}')
    for name in ('yuv422', 'yuv422_yuy2'):
        table[name] = Encoding(name, 2, np.dtype(np.uint8), name)
    return table


NAMED: dict[str, Encoding] = _named()
"""The encodings with a colour meaning, by name."""

GENERIC_DEPTHS: dict[str, np.dtype] = {
    '8U': np.dtype(np.uint8), '8S': np.dtype(np.int8), '16U': np.dtype(np.uint16),
    '16S': np.dtype(np.int16), '32S': np.dtype(np.int32), '32F': np.dtype(np.float32),
    '64F': np.dtype(np.float64)}
"""OpenCV element types of the generic encodings."""

_GENERIC = re.compile(r'(8U|8S|16U|16S|32S|32F|64F)(?:C([1-4]))?')
DEPTH = ('16UC1', 'mono16')
"""Encodings that carry depth (they pass into each other unchanged)."""
_AS_COLOUR = {'8UC1': 'mono8', '8UC3': 'bgr8', '8UC4': 'bgra8'}

SUPPORTED = (*NAMED, '8UC1..8UC4', '8SC1..8SC4', '16UC1..16UC4', '16SC1..16SC4',
             '32SC1..32SC4', '32FC1..32FC4', '64FC1..64FC4')
"""What an error message lists as supported."""


def lookup(name: object, what: str = 'encoding') -> Encoding:
    """The :class:`Encoding` of ``name``.

    Raises:
        ImageConversionError: not an encoding this module (and cv_bridge) knows.
    """
    if isinstance(name, str):
        if name in NAMED:
            return NAMED[name]
        match = _GENERIC.fullmatch(name)
        if match:
            return Encoding(name, int(match.group(2) or 1), GENERIC_DEPTHS[match.group(1)],
                            'generic')
    raise ImageConversionError(f'unknown {what} {name!r}; supported: {", ".join(SUPPORTED)}')


def array_shape(encoding: Encoding, height: int, width: int) -> tuple[int, ...]:
    """The array shape of an image of ``encoding``."""
    return (height, width) if encoding.channels == 1 else (height, width, encoding.channels)


# (source layout, destination layout) -> OpenCV codes, as cv_bridge's getConversionCodes.
_CODES: dict[tuple[str, str], int] = {
    ('gray', 'rgb'): cv2.COLOR_GRAY2RGB, ('gray', 'bgr'): cv2.COLOR_GRAY2BGR,
    ('gray', 'rgba'): cv2.COLOR_GRAY2RGBA, ('gray', 'bgra'): cv2.COLOR_GRAY2BGRA,
    ('rgb', 'gray'): cv2.COLOR_RGB2GRAY, ('rgb', 'bgr'): cv2.COLOR_RGB2BGR,
    ('rgb', 'rgba'): cv2.COLOR_RGB2RGBA, ('rgb', 'bgra'): cv2.COLOR_RGB2BGRA,
    ('bgr', 'gray'): cv2.COLOR_BGR2GRAY, ('bgr', 'rgb'): cv2.COLOR_BGR2RGB,
    ('bgr', 'rgba'): cv2.COLOR_BGR2RGBA, ('bgr', 'bgra'): cv2.COLOR_BGR2BGRA,
    ('rgba', 'gray'): cv2.COLOR_RGBA2GRAY, ('rgba', 'rgb'): cv2.COLOR_RGBA2RGB,
    ('rgba', 'bgr'): cv2.COLOR_RGBA2BGR, ('rgba', 'bgra'): cv2.COLOR_RGBA2BGRA,
    ('bgra', 'gray'): cv2.COLOR_BGRA2GRAY, ('bgra', 'rgb'): cv2.COLOR_BGRA2RGB,
    ('bgra', 'bgr'): cv2.COLOR_BGRA2BGR, ('bgra', 'rgba'): cv2.COLOR_BGRA2RGBA,
    ('yuv422', 'gray'): cv2.COLOR_YUV2GRAY_UYVY, ('yuv422', 'rgb'): cv2.COLOR_YUV2RGB_UYVY,
    ('yuv422', 'bgr'): cv2.COLOR_YUV2BGR_UYVY, ('yuv422', 'rgba'): cv2.COLOR_YUV2RGBA_UYVY,
    ('yuv422', 'bgra'): cv2.COLOR_YUV2BGRA_UYVY,
    ('yuv422_yuy2', 'gray'): cv2.COLOR_YUV2GRAY_YUY2,
    ('yuv422_yuy2', 'rgb'): cv2.COLOR_YUV2RGB_YUY2,
    ('yuv422_yuy2', 'bgr'): cv2.COLOR_YUV2BGR_YUY2,
    ('yuv422_yuy2', 'rgba'): cv2.COLOR_YUV2RGBA_YUY2,
    ('yuv422_yuy2', 'bgra'): cv2.COLOR_YUV2BGRA_YUY2,
    # OpenCV names a mosaic by its second row's first two pixels: RGGB is OpenCV's BG.
    ('bayer_rggb', 'gray'): cv2.COLOR_BayerBG2GRAY, ('bayer_rggb', 'rgb'): cv2.COLOR_BayerBG2RGB,
    ('bayer_rggb', 'bgr'): cv2.COLOR_BayerBG2BGR,
    ('bayer_bggr', 'gray'): cv2.COLOR_BayerRG2GRAY, ('bayer_bggr', 'rgb'): cv2.COLOR_BayerRG2RGB,
    ('bayer_bggr', 'bgr'): cv2.COLOR_BayerRG2BGR,
    ('bayer_gbrg', 'gray'): cv2.COLOR_BayerGR2GRAY, ('bayer_gbrg', 'rgb'): cv2.COLOR_BayerGR2RGB,
    ('bayer_gbrg', 'bgr'): cv2.COLOR_BayerGR2BGR,
    ('bayer_grbg', 'gray'): cv2.COLOR_BayerGB2GRAY, ('bayer_grbg', 'rgb'): cv2.COLOR_BayerGB2RGB,
    ('bayer_grbg', 'bgr'): cv2.COLOR_BayerGB2BGR,
}


def _change_depth(image: np.ndarray, source: Encoding, target: Encoding) -> np.ndarray:
    """OpenCV's ``convertTo`` as cv_bridge calls it: 8 <-> 16 bit scaled, else a plain cast
    (rounded and saturated into integer types)."""
    if image.dtype == target.dtype:
        return image
    scale = 1.0
    if source.bits == 8 and target.bits == 16:
        scale = 65535.0 / 255.0
    elif source.bits == 16 and target.bits == 8:
        scale = 255.0 / 65535.0
    values = image.astype(np.float64) * scale
    if np.issubdtype(target.dtype, np.integer):
        info = np.iinfo(target.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(target.dtype)


def check_conversion(source: str, desired: str) -> None:
    """Raise :class:`ImageConversionError` unless ``source`` converts to ``desired``."""
    plan(source, desired)


def plan(source: str, desired: str) -> tuple[Encoding, Encoding, int | None]:
    """(source, target, OpenCV code or None) of a conversion, checked.

    Raises:
        ImageConversionError: unknown encodings or a conversion cv_bridge refuses (and no
            extension of this module allows).
    """
    src = lookup(source)
    if desired in ('passthrough', source):
        return src, src, None
    dst = lookup(desired, 'desired encoding')
    if source in DEPTH and desired in DEPTH:
        return src, dst, None
    if dst.is_colour and source in _AS_COLOUR:
        src = NAMED[_AS_COLOUR[source]]  # OpenCV's BGR order (the documented extension)
    if not src.is_colour and dst.is_colour:
        raise ImageConversionError(
            f'cannot convert {source!r} to {desired!r}: {source!r} has no colour meaning (it '
            f'converts to passthrough or to a generic type of {src.channels} channel(s))')
    if not dst.is_colour:
        if src.channels != dst.channels:
            raise ImageConversionError(
                f'cannot convert {source!r} to {desired!r}: {src.channels} channel(s) to '
                f'{dst.channels}')
        return src, dst, None  # a change of depth only
    if src.layout == dst.layout:
        return src, dst, None  # a change of depth only (rgb8 -> rgb16)
    code = _CODES.get((src.layout, dst.layout))
    if code is None:
        raise ImageConversionError(f'cannot convert {source!r} to {desired!r} (as cv_bridge, '
                                   'Bayer converts to mono/RGB/BGR only, and nothing converts '
                                   'into Bayer or YUV)')
    return src, dst, code


def convert(image: np.ndarray, source: str, desired: str) -> np.ndarray:
    """Convert an array of ``source`` encoding to ``desired`` (or 'passthrough').

    Returns:
        A new C-contiguous array (the input itself for passthrough).

    Raises:
        ImageConversionError: the conversion is not possible, or OpenCV refuses the image
            (e.g. an odd width for YUV 4:2:2).
    """
    src, dst, code = plan(source, desired)
    if dst is src or (source in DEPTH and desired in DEPTH):
        return image
    out = image
    if code is not None:
        try:
            out = cv2.cvtColor(image, code)
        except cv2.error as err:
            raise ImageConversionError(
                f'OpenCV cannot convert a {image.shape} {image.dtype} {source!r} image to '
                f'{desired!r}: {" ".join(str(err).split())[-200:]}') from err
    return np.ascontiguousarray(_change_depth(out, src, dst))
