"""DeviceState checkpoints: a resumed state numbers new samples after everything it counted."""
from __future__ import annotations

import torch

from cdcca_ros.core.rounds.memory import Record
from cdcca_ros.core.rounds.state import DeviceState


def test_a_resumed_state_counts_new_samples_as_pending(tmp_path):
    """The plain round keeps no records in the memory: after a restart the memory is empty
    while the round counters are not. A new sample must still be pending (a round for it),
    so its number comes after the counters (it was numbered 0 and ignored forever)."""
    base = {'w': torch.zeros(4)}
    state = DeviceState('robot1', base, tmp_path / 'robot1')
    state.round_seq = state.ship_seq = 3  # three samples went into rounds; none kept
    state.save()
    resumed = DeviceState.load('robot1', base, tmp_path / 'robot1')
    assert resumed.round_seq == 3 and resumed.pending() == 0
    resumed.memory.add(Record(sample_id='robot1-new', seq=resumed.memory.next_seq,
                              tokens=torch.zeros(2, 4, dtype=torch.float16), indices=None,
                              question='what color is it?'))
    assert resumed.memory.records['robot1-new'].seq == 3
    assert resumed.pending() == 1
