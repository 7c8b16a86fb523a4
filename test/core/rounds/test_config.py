"""The guard's dataclass defaults are the cloud node's parameter defaults (one set)."""
from __future__ import annotations

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
