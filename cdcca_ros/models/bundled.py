"""The embedded default models shipped with the package, and model-spec resolution.

A model spec is what a node's ``model`` parameter holds: a local directory, a hub id, or
``bundled:<name>`` for the models shipped in ``cdcca_ros/assets/models/<name>`` (trained on the
drifting synthetic world by ``make models``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cdcca_ros.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import MLLM

BUNDLED_DIR = Path(__file__).resolve().parents[1] / 'assets' / 'models'
PREFIX = 'bundled:'


def resolve(spec: str) -> str:
    """Turn ``bundled:<name>`` into its directory; other specs are returned unchanged.

    Raises:
        ModelLoadError: a bundled model that is not there, or a path (``/...``, ``./...``,
            ``~/...``) that is not a directory.
    """
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


def load(spec: str, quantization: str | None = None, device: str = 'cpu') -> MLLM:
    """Load a model from a spec, with its trainable set configured (default set if none)."""
    from cdcca_ros.models.base import TrainableConfig
    from cdcca_ros.models.registry import load_model

    model = load_model(resolve(spec), quantization=quantization, device=device)
    if getattr(model, 'trainable_config', None) is None:
        model.configure_trainable(TrainableConfig())
    model.torch_model.eval()
    return model
