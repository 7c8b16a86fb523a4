"""Draw a :class:`~cdcca_ros.sim.scene.Scene` at any resolution with OpenCV.

Scenes live in normalised coordinates and each axis is scaled on its own, so a 640x480 frame
resized to 64x64 (what a model does on the robot) looks like the 64x64 rendering of the same
scene: the camera stream and the training samples share one distribution. Small images are
drawn directly (never downscaled from a large one), which keeps generation fast.
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.scene import COLORS, Background, Clutter, Scene, SceneObject

_SHIFT = 4  # fractional bits of cv2 polygon coordinates: sub-pixel placement at 64x64
_ONE = 1 << _SHIFT

TEXTURE_PERIOD = 0.055
"""Period of stripes and dots on textured objects, as a fraction of the image side."""


def _regular(n: int, radius: float, phase_deg: float) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float, half_width: float) -> np.ndarray:
    a, w = arm, half_width
    return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                     (-w, w), (-a, w), (-a, -w), (-w, -w)], dtype=np.float64)


# Outlines of every kind at radius 1 (y down); sizes chosen so the kinds cover similar areas.
UNIT_SHAPES: dict[str, np.ndarray] = {
    'circle': _regular(48, 1.0, 0.0),
    'square': np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    'triangle': _regular(3, 1.12, -90.0) + np.array([0.0, 0.12]),
    'diamond': np.array([(0.0, -1.08), (1.08, 0.0), (0.0, 1.08), (-1.08, 0.0)]),
    'star': _star(5, 1.12, 0.48),
    'cross': _cross(1.0, 0.34),
}


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate an image size ``(width, height)`` and return it as ints.

    Raises:
        ConfigError: A side is not a positive integer.
    """
    try:
        width, height = (int(s) for s in size)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'image size must be (width, height), got {size!r}') from err
    if width < 8 or height < 8 or width > 8192 or height > 8192:
        raise ConfigError(f'image size must be within 8..8192 per side, got {size!r}')
    return width, height


@functools.lru_cache(maxsize=16)
def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates: ``x`` of shape (1, W), ``y`` of shape (H, 1)."""
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    return xs, ys


@functools.lru_cache(maxsize=16)
def _texture_mask(width: int, height: int, texture: str) -> np.ndarray:
    """Where a texture paints its second colour (bool, H x W)."""
    xs, ys = _grid(width, height)
    u, v = xs / TEXTURE_PERIOD, ys / TEXTURE_PERIOD
    if texture == 'striped':
        return ((u + v) % 1.0) < 0.5
    if texture == 'dotted':
        return ((u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2) < 0.3 ** 2
    raise ConfigError(f'no texture mask for {texture!r}')


def _pattern_weight(bg: Background, width: int, height: int) -> np.ndarray:
    """Weight of the pattern colour per pixel, float32 in [0, 1], shape (H, W, 1)."""
    xs, ys = _grid(width, height)
    theta = math.radians(bg.angle)
    u = (xs * math.cos(theta) + ys * math.sin(theta)) / bg.period
    v = (ys * math.cos(theta) - xs * math.sin(theta)) / bg.period
    if bg.pattern == 'stripes':
        w = ((u % 1.0) < 0.5).astype(np.float32)
    elif bg.pattern == 'checker':
        w = ((np.floor(u) + np.floor(v)) % 2.0).astype(np.float32)
    elif bg.pattern == 'waves':
        w = 0.5 + 0.5 * np.sin(2.0 * np.pi * u + 2.5 * np.sin(2.0 * np.pi * v / 3.0))
    else:
        raise ConfigError(f'unknown background pattern {bg.pattern!r}')
    return np.asarray(w, dtype=np.float32)[..., None]


def _draw_background(img: np.ndarray, bg: Background) -> None:
    img[:] = bg.color
    if bg.pattern == 'plain' or bg.pattern_color == bg.color:
        return
    height, width = img.shape[:2]
    w = _pattern_weight(bg, width, height)
    base = np.asarray(bg.color, dtype=np.float32)
    other = np.asarray(bg.pattern_color, dtype=np.float32)
    img[:] = (base + w * (other - base) + 0.5).astype(np.uint8)  # convex mix: in range


def _px(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised points -> fixed-point pixel coordinates for cv2 (``shift`` bits)."""
    scaled = points * np.array([width * _ONE, height * _ONE]) - _ONE / 2
    return np.round(scaled).astype(np.int32)


def _draw_clutter(img: np.ndarray, item: Clutter) -> None:
    height, width = img.shape[:2]
    side = min(width, height)
    color = tuple(int(c) for c in item.color)
    if item.kind == 'line':
        p = _px(np.asarray(item.points[:2], dtype=np.float64), width, height)
        thickness = max(1, round(item.extent * side))
        cv2.line(img, tuple(p[0]), tuple(p[1]), color, thickness, cv2.LINE_AA, _SHIFT)
        return
    centre = tuple(_px(np.asarray(item.points[:1], dtype=np.float64), width, height)[0])
    axes = (max(1, round(item.extent * width * _ONE)), max(1, round(item.extent * height * _ONE)))
    if item.kind == 'dot':
        cv2.ellipse(img, centre, axes, 0.0, 0.0, 360.0, color, -1, cv2.LINE_AA, _SHIFT)
    else:  # arc
        thickness = max(1, round(0.012 * side))
        cv2.ellipse(img, centre, axes, 0.0, item.angle, item.angle + 200.0, color, thickness,
                    cv2.LINE_AA, _SHIFT)


def _draw_object(img: np.ndarray, obj: SceneObject) -> None:
    height, width = img.shape[:2]
    cx, cy = obj.center
    pts = _px(np.array([cx, cy]) + obj.radius * UNIT_SHAPES[obj.kind], width, height)
    color = COLORS[obj.color]
    if obj.texture == 'solid':
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA, _SHIFT)
        return
    # Textured: paint the shape, then its pattern inside a hard mask of the same outline.
    cv2.fillPoly(img, [pts], color, cv2.LINE_AA, _SHIFT)
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, _SHIFT)
    inside = (mask > 0) & _texture_mask(width, height, obj.texture)
    # Darker stripes/dots of the same hue (light ones on dark colours) keep the colour readable.
    img[inside] = tuple(int(0.55 * c) if sum(color) > 150 else 110 for c in color)


def render(scene: Scene, size: tuple[int, int] | int = 64) -> np.ndarray:
    """Draw ``scene``.

    Args:
        scene: What to draw.
        size: ``(width, height)`` in pixels, or one int for a square image.

    Returns:
        ``uint8`` RGB array of shape ``(height, width, 3)``.
    """
    width, height = check_size((size, size) if isinstance(size, int) else size)
    img = np.empty((height, width, 3), dtype=np.uint8)
    _draw_background(img, scene.background)
    for item in scene.clutter:
        _draw_clutter(img, item)
    for obj in scene.objects:
        _draw_object(img, obj)
    return img
