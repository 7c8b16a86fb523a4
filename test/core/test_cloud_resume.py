"""A cloud restarted before its first round: the samples it had stored are pending again
and their round runs without waiting for another sample."""
from __future__ import annotations

import torch

from cdcca_ros.core import wire


def test_restart_before_the_first_round_resumes_its_samples(tmp_path) -> None:
    from cdcca_ros.bench.common import build_tiny_pair
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime

    teacher, student = build_tiny_pair(0)
    key = wire.generate_keypair()[0]
    cfg = CloudConfig(min_samples=3)
    space = student.vision_space()
    first = CloudRuntime(teacher, student, key, cfg, state_dir=tmp_path)
    for i in range(3):
        assert first.add_sample('robot1', torch.randn(4, space.dim), torch.arange(4), 'q',
                                space.num_tokens, space.dim, sample_id=f's{i}')
    assert first.due('robot1')
    # The process dies here, before the round. A new one on the same folder:
    again = CloudRuntime(teacher, student, key, cfg, state_dir=tmp_path)
    assert again.resume() == ['robot1']
    state = again.device('robot1')
    assert state.pending() == 3 and again.due('robot1')
    # The ids are remembered too: a re-delivered sample is not taken twice.
    assert not again.add_sample('robot1', torch.randn(4, space.dim), torch.arange(4), 'q',
                                space.num_tokens, space.dim, sample_id='s1')
    assert CloudRuntime(teacher, student, key, cfg, state_dir=tmp_path / 'empty').resume() == []
