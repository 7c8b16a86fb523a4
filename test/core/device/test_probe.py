"""The probe after a swap: cached tokens, the trace, the shadow copy and what it refuses
(:mod:`cdcca_ros.core.device.probe`), through the runtime that runs it."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from device_helpers import DEVICE, Cloud, model_hash, runtime
from tiny_models import QUESTION, VOCAB

from cdcca_ros.core import wire
from cdcca_ros.core.device.probe import vision_frozen
from cdcca_ros.core.device_runtime import DeviceRuntime
from cdcca_ros.errors import ConfigError, DeltaRejectedError, ModelError


def test_probe_tokens_are_cached_only_when_the_vision_encoder_is_frozen(student_dir,
                                                                       keys) -> None:
    rt = runtime(student_dir, keys)
    assert not any(n.startswith('vision_model.') for n in rt.weights.layout.names)
    assert rt._probe.tokens is not None
    expected = rt.model.vision_tokens([rt.probe_image])
    assert torch.equal(rt._probe.tokens, expected)
    # A trainable name inside the encoder, or a model that does not say where its encoder
    # is: the tokens are recomputed for every probe.
    names = rt.weights.layout.names
    assert not vision_frozen(rt.model, names + ('vision_model.post.bias',))
    assert not vision_frozen(object(), names)  # type: ignore[arg-type]


def test_probe_is_traced_and_follows_the_weights(student_dir, keys) -> None:
    rt = runtime(student_dir, keys)
    assert rt.probe_mode == 'traced'
    traced = rt._probe.traced
    assert traced is not None and traced.usable(rt._probe.params)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    before = rt._probe.run()
    report = rt.apply(cloud.step(1, scale=0.2))
    assert report.extra['probe_mode'] == 'traced' and rt.status()['probe'] == 'traced'
    after = rt._probe.run()
    assert not np.allclose(before, after)  # the trace computes with the new weights
    np.testing.assert_allclose(after, rt._probe.eager()[0].numpy(), rtol=1e-5, atol=1e-7)
    # A trainable tensor given new storage: the trace no longer sees it, the eager probe runs.
    param = rt._probe.params[0]
    param.data = param.data.clone() + 1.0
    assert not traced.usable(rt._probe.params)
    np.testing.assert_array_equal(rt._probe.run(), rt._probe.eager()[0].numpy())
    assert runtime(student_dir, keys, trace_probe=False).probe_mode == 'eager'


@pytest.mark.parametrize('family', ['llava', 'qwen2_vl'])
def test_probe_is_traced_for_the_other_families(family: str, keys) -> None:
    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig

    model = build_tiny(family, list(VOCAB), seed=1)
    model.configure_trainable(TrainableConfig(lora_r=4, lora_alpha=8))
    rt = DeviceRuntime(model, DEVICE, keys[1])
    assert rt.probe_mode == 'traced'
    before = rt._probe.run()
    report = rt.apply(Cloud(rt.model.trainable_state_dict(), keys[0]).step(1, scale=0.2))
    assert report.extra['probe_mode'] == 'traced'
    after = rt._probe.run()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, rt._probe.eager()[0].numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('shadow', [True, False], ids=['shadow', 'in_place'])
def test_the_probe_runs_on_a_shadow_copy_while_answers_go_on(student_dir, keys, images,
                                                             shadow: bool) -> None:
    rt = runtime(student_dir, keys, shadow_probe=shadow)
    assert rt.probe_shadow is shadow and rt.status()['probe_shadow'] is shadow
    live = list(rt.model.torch_model.parameters())
    probed = list(rt._probe.model.torch_model.parameters())
    trainable = {id(p) for p in rt._params}
    if shadow:
        # Every frozen weight shared, every trainable one a tensor of its own.
        assert all((a is b) == (id(a) not in trainable) for a, b in zip(live, probed,
                                                                       strict=True))
        # The probe's answer in reports is decoded with the shadow's tokenizer: the model's.
        assert rt._probe.model.tokenizer is rt.model.tokenizer
    else:
        assert rt._probe.model is rt.model
    # During the probe, may another thread take the model lock (i.e. answer)?
    free_during_probe: list[bool] = []
    probe = rt._probe.run

    def watched() -> np.ndarray:
        out: list[bool] = []
        t = threading.Thread(target=lambda: out.append(rt.lock.acquire(timeout=0.2)
                                                       and (rt.lock.release() or True)))
        t.start()
        t.join()
        free_during_probe.append(out[0])
        return probe()

    rt._probe.run = watched  # type: ignore[method-assign]
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    before = [rt.answer(im, QUESTION).step_probs for im in images]
    rt.apply(cloud.step(1))
    assert free_during_probe == [shadow]
    assert rt.base_hash == cloud.ef.view_hash() == model_hash(rt)
    after = [rt.answer(im, QUESTION).step_probs for im in images]
    assert not all(np.allclose(a, b) for a, b in zip(after, before, strict=True))
    # A refused candidate never reaches the model (the shadow saw it; the model did not).
    trained = {k: torch.full_like(v, 6e4) if k.startswith('language_model') else v.clone()
               for k, v in cloud.ef.view.items()}
    with pytest.raises(DeltaRejectedError, match='probe'):
        rt.apply(cloud.make(trained))
    assert rt.version == 1 and model_hash(rt) == rt.base_hash
    assert all(np.array_equal(rt.answer(im, QUESTION).step_probs, a)
               for im, a in zip(images, after, strict=True))


def test_a_trace_that_froze_the_weights_is_not_used(student_dir, keys, monkeypatch) -> None:
    """A trace computing with copies of the weights (constants) fails the check after the
    weights are perturbed: the runtime probes eagerly."""
    real_trace = torch.jit.trace

    def frozen_trace(module, inputs, **kwargs):
        with torch.no_grad():
            snapshot = module(*inputs).clone()
        traced = real_trace(module, inputs, **kwargs)

        class Frozen:
            def __call__(self, x):
                return snapshot if torch.equal(x, inputs[0]) else traced(x)
        return Frozen()

    monkeypatch.setattr(torch.jit, 'trace', frozen_trace)
    rt = runtime(student_dir, keys)
    assert rt._probe.traced is None
    assert rt.probe_mode.startswith('eager (the trace does not follow')
    assert model_hash(rt) == rt.base_hash  # the perturbation was undone


def test_probe_rejects_finite_weights_that_blow_up(student_dir, keys, images) -> None:
    """Every value finite (the candidate passes the finite check), the outputs are not."""
    rt = runtime(student_dir, keys)
    base = rt.model.trainable_state_dict()
    cloud = Cloud(base, keys[0])
    trained = {k: torch.full_like(v, 6e4) if k.startswith('language_model') else v.clone()
               for k, v in base.items()}
    env = cloud.make(trained)
    before = [rt.answer(im, QUESTION) for im in images]
    with pytest.raises(DeltaRejectedError, match='probe.*NaN'):
        rt.apply(env)
    assert rt.version == 0 and rt.rejected == 1
    assert model_hash(rt) == rt.base_hash == wire.state_dict_hash(base)
    now = [rt.answer(im, QUESTION) for im in images]
    assert [a.text for a in now] == [a.text for a in before]
    assert all(np.array_equal(a.step_probs, b.step_probs)
               for a, b in zip(now, before, strict=True))


def test_probe_refuses_a_flat_distribution(student_dir, keys) -> None:
    # The last MLP's LoRA all equal and huge: the final LayerNorm's variance overflows and
    # every logit comes out equal.
    rt = runtime(student_dir, keys)
    probed = rt._probe.model  # the shadow copy the probe runs on
    base = probed.trainable_state_dict()
    probed.load_trainable_state_dict(
        {k: torch.full_like(v, 6e4) if 'layers.1.fc' in k and 'lora_' in k else v
         for k, v in base.items()})
    with pytest.raises(ModelError, match='flat'):
        rt._probe.run()
    probed.load_trainable_state_dict(base)
    probs = rt._probe.run()
    assert probs.ndim == 1 and abs(float(probs.sum()) - 1.0) < 1e-4


def test_next_token_probs_is_the_first_answer_step(student_dir, keys) -> None:
    rt = runtime(student_dir, keys)
    tokens = rt.model.vision_tokens([rt.probe_image])
    first = rt.model.answer_from_tokens(tokens, None, [rt.probe_question], max_new_tokens=3)
    probs = rt.model.next_token_probs(tokens, None, [rt.probe_question])
    assert probs.shape == (1, first[0].step_probs.shape[1])
    np.testing.assert_allclose(probs[0].numpy(), first[0].step_probs[0], atol=1e-6)
    np.testing.assert_allclose(rt._probe.run(), first[0].step_probs[0], atol=1e-6)


def test_probe_bound_on_the_distribution_shift(student_dir, keys) -> None:
    with pytest.raises(ConfigError):
        runtime(student_dir, keys, max_probe_tv=0.0)
    rt = runtime(student_dir, keys, max_probe_tv=1e-9)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    with pytest.raises(DeltaRejectedError, match='max_probe_tv'):
        rt.apply(cloud.step(1, scale=0.5))
    assert rt.version == 0 and model_hash(rt) == rt.base_hash
