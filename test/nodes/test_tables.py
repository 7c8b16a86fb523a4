"""The parameter tables: the README shows them as they are, and their defaults make sense."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdcca_ros.nodes.tables import TABLES, defaults, markdown, unknown_parameters

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('node', sorted(TABLES))
def test_readme_holds_the_generated_parameter_table(node):
    """`python -m cdcca_ros.nodes.tables` writes them; a table edit must reach the README."""
    assert markdown(node) in (REPO / 'README.md').read_text()


def test_every_parameter_says_whether_it_changes_at_runtime():
    runtime = {name: {p.name for p in table if p.runtime} for name, table in TABLES.items()}
    assert {'fps', 'synthetic.schedule'} <= runtime['camera_node']
    assert {'frame_max_age_ms', 'max_new_tokens', 'uts.entropy_threshold'} \
        <= runtime['device_node']
    assert {'round.min_samples', 'akd.lr'} <= runtime['cloud_node']
    fixed = {'model', 'device_id', 'cloud_public_key', 'state_dir', 'torch_device'}
    assert not fixed & runtime['device_node']
    assert not runtime['cloud_bridge_node']


def test_unknown_names_are_named_with_a_suggestion():
    err = unknown_parameters('device_node', ['max_new_token', 'zzz'])
    assert "unknown parameters 'max_new_token' (did you mean 'max_new_tokens'?), 'zzz';" \
        in str(err)


def test_the_default_probe_question_gets_a_sensible_answer():
    """The probe runs on a blank grey image: 'is there a red square?' is answered 'no' (the
    former default, 'what color is the object?', got '1')."""
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models import bundled

    runtime = DeviceRuntime(bundled.load('bundled:student'), 'robot1')
    question = defaults('device_node')['probe_question']
    assert runtime.answer(np.full((64, 64, 3), 128, np.uint8), question).text == 'no'
