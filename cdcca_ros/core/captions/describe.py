"""Asking the device for a caption: the ``describe`` question (no torch, no rclpy).

The ``ask`` service and action and the ``question`` topic carry free text; a question that is
one of :data:`DESCRIBE_QUESTIONS` (case and surrounding blanks and a final ``?`` / ``.``
ignored) asks for a caption of the frame instead of a short answer, so no message changes
and every client that can ask can ask for a description. A model without a caption head
answers such a question with a clear error.
"""
from __future__ import annotations

DESCRIBE = 'describe'
"""The question that asks for a caption (the ``caption`` topic's answers carry it)."""

DESCRIBE_QUESTIONS: tuple[str, ...] = (
    DESCRIBE, 'describe the scene', 'describe the image', 'what do you see', 'caption')
"""Every question that asks for a caption (lower case, without a final ``?`` or ``.``)."""


def is_describe(question: str) -> bool:
    """Whether ``question`` asks for a caption (see the module docstring)."""
    return question.strip().rstrip('?.').strip().lower() in DESCRIBE_QUESTIONS


__all__ = ['DESCRIBE', 'DESCRIBE_QUESTIONS', 'is_describe']
