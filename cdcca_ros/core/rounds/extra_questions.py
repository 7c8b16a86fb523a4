"""More questions per uplinked frame, answered by the teacher in the cloud (no rclpy).

A frame the device uplinked for one question holds the answers to others: the colour of the
object it asked about, where that object is, how many objects there are. The cloud can put
such questions to the teacher on the tokens it already has, so each uplinked frame trains
the student on several labelled questions **at no uplink cost** (the teacher's forwards are
the price). A *question source* writes them:

- ``templates`` (built in): the bundled world's closed-vocabulary templates
  (:func:`cdcca_ros.sim.questions.related_questions`). It writes nothing for a question not
  written from those templates, so on other tasks it is inert.
- ``module:function``: your own, for your robots' tasks, called as
  ``function(question: str, k: int, seed: int) -> list[str]`` (at most ``k`` questions,
  deterministic in its arguments).
- ``none``: no extra questions.

Derived records (:func:`derive`) share their parent's tokens, feature and split.
Training-split parents get them; the gate's held-out parents too with
``guard.gate_questions``, and the gate then judges frame by frame
(:func:`cdcca_ros.core.rounds.round.paired`), so its paired tests still count independent
frames. Early stopping's held-out samples stay one per frame. Derived records are never audit
samples (the live audit compares versions on the devices' own questions) and never pulled
themselves: a pull of the parent's other tokens reaches them (:meth:`CloudRuntime.add_pulled
<cdcca_ros.core.cloud_runtime.CloudRuntime.add_pulled>`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable

from cdcca_ros.core.rounds.memory import Record
from cdcca_ros.errors import ConfigError

QuestionSource = Callable[[str, int, int], list[str]]
"""``(question, k, seed) -> at most k other questions about the same frame``."""

MAX_EXTRA_QUESTIONS = 16
"""The most questions derived from one frame (``guard.extra_questions``' bound)."""

DERIVED_SEP = '~q'
"""A derived record's id is its parent's id, this separator and its index."""


def _templates(question: str, k: int, seed: int) -> list[str]:
    from cdcca_ros.sim.questions import related_questions

    return related_questions(question, k, seed)


_BUILTIN: dict[str, QuestionSource | None] = {'none': None, '': None, 'templates': _templates}


@functools.cache
def question_source(name: str) -> QuestionSource | None:
    """The source named ``name`` (``templates``, ``none``/'' or ``module:function``),
    resolved once per name.

    Raises:
        ConfigError: An unknown name, or a ``module:function`` that does not import or is
            not callable.
    """
    if name in _BUILTIN:
        return _BUILTIN[name]
    module_name, sep, attr = name.partition(':')
    if not sep or not module_name or not attr:
        raise ConfigError(f'question source {name!r}: use templates, none or module:function')
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f'question source {name!r} does not import: {err}') from err
    if not callable(fn):
        raise ConfigError(f'question source {name!r} is not callable')
    return fn


def derived_id(parent_id: str, index: int) -> str:
    """The id of the ``index``-th question derived from ``parent_id``."""
    return f'{parent_id}{DERIVED_SEP}{index}'


def derive(parent: Record, source: QuestionSource | None, k: int, next_seq: int,
           answer: Callable[[str], str | None] | None = None, gate: int = 0
           ) -> list[Record]:
    """Up to ``k`` records asking other questions of ``parent``'s frame.

    Args:
        parent: An uplinked training-split non-audit record (up to ``k`` questions) or a
            gate-split one, audit or not (up to ``gate``); anything else gets none.
        source: The question source (None: none).
        k: Most questions for a training frame.
        next_seq: The memory's next sequence number (the records take consecutive ones).
        answer: Gives the true answer of a question (the benchmarks' oracle); None: the
            teacher labels them. A question it cannot answer is skipped.
        gate: Most questions for a gate frame (``guard.gate_questions``).

    Raises:
        ConfigError: The source returned something that is not a list of strings.
    """
    if parent.split == 'gate':
        k = gate
    elif parent.split != 'train' or parent.audit:
        k = 0
    if source is None or k <= 0 or parent.parent:
        return []
    seed = int.from_bytes(hashlib.sha256(parent.sample_id.encode('utf-8')).digest()[:8], 'big')
    questions = source(parent.question, k, seed)
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise ConfigError(f'question source returned {type(questions).__name__}, not a list '
                          'of str')
    own = parent.question.strip().lower()
    out: list[Record] = []
    for text in dict.fromkeys(q.strip() for q in questions[:k]):
        if not text or text.lower() == own:
            continue
        record = Record(sample_id=derived_id(parent.sample_id, len(out)),
                        seq=next_seq + len(out), tokens=parent.tokens, indices=parent.indices,
                        question=text, split=parent.split, parent=parent.sample_id,
                        feature=parent.feature)
        if answer is not None:
            label = answer(text)
            if label is None:
                continue
            record.label, record.labelled, record.confidence = label, True, 1.0
            record.label_tokens = parent.label_tokens
        out.append(record)
    return out
