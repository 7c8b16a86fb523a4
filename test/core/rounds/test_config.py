"""The guard's dataclass defaults are the cloud node's parameter defaults (one set)."""
from __future__ import annotations

import pytest

from cdcca_ros.core.rounds.config import GuardConfig
from cdcca_ros.nodes.tables import defaults


def test_node_defaults_build_the_default_guard():
    assert GuardConfig.from_params(defaults('cloud_node')) == GuardConfig()


def test_guard_disabled_is_the_papers_round():
    params = {**defaults('cloud_node'), 'guard.enabled': False, 'akd.steps': 17}
    cfg = GuardConfig.from_params(params)
    assert not cfg.enabled and not cfg.gate.enabled and cfg.train.max_steps == 17
    assert cfg.val_fraction == cfg.gate_fraction == 0.0 and cfg.anchor == 'none'


def test_gate_settings_come_from_the_parameters():
    params = {**defaults('cloud_node'), 'guard.anchor_budget': 3.5, 'guard.alpha': 0.1}
    cfg = GuardConfig.from_params(params)
    assert cfg.gate.anchor_budget == 3.5 and cfg.gate.alpha == 0.1


def test_derived_questions_need_the_surer_label():
    import torch

    from cdcca_ros.core.rounds.config import LabelConfig
    from cdcca_ros.core.rounds.memory import Record
    from cdcca_ros.errors import ConfigError

    def rec(confidence, parent='', label='red'):
        r = Record(sample_id='a~q0' if parent else 'a', seq=0, tokens=torch.zeros(1, 1),
                   indices=None, question='q', split='train', parent=parent)
        r.label, r.confidence = label, confidence
        return r

    cfg = LabelConfig(min_confidence=0.5)
    assert cfg.trusted(rec(0.9)) and not cfg.trusted(rec(0.4))
    assert not cfg.trusted(rec(1, label=None))
    assert not cfg.trusted(rec(0.9, parent='a')) and cfg.trusted(rec(0.99, parent='a'))
    assert LabelConfig(derived_min_confidence=0.0).trusted(rec(0.1, parent='a'))
    params = {**defaults('cloud_node'), 'guard.derived_min_confidence': 0.9}
    assert GuardConfig.from_params(params).labels.derived_min_confidence == 0.9
    with pytest.raises(ConfigError):
        LabelConfig(derived_min_confidence=1.0)
