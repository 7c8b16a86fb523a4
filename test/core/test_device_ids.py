"""Device ids from messages name folders and key expressions: only safe ones are taken."""
from __future__ import annotations

import pytest
import torch

from cdcca_ros.core import wire
from cdcca_ros.errors import WireError


@pytest.mark.parametrize('bad', ['', 'x' * 64, '../etc', 'a/b', 'robot1\x00', 'robot 1', '٣',
                                 '.hidden', '..', None, 7])
def test_bad_device_ids_are_refused(bad) -> None:
    with pytest.raises(WireError, match='device id'):
        wire.check_device_id(bad)


@pytest.mark.parametrize('good', ['robot1', 'R2-D2', 'fleet_07.arm', 'x' * 63, 'a..b'])
def test_good_device_ids_pass(good: str) -> None:
    assert wire.check_device_id(good) == good


def test_cloud_refuses_samples_from_unsafe_device_ids(tmp_path) -> None:
    """A sample claiming a 300-character or path-like device id raised OSError from the
    checkpoint folder (killing cloud_node's callback) or wrote outside state_dir."""
    from cdcca_ros.bench.common import build_tiny_pair
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime

    teacher, student = build_tiny_pair(0)
    state = tmp_path / 'cloud'
    cloud = CloudRuntime(teacher, student, wire.generate_keypair()[0], CloudConfig(),
                         state_dir=state)
    space = student.vision_space()
    tokens = torch.zeros(2, space.dim)
    for bad in ('x' * 300, '../outside', ''):
        with pytest.raises(WireError, match='device id'):
            cloud.add_sample(bad, tokens, torch.tensor([0, 1]), 'q', space.num_tokens,
                             space.dim)
    assert not (tmp_path / 'outside').exists() and cloud.devices == {}
    assert cloud.add_sample('robot1', tokens, torch.tensor([0, 1]), 'q', space.num_tokens,
                            space.dim)
