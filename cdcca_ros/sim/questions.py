"""Short-answer and multiple-choice questions about a scene, with a closed vocabulary.

Five question types in equal shares (:data:`QTYPES`): an object's colour, an object's shape,
how many objects, whether a colour/kind pair exists, and which column an object is in. Every
answer is one word. Each question carries ten reference answers (VQA style, with synonyms from
:data:`SYNONYMS`) and a four-way multiple-choice form (A-OKVQA style).

:func:`vocabulary` lists every token any question, prompt or answer can contain, split the way
:func:`tokenize` (and a ``tokenizers`` Whitespace pre-tokenizer) splits text, so a word-level
tokenizer built from it never meets an unknown word.
"""
from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.scene import BASE_COLORS, BASE_KINDS, COLORS, COLUMNS, KINDS, MAX_OBJECTS, Scene

QTYPES: tuple[str, ...] = ('color', 'shape', 'count', 'exist', 'position')

TEMPLATES: dict[str, tuple[str, ...]] = {
    'color': ('what color is the {kind}?', 'which color does the {kind} have?'),
    'shape': ('what shape is the {color} object?', 'which shape is {color}?'),
    'count': ('how many shapes are there?', 'how many objects are in the picture?'),
    'exist': ('is there a {color} {kind}?', 'do you see a {color} {kind}?'),
    'position': ('where is the {kind}?', 'where is the {color} object?'),
}
"""Templates per type; ``{kind}`` and ``{color}`` name objects (unique within a scene)."""

ANSWER_POOLS: dict[str, tuple[str, ...]] = {
    'color': tuple(COLORS),
    'shape': KINDS,
    'count': tuple(str(n) for n in range(1, MAX_OBJECTS + 1)),
    'exist': ('yes', 'no'),
    'position': COLUMNS,
}
"""Every canonical answer of each type (also the multiple-choice distractor pools)."""

SYNONYMS: dict[str, tuple[str, ...]] = {
    'middle': ('center',),
    'diamond': ('rhombus',),
    'cross': ('plus',),
    'circle': ('round',),
}
"""Other answers a human annotator would give; they fill 3 of the 10 reference answers."""

NUM_REFERENCES = 10
NUM_CHOICES = 4
MC_PREFIX = 'choices:'

_TOKEN = re.compile(r'\w+|[^\w\s]+')


def tokenize(text: str) -> list[str]:
    """Lower-case word and punctuation tokens (same split as a Whitespace pre-tokenizer)."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Question:
    """One question with its ground truth.

    Attributes:
        text: The question, e.g. ``'what color is the square?'``.
        answer: Canonical one-word answer.
        answers: Ten reference answers (canonical and synonyms) for VQA accuracy.
        qtype: One of :data:`QTYPES`.
        choices: Four multiple-choice options, the answer among them.
        answer_index: Position of ``answer`` in ``choices``.
    """

    text: str
    answer: str
    answers: tuple[str, ...]
    qtype: str
    choices: tuple[str, ...]
    answer_index: int

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ConfigError(f'Question qtype {self.qtype!r} is not one of {QTYPES}')
        if len(self.choices) != NUM_CHOICES or self.choices[self.answer_index] != self.answer:
            raise ConfigError(
                f'Question choices {self.choices!r} must be {NUM_CHOICES} options with '
                f'{self.answer!r} at index {self.answer_index}')

    @property
    def mc_prompt(self) -> str:
        """The question with its choices in the text (see :func:`format_mc_prompt`)."""
        return format_mc_prompt(self.text, self.choices)


def format_mc_prompt(question: str, choices: tuple[str, ...] | list[str]) -> str:
    """``'what color is the square? choices: red, blue, green, yellow.'``"""
    return f'{question} {MC_PREFIX} {", ".join(choices)}.'


def reference_answers(answer: str) -> tuple[str, ...]:
    """Ten reference answers: the canonical one 7 times and its synonyms 3 times (or 10x)."""
    syn = SYNONYMS.get(answer, ())
    if not syn:
        return (answer,) * NUM_REFERENCES
    return (answer,) * (NUM_REFERENCES - 3) + tuple(itertools.islice(itertools.cycle(syn), 3))


def _choices(answer: str, qtype: str, rng: np.random.Generator) -> tuple[tuple[str, ...], int]:
    pool = [a for a in ANSWER_POOLS[qtype] if a != answer]
    order = rng.permutation(len(pool))
    picked = [pool[int(i)] for i in order[:NUM_CHOICES - 1]]
    if len(picked) < NUM_CHOICES - 1:
        # yes/no and left/middle/right have too few options: pad with other types' answers,
        # as A-OKVQA pads with plausible-looking but wrong words.
        others = [a for t in QTYPES if t != qtype for a in ANSWER_POOLS[t]]
        fill = rng.permutation(len(others))[:NUM_CHOICES - 1 - len(picked)]
        picked += [others[int(i)] for i in fill]
    options = [answer] + picked
    perm = rng.permutation(NUM_CHOICES)
    choices = tuple(options[int(i)] for i in perm)
    return choices, int(np.flatnonzero(perm == 0)[0])


def _pick(rng: np.random.Generator, items: list | tuple) -> object:
    return items[int(rng.integers(0, len(items)))]


def ask(scene: Scene, rng: np.random.Generator, qtype: str | None = None) -> Question:
    """Ask one question about ``scene``.

    Args:
        scene: A scene with at least one object.
        rng: The generator (template, referent, distractor choices).
        qtype: One of :data:`QTYPES`, or None for a uniformly random type.

    Raises:
        ConfigError: Unknown ``qtype`` or a scene without objects.
    """
    if qtype is None:
        qtype = QTYPES[int(rng.integers(0, len(QTYPES)))]
    if qtype not in QTYPES:
        raise ConfigError(f'unknown question type {qtype!r}; known: {QTYPES}')
    if not scene.objects:
        raise ConfigError('cannot ask about a scene without objects')
    variant = int(rng.integers(0, len(TEMPLATES[qtype])))
    template = TEMPLATES[qtype][variant]
    obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
    if qtype == 'color':
        text, answer = template.format(kind=obj.kind), obj.color
    elif qtype == 'shape':
        text, answer = template.format(color=obj.color), obj.kind
    elif qtype == 'count':
        text, answer = template, str(len(scene.objects))
    elif qtype == 'position':
        text, answer = template.format(kind=obj.kind, color=obj.color), obj.column
    else:  # exist: half present pairs, half absent ones
        if bool(rng.integers(0, 2)):
            color, kind, answer = obj.color, obj.kind, 'yes'
        else:
            # Absent pairs from the source concepts plus what the scene shows, so a clean
            # scene never prompts a word only drift brings.
            kinds = [k for k in KINDS if k in BASE_KINDS or scene.count(kind=k)]
            colors = [c for c in COLORS if c in BASE_COLORS or scene.count(color=c)]
            present = {(o.color, o.kind) for o in scene.objects}
            absent = [(c, k) for c in colors for k in kinds if (c, k) not in present]
            color, kind = _pick(rng, absent)  # type: ignore[misc]
            answer = 'no'
        text = template.format(color=color, kind=kind)
    choices, index = _choices(answer, qtype, rng)
    return Question(text=text, answer=answer, answers=reference_answers(answer), qtype=qtype,
                    choices=choices, answer_index=index)


def answer_space() -> list[str]:
    """Every canonical answer, grouped by type in :data:`QTYPES` order (no duplicates)."""
    out: list[str] = []
    for qtype in QTYPES:
        out += [a for a in ANSWER_POOLS[qtype] if a not in out]
    return out


def vocabulary() -> list[str]:
    """Every token a question, a multiple-choice prompt or a reference answer can contain.

    Built by expanding every template with every colour and kind, so it stays closed when a
    template or a pool changes. Sorted, no duplicates.
    """
    words: set[str] = set()
    for templates in TEMPLATES.values():
        for template, color, kind in itertools.product(templates, COLORS, KINDS):
            words.update(tokenize(template.format(color=color, kind=kind)))
    for answer in answer_space():
        words.update(tokenize(answer))
        for ref in reference_answers(answer):
            words.update(tokenize(ref))
    words.update(tokenize(format_mc_prompt('', ANSWER_POOLS['exist'])))
    return sorted(words)


@functools.cache
def _template_questions() -> dict[str, tuple[str, str | None, str | None]]:
    """Every question :data:`TEMPLATES` can write, with its ``(qtype, color, kind)``."""
    table: dict[str, tuple[str, str | None, str | None]] = {}
    for qtype, templates in TEMPLATES.items():
        for template in templates:
            colors: list[str | None] = list(COLORS) if '{color}' in template else [None]
            kinds: list[str | None] = list(KINDS) if '{kind}' in template else [None]
            for color, kind in itertools.product(colors, kinds):
                table.setdefault(template.format(color=color, kind=kind), (qtype, color, kind))
    return table


def parse(text: str) -> tuple[str, str | None, str | None] | None:
    """``(qtype, color, kind)`` of a question written from :data:`TEMPLATES` (the colour or
    the kind None where the template names none); None for any other text."""
    return _template_questions().get(text.strip().lower())


def related_questions(text: str, k: int, seed: int) -> list[str]:
    """Up to ``k`` other questions about the scene ``text`` was asked on, built from the
    question alone (no ground truth): the same object's other attributes, the count, and an
    exist question on the object. Empty for a question not written from :data:`TEMPLATES`.

    Deterministic in ``(text, k, seed)``. This is the cloud's ``templates`` question source
    (:mod:`cdcca_ros.core.rounds.extra_questions`).
    """
    parsed = parse(text)
    if parsed is None or k <= 0:
        return []
    qtype, color, kind = parsed
    rng = np.random.default_rng(seed)
    cands = [TEMPLATES['count'][0]]
    if qtype != 'exist' and kind is not None:  # the object of this kind is in the scene
        cands += [TEMPLATES['color'][0].format(kind=kind),
                  TEMPLATES['position'][0].format(kind=kind),
                  TEMPLATES['exist'][0].format(color=_pick(rng, BASE_COLORS), kind=kind)]
    elif qtype != 'exist' and color is not None:
        cands += [TEMPLATES['shape'][0].format(color=color),
                  TEMPLATES['position'][1].format(color=color),
                  TEMPLATES['exist'][0].format(color=color, kind=_pick(rng, BASE_KINDS))]
    else:
        cands.append(TEMPLATES['exist'][0].format(color=_pick(rng, BASE_COLORS),
                                                  kind=_pick(rng, BASE_KINDS)))
    own = text.strip().lower()
    cands = [c for c in dict.fromkeys(cands) if c != own]
    order = rng.permutation(len(cands))
    return [cands[int(i)] for i in order[:k]]


def answer_of(scene: Scene, text: str) -> str | None:
    """The true answer to a question written from :data:`TEMPLATES` about ``scene``; None
    for other text or a question about an object the scene does not hold."""
    parsed = parse(text)
    if parsed is None:
        return None
    qtype, color, kind = parsed
    if qtype == 'count':
        return str(len(scene.objects))
    found = scene.find(kind=kind, color=color)
    if qtype == 'exist':
        return 'yes' if found else 'no'
    if len(found) != 1:
        return None
    obj = found[0]
    return {'color': obj.color, 'shape': obj.kind, 'position': obj.column}[qtype]
