"""DeviceRuntime: hot-apply between two answers, streamed answers, rollback orders, the
entropy guard and the bounds on a signed delta.

The runtime's parts have their own tests under ``test/core/device`` (flat weights, the probe,
persistence); the tiny device and the cloud's side of its deltas are ``device_helpers``.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from device_helpers import DEVICE, Cloud, load, model_hash, runtime, save_student
from tiny_models import QUESTION, random_images

from cdcca_ros.core import wire
from cdcca_ros.core.device.weights import FlatWeights
from cdcca_ros.core.updates import seal_delta
from cdcca_ros.errors import ConfigError, DeltaRejectedError


@pytest.fixture(scope='module')
def student_dir(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp('student'))


@pytest.fixture(scope='module')
def keys():
    return wire.generate_keypair()


@pytest.fixture(scope='module')
def images():
    return random_images(3)


@pytest.mark.parametrize('direct', [True, False], ids=['direct_copy', 'load_state_dict'])
def test_apply_matches_the_cloud_and_reports_its_steps(student_dir, keys, images,
                                                       direct: bool) -> None:
    rt = runtime(student_dir, keys)
    assert rt._params is not None  # the swap copies straight into the live parameters
    if not direct:
        rt._params = None  # a model that does not expose them: load_trainable_state_dict
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    before = [rt.answer(im, QUESTION).step_probs for im in images]
    report = rt.apply(cloud.step(1))
    assert rt.version == 1 and report.new_version == 1
    assert rt.base_hash == cloud.ef.view_hash() == model_hash(rt)
    assert set(report.extra['steps_ms']) == {'gate_ms', 'build_ms', 'finite_ms', 'hash_ms',
                                             'swap_ms', 'probe_ms'}
    assert 0.0 < report.extra['probe_tv'] <= 1.0
    assert report.swap_ms <= report.apply_ms
    after = [rt.answer(im, QUESTION).step_probs for im in images]
    assert not all(np.allclose(a, b) for a, b in zip(after, before, strict=True))


def test_answers_continue_while_applying(student_dir, keys, images) -> None:
    rt = runtime(student_dir, keys)
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


# --- streamed answers -----------------------------------------------------------------------
def test_a_streamed_answer_is_the_plain_answer_and_a_cancel_frees_the_model(student_dir, keys,
                                                                            images) -> None:
    """``on_step`` (the Ask action) sees every step under the model lock; a cancel raised
    there ends the answer without a sample and leaves the lock free for the next one."""
    from cdcca_ros.errors import GenerationCancelled

    rt = runtime(student_dir, keys, trace_probe=False)
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

    rt = runtime(student_dir, keys)
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
        assert rt.version == 1 and rt.base_hash == applied_hash == model_hash(rt)
        assert [rt.answer(im, QUESTION).text for im in images] == before
    order = seal_rollback(keys[0], **good)
    assert rt.apply_rollback(order) == 2
    assert rt.base_hash == base_hash == model_hash(rt) and rt.rollbacks == 1
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

    rt = runtime(confident_dir, keys, entropy_guard=EntropyGuardConfig(window=6, ratio=2.0,
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
    assert rt.version == 2 and rt.base_hash == base_hash == model_hash(rt)
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
    rt = runtime(student_dir, keys, state)
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
    assert rt.version == 1 and model_hash(rt) == rt.base_hash
    assert rt.rollback() == 2
    assert rt.flush(10.0)
    again = runtime(student_dir, keys, state)
    assert again.version == 2
    with pytest.raises(DeltaRejectedError, match='nothing to roll back'):
        again.rollback()


def test_update_ratio_bounds_how_far_the_weights_move(student_dir, keys) -> None:
    with pytest.raises(ConfigError):
        runtime(student_dir, keys, max_update_ratio=0.0)
    rt = runtime(student_dir, keys, max_update_ratio=0.35)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    norm = rt.weights.norm()
    report = rt.apply(cloud.step(1, scale=1e-3))
    assert 0 < report.extra['update_ratio'] < 0.35
    assert report.extra['update_ratio'] == pytest.approx(
        float(torch.cat([(cloud.ef.view[k] - v).reshape(-1) for k, v in
                         FlatWeights.pack(load(student_dir).trainable_state_dict())
                         .tensors.items()]).norm()) / norm, rel=1e-3)
    hash_before = rt.base_hash
    with pytest.raises(DeltaRejectedError, match='update_too_large'):
        rt.apply(cloud.step(2, scale=1.0))
    assert rt.version == 1 and rt.base_hash == hash_before == model_hash(rt)
