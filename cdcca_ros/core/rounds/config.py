"""Settings of the guarded round: labels, memory, training, gate, audit (no rclpy)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from cdcca_ros.core.coverage import CoverageConfig
from cdcca_ros.core.rounds.gate import GateConfig
from cdcca_ros.core.rounds.memory import Record
from cdcca_ros.core.rounds.trainer import TrainConfig
from cdcca_ros.errors import ConfigError


@dataclass
class LabelConfig:
    """Which teacher labels the student may trust.

    Attributes:
        min_confidence: Labels the teacher is less sure of than this (geometric mean of its
            answer tokens' probabilities) are not used at all.
        derived_min_confidence: The same floor for the questions the cloud derives
            (``guard.extra_questions``). They were not chosen for the student's doubt, so
            the student often answers them right already and a wrong label there teaches
            it an error: measured on 150 uplinked frames a shift (seed 0), the teacher's
            derived labels were 92-93% right on fog and novel but 78% on overexposed frames
            (the student: 91%), and 94% of those it gave with confidence >= 0.98 (two
            thirds of them).
        derived_student_below: A derived training question keeps its label only when the
            device's student answers it with less confidence than this (0: always):
            :meth:`RoundRunner._skip_what_the_student_knows
            <cdcca_ros.core.rounds.round.RoundRunner._skip_what_the_student_knows>`.
        pull_below: A label made from a subset of the tokens with less confidence than this
            asks the device for the rest of the sample's tokens (0: never); the sample waits
            for them, then is labelled again from all tokens.
        pull_wait_rounds: Rounds a requested sample waits; then its first label is used if
            it clears ``min_confidence``, else the sample is dropped.
        pull_fraction: Largest share of the partial samples labelled at once that are pulled
            (the least confident first): pulls add at most this share of full samples to
            the uplink.
    """

    min_confidence: float = 0.0
    derived_min_confidence: float = 0.98
    derived_student_below: float = 0.99
    pull_below: float = 0.98
    pull_wait_rounds: int = 2
    pull_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ('min_confidence', 'derived_min_confidence', 'derived_student_below',
                     'pull_below'):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f'labels.{name} must be in [0, 1), got {value}')
        if not 0.0 <= self.pull_fraction <= 1.0:
            raise ConfigError(f'labels.pull_fraction must be in [0, 1], got '
                              f'{self.pull_fraction}')
        if self.pull_wait_rounds < 0:
            raise ConfigError(f'labels.pull_wait_rounds must be >= 0, got '
                              f'{self.pull_wait_rounds}')

    def trusted(self, record: Record) -> bool:
        """Whether ``record``'s teacher label is sure enough to use (its floor:
        ``min_confidence``, or ``derived_min_confidence`` too for a derived question)."""
        floor = (max(self.min_confidence, self.derived_min_confidence) if record.parent
                 else self.min_confidence)
        return bool(record.label) and record.confidence >= floor


@dataclass
class AuditConfig:
    """The live audit: is the version the device runs worse than the one before it?

    Attributes:
        enabled: Watch audit samples and order rollbacks.
        alpha: One-sided significance of "worse" (exact McNemar on the audit samples that
            arrived since the version shipped, both versions answering each).
        min_samples: Audit samples needed before a version is judged.
        min_drop: Smallest fall (points) that orders a rollback.
    """

    enabled: bool = True
    alpha: float = 0.01
    min_samples: int = 30
    min_drop: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f'audit.alpha must be in (0, 1), got {self.alpha}')
        if self.min_samples < 1 or not (math.isfinite(self.min_drop) and self.min_drop >= 0):
            raise ConfigError(f'audit.min_samples={self.min_samples} must be >= 1 and '
                              f'audit.min_drop={self.min_drop} >= 0')


@dataclass
class GuardConfig:
    """The guarded round (see :mod:`cdcca_ros.core.rounds`).

    Attributes:
        enabled: False runs the paper's plain round: train on the round's samples only for
            ``akd.steps`` steps and ship every result (no memory, anchor, gate or audit).
        train: Steps, mixture and early stopping.
        gate: When a candidate ships.
        routing: The gate judges every held-out sample as a device with this coverage
            (:mod:`cdcca_ros.core.coverage`, the devices' ``guard.coverage_*``) answers a
            fresh frame like it: with the candidate where the frame is covered, with the
            shipped student elsewhere (anchor-like frames); None: every sample with the
            candidate (devices without coverage).
        labels: Which labels are trusted; token pulls.
        audit: Live audit and rollback orders.
        memory_bytes: Bound of the per-device replay memory.
        clusters: Largest number of memory clusters (replay balance, gate slices).
        val_fraction: Share of samples held out for early stopping.
        gate_fraction: Share of samples held out for the gate (audit samples: see
            ``audit_gate_fraction``).
        audit_gate_fraction: Share of the audit stream's samples held out for the gate and
            the live audit; the rest train like uplinked samples (1: every audit sample is
            held out).
        extra_questions: Most questions the cloud derives from each uplinked training
            sample and has the teacher answer on the same tokens (no uplink cost; see
            :mod:`cdcca_ros.core.rounds.extra_questions`).
        question_source: Who writes them: ``templates`` (the bundled world's; inert on
            other questions), ``none`` or ``module:function``.
        gate_questions: Most questions derived from each of the gate's held-out frames
            (0: none); the gate then judges every slice that holds some frame by frame (a
            frame's share of right answers, the sign test over frames): more evidence per
            held-out frame, the tests still counting independent frames.
        anchor: Anchor set: '' (the student's own ``anchor.safetensors`` if it ships one),
            ``'none'``, or a file (see :mod:`cdcca_ros.core.rounds.anchor`).
        anchor_limit: Anchor samples used at most.
        anchor_gate_fraction: Share of the anchor set held out for the gate (its other
            shares: ``val_fraction`` for early stopping, the rest trains).
        reset_after_refusals: After this many candidates refused for harm (a slice fell)
            since the last shipped one, the trained copy restarts from what the device holds
            (a copy that keeps harming has wandered off; RDumb's reset).
    """

    enabled: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    routing: CoverageConfig | None = field(default_factory=CoverageConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    memory_bytes: int = 64 << 20
    clusters: int = 6
    val_fraction: float = 0.1
    gate_fraction: float = 0.25
    audit_gate_fraction: float = 1.0
    extra_questions: int = 4
    question_source: str = 'templates'
    gate_questions: int = 4
    anchor: str = ''
    anchor_limit: int = 1024
    anchor_gate_fraction: float = 0.3
    reset_after_refusals: int = 4

    def __post_init__(self) -> None:
        if self.memory_bytes < 1024:
            raise ConfigError(f'memory_bytes must be >= 1024, got {self.memory_bytes}')
        if self.clusters < 1 or self.anchor_limit < 0 or self.reset_after_refusals < 1:
            raise ConfigError(f'clusters={self.clusters}, anchor_limit={self.anchor_limit}, '
                              f'reset_after_refusals={self.reset_after_refusals} out of range')
        if (self.val_fraction < 0 or self.gate_fraction < 0
                or self.val_fraction + self.gate_fraction >= 1.0):
            raise ConfigError(f'val_fraction={self.val_fraction} + gate_fraction='
                              f'{self.gate_fraction} must be in [0, 1)')
        from cdcca_ros.core.rounds.extra_questions import MAX_EXTRA_QUESTIONS, question_source

        for name in ('extra_questions', 'gate_questions'):
            if not 0 <= getattr(self, name) <= MAX_EXTRA_QUESTIONS:
                raise ConfigError(f'{name} must be in [0, {MAX_EXTRA_QUESTIONS}], got '
                                  f'{getattr(self, name)}')
        question_source(self.question_source)  # raises on an unknown one
        if not 0.0 <= self.audit_gate_fraction <= 1.0:
            raise ConfigError(f'audit_gate_fraction must be in [0, 1], got '
                              f'{self.audit_gate_fraction}')

    @classmethod
    def plain(cls, steps: int) -> GuardConfig:
        """The paper's round: ``steps`` steps on the round's samples, every result shipped."""
        return cls(enabled=False,
                   train=TrainConfig(max_steps=steps, min_steps=steps, eval_every=steps,
                                     patience=1, mix_new=1.0, mix_anchor=0.0,
                                     data_epochs=1e9),
                   gate=GateConfig(enabled=False), audit=AuditConfig(enabled=False),
                   val_fraction=0.0, gate_fraction=0.0, anchor='none', extra_questions=0,
                   gate_questions=0)

    def with_(self, **changes: Any) -> GuardConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GuardConfig:
        """The config a cloud node builds from its ``guard.*`` parameters (every one present:
        the node's table gives the defaults)."""
        if not params['guard.enabled']:
            return cls.plain(int(params['akd.steps']))
        p = {k[len('guard.'):]: v for k, v in params.items() if k.startswith('guard.')}
        return cls(
            enabled=True,
            train=TrainConfig(max_steps=p['max_steps'], data_epochs=p['data_epochs'],
                              min_steps=min(p['min_steps'], p['max_steps']),
                              mix_new=p['mix_new'], mix_anchor=p['mix_anchor'],
                              anchor_loss=p['anchor_loss'], l2sp=p['l2sp']),
            gate=GateConfig(enabled=p['gate'], alpha=p['alpha'], min_gain=p['min_gain'],
                            tolerance=p['tolerance'],
                            anchor_tolerance=p['anchor_tolerance'],
                            anchor_min_broken=p['anchor_min_broken'],
                            anchor_budget=p['anchor_budget'], gain_on=p['gain_on'],
                            new_clusters=p['gate_new_clusters'],
                            harm_alpha=p['harm_alpha'],
                            harm_correction=p['harm_correction'],
                            big_fall=p['big_fall']),
            routing=(CoverageConfig(margin=p['gate_coverage_margin']) if p['gate_routed']
                     else None),
            labels=LabelConfig(min_confidence=p['min_label_confidence'],
                               derived_min_confidence=p['derived_min_confidence'],
                               derived_student_below=p['derived_student_below'],
                               pull_below=p['pull_below'],
                               pull_fraction=p['pull_fraction']),
            audit=AuditConfig(enabled=p['audit'], alpha=p['audit_alpha'],
                              min_drop=p['audit_min_drop']),
            memory_bytes=int(p['memory_mb'] * (1 << 20)),
            reset_after_refusals=p['reset_after_refusals'],
            val_fraction=p['val_fraction'], gate_fraction=p['gate_fraction'],
            audit_gate_fraction=p['audit_gate_fraction'],
            extra_questions=p['extra_questions'], question_source=p['question_source'],
            gate_questions=p['gate_questions'],
            anchor=p['anchor'])
