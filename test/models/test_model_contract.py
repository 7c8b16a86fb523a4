"""The model contract (cdcca_ros/models/base.py): its dataclasses validate their values, and
every registered family implements it."""
from __future__ import annotations

import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.models import MLLM, TrainableConfig, VisionSpace
from cdcca_ros.models.registry import FAMILIES, family_class


@pytest.mark.parametrize(('kwargs', 'match'), [
    ({'dim': 0}, 'dim'),
    ({'num_tokens': 64}, 'expected 65'),
    ({'has_cls': False}, 'expected 64'),
    ({'grid': (8, 7)}, 'grid'),
])
def test_vision_space_validates(kwargs, match):
    base = dict(dim=48, num_tokens=65, grid=(8, 8), has_cls=True, encoder='vit')
    with pytest.raises(ConfigError, match=match):
        VisionSpace(**{**base, **kwargs})


def test_vision_space_is_hashable_and_compares_by_value():
    a = VisionSpace(48, 65, (8, 8), True, 'vit')
    assert a == VisionSpace(48, 65, (8, 8), True, 'vit') and len({a, a}) == 1
    assert a != VisionSpace(48, 65, (8, 8), True, 'other')


@pytest.mark.parametrize(('kwargs', 'match'), [
    ({'lora_r': 0}, 'lora_r'),
    ({'lora_alpha': -1}, 'lora_alpha'),
    ({'lora_dropout': 1.0}, 'lora_dropout'),
    ({'lora_targets': 'q_proj'}, 'lora_targets'),
    ({'lora_targets': ()}, 'lora_targets'),
])
def test_trainable_config_validates(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainableConfig(**kwargs)


def test_trainable_config_dict_round_trip():
    cfg = TrainableConfig(lora_r=4, lora_targets=['q_proj', 'v_proj'], train_norms=False)
    assert cfg.lora_targets == ('q_proj', 'v_proj')
    assert TrainableConfig.from_dict(cfg.to_dict()) == cfg


# What every family must provide (cdcca_ros/models/base.py): answers with token probabilities,
# vision tokens, query features and fused representations, the trainable set, save/load.
CONTRACT = {'vision_space', 'vision_tokens', 'answer', 'answer_from_tokens', 'forward_train',
            'mc_token_features', 'configure_trainable', 'trainable_state_dict',
            'load_trainable_state_dict', 'save', 'load'}


def test_the_contract_is_abstract_and_every_family_implements_it():
    assert MLLM.__abstractmethods__ == CONTRACT
    for family in sorted(FAMILIES):
        cls = family_class(family)
        assert issubclass(cls, MLLM) and not cls.__abstractmethods__, (family,
                                                                      cls.__abstractmethods__)
        for name in CONTRACT:  # implemented below MLLM, not inherited from its stub
            owner = next(k for k in cls.__mro__ if name in vars(k))
            assert owner is not MLLM, (family, name)
