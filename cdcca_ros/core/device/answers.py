"""A device's answers: the record UTS reads and the multiple-choice prompt (no rclpy)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor


@dataclass
class AnsweredSample:
    """One answer and what UTS needs of it."""

    question: str
    text: str
    choice_index: int
    confidence: float
    entropy_mean: float
    entropy_max: float
    step_probs: np.ndarray
    tokens: Tensor  # [N, D] vision tokens of the frame
    version: int
    latency_ms: float
    adapted: bool = True  # False: the frame lay outside the update's coverage (base answered)
    caption: bool = False  # a caption of the frame (a describe question), not an answer


def match_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the choice the answer names (case/space-insensitive), or -1."""
    norm = text.strip().lower()
    for i, choice in enumerate(choices):
        if choice.strip().lower() == norm:
            return i
    for i, choice in enumerate(choices):
        if norm and (norm in choice.strip().lower() or choice.strip().lower() in norm):
            return i
    return -1


def format_question(question: str, choices: Sequence[str]) -> str:
    """The prompt for a multiple-choice question: the choices follow the question."""
    if not choices:
        return question
    return f'{question} choices: {", ".join(choices)}'
