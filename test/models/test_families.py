"""The MLLM contract, table-driven over the three families at tiny size (offline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.errors import ModelError, VisionSpaceMismatchError
from cdcca_ros.models import TrainableConfig, check_vision_space, load_model

# How each family turns K kept tokens into what the LM sees (query width L for K of N).
QUERY_LEN = {
    'blip2': lambda model, k: model.torch_model.config.num_query_tokens,  # fixed queries
    'llava': lambda model, k: k,                                         # only kept tokens
    'qwen2_vl': lambda model, k: model.vision_space().num_tokens // 4,   # zero-filled 2x2
}


def _same(a, b, atol=1e-5):
    """Two answer lists agree: same ids and the same per-step distributions."""
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.step_probs, y.step_probs, atol=atol)


def _subset(tokens: torch.Tensor, keep: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(tokens.shape[1], generator=gen)[:keep].sort().values
                       for _ in range(tokens.shape[0])])
    kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    return kept, idx


def test_answer(model, images, questions):
    results = model.answer(images, questions, max_new_tokens=4)
    vocab = model.lm_head.out_features
    assert len(results) == 2
    for res in results:
        assert isinstance(res.text, str) and res.text == res.text.strip()
        steps = len(res.step_probs)
        assert len(res.token_ids) <= 4 and model.eos_token_id not in res.token_ids
        # The eos step is included when generation stopped there.
        chosen = res.token_ids + [model.eos_token_id] * (steps - len(res.token_ids))
        assert steps in (len(res.token_ids), len(res.token_ids) + 1) and 1 <= steps <= 4
        if steps == len(res.token_ids):
            assert steps == 4  # only max_new_tokens ends an answer without eos
        assert res.step_probs.shape == (steps, vocab) and res.step_probs.dtype == np.float32
        assert res.token_probs.shape == (steps,) and res.token_probs.dtype == np.float32
        np.testing.assert_allclose(res.step_probs.sum(axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(
            res.token_probs, res.step_probs[np.arange(steps), chosen], rtol=1e-6)
        # Greedy: every chosen token is the step's most likely one.
        assert np.all(res.token_probs >= res.step_probs.max(axis=1) - 1e-7)
        assert 0.0 < res.latency_ms < 5000.0
    assert not model.torch_model.training


def test_answer_is_deterministic_and_batch_independent(model, images, questions):
    both = model.answer(images, questions)
    _same(both, model.answer(images, questions), atol=0)
    # Left padding and positions: each row alone gives the same answer as in the batch.
    _same(both[:1], model.answer(images[:1], questions[:1]))
    _same(both[1:], model.answer(images[1:], questions[1:]))


def test_on_step_reports_each_step_as_it_is_generated(model, images, questions):
    """Streaming (the Ask action): one report per step, before the next step runs, with the
    values the finished answer holds; the answer itself is the same as without a callback."""
    from cdcca_ros.errors import GenerationCancelled

    tokens = model.vision_tokens(images)
    plain = model.answer_from_tokens(tokens, None, questions, max_new_tokens=5)
    steps = []
    streamed = model.answer_from_tokens(tokens, None, questions, max_new_tokens=5,
                                        on_step=steps.append)
    _same(plain, streamed, atol=0)
    assert [s.index for s in steps] == list(range(len(steps)))
    assert len(steps) == max(len(r.step_probs) for r in plain)
    for b, res in enumerate(plain):
        rows = steps[:len(res.step_probs)]
        np.testing.assert_allclose([s.probabilities[b] for s in rows], res.token_probs,
                                   rtol=1e-6)
        entropy = -(res.step_probs * np.log(np.clip(res.step_probs, 1e-30, None))).sum(axis=1)
        np.testing.assert_allclose([s.entropies[b] for s in rows], entropy, rtol=1e-4,
                                   atol=1e-6)
        assert rows[-1].texts[b] == res.text and rows[-1].finished[b]
        assert not any(s.finished[b] for s in rows[:-1])
        assert [s.token_ids[b] for s in rows][:len(res.token_ids)] == res.token_ids
    # Raising from the callback stops generation right after that step.
    seen = []

    def stop_after_two(step):
        seen.append(step.index)
        if step.index == 1:
            raise GenerationCancelled('stop')
    with pytest.raises(GenerationCancelled):
        model.answer_from_tokens(tokens, None, questions, max_new_tokens=5,
                                 on_step=stop_after_two)
    assert seen == [0, 1][:len(steps)]


def test_answer_latency_is_small(model, images, questions):
    model.answer(images[:1], questions[:1])  # warm-up
    times = [model.answer(images[:1], questions[:1], max_new_tokens=4)[0].latency_ms
             for _ in range(3)]
    # Tens of ms on this CPU; a generous bound, the machine is shared.
    assert min(times) < 500.0


def test_vision_tokens_match_vision_space(model, images):
    space = model.vision_space()
    tokens = model.vision_tokens(images)
    assert tuple(tokens.shape) == (2, space.num_tokens, space.dim)
    assert space.num_tokens == space.grid[0] * space.grid[1] + int(space.has_cls)
    assert torch.isfinite(tokens).all()
    # Different resolutions, same space; different images, different tokens.
    assert not torch.allclose(tokens[0], tokens[1])


def test_answer_from_all_tokens_equals_answer(model, images, questions):
    tokens = model.vision_tokens(images)
    direct = model.answer(images, questions)
    _same(direct, model.answer_from_tokens(tokens, None, questions), atol=0)
    every = torch.arange(tokens.shape[1]).expand(2, -1)
    _same(direct, model.answer_from_tokens(tokens, every, questions))


def test_answer_from_subset(model, images, questions):
    tokens = model.vision_tokens(images)
    kept, idx = _subset(tokens, keep=tokens.shape[1] // 4)
    sub = model.answer_from_tokens(kept, idx, questions)
    full = model.answer_from_tokens(tokens, None, questions)
    for s in sub:
        np.testing.assert_allclose(s.step_probs.sum(axis=1), 1.0, atol=1e-4)
    assert not np.allclose(sub[0].step_probs[0], full[0].step_probs[0])
    # What the LM is fed: the family's documented way of using a subset.
    out = model.forward_train(kept, idx, questions, ['red', 'two'])
    expected_len = QUERY_LEN[model.family](model, kept.shape[1])
    assert out.query.shape[:2] == (2, expected_len)


@pytest.mark.parametrize('family', ['blip2', 'qwen2_vl'])
def test_subset_order_does_not_matter(family, make_model, images, questions):
    """BLIP-2 cross-attends to a set; Qwen2-VL scatters by index: order is irrelevant."""
    model = make_model(family)
    kept, idx = _subset(model.vision_tokens(images), keep=20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    _same(model.answer_from_tokens(kept, idx, questions),
          model.answer_from_tokens(kept[:, perm], idx[:, perm], questions), atol=1e-5)


def test_bad_inputs_raise(model, images, questions):
    tokens = model.vision_tokens(images)
    with pytest.raises(ModelError, match='uint8'):
        model.answer([images[0].astype(np.float32)], questions[:1])
    with pytest.raises(ModelError, match='indices'):
        model.answer_from_tokens(tokens[:, :3], torch.tensor([[0, 1, 10_000]] * 2), questions)
    with pytest.raises(ModelError, match='all'):
        model.answer_from_tokens(tokens[:, :3], None, questions)
    with pytest.raises(ModelError, match='tokens must be'):
        model.answer_from_tokens(tokens[..., :-1], None, questions)
    with pytest.raises(ModelError, match='questions'):
        model.answer(images, questions[:1])


def test_forward_train_outputs(model, images, questions):
    tokens = model.vision_tokens(images)
    answers = ['red', 'two shapes']
    out = model.forward_train(tokens, None, questions, answers)
    lengths = [len(model.tokenizer(' ' + a, add_special_tokens=False)['input_ids']) + 1
               for a in answers]  # + eos
    batch, seq, vocab = out.logits.shape
    assert batch == 2 and vocab == model.lm_head.out_features
    assert out.query.ndim == 3 and out.query.shape[0] == 2
    assert out.fused.shape == (2, max(lengths), model.text_config.hidden_size)
    assert out.answer_mask.dtype == torch.bool
    assert out.answer_mask.sum(dim=1).tolist() == lengths
    assert torch.all(out.fused[0, lengths[0]:] == 0)  # padding is zero
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    # The loss covers answer tokens only: it equals CE over exactly those positions.
    logp = out.logits.float().log_softmax(-1)
    ids = [model.tokenizer(' ' + a, add_special_tokens=False)['input_ids'] +
           [model.eos_token_id] for a in answers]
    nll = [-logp[b, seq - len(ids[b]) - 1 + j, t] for b in range(2) for j, t in enumerate(ids[b])]
    torch.testing.assert_close(out.loss, torch.stack(nll).mean(), rtol=1e-4, atol=1e-5)


def test_backprop_reaches_only_trainable(make_model, family, images, questions):
    model = make_model(family)
    model.configure_trainable(TrainableConfig(lora_r=4))
    trainable = model.trainable_parameters()
    assert any('lora_A' in n for n in trainable) and any('lora_B' in n for n in trainable)
    space_params = {n for n, _ in model.torch_model.named_parameters()
                    if model._is_shared_vision(n)}
    assert space_params and not space_params & set(trainable)
    tokens = model.vision_tokens(images)
    model.torch_model.train()
    model.forward_train(tokens, None, questions, ['red', 'two']).loss.backward()
    for name, param in model.torch_model.named_parameters():
        if name in trainable:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # LoRA B starts at zero, so A gets no gradient at step 0, but B must.
    assert any(float(p.grad.abs().sum()) > 0 for n, p in trainable.items() if 'lora_B' in n)


@pytest.fixture(params=['blip2', 'llava', 'qwen2_vl'])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def _perturbed(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=gen) if 'lora_B' in k else v.clone()
            for k, v in sd.items()}


def test_trainable_state_dict_round_trip(make_model, family, images, questions):
    model = make_model(family)
    with pytest.raises(ModelError, match='configure_trainable'):
        model.trainable_state_dict()
    model.configure_trainable(TrainableConfig(lora_r=4))
    before = model.answer(images, questions)
    saved = model.trainable_state_dict()
    model.load_trainable_state_dict(_perturbed(saved))
    changed = model.answer(images, questions)
    assert not np.allclose(changed[0].step_probs[0], before[0].step_probs[0])
    # The saved dict is a copy: loading the perturbation did not touch it.
    assert all(float(v.abs().sum()) == 0 for k, v in saved.items() if 'lora_B' in k)
    model.load_trainable_state_dict(saved)
    _same(before, model.answer(images, questions), atol=0)


def test_load_trainable_state_dict_is_strict(make_model, family):
    model = make_model(family)
    model.configure_trainable(TrainableConfig(lora_r=4))
    sd = model.trainable_state_dict()
    name = next(k for k in sd if 'lora_A' in k)
    bad_shape = dict(sd, **{name: torch.zeros(3, 3)})
    with pytest.raises(ModelError, match=name.replace('.', r'\.')):
        model.load_trainable_state_dict(bad_shape)
    missing = {k: v for k, v in sd.items() if k != name}
    with pytest.raises(ModelError, match='missing'):
        model.load_trainable_state_dict(missing)
    with pytest.raises(ModelError, match='unexpected'):
        model.load_trainable_state_dict(dict(sd, extra=torch.zeros(1)))
    # Nothing was half-applied by the failed calls.
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, sd[k])


def test_configure_trainable_options(make_model, family):
    model = make_model(family)
    model.configure_trainable(TrainableConfig(train_norms=False, train_biases=False,
                                              train_query_tokens=False))
    assert all('lora_' in n for n in model.trainable_parameters())
    with pytest.raises(ModelError, match='already configured'):
        model.configure_trainable(TrainableConfig(lora_r=2))


def test_save_load_round_trip(make_model, family, images, questions, tmp_path):
    model = make_model(family)
    model.configure_trainable(TrainableConfig(lora_r=4))
    model.load_trainable_state_dict(_perturbed(model.trainable_state_dict()))
    model.save(tmp_path / 'm')
    loaded = load_model(tmp_path / 'm')
    assert type(loaded) is type(model) and loaded.family == family
    assert loaded.trainable_config == model.trainable_config
    assert loaded.vision_space() == model.vision_space()
    _same(model.answer(images, questions), loaded.answer(images, questions), atol=0)
    sd, sd2 = model.trainable_state_dict(), loaded.trainable_state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_save_load_without_lora(model, images, questions, tmp_path):
    model.save(tmp_path / 'plain')
    loaded = load_model(tmp_path / 'plain')
    assert loaded.trainable_config is None
    _same(model.answer(images, questions), loaded.answer(images, questions), atol=0)


def test_mc_token_features_shape_and_determinism(model, images):
    tokens = model.vision_tokens(images)
    feats = model.mc_token_features(tokens, p=0.1, num_masks=5,
                                    generator=torch.Generator().manual_seed(0))
    assert feats.shape[:3] == (5, 2, model.vision_space().num_tokens) and feats.ndim == 4
    again = model.mc_token_features(tokens, p=0.1, num_masks=5,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(feats, again)
    assert float(feats.var(dim=0).mean()) > 0
    still = model.mc_token_features(tokens, p=0.0, num_masks=3)
    assert torch.allclose(still[0], still[2])  # no dropout: every mask gives the same features


def test_mc_token_variance_is_not_plain_dropout(model, images):
    """Per-token variance / (x^2 p/(1-p)) is constant for dropout on the token itself.

    For features that go through the model it must vary across tokens. The tokens are
    scaled up (by 10, each by a random factor) so that the randomly initialised attention
    is less uniform, as trained attention would be.
    """
    p, masks = 0.2, 512
    tokens = model.vision_tokens(images[:1])
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.empty(tokens.shape[1]).uniform_(-1.5, 1.5, generator=gen)) * 10
    x = tokens * scale[None, :, None]
    feats = model.mc_token_features(x, p=p, num_masks=masks,
                                    generator=torch.Generator().manual_seed(1))
    plain = (torch.rand((masks, *x.shape), generator=gen) >= p) * x / (1 - p)
    expected = (x ** 2).mean(-1)[0] * p / (1 - p)

    def spread(var: torch.Tensor) -> float:
        ratio = var.mean(-1)[0] / expected
        return float(ratio.std() / ratio.mean())

    base = spread(plain.var(dim=0))
    assert base < 0.1  # the check can see plain dropout: its ratio is flat
    assert spread(feats.var(dim=0)) > 4 * base  # measured: 7x to 100x


def test_check_vision_space(make_model, images):
    teacher = make_model('blip2')
    student = make_model('blip2', qformer_layers=1, lm_hidden=32, lm_layers=1,
                         vision_from=teacher, seed=1)
    check_vision_space(teacher, student)  # shared ViT: no error
    assert torch.equal(teacher.vision_tokens(images), student.vision_tokens(images))
    stranger = make_model('blip2', seed=2)  # same shapes, other weights
    with pytest.raises(VisionSpaceMismatchError, match='encoder') as err:
        check_vision_space(teacher, stranger)
    assert teacher.vision_space().encoder in str(err.value)
    assert stranger.vision_space().encoder in str(err.value)
    with pytest.raises(VisionSpaceMismatchError, match='has_cls: teacher=True student=False'):
        check_vision_space(teacher, make_model('llava'))
    with pytest.raises(VisionSpaceMismatchError, match='dim: teacher=48 student=32'):
        check_vision_space(teacher, make_model('blip2', vision_hidden=32))


@pytest.mark.parametrize('family', ['llava', 'qwen2_vl'])
def test_vision_from_shares_tokens(family, make_model, images):
    teacher = make_model(family)
    student = make_model(family, lm_hidden=32, lm_layers=1, vision_from=teacher, seed=5)
    check_vision_space(teacher, student)
    assert torch.equal(teacher.vision_tokens(images), student.vision_tokens(images))


def test_vision_space_follows_vision_weights(make_model):
    """Training the teacher's ViT further breaks the match with an older student."""
    teacher = make_model('blip2')
    student = make_model('blip2', vision_from=teacher, seed=1)
    check_vision_space(teacher, student)
    with torch.no_grad():
        next(teacher.torch_model.vision_model.parameters()).add_(0.01)
    with pytest.raises(VisionSpaceMismatchError, match='encoder'):
        check_vision_space(teacher, student)


def test_empty_answer_keeps_the_eos_step(make_model, images, questions):
    model = make_model('blip2')
    eos = model.eos_token_id

    def favour_eos(module, args, out):
        out[..., eos] += 100.0
        return out

    handle = model.lm_head.register_forward_hook(favour_eos)
    try:
        results = model.answer(images, questions)
    finally:
        handle.remove()
    for res in results:
        assert res.token_ids == [] and res.text == ''
        assert res.step_probs.shape == (1, model.lm_head.out_features)
        np.testing.assert_allclose(res.token_probs, [1.0], atol=1e-6)
