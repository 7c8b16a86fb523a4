"""The embedded default models shipped with the package, and model-spec resolution.

A model spec is what a node's ``model`` parameter holds: a local directory, a hub id,
``bundled:<name>`` for the models shipped in ``cdcca_ros/assets/models/<name>`` (trained on the
drifting synthetic world by ``make models``), or ``real:<name>`` for a published model's real
configuration shipped without weights in ``cdcca_ros/assets/real/<name>`` (weights initialised
locally at load; see :mod:`cdcca_ros.models.real`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cdcca_ros.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import MLLM

ASSETS_DIR = Path(__file__).resolve().parents[1] / 'assets'
BUNDLED_DIR = ASSETS_DIR / 'models'
REAL_DIR = ASSETS_DIR / 'real'
PREFIX = 'bundled:'
REAL_PREFIX = 'real:'


def resolve(spec: str) -> str:
    """Turn ``bundled:<name>`` / ``real:<name>`` into its directory; other specs are returned
    unchanged.

    Raises:
        ModelLoadError: a bundled or real model that is not there, or a path (``/...``,
            ``./...``, ``~/...``) that is not a directory.
    """
    if spec.startswith(REAL_PREFIX):
        name = spec[len(REAL_PREFIX):]
        path = REAL_DIR / name
        if not name or not (path / 'config.json').is_file():
            known = sorted(p.name for p in REAL_DIR.iterdir() if (p / 'config.json').is_file())
            raise ModelLoadError(f'real configuration {name!r} not found in {REAL_DIR}; '
                                 f'known: {known}')
        return str(path)
    if not spec.startswith(PREFIX):
        if spec.startswith(('/', './', '../', '~')) and not Path(spec).expanduser().is_dir():
            raise ModelLoadError(f'model directory {spec!r} does not exist (a model is a '
                                 'local directory, a hub id, or bundled:<name>)')
        return str(Path(spec).expanduser()) if spec.startswith('~') else spec
    name = spec[len(PREFIX):]
    path = BUNDLED_DIR / name
    if not (path / 'config.json').is_file():
        raise ModelLoadError(f'bundled model {name!r} not found in {BUNDLED_DIR}; '
                             '`make models` trains the bundled teacher and student')
    return str(path)


def load(spec: str, quantization: str | None = None, device: str = 'cpu',
         dtype: str | None = None) -> MLLM:
    """Load a model from a spec, with its trainable set configured (default set if none)."""
    from cdcca_ros.models.base import TrainableConfig
    from cdcca_ros.models.registry import load_model

    model = load_model(resolve(spec), quantization=quantization, device=device, dtype=dtype)
    if getattr(model, 'trainable_config', None) is None:
        model.configure_trainable(TrainableConfig())
    model.torch_model.eval()
    return model
