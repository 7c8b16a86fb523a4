"""Caption entropy, AKD on teacher captions and caption TENT on tiny real models."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cdcca_ros.core.captions import adapt
from cdcca_ros.core.uts import answer_entropy
from cdcca_ros.errors import ConfigError
from cdcca_ros.models.base import AnswerResult
from cdcca_ros.models.caption_head import Captioner, build_head
from cdcca_ros.sim.captions import CaptionSample
from cdcca_ros.sim.scene import Scene, SceneObject
from cdcca_ros.sim.train_captions import CaptionRecipe, train_head

CAPTION = 'a red square on a grey background'


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope='module')
def pair() -> tuple[Captioner, Captioner]:
    """A teacher whose head says CAPTION for anything, a student with a random head; the
    student's model has LoRA configured."""
    from cdcca_ros.bench.common import build_tiny_pair

    teacher, student = build_tiny_pair(0)
    image = _images(1)[0]
    scene = Scene(objects=(SceneObject('square', 'red'),))

    def sample(text: str) -> CaptionSample:
        return CaptionSample(image=image, references=(text,), split='in', domain='source',
                             scene=scene, index=0)

    recipe = CaptionRecipe(steps=120, batch_size=4, lr=3e-3, hidden=32, layers=1)
    t = Captioner(teacher, train_head(teacher, [sample(CAPTION)], recipe))
    s = Captioner(student, build_head(replace(t.config, token_dim=t.config.token_dim,
                                              query_dim=student.query_features(
                                                  student.vision_tokens([image])).shape[2],
                                              max_length=12, seed=5)))
    assert t.caption([image])[0].text == CAPTION
    return t, s


def test_caption_entropy_is_eq2_over_every_step() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], dtype=np.float32)
    result = AnswerResult(text='x y', token_ids=[0, 1], step_probs=probs,
                          token_probs=probs.max(axis=1), latency_ms=0.0)
    stats = adapt.caption_entropy(result)
    steps = [0.0, np.log(2), 1.5 * np.log(2)]
    assert stats.mean == pytest.approx(np.mean(steps), rel=1e-5)
    assert stats.max == pytest.approx(max(steps), rel=1e-5)
    assert stats.mean == answer_entropy(probs).mean


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        adapt.CaptionAkdConfig(lambda_query=0, lambda_repr=0, lambda_ce=0)
    with pytest.raises(ConfigError):
        adapt.CaptionAkdConfig(lr=0)
    with pytest.raises(ConfigError):
        adapt.CaptionAkdConfig(train_model=False, train_head=False)


def test_distillation_teaches_the_teachers_captions(pair) -> None:
    import copy

    teacher, student = pair
    student = copy.deepcopy(student)
    images = _images(6, seed=1)
    tokens = student.model.vision_tokens(images)
    assert student.caption(images[:1])[0].text != CAPTION
    cfg = adapt.CaptionAkdConfig(steps=120, lr=3e-3, batch_size=6, train_head=True,
                                 lambda_query=0.0, lambda_repr=0.0)
    distiller = adapt.CaptionDistiller(student, teacher, cfg)
    # kept tokens, as UTS uplinks them: the teacher labels what arrived
    kept = torch.tensor([0, 1, 3, 5, 7])
    rows = [tokens[i, kept] for i in range(6)]
    labels = distiller.label(rows, [kept] * 6)
    assert labels == [CAPTION] * 6
    losses = distiller.fit(rows, [kept] * 6, labels)
    assert set(losses) == {'total', 'query', 'repr', 'ce'} and losses['query'] == 0.0
    assert [r.text for r in student.caption(_images(3, seed=2))] == [CAPTION] * 3


def test_default_trains_the_adapter_not_the_head(pair) -> None:
    import copy

    teacher, student = pair
    student = copy.deepcopy(student)
    head_before = {k: v.clone() for k, v in student.head.state_dict().items()}
    model_before = {k: v.clone() for k, v in student.model.torch_model.state_dict().items()}
    trainable = set(student.model.trainable_state_dict())
    tokens = student.model.vision_tokens(_images(4, seed=3))
    cfg = adapt.CaptionAkdConfig(steps=5, batch_size=4)
    distiller = adapt.CaptionDistiller(student, teacher, cfg)
    losses = distiller.fit(list(tokens), [None] * 4, [CAPTION] * 4)
    assert losses['query'] > 0 and losses['repr'] > 0 and losses['ce'] > 0
    assert all(torch.equal(v, student.head.state_dict()[k]) for k, v in head_before.items())
    after = student.model.torch_model.state_dict()
    changed = {k for k, v in model_before.items() if not torch.equal(v, after[k])}
    assert changed, 'nothing trained'
    # only the trainable set moved (names differ by PEFT's prefixes: compare by suffix)
    assert all(any(k.endswith(t) or t.endswith(k) for t in trainable) for k in changed)
    # head_state / load_state round trip what a delta carries
    state = adapt.head_state(student, cfg)
    assert state and all(k.startswith('model.') for k in state)
    fresh = copy.deepcopy(pair[1])
    adapt.load_state(fresh, state)
    assert [r.text for r in fresh.caption(_images(2))] == \
        [r.text for r in student.caption(_images(2))]


def test_tent_lowers_the_caption_entropy(pair) -> None:
    import copy

    student = copy.deepcopy(pair[1])
    tokens = student.model.vision_tokens(_images(6, seed=4))

    def mean_entropy() -> float:
        return float(np.mean([adapt.caption_entropy(r).mean
                              for r in student.caption_from_tokens(tokens)]))

    before = mean_entropy()
    adapt.tent_fit(student, tokens, adapt.CaptionAkdConfig(steps=30, lr=3e-3, batch_size=6,
                                                           train_head=True))
    assert mean_entropy() < before


def test_anchor_rows_only_get_cross_entropy(pair) -> None:
    import copy

    teacher, student = pair
    student = copy.deepcopy(student)
    tokens = student.model.vision_tokens(_images(4, seed=6))
    distiller = adapt.CaptionDistiller(student, teacher, adapt.CaptionAkdConfig(steps=2,
                                                                               batch_size=4))
    anchors = distiller.fit(list(tokens), [None] * 4, [CAPTION] * 4, distill=[False] * 4)
    assert anchors['query'] == anchors['repr'] == 0.0 and anchors['ce'] > 0
    with pytest.raises(ConfigError):
        distiller.fit(list(tokens), [None] * 4, [CAPTION] * 4, distill=[True])
