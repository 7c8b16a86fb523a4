"""The ``describe`` question, and the device runtime's captions (bundled student and head)."""
from __future__ import annotations

import numpy as np
import pytest

from cdcca_ros.core.captions.describe import is_describe
from cdcca_ros.errors import ConfigError


@pytest.mark.parametrize('question,expected', [
    ('describe', True), ('  Describe the scene? ', True), ('What do you see?', True),
    ('caption.', True), ('describe the red square', False), ('what color is it?', False),
    ('', False)])
def test_which_questions_ask_for_a_caption(question: str, expected: bool) -> None:
    assert is_describe(question) is expected


def test_the_runtime_captions_a_describe_question_with_the_head(tmp_path) -> None:
    from cdcca_ros.core.captions.adapt import caption_entropy
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models import bundled
    from cdcca_ros.models.caption_head import Captioner, load_head
    from cdcca_ros.sim.world import World

    model = bundled.load('bundled:student')
    head = load_head(bundled.resolve('bundled:student'))
    runtime = DeviceRuntime(model, 'robot1', state_dir=tmp_path / 'a', caption_head=head)
    image = World(3).samples('source', 1, image_size=(64, 64))[0].image
    sample = runtime.answer(image, 'Describe the scene?')
    direct = Captioner(model, head).caption([image])[0]
    assert sample.text == direct.text and len(sample.text.split()) > 3
    assert sample.choice_index == -1 and sample.adapted
    assert sample.entropy_mean == pytest.approx(caption_entropy(direct).mean)
    assert sample.step_probs.shape == direct.step_probs.shape
    # A short question is still answered as a question.
    assert runtime.answer(image, 'what color is the object?').text != sample.text
    # A model without a head refuses to describe, with the reason.
    bare = DeviceRuntime(bundled.load('bundled:student'), 'robot1', state_dir=tmp_path / 'b')
    with pytest.raises(ConfigError, match='no caption head'):
        bare.caption(np.zeros((64, 64, 3), np.uint8))
