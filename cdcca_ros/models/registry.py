"""Family registry: load, build tiny offline models, check teacher/student compatibility.

Family modules (and with them torch/transformers) are imported lazily, on first use.
"""
from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdcca_ros.errors import ConfigError, ModelLoadError, VisionSpaceMismatchError
from cdcca_ros.models.base import MLLM, QUANTIZATIONS

# family name -> (module, class name); the module is imported only when used.
FAMILIES: dict[str, tuple[str, str]] = {
    'blip2': ('cdcca_ros.models.blip2', 'Blip2MLLM'),
    'llava': ('cdcca_ros.models.llava', 'LlavaMLLM'),
    'qwen2_vl': ('cdcca_ros.models.qwen2_vl', 'Qwen2VLMLLM'),
}

# HF ``model_type`` of a hub/config.json -> family, for directories without cdcca.json.
_MODEL_TYPES = {'blip-2': 'blip2', 'llava': 'llava', 'qwen2_vl': 'qwen2_vl'}

CDCCA_JSON = 'cdcca.json'



# One model is built or loaded at a time in a process: transformers and accelerate create the
# weights on the meta device through process-wide hooks (``init_empty_weights`` patches
# ``nn.Module.register_parameter``), so a second load running meanwhile in another thread (a
# device and a cloud node composed in one process) could get meta tensors ("Cannot copy out
# of meta tensor").
LOAD_LOCK = threading.RLock()

def check_torch_device(name: str) -> str:
    """Return ``name`` if this torch can put a model there, else raise ConfigError saying why.

    ``cpu``, ``cuda``/``cuda:N`` (needs a CUDA build of torch and GPU N) and ``mps`` (Apple)
    are checked before anything loads, so a wrong device is one clear error at start instead of
    an assertion deep inside torch.

    Raises:
        ConfigError: not a torch device, or one this machine's torch cannot use.
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f'torch_device {name!r} is not a torch device (e.g. cpu, cuda:0): '
                          f'{err}') from err
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            build = (f'CUDA {torch.version.cuda}' if torch.version.cuda
                     else 'a CPU-only build')
            raise ConfigError(f'torch_device {name!r}: no usable CUDA GPU (torch '
                              f'{torch.__version__} is {build}); use cpu, or install the CUDA '
                              'build of torch that matches the driver')
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f'torch_device {name!r}: this machine has {count} CUDA '
                              f'device(s) (cuda:0..cuda:{count - 1})')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f'torch_device {name!r}: MPS is not available here')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise ConfigError(f'torch_device {name!r}: only cpu, cuda[:N] and mps are supported')
    return name


def family_class(family: str) -> type[MLLM]:
    """Return the :class:`MLLM` subclass of ``family`` (imports its module).

    Raises:
        ConfigError: ``family`` is not registered.
    """
    if family not in FAMILIES:
        raise ConfigError(f'unknown model family {family!r}; known: {sorted(FAMILIES)}')
    module_name, class_name = FAMILIES[family]
    return getattr(importlib.import_module(module_name), class_name)


def _detect_family(path_or_hub_id: str | Path) -> str:
    """Read the family from ``cdcca.json``, else from the HF config's ``model_type``."""
    path = Path(path_or_hub_id)
    meta = path / CDCCA_JSON
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text())['family'])
        except (ValueError, KeyError) as err:
            raise ModelLoadError(f'{meta} is not a valid cdcca.json: {err}') from err
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(path_or_hub_id)).model_type
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f'cannot read a model config from {str(path_or_hub_id)!r}: {err}') from err
    if model_type not in _MODEL_TYPES:
        raise ModelLoadError(
            f'{str(path_or_hub_id)!r}: model_type {model_type!r} has no registered family '
            f'(known: {sorted(_MODEL_TYPES)})')
    return _MODEL_TYPES[model_type]


def load_model(path_or_hub_id: str | Path, family: str | None = None,
               quantization: str | None = None, device: str = 'cpu',
               dtype: str | None = None) -> MLLM:
    """Load a model saved by :meth:`MLLM.save` (or a hub id with ``family`` given, or a
    real configuration without weights, see :mod:`cdcca_ros.models.real`).

    Args:
        path_or_hub_id: Directory or hub id.
        family: Family name; None reads it from the directory.
        quantization: None, ``'4bit'`` or ``'8bit'``.
        device: Torch device string (checked first: :func:`check_torch_device`), or
            ``'meta'``: shapes only, random-init directories.
        dtype: Weights dtype name; None: the checkpoint's (float32 for a random init).
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f'quantization must be one of {QUANTIZATIONS}, got {quantization!r}')
    if device != 'meta':
        check_torch_device(device)
    if family is None:
        family = _detect_family(path_or_hub_id)
    with LOAD_LOCK:
        return family_class(family).load(path_or_hub_id, quantization=quantization,
                                         device=device, dtype=dtype)


def build_tiny(family: str, vocabulary: Sequence[str], **sizes: Any) -> MLLM:
    """Build a small randomly initialised model of ``family`` fully offline.

    Args:
        family: Family name.
        vocabulary: Words of the tokenizer's vocabulary (special tokens are added).
        **sizes: Family-specific size keywords (see each module's ``build_tiny``).
    """
    with LOAD_LOCK:
        return family_class(family).build_tiny(vocabulary, **sizes)  # type: ignore[attr-defined]


def check_vision_space(teacher: MLLM, student: MLLM) -> None:
    """Raise :class:`VisionSpaceMismatchError` unless both models share the vision space."""
    t_space, s_space = teacher.vision_space(), student.vision_space()
    if t_space != s_space:
        diffs = [f'{name}: teacher={getattr(t_space, name)!r} student={getattr(s_space, name)!r}'
                 for name in ('dim', 'num_tokens', 'grid', 'has_cls', 'encoder')
                 if getattr(t_space, name) != getattr(s_space, name)]
        raise VisionSpaceMismatchError(
            f'teacher {teacher.family} and student {student.family} vision spaces differ '
            f'({"; ".join(diffs)}): teacher={t_space} student={s_space}')
