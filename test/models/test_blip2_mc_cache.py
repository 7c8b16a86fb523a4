"""BLIP-2 Monte-Carlo token features: the cached fast path computes what the Q-Former does.

The reference below is the direct computation through the HF modules (queries through the
self-attention block, masked tokens through the LoRA-wrapped key/value projections, softmax
over tokens), as before the cache. The cache must agree with it for the same masks, be reused
while the weights stay, and be rebuilt whenever anything it read changes.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from cdcca_ros.errors import ModelError
from cdcca_ros.models._hf import WeightsStamp, eval_mode, keep_mask
from cdcca_ros.models.base import TrainableConfig

P, MASKS = 0.2, 6


def reference_features(model, tokens: Tensor, p: float, num_masks: int,
                       generator: torch.Generator) -> Tensor:
    """Uncached: every mask through the first cross-attention's modules."""
    tm = model.torch_model
    layer = tm.qformer.encoder.layer[0]
    batch, num, dim = tokens.shape
    with eval_mode(tm):
        query = layer.attention(tm.qformer.layernorm(tm.query_tokens))
        attn = layer.crossattention.attention
        heads, head_dim = attn.num_attention_heads, attn.attention_head_size
        q = attn.query(query).view(-1, heads, head_dim)
        keep = keep_mask((num_masks, batch, num, dim), p, generator, tokens.device)
        x = (tokens.unsqueeze(0) * keep / (1.0 - p)).reshape(-1, num, dim)
        k = attn.key(x).view(x.shape[0], num, heads, head_dim)
        v = attn.value(x).view(x.shape[0], num, heads, head_dim)
        scores = torch.einsum('qhd,bnhd->bhqn', q, k) * attn.scaling
        probs = scores.softmax(dim=-1).sum(dim=2)
        contrib = probs.transpose(1, 2).unsqueeze(-1) * v
    return contrib.reshape(num_masks, batch, num, heads * head_dim)


def cached_features(model, tokens: Tensor, seed: int = 0) -> Tensor:
    return model.mc_token_features(tokens, P, MASKS, generator=torch.Generator().manual_seed(seed))


def assert_matches_reference(model, tokens: Tensor, seed: int = 0) -> Tensor:
    fast = cached_features(model, tokens, seed)
    slow = reference_features(model, tokens, P, MASKS, torch.Generator().manual_seed(seed))
    assert fast.shape == slow.shape
    # Same masks, same maths; only the rounding differs (the key bias is dropped, the
    # projections are read off the modules).
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))
    return fast


@pytest.fixture
def blip2(make_model, images):
    model = make_model('blip2', dropout=0.1)
    return model, model.vision_tokens(images)


@pytest.fixture
def blip2_lora(blip2):
    """With LoRA on the Q-Former projections, and non-zero LoRA B so the adapters matter."""
    model, tokens = blip2
    model.configure_trainable(TrainableConfig(lora_r=4, lora_targets=('query', 'key', 'value')))
    gen = torch.Generator().manual_seed(5)
    state = {name: (value + 0.3 * torch.randn(value.shape, generator=gen)
                    if 'lora_B' in name else value)
             for name, value in model.trainable_state_dict().items()}
    model.load_trainable_state_dict(state)
    return model, tokens


def _count_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_cached_features_equal_the_direct_computation(blip2):
    model, tokens = blip2
    first = assert_matches_reference(model, tokens, seed=0)
    assert not torch.equal(first, assert_matches_reference(model, tokens, seed=1))
    assert float(first.var(dim=0).mean()) > 0


def test_cache_is_reused_while_the_weights_stay(blip2_lora):
    model, tokens = blip2_lora
    assert_matches_reference(model, tokens)
    cross = model.torch_model.qformer.encoder.layer[0].crossattention.attention
    key_calls, value_calls = _count_calls(cross.key), _count_calls(cross.value)
    stamp = model._mc_cache[0]
    again = [cached_features(model, tokens, seed) for seed in range(3)]
    assert key_calls == [] and value_calls == []  # no projection recomputed
    assert model._mc_cache[0] is stamp and stamp.matches()
    assert torch.equal(again[0], cached_features(model, tokens, 0))


def test_cache_follows_hot_apply_and_rollback(blip2_lora):
    model, tokens = blip2_lora
    before = assert_matches_reference(model, tokens)
    backup = model.trainable_state_dict()
    gen = torch.Generator().manual_seed(9)
    delta = {name: value + 0.2 * torch.randn(value.shape, generator=gen)
             for name, value in backup.items()}
    model.load_trainable_state_dict(delta)  # what the device's hot-apply does
    after = assert_matches_reference(model, tokens)
    assert not torch.allclose(before, after, atol=1e-3)
    model.load_trainable_state_dict(backup)  # rollback
    torch.testing.assert_close(cached_features(model, tokens), before, rtol=1e-6, atol=1e-6)


def test_cache_follows_training_steps(blip2_lora, questions):
    model, tokens = blip2_lora
    before = assert_matches_reference(model, tokens)
    params = [p for p in model.torch_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.torch_model.train()
    try:
        out = model.forward_train(tokens, None, questions, ['red', 'two'])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        during = assert_matches_reference(model, tokens)  # train mode: still eval maths
    finally:
        model.torch_model.eval()
    assert not torch.allclose(before, during, atol=1e-4)
    torch.testing.assert_close(cached_features(model, tokens), during, rtol=0, atol=0)


def test_cache_follows_structure_and_adapter_switches(blip2):
    model, tokens = blip2
    cached_features(model, tokens)
    stamp = model._mc_cache[0]
    cross = model.torch_model.qformer.encoder.layer[0].crossattention.attention
    # A replaced parameter (load_state_dict(assign=True) does this).
    cross.value.bias = nn.Parameter(torch.randn(cross.value.bias.shape))
    assert not stamp.matches()
    assert_matches_reference(model, tokens)
    # peft injection replaces the projection modules.
    model.configure_trainable(TrainableConfig(lora_r=4, lora_targets=('key', 'value')))
    assert not model._mc_cache[0].matches()
    with torch.no_grad():
        cross.value.lora_B['default'].weight.normal_()
    with_adapter = assert_matches_reference(model, tokens)
    cross.value.enable_adapters(False)
    try:
        without = assert_matches_reference(model, tokens)
    finally:
        cross.value.enable_adapters(True)
    assert not torch.allclose(with_adapter, without, atol=1e-4)
    torch.testing.assert_close(cached_features(model, tokens), with_adapter, rtol=0, atol=0)


def test_writes_through_data_need_clear(blip2):
    model, tokens = blip2
    before = cached_features(model, tokens)
    tm = model.torch_model
    # Through .data the version counter does not move: the stamp cannot see the write.
    tm.query_tokens.data.add_(torch.randn(tm.query_tokens.shape,
                                          generator=torch.Generator().manual_seed(3)))
    assert model._mc_cache[0].matches()
    torch.testing.assert_close(cached_features(model, tokens), before, rtol=0, atol=0)
    model.clear_mc_cache()
    after = assert_matches_reference(model, tokens)
    assert not torch.allclose(before, after, atol=1e-4)


def test_stamp_rejects_unknown_paths(blip2):
    model, _ = blip2
    with pytest.raises(ModelError, match='qformer.nothing'):
        WeightsStamp(model.torch_model, ['qformer.nothing'])
