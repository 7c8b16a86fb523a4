"""VQA accuracy (direct answers) and multiple-choice accuracy, as VQAv2 / A-OKVQA score them.

Direct answers are normalised (case, punctuation, articles, number words to digits) and scored
``min(#matching references / 3, 1)`` against ten reference answers. Multiple choice counts a hit
when the prediction (an index, or text that normalises to one of the choices) is the right one.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from cdcca_ros.errors import ConfigError

NUMBER_WORDS: dict[str, str] = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
    'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10',
}
ARTICLES = frozenset({'a', 'an', 'the'})

# Punctuation becomes a space, except a period inside a number ('1.5').
_PUNCT = re.compile(r'(?!(?<=\d)\.(?=\d))[^\w\s]|_')


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words to digits, single spaces."""
    words = _PUNCT.sub(' ', str(text).lower()).split()
    return ' '.join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(#references equal to the prediction / 3, 1)`` after normalisation.

    Raises:
        ConfigError: ``answers`` is empty.
    """
    if not answers:
        raise ConfigError('vqa_accuracy needs at least one reference answer')
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return min(matches / 3.0, 1.0)


def choice_index(prediction: str | int, choices: Sequence[str]) -> int | None:
    """Which choice a prediction names: an int is taken as is, text matches after
    normalisation (first match); None when it names none of them."""
    if isinstance(prediction, bool):
        raise ConfigError(f'a multiple-choice prediction must be str or int, got {prediction!r}')
    if isinstance(prediction, int):
        return prediction if 0 <= prediction < len(choices) else None
    pred = normalize_answer(prediction)
    return next((i for i, c in enumerate(choices) if normalize_answer(c) == pred), None)


def mc_accuracy(prediction: str | int, choices: Sequence[str], answer_index: int) -> float:
    """1.0 when the prediction selects ``choices[answer_index]``, else 0.0.

    Raises:
        ConfigError: ``answer_index`` is not a valid position in ``choices``.
    """
    if not 0 <= answer_index < len(choices):
        raise ConfigError(
            f'answer_index {answer_index} is out of range for {len(choices)} choices')
    return 1.0 if choice_index(prediction, choices) == answer_index else 0.0


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` over paired lists.

    Raises:
        ConfigError: Lists of different lengths or empty.
    """
    if len(predictions) != len(answers) or not predictions:
        raise ConfigError(
            f'need equal non-empty lists, got {len(predictions)} predictions and '
            f'{len(answers)} reference lists')
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def mean_mc_accuracy(predictions: Sequence[str | int], choices: Sequence[Sequence[str]],
                     answer_indices: Sequence[int]) -> float:
    """Mean :func:`mc_accuracy` over paired lists.

    Raises:
        ConfigError: Lists of different lengths or empty.
    """
    if not predictions or not len(predictions) == len(choices) == len(answer_indices):
        raise ConfigError(
            f'need equal non-empty lists, got {len(predictions)} predictions, {len(choices)} '
            f'choice lists, {len(answer_indices)} answer indices')
    hits = (mc_accuracy(p, c, i) for p, c, i in zip(predictions, choices, answer_indices))
    return sum(hits) / len(predictions)
