"""Shifts the package's defaults were never tuned on, registered from outside the package.

Import it (``--plugin examples/unseen_shifts.py`` for the benches) and four domains exist:

- ``rain``: streaks of light rain over the picture and a little blur;
- ``overexposed``: a washed-out, clipped exposure;
- ``jpeg``: heavy JPEG compression (blocks, ringing) as a poor video link gives;
- ``hue_swap``: the colour channels rotated (red shows as green, green as blue ...): the
  scene's ground truth keeps the true colours, so a model that reads colours from pixels --
  student *and* teacher -- answers colour questions wrong. The teacher is no better than the
  device there: a guarded round must leave the device as it is.

This is also the template for your own: a function per shift registered with
:func:`cdcca_ros.sim.shifts.register_shift`, a :class:`cdcca_ros.sim.domains.Domain` per mix,
:func:`cdcca_ros.sim.domains.register_domain`, and (for the benches that read it) the name
added to ``cdcca_ros.sim.domains.DRIFTED``.
"""
from __future__ import annotations

import cv2
import numpy as np

from cdcca_ros.sim import domains
from cdcca_ros.sim.domains import Domain, register_domain
from cdcca_ros.sim.shifts import register_shift

UNSEEN = ('rain', 'overexposed', 'jpeg', 'hue_swap')


@register_shift('rain_streaks', 'image', overwrite=True)
def rain_streaks(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Thin bright diagonal streaks (density and contrast grow with strength)."""
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    layer = np.zeros((h, w), np.float32)
    for _ in range(int(strength * 0.02 * h * w / max(1.0, h / 16))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        length = max(2, int(0.15 * h))
        cv2.line(layer, (x, y), (x + length // 3, y + length), 1.0, max(1, h // 64))
    out = out * (1 - 0.6 * strength * layer[..., None]) + 230 * 0.6 * strength * layer[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


@register_shift('overexpose', 'image', overwrite=True)
def overexpose(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Gain and a lifted floor, clipped at white."""
    gain = 1.0 + 1.2 * strength
    return np.clip(image.astype(np.float32) * gain + 60 * strength, 0, 255).astype(np.uint8)


@register_shift('jpeg_blocks', 'image', overwrite=True)
def jpeg_blocks(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG round trip at a quality falling with strength (to 3)."""
    quality = int(round(60 - 57 * strength))
    ok, data = cv2.imencode('.jpg', image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        return image
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


@register_shift('channel_rotate', 'image', overwrite=True)
def channel_rotate(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """RGB -> GBR blended in by strength (1: fully rotated)."""
    rotated = image[..., [1, 2, 0]].astype(np.float32)
    return np.clip((1 - strength) * image + strength * rotated, 0, 255).astype(np.uint8)


for _domain in (
        Domain('rain', (('rain_streaks', 0.8), ('blur', 0.2)), 'light rain over the lens'),
        Domain('overexposed', (('overexpose', 0.7),), 'washed-out, clipped exposure'),
        Domain('jpeg', (('jpeg_blocks', 0.9),), 'a poor video link: heavy JPEG'),
        Domain('hue_swap', (('channel_rotate', 1.0),),
               'colour channels rotated: teacher and student both misread colours'),
):
    register_domain(_domain, overwrite=True)

if not set(UNSEEN) <= set(domains.DRIFTED):
    domains.DRIFTED = tuple(domains.DRIFTED) + tuple(d for d in UNSEEN
                                                    if d not in domains.DRIFTED)
