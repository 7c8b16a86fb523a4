"""MLLM adapters over transformers: one interface (:mod:`.base`), one module per family.

Importing this package is cheap: torch and transformers load only when a family module is
used (through :mod:`.registry`).
"""
from cdcca_ros.models.base import MLLM, AnswerResult, TrainableConfig, TrainOutputs, VisionSpace
from cdcca_ros.models.registry import build_tiny, check_vision_space, load_model

__all__ = [
    'MLLM', 'AnswerResult', 'TrainOutputs', 'TrainableConfig', 'VisionSpace', 'build_tiny',
    'check_vision_space', 'load_model',
]
