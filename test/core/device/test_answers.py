"""Multiple-choice prompts and the choice an answer names (core/device/answers.py)."""
from __future__ import annotations

import pytest

from cdcca_ros.core.device.answers import format_question, match_choice

MATCH_CASES = [
    ('Red', ('blue', 'red'), 1),                 # exact, case-insensitive
    (' red ', ('red square', 'red'), 1),         # an exact match beats an earlier partial one
    ('a red one', ('blue', 'red'), 1),           # the choice inside the answer
    ('re', ('blue', 'red'), 1),                  # the answer inside a choice
    ('green', ('red', 'blue'), -1),              # names none
    ('', ('red', 'blue'), -1),                   # an empty answer names nothing
    ('red', (), -1),                             # no choices
]


@pytest.mark.parametrize(('text', 'choices', 'expected'), MATCH_CASES)
def test_match_choice(text: str, choices: tuple[str, ...], expected: int) -> None:
    assert match_choice(text, choices) == expected


def test_format_question_lists_the_choices_after_the_question() -> None:
    assert format_question('what color?', ()) == 'what color?'
    assert format_question('what color?', ('red', 'blue')) == 'what color? choices: red, blue'
