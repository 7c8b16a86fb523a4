"""Questions: correct answers on constructed scenes, MC form, balanced types, closed vocabulary."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.domains import DRIFTED, SOURCE
from cdcca_ros.sim.questions import (
    ANSWER_POOLS,
    NUM_CHOICES,
    QTYPES,
    Question,
    answer_of,
    answer_space,
    ask,
    format_mc_prompt,
    parse,
    reference_answers,
    related_questions,
    tokenize,
    vocabulary,
)
from cdcca_ros.sim.scene import BASE_COLORS, BASE_KINDS, Scene, SceneObject
from cdcca_ros.sim.world import World

SCENE = Scene((SceneObject('circle', 'red', cell=(0, 0)),
               SceneObject('square', 'blue', cell=(1, 1)),
               SceneObject('star', 'yellow', cell=(2, 2))))
TRUTH_BY_KIND = {'circle': ('red', 'left'), 'square': ('blue', 'middle'),
                 'star': ('yellow', 'right')}
KIND_BY_COLOR = {'red': 'circle', 'blue': 'square', 'yellow': 'star'}


def _named(text: str, names) -> str:
    found = [n for n in names if n in tokenize(text)]
    assert len(found) == 1, text
    return found[0]


@pytest.mark.parametrize('qtype', QTYPES)
def test_answers_are_correct_on_a_constructed_scene(qtype: str) -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        q = ask(SCENE, rng, qtype)
        assert q.qtype == qtype
        seen.add(q.answer)
        if qtype == 'color':
            assert q.answer == TRUTH_BY_KIND[_named(q.text, TRUTH_BY_KIND)][0]
        elif qtype == 'shape':
            assert q.answer == KIND_BY_COLOR[_named(q.text, KIND_BY_COLOR)]
        elif qtype == 'count':
            assert q.answer == '3'
        elif qtype == 'position':
            words = tokenize(q.text)
            kind = next((k for k in TRUTH_BY_KIND if k in words), None)
            kind = kind or KIND_BY_COLOR[_named(q.text, KIND_BY_COLOR)]
            assert q.answer == TRUTH_BY_KIND[kind][1]
        else:
            words = tokenize(q.text)
            pair = (next(w for w in words if w in ANSWER_POOLS['color']),
                    next(w for w in words if w in ANSWER_POOLS['shape']))
            present = {(o.color, o.kind) for o in SCENE.objects}
            assert q.answer == ('yes' if pair in present else 'no'), q.text
    expected = {'count': {'3'}, 'exist': {'yes', 'no'}}.get(qtype)
    assert seen == expected if expected else len(seen) == 3


def test_multiple_choice_form() -> None:
    rng = np.random.default_rng(1)
    for qtype in QTYPES * 20:
        q = ask(SCENE, rng, qtype)
        assert len(q.choices) == NUM_CHOICES == len(set(q.choices))
        assert q.choices[q.answer_index] == q.answer
        prompt = q.mc_prompt
        assert prompt.startswith(q.text) and all(c in prompt for c in q.choices)
    assert format_mc_prompt('is it?', ['yes', 'no', 'red', '2']) == \
        'is it? choices: yes, no, red, 2.'


def test_reference_answers_have_ten_with_synonyms() -> None:
    assert reference_answers('red') == ('red',) * 10
    refs = reference_answers('middle')
    assert len(refs) == 10 and refs.count('middle') == 7 and refs.count('center') == 3


@pytest.mark.parametrize('call', [
    lambda: ask(SCENE, np.random.default_rng(0), 'weather'),
    lambda: ask(Scene(()), np.random.default_rng(0), 'count'),
    lambda: Question('q', 'red', ('red',) * 10, 'color', ('red', 'a', 'b', 'c'), 1),
])
def test_question_errors(call) -> None:
    with pytest.raises(ConfigError):
        call()


def test_types_balanced_and_answers_spread() -> None:
    samples = World(3).samples(SOURCE, 500, image_size=16)
    types = collections.Counter(s.qtype for s in samples)
    assert set(types.values()) == {100}
    for qtype in QTYPES:
        answers = collections.Counter(s.answer for s in samples if s.qtype == qtype)
        # Every source answer of the type appears, none dominates, no drift-only concept.
        pool = {'color': BASE_COLORS, 'shape': BASE_KINDS, 'count': ('1', '2', '3', '4')}.get(
            qtype, ANSWER_POOLS[qtype])
        assert set(answers) == set(pool), (qtype, answers)
        assert max(answers.values()) < 0.6 * 100, (qtype, answers)


def test_vocabulary_is_closed_over_every_domain() -> None:
    vocab = set(vocabulary())
    assert set(answer_space()) <= vocab
    world = World(11)
    used: set[str] = set()
    for domain in (SOURCE, *DRIFTED):
        for s in world.samples(domain, 800, image_size=8):
            for text in (s.mc_prompt, *s.answers, *s.choices):
                used.update(tokenize(text))
    assert used <= vocab, used - vocab
    # The vocabulary is not padded with words nothing ever produces.
    assert len(vocab - used) <= 2, vocab - used


def _samples(n: int = 40):
    world = World(5)
    return [s for domain in (SOURCE,) + tuple(DRIFTED) for s in world.samples(domain, n, 32)]


def test_the_true_answer_of_any_template_question_is_read_from_the_scene():
    samples = _samples()
    assert all(answer_of(s.scene, s.question) == s.answer for s in samples)
    assert answer_of(SCENE, 'what color is the diamond?') is None  # no diamond in the scene
    assert answer_of(SCENE, 'is there a red diamond?') == 'no'


def test_related_questions_ask_other_things_about_the_same_frame():
    words = set(vocabulary())
    kinds = collections.Counter()
    for i, s in enumerate(_samples()):
        qs = related_questions(s.question, 4, seed=i)
        assert qs == related_questions(s.question, 4, seed=i)  # deterministic
        assert 1 <= len(qs) <= 4 and s.question not in qs and len(set(qs)) == len(qs)
        assert related_questions(s.question, 1, seed=i) == qs[:1]
        for q in qs:
            qtype, _, _ = parse(q)
            kinds[qtype] += 1
            # Written from the question alone, yet about something the frame holds.
            assert answer_of(s.scene, q) is not None
            assert set(tokenize(q)) <= words
    assert set(kinds) == set(QTYPES)


def test_a_question_not_written_from_the_templates_gets_no_related_ones():
    assert parse('is the door open?') is None
    assert related_questions('is the door open?', 4, 0) == []
    assert answer_of(SCENE, 'is the door open?') is None
    assert related_questions('what color is the circle?', 0, 0) == []
