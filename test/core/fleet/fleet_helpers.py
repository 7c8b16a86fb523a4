"""Round settings shared by the fleet tests."""
from __future__ import annotations


def short_round(steps: int = 4, min_samples: int = 4, gate: bool = False):
    """The guarded round with few steps, no refit, no token pulls (the random tiny teacher is
    never sure), no derived questions (the tests count the records a round takes); the gate
    off so every round ships."""
    from cdcca_ros.core.akd import AKDConfig
    from cdcca_ros.core.cloud_runtime import CloudConfig
    from cdcca_ros.core.refit import RefitConfig
    from cdcca_ros.core.rounds.config import AuditConfig, GuardConfig, LabelConfig
    from cdcca_ros.core.rounds.gate import GateConfig
    from cdcca_ros.core.rounds.trainer import TrainConfig

    guard = GuardConfig(train=TrainConfig(max_steps=steps, min_steps=steps, eval_every=steps),
                        gate=GateConfig(enabled=gate), audit=AuditConfig(enabled=False),
                        labels=LabelConfig(pull_below=0.0), anchor='none',
                        extra_questions=0, gate_questions=0)
    return CloudConfig(min_samples=min_samples, akd=AKDConfig(seed=0, batch_size=8),
                       refit=RefitConfig(steps=0), budget_bytes=None, guard=guard)
