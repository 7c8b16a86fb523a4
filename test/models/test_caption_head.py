"""The caption head: vocabulary codec, seeded build, save/load, greedy captions with Eq. 2
distributions, and a model whose answers it leaves untouched."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdcca_ros.core.uts import answer_entropy
from cdcca_ros.errors import ConfigError, ModelLoadError
from cdcca_ros.models import caption_head as ch
from cdcca_ros.sim.captions import CaptionSample
from cdcca_ros.sim.scene import Scene, SceneObject

VOCAB = ['what', 'color', 'is', 'the', 'circle', 'square', 'red', 'blue', '?']
WORDS = ('a', 'red', 'blue', 'square', 'circle', 'on', 'grey', 'background', ',', ':')


@pytest.fixture(scope='module')
def model():
    from cdcca_ros.models import build_tiny

    m = build_tiny('blip2', VOCAB, seed=1, qformer_layers=1, dropout=0.0)
    m.torch_model.eval()
    return m


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _cfg(model, **kw) -> ch.CaptionHeadConfig:
    tokens = model.vision_tokens(_images(1))
    return ch.CaptionHeadConfig(words=WORDS, token_dim=tokens.shape[2],
                                query_dim=model.query_features(tokens).shape[2], **kw)


def test_encode_decode_round_trip(model) -> None:
    cfg = _cfg(model)
    ids = ch.encode_caption(cfg, 'A red square, a blue circle: on grey background!')
    assert ids[-1] == ch.EOS and ch.UNK not in ids
    assert ch.decode_caption(cfg, ids) == 'a red square, a blue circle: on grey background'
    assert ch.UNK in ch.encode_caption(cfg, 'a purple square')
    assert len(ch.encode_caption(cfg, ' '.join(['a'] * 500))) == cfg.max_length + 1


def test_build_is_seeded_and_leaves_the_global_generator(model) -> None:
    before = torch.random.get_rng_state()
    a, b = ch.build_head(_cfg(model, seed=3)), ch.build_head(_cfg(model, seed=3))
    c = ch.build_head(_cfg(model, seed=4))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values()))
    assert not torch.equal(a.out.weight, c.out.weight)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        ch.CaptionHeadConfig(words=('a', 'a'), token_dim=8)
    with pytest.raises(ConfigError):
        ch.CaptionHeadConfig(words=('<eos>',), token_dim=8)
    with pytest.raises(ConfigError):
        ch.CaptionHeadConfig(words=('a',), token_dim=8, hidden=30, heads=4)


def test_captions_carry_every_step_distribution(model) -> None:
    captioner = ch.Captioner(model, ch.build_head(_cfg(model, max_length=12)))
    results = captioner.caption(_images(3))
    assert len(results) == 3
    for r in results:
        assert len(r.token_ids) <= 12
        assert r.step_probs.shape == (len(r.token_ids) + 1, captioner.config.vocab_size)
        assert np.allclose(r.step_probs.sum(axis=1), 1.0, atol=1e-5)
        assert np.allclose(r.token_probs, r.step_probs.max(axis=1))
        assert answer_entropy(r.step_probs).mean > 0.0
    # an untrained head rarely stops: cut at max_length, the stop step is still there
    short = captioner.caption(_images(2), max_length=3)
    assert all(len(r.token_ids) <= 3 and len(r.step_probs) == len(r.token_ids) + 1
               for r in short)
    with pytest.raises(ConfigError):
        captioner.caption(_images(1), max_length=13)
    # kept tokens (UTS) caption too
    tokens = model.vision_tokens(_images(2))
    kept = torch.tensor([[0, 2, 4], [1, 3, 5]])
    rows = torch.arange(2)[:, None]
    assert len(captioner.caption_from_tokens(tokens[rows, kept], kept, max_length=4)) == 2


def test_training_learns_a_caption_and_leaves_the_model(model, tmp_path) -> None:
    from cdcca_ros.sim.train_captions import CaptionRecipe, train_head

    before = {k: v.clone() for k, v in model.torch_model.state_dict().items()}
    images = _images(4, seed=5)
    answers = model.answer(images, ['what color is the square?'] * 4)
    sample = CaptionSample(image=images[0], references=('a red square on a grey background',),
                           split='in', domain='source',
                           scene=Scene(objects=(SceneObject('square', 'red'),)), index=0)
    recipe = CaptionRecipe(steps=120, batch_size=4, lr=3e-3, hidden=32, layers=1)
    head = train_head(model, [sample], recipe)
    captioner = ch.Captioner(model, head)
    assert captioner.caption(images[:1])[0].text == 'a red square on a grey background'
    # the model's weights and answers are untouched
    after = model.torch_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = model.answer(images, ['what color is the square?'] * 4)
    assert [a.text for a in again] == [a.text for a in answers]
    assert all(np.array_equal(a.step_probs, b.step_probs) for a, b in zip(answers, again))
    # save / load gives the same captions
    ch.save_head(head, tmp_path)
    assert ch.has_head(tmp_path)
    loaded = ch.Captioner.load(model, tmp_path)
    x = captioner.caption(images)
    y = loaded.caption(images)
    assert [r.text for r in x] == [r.text for r in y]
    assert all(np.array_equal(a.step_probs, b.step_probs) for a, b in zip(x, y))


def test_load_refuses_what_is_not_a_head(model, tmp_path) -> None:
    with pytest.raises(ModelLoadError):
        ch.load_head(tmp_path)
    ch.save_head(ch.build_head(_cfg(model)), tmp_path)
    meta = json.loads((tmp_path / ch.HEAD_CONFIG).read_text())
    (tmp_path / ch.HEAD_CONFIG).write_text(json.dumps({**meta, 'format_version': 99}))
    with pytest.raises(ModelLoadError, match='format_version'):
        ch.load_head(tmp_path)
    (tmp_path / ch.HEAD_CONFIG).write_text(json.dumps({**meta, 'hidden': 32}))
    with pytest.raises(ModelLoadError, match='does not load'):
        ch.load_head(tmp_path)
    (tmp_path / ch.HEAD_WEIGHTS).write_bytes(b'not safetensors')
    (tmp_path / ch.HEAD_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError):
        ch.load_head(tmp_path)
