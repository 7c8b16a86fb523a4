"""One CD-CCA round without ROS: device answers + UTS, cloud AKD + DWC, device hot-apply.

The teacher is a tiny BLIP-2 briefly trained to answer 'red' to everything, so pseudo-labels
are known; the student shares its vision encoder and starts answering something else.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import QUESTION, random_images, red_teacher_and_student

from cdcca_ros.core.akd import AKDConfig
from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
from cdcca_ros.core.device_runtime import DeviceRuntime
from cdcca_ros.core.rounds.config import GuardConfig
from cdcca_ros.core.updates import DeltaEnvelope, seal_delta
from cdcca_ros.core.uts import UtsConfig, UtsPipeline, unpack_tokens
from cdcca_ros.core.wire import generate_keypair
from cdcca_ros.errors import DeltaRejectedError, WireError


@pytest.fixture(scope='module')
def images():
    return random_images()


@pytest.fixture(scope='module')
def models(tmp_path_factory, images):
    path = tmp_path_factory.mktemp('student')
    return red_teacher_and_student(path, images), path


def _load_student(path):
    from cdcca_ros.models import bundled

    return bundled.load(str(path))


def _round(models, images, tmp_path, codec='sparse', codec_params=None, **cfg):
    teacher, student_dir = models
    private, public = generate_keypair()
    device = DeviceRuntime(_load_student(student_dir), 'robot1', public, tmp_path / 'device',
                           probe_image=images[0])
    # The paper's plain round: these tests are about the delta's path, not the guard.
    cloud = CloudRuntime(teacher, _load_student(student_dir), private, CloudConfig(
        min_samples=len(images), akd=AKDConfig(steps=30, lr=5e-3, batch_size=6),
        codec=codec, codec_params=codec_params or {}, guard=GuardConfig.plain(30),
        **{'budget_bytes': None, **cfg}), state_dir=tmp_path / 'cloud')
    assert cloud.device('robot1').hash == device.base_hash  # both start from the same base
    _uplink(device, cloud, images)
    return device, cloud, cloud.run_round('robot1'), private


def _uplink(device, cloud, images):
    uts = UtsPipeline(UtsConfig(stage1_threshold=0.0, keep_ratio=0.5, pack_dtype='fp16'),
                      device.mc_token_features, has_cls=True)
    for image in images:
        sample = device.answer(image, QUESTION)
        result = uts.process(sample.step_probs, sample.tokens)
        assert result is not None
        kept = torch.as_tensor(result.kept_indices)
        cloud.add_sample('robot1', unpack_tokens(result.packed), kept, QUESTION,
                         int(sample.tokens.shape[0]), int(sample.tokens.shape[1]))
    assert cloud.due('robot1')


def test_one_round_changes_device_version_and_answers(models, images, tmp_path):
    device, cloud, result, _ = _round(models, images, tmp_path)
    before = [device.answer(im, QUESTION).text for im in images]
    assert result is not None and result.samples == len(images)
    assert result.losses[-1]['total'] < result.losses[0]['total']
    assert result.agreement_after > result.agreement_before
    report = device.apply(result.envelope)
    after = [device.answer(im, QUESTION).text for im in images]
    assert device.version == 1 and report.new_version == 1
    assert device.base_hash == cloud.device('robot1').hash
    assert after != before
    assert after.count('red') > before.count('red')
    # A restart of the device comes back on the applied adapter.
    again = DeviceRuntime(_load_student(models[1]), 'robot1', device.public_key,
                          tmp_path / 'device', probe_image=images[0])
    assert again.version == 1 and again.base_hash == device.base_hash
    assert [again.answer(im, QUESTION).text for im in images] == after
    # Rollback restores the previous answers under a new, higher version.
    assert device.rollback() == 2
    assert [device.answer(im, QUESTION).text for im in images] == before


def test_round_at_one_bit_refits_and_the_device_follows_exactly(models, images, tmp_path):
    from cdcca_ros.core import dwc
    from cdcca_ros.core.refit import RefitConfig

    n = dwc.num_params(_load_student(models[1]).trainable_state_dict())
    budget = n // 8  # 1 bit per trainable value, container included
    device, cloud, result, _ = _round(models, images, tmp_path, budget_bytes=budget,
                                      refit=RefitConfig(steps=20, fisher_batches=2))
    assert result.refit is not None and result.refit.used
    assert result.refit.objective_after < result.refit.objective_before
    assert len(result.envelope.payload) <= budget and result.stats.bits_per_param <= 1.0
    # The cloud sends compact payloads: no index, the device decodes with its own set.
    assert not dwc.is_self_describing(result.envelope.payload)
    before = [device.answer(im, QUESTION).text for im in images]
    device.apply(result.envelope)
    assert device.base_hash == cloud.device('robot1').hash
    assert [device.answer(im, QUESTION).text for im in images] != before
    # Error feedback: what the refit left out of this round is in the next delta, taken
    # against exactly what the device holds.
    state = cloud.device('robot1')
    assert state.feedback.residual_norm() > 0
    lacking = dwc.compute_delta(state.trained, state.feedback.view)
    for k, r in state.feedback.residual.items():
        torch.testing.assert_close(r, lacking[k], atol=1e-6, rtol=1e-4)
    _uplink(device, cloud, images)
    second = cloud.run_round('robot1')
    device.apply(second.envelope)
    assert device.version == 2 and device.base_hash == cloud.device('robot1').hash


def test_lossless_enough_payload_skips_the_refit(models, images, tmp_path):
    _, _, result, _ = _round(models, images, tmp_path)  # 4-bit default: ~0.08 error
    assert result.stats.rel_l2_error < 0.2 and result.refit is None


def test_cloud_state_survives_restart(models, images, tmp_path):
    teacher, student_dir = models
    _, cloud, result, private = _round(models, images, tmp_path)
    state = cloud.device('robot1')
    restarted = CloudRuntime(teacher, _load_student(student_dir), private, cloud.cfg,
                             state_dir=tmp_path / 'cloud')
    again = restarted.device('robot1')
    assert (again.version, again.round, again.hash) == (state.version, state.round, state.hash)
    assert again.pending() == 0
    # Pending samples are on disk too.
    restarted.add_sample('robot1', torch.zeros(3, restarted.space.dim), torch.tensor([0, 1, 2]),
                         QUESTION, restarted.space.num_tokens, restarted.space.dim)
    third = CloudRuntime(teacher, _load_student(student_dir), private, cloud.cfg,
                         state_dir=tmp_path / 'cloud')
    assert third.device('robot1').pending() == 1
    # A sample re-delivered after a restart (the link is at-least-once) is taken only once.
    args = (torch.zeros(3, third.space.dim), torch.tensor([0, 1, 2]), QUESTION,
            third.space.num_tokens, third.space.dim)
    assert third.add_sample('robot1', *args, sample_id='robot1-7')
    fourth = CloudRuntime(teacher, _load_student(student_dir), private, cloud.cfg,
                          state_dir=tmp_path / 'cloud')
    assert not fourth.add_sample('robot1', *args, sample_id='robot1-7')
    assert fourth.add_sample('robot1', *args, sample_id='robot1-8')
    assert fourth.device('robot1').pending() == 3


def test_wrong_vision_space_is_refused(models, tmp_path):
    teacher, student_dir = models
    private, _ = generate_keypair()
    cloud = CloudRuntime(teacher, _load_student(student_dir), private, CloudConfig())
    with pytest.raises(WireError, match='expects'):
        cloud.add_sample('robot1', torch.zeros(2, 7), None, QUESTION, 65, 7)


def _mutations(env: DeltaEnvelope, private, device):
    good = dict(device_id=env.device_id, round=env.round, base_version=env.base_version,
                base_hash=env.base_hash, new_version=env.new_version, new_hash=env.new_hash,
                codec=env.codec, payload=env.payload)
    from cdcca_ros.core.codecs import container

    # The encoders refuse non-finite values: build the container by hand, as a broken cloud
    # or an attacker holding the key would.
    base = device.model.trainable_state_dict()
    entries = [container.Entry(k, 'float32', tuple(v.shape)) for k, v in base.items()]
    values = np.zeros(sum(v.numel() for v in base.values()), np.float16)
    values[3] = np.nan
    nan_payload = container.write_payload('fp16', {}, entries, {'values': values})
    other_private, _ = generate_keypair()
    return {
        'bad_signature': dataclasses.replace(env, signature=bytes(64)),
        'wrong_key': seal_delta(other_private, **good),
        'wrong_device': seal_delta(private, **{**good, 'device_id': 'robot2'}),
        'wrong_base': seal_delta(private, **{**good, 'base_hash': 'f' * 64}),
        'older_version': seal_delta(private, **{**good, 'new_version': 0}),
        'truncated': seal_delta(private, **{**good, 'payload': env.payload[:-7]}),
        'nan': seal_delta(private, **{**good, 'codec': 'fp16', 'payload': nan_payload}),
        'wrong_hash': seal_delta(private, **{**good, 'new_hash': '0' * 64}),
    }


def test_every_bad_delta_is_rejected_and_answers_unchanged(models, images, tmp_path):
    device, _, result, private = _round(models, images, tmp_path)
    before = [device.answer(im, QUESTION) for im in images]
    for name, bad in _mutations(result.envelope, private, device).items():
        with pytest.raises(DeltaRejectedError):
            device.apply(bad)
        assert device.version == 0, name
        now = [device.answer(im, QUESTION) for im in images]
        assert [a.text for a in now] == [a.text for a in before], name
        assert all(np.allclose(a.step_probs, b.step_probs) for a, b in zip(now, before)), name
    assert device.rejected == 8
    device.apply(result.envelope)
    assert device.version == 1
    with pytest.raises(DeltaRejectedError, match='replay|already'):
        device.apply(result.envelope)  # replay
    assert device.version == 1
