"""Questions the cloud derives from an uplinked frame: sources, which records get them, ids."""
from __future__ import annotations

import pytest
import torch

from cdcca_ros.core.rounds.extra_questions import derive, derived_id, question_source
from cdcca_ros.core.rounds.memory import Record
from cdcca_ros.errors import ConfigError

QUESTION = 'what color is the square?'


def _record(split: str = 'train', audit: bool = False, parent: str = '') -> Record:
    return Record(sample_id='robot1-7', seq=3, tokens=torch.ones(4, 8, dtype=torch.float16),
                  indices=torch.tensor([0, 2, 4, 6]), question=QUESTION, split=split,
                  audit=audit, parent=parent)


def test_sources_by_name():
    assert question_source('none') is None and question_source('') is None
    templates = question_source('templates')
    assert templates(QUESTION, 2, 0) and templates('is the door open?', 2, 0) == []
    assert question_source('os.path:join') is not None  # module:function
    for bad in ('nope', 'no_such_module_x:f', 'os:sep', 'os.path:no_such_function', ':f'):
        with pytest.raises(ConfigError):
            question_source(bad)


def test_a_training_frame_gets_questions_on_its_own_tokens():
    parent = _record()
    kids = derive(parent, question_source('templates'), 3, next_seq=10)
    assert 1 <= len(kids) <= 3
    assert [k.sample_id for k in kids] == [derived_id('robot1-7', i) for i in range(len(kids))]
    assert [k.seq for k in kids] == list(range(10, 10 + len(kids)))
    for k in kids:
        assert k.parent == 'robot1-7' and k.split == 'train' and not k.audit
        assert k.tokens is parent.tokens and k.indices is parent.indices
        assert k.question != QUESTION and not k.labelled  # the teacher labels them
    # The oracle's path: true answers given; a question it cannot answer is left out.
    truth = derive(parent, question_source('templates'), 3, 10,
                   answer=lambda q: 'yes' if q.startswith('is there') else None)
    assert truth and all(k.label == 'yes' and k.labelled and k.confidence == 1.0
                         for k in truth)


@pytest.mark.parametrize('parent', [_record('gate'), _record('val'), _record(audit=True),
                                    _record(parent='robot1-1')])
def test_held_out_audit_and_derived_records_get_none(parent):
    assert derive(parent, question_source('templates'), 3, 10) == []


@pytest.mark.parametrize('parent', [_record('gate'), _record('gate', audit=True)])
def test_gate_frames_get_questions_with_gate_questions(parent):
    kids = derive(parent, question_source('templates'), 0, 10, gate=3)
    assert kids and all(k.split == 'gate' and not k.audit and k.parent == 'robot1-7'
                        for k in kids)
    # Early stopping's held-out frames and derived records still get none.
    for other in (_record('val'), _record('gate', parent='robot1-1')):
        assert derive(other, question_source('templates'), 3, 10, gate=3) == []


def test_nothing_without_a_source_or_a_count_and_a_bad_source_is_refused():
    assert derive(_record(), None, 3, 0) == [] == derive(_record(), question_source('templates'),
                                                         0, 0)
    with pytest.raises(ConfigError):
        derive(_record(), lambda q, k, s: 'what?', 3, 0)
    # Its own question and duplicates are dropped.
    kids = derive(_record(), lambda q, k, s: [QUESTION, 'where is the square?',
                                              'where is the square?'], 3, 0)
    assert [k.question for k in kids] == ['where is the square?']
