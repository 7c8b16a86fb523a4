"""4-bit / 8-bit (bitsandbytes) loading of a saved tiny model on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.models import TrainableConfig, load_model

bnb = pytest.importorskip('bitsandbytes', reason='bitsandbytes is not installed')


@pytest.fixture(scope='module')
def saved(tmp_path_factory, images):
    from cdcca_ros.models import build_tiny

    model = build_tiny('blip2', ['what', 'colour', 'is', 'the', 'shape', '?', 'red', 'blue'])
    model.configure_trainable(TrainableConfig(lora_r=4))
    path = tmp_path_factory.mktemp('blip2')
    model.save(path)
    return model, path


@pytest.mark.parametrize(('quantization', 'layer', 'tol'), [
    ('8bit', 'Linear8bitLt', 0.01),
    ('4bit', 'Linear4bit', 0.05),
])
def test_quantized_load(saved, images, quantization, layer, tol):
    model, path = saved
    quant = load_model(path, quantization=quantization)
    kinds = {type(m).__name__ for n, m in quant.torch_model.named_modules()
             if n.startswith('language_model.model.')}
    assert layer in kinds
    # Only the language model is quantized: the shared vision tokens stay exact.
    assert all(type(m).__name__ == 'Linear'
               for n, m in quant.torch_model.named_modules()
               if n.startswith(('vision_model.', 'qformer.')) and 'Linear' in type(m).__name__)
    assert torch.equal(quant.vision_tokens(images), model.vision_tokens(images))
    assert quant.vision_space() == model.vision_space()
    assert quant.trainable_config == model.trainable_config  # LoRA restored on top
    got, ref = quant.answer(images, ['what colour is the shape?'] * 2), model.answer(
        images, ['what colour is the shape?'] * 2)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a.step_probs.sum(axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(a.step_probs[0], b.step_probs[0], atol=tol)
