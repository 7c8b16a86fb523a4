"""DeviceRuntime hot-apply: flat weights, the probe, background persistence and restarts.

A tiny BLIP-2 (LoRA on the language model and the Q-Former) plays the device; deltas are made
the cloud's way (error-feedback view, codec, Ed25519 seal) without the training.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import QUESTION, VOCAB, random_images

from cdcca_ros.core import device_runtime, dwc, wire
from cdcca_ros.core.device_runtime import DeviceRuntime, FlatWeights
from cdcca_ros.core.updates import DeltaEnvelope, seal_delta
from cdcca_ros.errors import ConfigError, DeltaMismatchError, DeltaRejectedError, ModelError

DEVICE = 'robot1'


@pytest.fixture(scope='module')
def student_dir(tmp_path_factory):
    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig

    path = tmp_path_factory.mktemp('student')
    model = build_tiny('blip2', VOCAB, seed=2, qformer_layers=1, dropout=0.0)
    model.configure_trainable(TrainableConfig(
        lora_r=4, lora_alpha=8, lora_targets=('q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1',
                                              'fc2', 'query', 'value')))
    model.save(path)
    return path


@pytest.fixture(scope='module')
def keys():
    return wire.generate_keypair()


@pytest.fixture(scope='module')
def images():
    return random_images(3)


def _load(path):
    from cdcca_ros.models import bundled

    return bundled.load(str(path))


class Cloud:
    """The cloud's side for one device: error-feedback view, compress, seal."""

    def __init__(self, base: dict[str, torch.Tensor], key, codec: str = 'fp16') -> None:
        self.ef = dwc.ErrorFeedback(base)
        self.key = key
        self.codec = dwc.get_codec(codec)
        self.version = 0

    def make(self, trained: dict[str, torch.Tensor]) -> DeltaEnvelope:
        base_hash = self.ef.view_hash()
        delta = dwc.compute_delta(trained, self.ef.view)
        c = dwc.compress(delta, self.codec)
        self.ef.commit(delta, c.decoded)
        self.version += 1
        return seal_delta(self.key, device_id=DEVICE, round=self.version,
                          base_version=self.version - 1, base_hash=base_hash,
                          new_version=self.version, new_hash=self.ef.view_hash(),
                          codec=self.codec.name, payload=c.payload)

    def step(self, seed: int, scale: float = 0.05) -> DeltaEnvelope:
        g = torch.Generator().manual_seed(seed)
        trained = {k: v + torch.randn(v.shape, generator=g) * scale
                   for k, v in self.ef.view.items()}
        return self.make(trained)


def _runtime(student_dir, keys, state_dir=None, **kwargs) -> DeviceRuntime:
    return DeviceRuntime(_load(student_dir), DEVICE, keys[1], state_dir, **kwargs)


def _model_hash(rt: DeviceRuntime) -> str:
    return wire.state_dict_hash(rt.model.trainable_state_dict())


# --- flat weights -------------------------------------------------------------------------
def _mixed(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {'z.lora_B': torch.randn(6, 4, generator=g),
            'a.norm': torch.randn(5, generator=g).half(),
            'm.lora_A': torch.randn(4, 6, generator=g).bfloat16(),
            'q.query_tokens': torch.randn(1, 3, 4, generator=g),
            'd.double': torch.randn(3, generator=g, dtype=torch.float64),
            'e.empty': torch.zeros(0, 4),
            's.scalar': torch.tensor(0.25)}


@pytest.mark.parametrize('delta_dtype', [torch.float32, torch.float16, torch.float64])
def test_flat_build_is_bit_identical_to_apply_delta(delta_dtype) -> None:
    base = _mixed(0)
    g = torch.Generator().manual_seed(1)
    delta = {k: (torch.randn(v.shape, generator=g) * 1e-2).to(delta_dtype)
             for k, v in base.items()}
    flat = FlatWeights.pack(base).plus(delta)
    ref = dwc.apply_delta(base, delta)
    for name, t in ref.items():
        got = flat.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name
    assert flat.digest() == wire.state_dict_hash(ref)
    assert FlatWeights.pack(base).digest() == wire.state_dict_hash(base)


def test_flat_build_refuses_a_delta_that_does_not_fit() -> None:
    base = _mixed(0)
    weights = FlatWeights.pack(base)
    zeros = {k: torch.zeros(v.shape) for k, v in base.items()}
    bad = {'missing': {k: v for k, v in zeros.items() if k != 'a.norm'},
           'extra': dict(zeros, other=torch.zeros(1)),
           'shape': dict(zeros, **{'z.lora_B': torch.zeros(4, 6)}),
           'dtype': dict(zeros, **{'a.norm': torch.zeros(5, dtype=torch.int64)})}
    for kind, delta in bad.items():
        with pytest.raises(DeltaMismatchError):
            weights.plus(delta)
        assert weights.digest() == wire.state_dict_hash(base), kind


@pytest.mark.parametrize('codec', ['fp16', 'sparse'])
def test_flat_delta_build_is_bit_identical_to_the_tensor_build(codec: str) -> None:
    g = torch.Generator().manual_seed(2)
    base = {k: torch.randn(s, generator=g) for k, s in
            {'z.lora_B': (6, 4), 'a.norm': (5,), 'q.query_tokens': (1, 3, 4)}.items()}
    delta = {k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in base.items()}
    c = dwc.get_codec(codec)
    payload = c.encode(delta, self_describing=False)
    weights = FlatWeights.pack(base)
    flat = weights.plus_flat(c.decode_flat(payload, base))
    ref = weights.plus(c.decode(payload, spec=base))
    assert len(flat.buffers) == 1 and torch.equal(flat.buffers[0], ref.buffers[0])
    assert flat.digest() == ref.digest()
    # Weights in several buffers (mixed dtypes) take the per-tensor way, same result.
    mixed = dict(base, **{'a.norm': base['a.norm'].half()})
    mixed_flat = FlatWeights.pack(mixed).plus_flat(c.decode_flat(payload, base))
    assert mixed_flat.digest() == FlatWeights.pack(mixed).plus(
        c.decode(payload, spec=base)).digest()
    with pytest.raises(DeltaMismatchError):
        FlatWeights.pack(dict(base, **{'z.lora_B': torch.zeros(4, 6)})).plus_flat(
            c.decode_flat(payload, base))


def test_overflow_of_finite_values_is_caught() -> None:
    base = {'a': torch.ones(3), 'b': torch.full((2,), 3e38)}
    flat = FlatWeights.pack(base).plus({'a': torch.ones(3), 'b': torch.full((2,), 3e38)})
    assert flat.first_non_finite() == 'b'
    assert FlatWeights.pack(base).first_non_finite() is None


# --- apply and the probe ------------------------------------------------------------------
@pytest.mark.parametrize('direct', [True, False], ids=['direct_copy', 'load_state_dict'])
def test_apply_matches_the_cloud_and_reports_its_steps(student_dir, keys, images,
                                                       direct: bool) -> None:
    rt = _runtime(student_dir, keys)
    assert rt._params is not None  # the swap copies straight into the live parameters
    if not direct:
        rt._params = None  # a model that does not expose them: load_trainable_state_dict
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    before = [rt.answer(im, QUESTION).step_probs for im in images]
    report = rt.apply(cloud.step(1))
    assert rt.version == 1 and report.new_version == 1
    assert rt.base_hash == cloud.ef.view_hash() == _model_hash(rt)
    assert set(report.extra['steps_ms']) == {'gate_ms', 'build_ms', 'finite_ms', 'hash_ms',
                                             'swap_ms', 'probe_ms'}
    assert 0.0 < report.extra['probe_tv'] <= 1.0
    assert report.swap_ms <= report.apply_ms
    after = [rt.answer(im, QUESTION).step_probs for im in images]
    assert not all(np.allclose(a, b) for a, b in zip(after, before, strict=True))


def test_probe_tokens_are_cached_only_when_the_vision_encoder_is_frozen(student_dir,
                                                                       keys) -> None:
    rt = _runtime(student_dir, keys)
    assert not any(n.startswith('vision_model.') for n in rt.weights.layout.names)
    assert rt._probe_tokens is not None
    expected = rt.model.vision_tokens([rt.probe_image])
    assert torch.equal(rt._probe_tokens, expected)
    # A trainable name inside the encoder, or a model that does not say where its encoder
    # is: the tokens are recomputed for every probe.
    names = rt.weights.layout.names
    assert not device_runtime._vision_frozen(rt.model, names + ('vision_model.post.bias',))
    assert not device_runtime._vision_frozen(object(), names)  # type: ignore[arg-type]


def test_probe_is_traced_and_follows_the_weights(student_dir, keys) -> None:
    rt = _runtime(student_dir, keys)
    assert rt.probe_mode == 'traced'
    traced = rt._traced_probe
    assert traced is not None and traced.usable(rt._probe_params)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    before = rt._probe()
    report = rt.apply(cloud.step(1, scale=0.2))
    assert report.extra['probe_mode'] == 'traced' and rt.status()['probe'] == 'traced'
    after = rt._probe()
    assert not np.allclose(before, after)  # the trace computes with the new weights
    np.testing.assert_allclose(after, rt._eager_probe()[0].numpy(), rtol=1e-5, atol=1e-7)
    # A trainable tensor given new storage: the trace no longer sees it, the eager probe runs.
    param = rt._probe_params[0]
    param.data = param.data.clone() + 1.0
    assert not traced.usable(rt._probe_params)
    np.testing.assert_array_equal(rt._probe(), rt._eager_probe()[0].numpy())
    assert _runtime(student_dir, keys, trace_probe=False).probe_mode == 'eager'


@pytest.mark.parametrize('family', ['llava', 'qwen2_vl'])
def test_probe_is_traced_for_the_other_families(family: str, keys) -> None:
    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig

    model = build_tiny(family, list(VOCAB), seed=1)
    model.configure_trainable(TrainableConfig(lora_r=4, lora_alpha=8))
    rt = DeviceRuntime(model, DEVICE, keys[1])
    assert rt.probe_mode == 'traced'
    before = rt._probe()
    report = rt.apply(Cloud(rt.model.trainable_state_dict(), keys[0]).step(1, scale=0.2))
    assert report.extra['probe_mode'] == 'traced'
    after = rt._probe()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, rt._eager_probe()[0].numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('shadow', [True, False], ids=['shadow', 'in_place'])
def test_the_probe_runs_on_a_shadow_copy_while_answers_go_on(student_dir, keys, images,
                                                             shadow: bool) -> None:
    rt = _runtime(student_dir, keys, shadow_probe=shadow)
    assert rt.probe_shadow is shadow and rt.status()['probe_shadow'] is shadow
    live = list(rt.model.torch_model.parameters())
    probed = list(rt._probe_model.torch_model.parameters())
    trainable = {id(p) for p in rt._params}
    if shadow:
        # Every frozen weight shared, every trainable one a tensor of its own.
        assert all((a is b) == (id(a) not in trainable) for a, b in zip(live, probed,
                                                                       strict=True))
    else:
        assert rt._probe_model is rt.model
    # During the probe, may another thread take the model lock (i.e. answer)?
    free_during_probe: list[bool] = []
    probe = rt._probe

    def watched() -> np.ndarray:
        out: list[bool] = []
        t = threading.Thread(target=lambda: out.append(rt.lock.acquire(timeout=0.2)
                                                       and (rt.lock.release() or True)))
        t.start()
        t.join()
        free_during_probe.append(out[0])
        return probe()

    rt._probe = watched  # type: ignore[method-assign]
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    before = [rt.answer(im, QUESTION).step_probs for im in images]
    rt.apply(cloud.step(1))
    assert free_during_probe == [shadow]
    assert rt.base_hash == cloud.ef.view_hash() == _model_hash(rt)
    after = [rt.answer(im, QUESTION).step_probs for im in images]
    assert not all(np.allclose(a, b) for a, b in zip(after, before, strict=True))
    # A refused candidate never reaches the model (the shadow saw it; the model did not).
    trained = {k: torch.full_like(v, 6e4) if k.startswith('language_model') else v.clone()
               for k, v in cloud.ef.view.items()}
    with pytest.raises(DeltaRejectedError, match='probe'):
        rt.apply(cloud.make(trained))
    assert rt.version == 1 and _model_hash(rt) == rt.base_hash
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
    rt = _runtime(student_dir, keys)
    assert rt._traced_probe is None
    assert rt.probe_mode.startswith('eager (the trace does not follow')
    assert _model_hash(rt) == rt.base_hash  # the perturbation was undone


def test_probe_rejects_finite_weights_that_blow_up(student_dir, keys, images) -> None:
    """Every value finite (the candidate passes the finite check), the outputs are not."""
    rt = _runtime(student_dir, keys)
    base = rt.model.trainable_state_dict()
    cloud = Cloud(base, keys[0])
    trained = {k: torch.full_like(v, 6e4) if k.startswith('language_model') else v.clone()
               for k, v in base.items()}
    env = cloud.make(trained)
    before = [rt.answer(im, QUESTION) for im in images]
    with pytest.raises(DeltaRejectedError, match='probe.*NaN'):
        rt.apply(env)
    assert rt.version == 0 and rt.rejected == 1
    assert _model_hash(rt) == rt.base_hash == wire.state_dict_hash(base)
    now = [rt.answer(im, QUESTION) for im in images]
    assert [a.text for a in now] == [a.text for a in before]
    assert all(np.array_equal(a.step_probs, b.step_probs)
               for a, b in zip(now, before, strict=True))


def test_probe_refuses_a_flat_distribution(student_dir, keys) -> None:
    # The last MLP's LoRA all equal and huge: the final LayerNorm's variance overflows and
    # every logit comes out equal.
    rt = _runtime(student_dir, keys)
    probed = rt._probe_model  # the shadow copy the probe runs on
    base = probed.trainable_state_dict()
    probed.load_trainable_state_dict(
        {k: torch.full_like(v, 6e4) if 'layers.1.fc' in k and 'lora_' in k else v
         for k, v in base.items()})
    with pytest.raises(ModelError, match='flat'):
        rt._probe()
    probed.load_trainable_state_dict(base)
    probs = rt._probe()
    assert probs.ndim == 1 and abs(float(probs.sum()) - 1.0) < 1e-4


def test_next_token_probs_is_the_first_answer_step(student_dir, keys) -> None:
    rt = _runtime(student_dir, keys)
    tokens = rt.model.vision_tokens([rt.probe_image])
    first = rt.model.answer_from_tokens(tokens, None, [rt.probe_question], max_new_tokens=3)
    probs = rt.model.next_token_probs(tokens, None, [rt.probe_question])
    assert probs.shape == (1, first[0].step_probs.shape[1])
    np.testing.assert_allclose(probs[0].numpy(), first[0].step_probs[0], atol=1e-6)
    np.testing.assert_allclose(rt._probe(), first[0].step_probs[0], atol=1e-6)


def test_probe_bound_on_the_distribution_shift(student_dir, keys) -> None:
    with pytest.raises(ConfigError):
        _runtime(student_dir, keys, max_probe_tv=0.0)
    rt = _runtime(student_dir, keys, max_probe_tv=1e-9)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    with pytest.raises(DeltaRejectedError, match='max_probe_tv'):
        rt.apply(cloud.step(1, scale=0.5))
    assert rt.version == 0 and _model_hash(rt) == rt.base_hash


def test_answers_continue_while_applying(student_dir, keys, images) -> None:
    rt = _runtime(student_dir, keys)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    envelopes = [cloud.step(seed) for seed in range(1, 6)]
    stop = threading.Event()
    outcomes: list[tuple[int, bool]] = []

    def answer_loop() -> None:
        i = 0
        while not stop.is_set():
            sample = rt.answer(images[i % len(images)], QUESTION)
            outcomes.append((sample.version, bool(np.isfinite(sample.step_probs).all())))
            i += 1

    thread = threading.Thread(target=answer_loop)
    thread.start()
    try:
        for env in envelopes:
            rt.apply(env)
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert rt.version == 5
    assert outcomes and all(ok for _, ok in outcomes)
    versions = [v for v, _ in outcomes]
    assert versions == sorted(versions)  # every answer names the version that produced it


# --- persistence --------------------------------------------------------------------------
def test_two_quick_applies_then_restart_lands_on_the_second(student_dir, keys, images,
                                                            tmp_path) -> None:
    rt = _runtime(student_dir, keys, tmp_path / 'device')
    assert rt.persisted_version == 0  # nothing on disk: a restart starts from the base
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    rt.apply(cloud.step(2))
    answers = [rt.answer(im, QUESTION).step_probs for im in images]
    # No flush: a runtime starting on the folder waits for the pending writes itself.
    again = _runtime(student_dir, keys, tmp_path / 'device')
    assert again.version == 2 and again.round == 2
    assert again.base_hash == rt.base_hash == _model_hash(again)
    assert rt.persisted_version == 2 and rt.status()['persisted_version'] == 2
    assert all(np.array_equal(again.answer(im, QUESTION).step_probs, a)
               for im, a in zip(images, answers, strict=True))
    # The cloud's next delta applies on the restarted device.
    again.apply(cloud.step(3))
    assert again.version == 3


def test_rollback_is_persisted(student_dir, keys, tmp_path) -> None:
    rt = _runtime(student_dir, keys, tmp_path / 'device')
    base_hash = rt.base_hash
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    assert rt.rollback() == 2
    assert rt.base_hash == base_hash == _model_hash(rt)
    assert rt.flush(timeout=30) and rt.persisted_version == 2
    again = _runtime(student_dir, keys, tmp_path / 'device')
    assert again.version == 2 and again.base_hash == base_hash


def test_writer_writes_the_latest_version_in_order(student_dir, keys, tmp_path,
                                                   monkeypatch) -> None:
    rt = _runtime(student_dir, keys, tmp_path / 'device')
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    envelopes = [cloud.step(seed) for seed in range(1, 6)]
    written: list[int] = []
    started, release = threading.Event(), threading.Event()
    real_write = device_runtime.write_adapter

    def slow_write(directory, snapshot) -> None:
        started.set()
        release.wait(30)  # a slow disk: the applies overtake the writer
        real_write(directory, snapshot)
        written.append(snapshot.version)

    monkeypatch.setattr(device_runtime, 'write_adapter', slow_write)
    rt.apply(envelopes[0])
    assert started.wait(30)  # v1 is being written
    for env in envelopes[1:]:
        rt.apply(env)  # does not wait for the disk...
        assert rt.persisted_version == 0  # ...and never claims what is not there
    assert rt.status()['persisted_version'] == 0
    release.set()
    assert rt.flush(timeout=30)
    assert written == [1, 5]  # in order; versions overtaken while writing are skipped
    assert rt.persisted_version == 5
    from safetensors import safe_open

    with safe_open(str(tmp_path / 'device' / device_runtime.WEIGHTS_FILE), 'pt') as f:
        meta = f.metadata()
    assert meta['version'] == '5' and meta['hash'] == rt.base_hash


def test_failed_write_is_reported_and_retried(student_dir, keys, tmp_path) -> None:
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where the state folder should be')
    rt = _runtime(student_dir, keys, blocker)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))  # the apply itself succeeds
    assert rt.flush(timeout=30)
    assert rt.version == 1 and rt.persisted_version == 0
    assert 'cannot persist v1' in rt.status()['persist_error']
    blocker.unlink()
    rt.apply(cloud.step(2))
    assert rt.flush(timeout=30)
    assert rt.persisted_version == 2 and rt.status()['persist_error'] == ''


def test_corrupt_or_foreign_state_is_refused(student_dir, keys, tmp_path) -> None:
    rt = _runtime(student_dir, keys, tmp_path / 'device')
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    assert rt.flush(timeout=30)
    with pytest.raises(ModelError, match='belongs to'):
        DeviceRuntime(_load(student_dir), 'robot2', keys[1], tmp_path / 'device')
    path = tmp_path / 'device' / device_runtime.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one weight byte: the recorded hash no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match='hash'):
        _runtime(student_dir, keys, tmp_path / 'device')


def test_a_streamed_answer_is_the_plain_answer_and_a_cancel_frees_the_model(student_dir, keys,
                                                                            images) -> None:
    """``on_step`` (the Ask action) sees every step under the model lock; a cancel raised
    there ends the answer without a sample and leaves the lock free for the next one."""
    from cdcca_ros.errors import GenerationCancelled

    rt = _runtime(student_dir, keys, trace_probe=False)
    plain = rt.answer(images[0], 'what color is the circle?')
    steps = []

    def locked(step) -> None:
        assert rt.lock._is_owned()  # the RLock is held by this thread while it generates
        steps.append(step)
    streamed = rt.answer(images[0], 'what color is the circle?', on_step=locked)
    assert streamed.text == plain.text and streamed.confidence == plain.confidence
    assert len(steps) == len(streamed.step_probs) and steps[-1].texts == [plain.text]

    def cancel(step) -> None:
        raise GenerationCancelled('canceled')
    with pytest.raises(GenerationCancelled):
        rt.answer(images[0], 'what color is the circle?', on_step=cancel)
    assert rt.lock.acquire(blocking=False)  # free again
    rt.lock.release()
    assert rt.answer(images[0], 'what color is the circle?').text == plain.text


# --- rollback orders and the entropy guard -------------------------------------------------
def test_a_signed_rollback_order_is_verified_and_carried_out(student_dir, keys, images):
    from cdcca_ros.core.updates import seal_rollback

    rt = _runtime(student_dir, keys)
    base_hash = rt.base_hash
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1, scale=0.5))
    applied_hash, before = rt.base_hash, [rt.answer(im, QUESTION).text for im in images]
    good = dict(device_id=DEVICE, from_version=1, from_hash=applied_hash, to_hash=base_hash,
                new_version=2, reason='audit: v1 answers worse')
    other_private, _ = wire.generate_keypair()
    forged = seal_rollback(other_private, **good)
    wrong_device = seal_rollback(keys[0], **{**good, 'device_id': 'robot2'})
    wrong_target = seal_rollback(keys[0], **{**good, 'to_hash': 'f' * 64})
    stale = seal_rollback(keys[0], **{**good, 'from_version': 0, 'new_version': 1})
    for order, reason in ((forged, 'unknown_key'), (wrong_device, 'wrong_device'),
                          (wrong_target, 'wrong_base'), (stale, 'replay')):
        with pytest.raises(DeltaRejectedError, match=reason):
            rt.apply_rollback(order)
        assert rt.version == 1 and rt.base_hash == applied_hash == _model_hash(rt)
        assert [rt.answer(im, QUESTION).text for im in images] == before
    order = seal_rollback(keys[0], **good)
    assert rt.apply_rollback(order) == 2
    assert rt.base_hash == base_hash == _model_hash(rt) and rt.rollbacks == 1
    with pytest.raises(DeltaRejectedError, match='replay'):  # the same order again
        rt.apply_rollback(order)
    # The withdrawn delta cannot come back: its version is below the device's now.
    with pytest.raises(DeltaRejectedError, match='rollback'):
        rt.apply(seal_delta(keys[0], device_id=DEVICE, round=1, base_version=0,
                            base_hash=base_hash, new_version=1, new_hash=applied_hash,
                            codec='fp16', payload=b''))


@pytest.fixture(scope='module')
def confident_dir(tmp_path_factory, images):
    """A tiny model sure of its answers (trained to say 'red'), trainable set configured."""
    from tiny_models import red_teacher_and_student

    from cdcca_ros.models.base import TrainableConfig

    teacher = red_teacher_and_student(tmp_path_factory.mktemp('student'), images)
    teacher.configure_trainable(TrainableConfig(lora_r=4, lora_alpha=8))
    path = tmp_path_factory.mktemp('confident')
    teacher.save(path)
    return path


def test_the_entropy_guard_rolls_a_broken_update_back_on_its_own(confident_dir, keys, images):
    from cdcca_ros.core.entropy_guard import EntropyGuardConfig

    rt = _runtime(confident_dir, keys, entropy_guard=EntropyGuardConfig(window=6, ratio=2.0,
                                                                        min_rise=0.3))
    base_hash = rt.base_hash
    for _ in range(2):
        for im in images:
            rt.answer(im, QUESTION)
    # A "valid" update whose weights are noise: signed, finite, passes the probe ...
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    g = torch.Generator().manual_seed(5)
    noisy = {k: v + torch.randn(v.shape, generator=g) * 3.0 for k, v in cloud.ef.view.items()}
    rt.apply(cloud.make(noisy))
    assert rt.version == 1
    entropies = [rt.answer(im, QUESTION).entropy_mean for im in images * 2]
    # ... but its answers are far less sure: after a window the guard restores the base.
    assert np.mean(entropies) > 0.3
    assert rt.version == 2 and rt.base_hash == base_hash == _model_hash(rt)
    event = rt.local_rollbacks[-1]
    assert event['from_version'] == 1 and event['hash'] == base_hash
    assert 'rose from' in event['reason']


def test_the_entropy_guard_keeps_a_harmless_update(student_dir, keys, images):
    from cdcca_ros.core.entropy_guard import EntropyGuard, EntropyGuardConfig

    guard = EntropyGuard(EntropyGuardConfig(window=4, ratio=3.0, min_rise=1.0))
    for e in (0.1, 0.2, 0.1, 0.2):
        assert guard.observe(0, e) is None
    # Twice as unsure (a new scene), but 0.3 nats is below min_rise: kept.
    for e in (0.3, 0.3, 0.3, 0.3):
        assert guard.observe(1, e) is None
    assert guard.last['verdict'] == 'kept'
    # Without a predecessor's window there is no verdict at all.
    fresh = EntropyGuard(EntropyGuardConfig(window=4))
    assert all(fresh.observe(3, 4.0) is None for _ in range(10))


# --- hostile but signed deltas ---------------------------------------------------------------
def test_last_version_cannot_wedge_the_device(student_dir, keys, tmp_path) -> None:
    """A signed delta to version 2**64 - 1 (then a rollback, which would need version 2**64)
    is refused for its jump; rollback, a restart and the next real delta all still work."""
    import dataclasses

    state = tmp_path / 'state'
    rt = _runtime(student_dir, keys, state)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    good = cloud.step(2)
    huge = seal_delta(keys[0], **{f.name: getattr(good, f.name)
                                  for f in dataclasses.fields(good)
                                  if f.name in ('device_id', 'round', 'base_version',
                                                'base_hash', 'new_hash', 'codec', 'payload')},
                      new_version=(1 << 64) - 1)
    with pytest.raises(DeltaRejectedError, match='version_jump'):
        rt.apply(huge)
    assert rt.version == 1 and _model_hash(rt) == rt.base_hash
    assert rt.rollback() == 2
    assert rt.flush(10.0)
    again = _runtime(student_dir, keys, state)
    assert again.version == 2
    with pytest.raises(DeltaRejectedError, match='nothing to roll back'):
        again.rollback()


def test_update_ratio_bounds_how_far_the_weights_move(student_dir, keys) -> None:
    with pytest.raises(ConfigError):
        _runtime(student_dir, keys, max_update_ratio=0.0)
    rt = _runtime(student_dir, keys, max_update_ratio=0.35)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    norm = rt.weights.norm()
    report = rt.apply(cloud.step(1, scale=1e-3))
    assert 0 < report.extra['update_ratio'] < 0.35
    assert report.extra['update_ratio'] == pytest.approx(
        float(torch.cat([(cloud.ef.view[k] - v).reshape(-1) for k, v in
                         FlatWeights.pack(_load(student_dir).trainable_state_dict())
                         .tensors.items()]).norm()) / norm, rel=1e-3)
    hash_before = rt.base_hash
    with pytest.raises(DeltaRejectedError, match='update_too_large'):
        rt.apply(cloud.step(2, scale=1.0))
    assert rt.version == 1 and rt.base_hash == hash_before == _model_hash(rt)
