"""The CUDA path: answering, features and quantized loading on a GPU (skipped without one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.models import TrainableConfig, build_tiny, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

VOCAB = ['what', 'colour', 'is', 'the', 'shape', '?', 'red', 'blue', 'circle']


@pytest.mark.parametrize('family', ['blip2', 'llava', 'qwen2_vl'])
def test_cuda_matches_cpu(family, images, tmp_path):
    cpu = build_tiny(family, VOCAB)
    cpu.configure_trainable(TrainableConfig(lora_r=4))
    cpu.save(tmp_path)
    gpu = load_model(tmp_path, device='cuda')
    assert gpu.device.type == 'cuda'
    questions = ['what colour is the shape?'] * 2
    a, b = cpu.answer(images, questions), gpu.answer(images, questions)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.step_probs[0], y.step_probs[0], atol=1e-3)
    tokens = gpu.vision_tokens(images)
    assert tokens.device.type == 'cuda'
    torch.testing.assert_close(tokens.cpu(), cpu.vision_tokens(images), atol=1e-3, rtol=1e-3)
    feats = gpu.mc_token_features(tokens, 0.1, 4, generator=torch.Generator().manual_seed(0))
    assert feats.device.type == 'cuda' and feats.shape[:3] == (4, 2, tokens.shape[1])
    gpu.torch_model.train()
    out = gpu.forward_train(tokens, None, questions, ['red', 'blue circle'])
    out.loss.backward()
    assert all(p.grad is not None for p in gpu.trainable_parameters().values())
    sd = {k: v.cpu() for k, v in gpu.trainable_state_dict().items()}
    gpu.load_trainable_state_dict(sd)  # tensors from the CPU (e.g. a decoded delta)


@pytest.mark.parametrize('quantization', ['8bit', '4bit'])
def test_cuda_quantized(quantization, images, tmp_path):
    pytest.importorskip('bitsandbytes')
    model = build_tiny('blip2', VOCAB)
    model.save(tmp_path)
    quant = load_model(tmp_path, quantization=quantization, device='cuda')
    res = quant.answer(images, ['what colour is the shape?'] * 2)
    np.testing.assert_allclose(res[0].step_probs.sum(axis=1), 1.0, atol=1e-3)
    quant.configure_trainable(TrainableConfig(lora_r=4))
    quant.torch_model.train()
    out = quant.forward_train(quant.vision_tokens(images), None, ['what?'] * 2, ['red', 'blue'])
    out.loss.backward()
    assert torch.isfinite(out.loss)
