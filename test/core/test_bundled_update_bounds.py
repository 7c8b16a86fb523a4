"""The device_node's default update bound on the bundled models: a real round of the bundled
cloud (node defaults with the guard off: the paper's round, every result shipped, the largest
update a device takes) is applied, a signed delta of random values is refused.
"""
from __future__ import annotations

import pytest
import torch


def test_default_bound_takes_a_real_round_and_refuses_random_values() -> None:
    from cdcca_ros.bench.common import device_uts_config, world_samples
    from cdcca_ros.core import dwc, wire
    from cdcca_ros.core.cloud_runtime import CloudRuntime
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.updates import seal_delta
    from cdcca_ros.core.uts import UtsPipeline, unpack_tokens
    from cdcca_ros.errors import DeltaRejectedError
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.cloud_node import cloud_config
    from cdcca_ros.nodes.tables import defaults

    params = defaults('device_node')
    private, public = wire.generate_keypair()
    device = DeviceRuntime(bundled.load('bundled:student'), 'robot1', public,
                           max_update_ratio=params['max_update_ratio'],
                           max_new_tokens=params['max_new_tokens'])
    cloud = CloudRuntime(bundled.load('bundled:teacher'), bundled.load('bundled:student'),
                         private, cloud_config({**defaults('cloud_node'), 'guard.enabled': False}))
    space = device.model.vision_space()
    uts = UtsPipeline(device_uts_config(stage1_mode='top_fraction', stage1_fraction=1.0),
                      device.mc_token_features, has_cls=space.has_cls)
    for s in world_samples(3, ['fog'], 32, 48):
        answered = device.answer(s.image, s.question)
        kept = uts.process(answered.step_probs, answered.tokens)
        cloud.add_sample('robot1', unpack_tokens(kept.packed), torch.as_tensor(
            kept.kept_indices), s.question, space.num_tokens, space.dim)
    result = cloud.run_round('robot1')
    report = device.apply(result.envelope)
    assert 0 < report.extra['update_ratio'] < params['max_update_ratio']

    probe = world_samples(4, ['source', 'fog'], 4, 48)
    answers = [device.answer(s.image, s.question).text for s in probe]
    g = torch.Generator().manual_seed(0)
    # What an attacker holding a signing key (or a broken cloud) could send: N(0, 1) values.
    noise = {k: torch.randn(v.shape, generator=g) for k, v in device.weights.tensors.items()}
    payload = dwc.get_codec('fp16').encode(noise)
    new = dwc.apply_delta(device.weights.tensors, dwc.get_codec('fp16').decode(payload))
    env = seal_delta(private, device_id='robot1', round=2, base_version=1,
                     base_hash=device.base_hash, new_version=2,
                     new_hash=wire.state_dict_hash(new), codec='fp16', payload=payload)
    with pytest.raises(DeltaRejectedError, match='update_too_large'):
        device.apply(env)
    assert device.version == 1
    assert [device.answer(s.image, s.question).text for s in probe] == answers
