"""The anchor set file and its records."""
from __future__ import annotations

import pytest
import torch
from tiny_models import QUESTION, random_images, red_teacher_and_student

from cdcca_ros.core.rounds.anchor import (
    ANCHOR_FILE,
    anchor_records,
    read_anchor,
    resolve_anchor,
    write_anchor,
    write_anchor_from_images,
)
from cdcca_ros.errors import ConfigError


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    from cdcca_ros.models import bundled

    path = tmp_path_factory.mktemp('student')
    red_teacher_and_student(path, random_images())
    return bundled.load(str(path)), path


def test_write_read_round_trip(tmp_path):
    tokens = torch.randn(3, 5, 4)
    write_anchor(tmp_path / 'a.safetensors', tokens, ['q1', 'q2', 'q3'], ['x', 'y', 'z'])
    t, q, a = read_anchor(tmp_path / 'a.safetensors')
    assert torch.allclose(t.float(), tokens, atol=1e-2) and q == ['q1', 'q2', 'q3']
    assert a == ['x', 'y', 'z']
    with pytest.raises(ConfigError, match='N = 2'):
        write_anchor(tmp_path / 'b.safetensors', tokens, ['q1', 'q2'])
    (tmp_path / 'c.safetensors').write_bytes(b'junk')
    with pytest.raises(ConfigError):
        read_anchor(tmp_path / 'c.safetensors')


def test_resolve_prefers_the_students_own_then_a_path_then_none(tmp_path):
    assert resolve_anchor('', str(tmp_path)) is None
    (tmp_path / ANCHOR_FILE).write_bytes(b'x')
    assert resolve_anchor('', str(tmp_path)) == tmp_path / ANCHOR_FILE
    assert resolve_anchor('none', str(tmp_path)) is None
    with pytest.raises(ConfigError, match='does not exist'):
        resolve_anchor(str(tmp_path / 'missing.safetensors'), None)


def test_records_are_labelled_by_the_base_student_without_answers(student, tmp_path):
    model, _ = student
    images = random_images(12, seed=3)
    write_anchor_from_images(tmp_path / ANCHOR_FILE, model, images, [QUESTION] * 12)
    records = anchor_records(tmp_path / ANCHOR_FILE, model, 0.1, 0.3)
    own = [r.text for r in model.answer(images, [QUESTION] * 12)]
    assert [r.label for r in records] == [a or None for a in own]
    assert all(r.labelled and r.confidence == 1.0 and r.indices is None for r in records)
    # The base's own answer distribution is kept: its top entry is the answer's first token.
    first = model.tokenizer(' ' + own[0], add_special_tokens=False)['input_ids'][0]
    assert int(records[0].soft[0][0, 0]) == first
    assert {r.split for r in records} <= {'train', 'val', 'gate'}


def test_records_use_the_files_answers_when_it_has_them(student, tmp_path):
    model, _ = student
    images = random_images(4, seed=4)
    write_anchor_from_images(tmp_path / ANCHOR_FILE, model, images, [QUESTION] * 4,
                             ['green'] * 4)
    assert [r.label for r in anchor_records(tmp_path / ANCHOR_FILE, model, 0.1, 0.3)] == [
        'green'] * 4


def test_tokens_of_another_space_are_refused(student, tmp_path):
    model, _ = student
    write_anchor(tmp_path / 'x.safetensors', torch.zeros(2, 3, 7), ['a', 'b'])
    with pytest.raises(ConfigError, match='do not fit'):
        anchor_records(tmp_path / 'x.safetensors', model, 0.1, 0.3)
