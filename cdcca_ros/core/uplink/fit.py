"""Fit a model's token basis on source-domain frames and store it beside the model.

``python -m cdcca_ros.core.uplink.fit --model SPEC [--images DIR] [--frames N] [--out FILE]``

The basis belongs to the model's vision encoder (shared by the device's student and the cloud's
teacher): fit it once on frames of the domain the model was trained for, keep it in the student's
directory as :data:`~cdcca_ros.core.uplink.basis.BASIS_FILE` (where ``device_node`` and
``cloud_node`` look by default), and give the same file to both sides. ``--images`` takes a
folder of JPEG/PNG frames from your robot; without it the synthetic world's source domain is
rendered at the camera's 640x480 (what the bundled models were trained on).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, fit_basis, space_id
from cdcca_ros.errors import CdccaError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import MLLM

BATCH = 16
SYNTHETIC_SEED = 7  # a world seed of its own: the fit frames are none of the benches' samples


def fit_for_model(model: MLLM, frames: Iterable[np.ndarray], max_rank: int | None = None
                  ) -> TokenBasis:
    """Fit a basis on the vision tokens of ``frames`` (RGB uint8) through ``model``'s encoder."""
    chunks: list[torch.Tensor] = []
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == BATCH:
            chunks.append(model.vision_tokens(batch).float().cpu())
            batch = []
    if batch:
        chunks.append(model.vision_tokens(batch).float().cpu())
    if not chunks:
        raise ConfigError('fit_for_model: no frame given')
    return fit_basis(torch.cat(chunks), space_id(model.vision_space()), max_rank=max_rank)


def synthetic_source_frames(count: int, size: tuple[int, int] = (640, 480),
                            seed: int = SYNTHETIC_SEED) -> list[np.ndarray]:
    """``count`` source-domain frames of the synthetic world at ``size`` (width, height)."""
    from cdcca_ros.sim.domains import SOURCE
    from cdcca_ros.sim.world import World

    return [s.image for s in World(seed).samples(SOURCE, count, size, start=0)]


def folder_frames(folder: Path) -> list[np.ndarray]:
    """Every JPEG/PNG frame in ``folder`` as RGB."""
    import cv2

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))
    frames = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ConfigError(f'cannot read the image {path}')
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not frames:
        raise ConfigError(f'no .jpg/.png frame in {folder}')
    return frames


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    from cdcca_ros.models import bundled

    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.core.uplink.fit',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='bundled:student', help='model spec')
    parser.add_argument('--images', type=Path, default=None,
                        help='folder of source-domain frames (default: synthetic world)')
    parser.add_argument('--frames', type=int, default=400,
                        help='synthetic frames to render (without --images)')
    parser.add_argument('--max-rank', type=int, default=None, help='directions kept at most')
    parser.add_argument('--out', type=Path, default=None,
                        help=f'output file (default: MODEL_DIR/{BASIS_FILE})')
    args = parser.parse_args(argv)
    try:
        model_dir = Path(bundled.resolve(args.model))
        out = args.out or model_dir / BASIS_FILE
        torch.manual_seed(0)
        model = bundled.load(args.model)
        frames = (folder_frames(args.images) if args.images
                  else synthetic_source_frames(args.frames))
        with torch.no_grad():
            basis = fit_for_model(model, frames, args.max_rank)
        basis.save(out)
    except (CdccaError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {out}: basis {basis.version}, {basis.rank} directions of {basis.dim}, '
          f'{len(frames)} frames, for {basis.vision_space}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
