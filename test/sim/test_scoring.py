"""VQA and multiple-choice scoring on known cases."""
from __future__ import annotations

import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.scoring import (
    choice_index,
    mc_accuracy,
    mean_mc_accuracy,
    mean_vqa_accuracy,
    normalize_answer,
    vqa_accuracy,
)


@pytest.mark.parametrize('raw, norm', [
    ('Red', 'red'), ('  the  Square. ', 'square'), ('an apple!', 'apple'), ('Two', '2'),
    ('three', '3'), ('none', '0'), ('1.5', '1.5'), ('yes,', 'yes'), ("it's A dog", 'it s dog'),
    ('left_side', 'left side'),
])
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize('pred, answers, acc', [
    ('red', ['red'] * 10, 1.0),
    ('red', ['red'] * 3 + ['blue'] * 7, 1.0),
    ('red', ['red'] * 2 + ['blue'] * 8, 2 / 3),
    ('red', ['red'] + ['blue'] * 9, 1 / 3),
    ('green', ['red'] * 10, 0.0),
    ('Two.', ['2'] * 10, 1.0),
    ('the Middle', ['middle'] * 7 + ['center'] * 3, 1.0),
    ('center', ['middle'] * 7 + ['center'] * 3, 1.0),
    ('centre', ['middle'] * 7 + ['center'] * 3, 0.0),
])
def test_vqa_accuracy(pred: str, answers: list[str], acc: float) -> None:
    assert vqa_accuracy(pred, answers) == pytest.approx(acc)


@pytest.mark.parametrize('pred, acc', [
    (2, 1.0), (0, 0.0), ('blue', 1.0), ('The Blue.', 1.0), ('red', 0.0), ('purple', 0.0),
    (7, 0.0),
])
def test_mc_accuracy(pred: str | int, acc: float) -> None:
    assert mc_accuracy(pred, ['red', 'green', 'blue', 'yellow'], 2) == acc


def test_choice_index_and_means() -> None:
    assert choice_index('three', ['1', '2', '3', '4']) == 2
    assert choice_index('nothing', ['1', '2']) is None
    assert mean_vqa_accuracy(['a red', 'blue'], [['red'] * 10, ['red'] * 10]) == 0.5
    assert mean_mc_accuracy([0, 'no'], [['yes', 'no'], ['yes', 'no']], [0, 0]) == 0.5


@pytest.mark.parametrize('call', [
    lambda: vqa_accuracy('red', []),
    lambda: mc_accuracy('red', ['red'], 3),
    lambda: mc_accuracy(True, ['red', 'blue'], 1),
    lambda: mean_vqa_accuracy(['red'], []),
    lambda: mean_mc_accuracy([], [], []),
])
def test_scoring_errors(call) -> None:
    with pytest.raises(ConfigError):
        call()
