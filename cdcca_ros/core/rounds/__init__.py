"""The guarded cloud round: one home for label, train, compress, gate and sign (no rclpy).

- :mod:`~cdcca_ros.core.rounds.memory`: the per-device replay memory (bounded, persisted,
  clustered, split into train / val / gate);
- :mod:`~cdcca_ros.core.rounds.anchor`: the anchor set that holds the student's original
  behaviour;
- :mod:`~cdcca_ros.core.rounds.trainer`: a round's training (new + replay + anchor, early
  stopping);
- :mod:`~cdcca_ros.core.rounds.gate` and :mod:`~cdcca_ros.core.rounds.stats`: the update
  gate and its paired statistics;
- :mod:`~cdcca_ros.core.rounds.round`: the round itself and the live audit;
- :mod:`~cdcca_ros.core.rounds.state`: what the cloud checkpoints per device;
- :mod:`~cdcca_ros.core.rounds.config`: the settings.
"""
