"""The simulated robot of the adaptation benches: a device runtime and its UTS pipeline
beside a cloud runtime, answering, uplinking, answering the cloud's token pulls, carrying out
rollback orders and applying the deltas of the rounds it triggers.

Used by :mod:`cdcca_ros.bench.stream` (the continual bench) and
:mod:`cdcca_ros.bench.adaptation` (the paper's tables); it imports neither.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.questions import answer_of

if TYPE_CHECKING:  # pragma: no cover

    from cdcca_ros.core.cloud_runtime import CloudRuntime
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.sim.world import Sample

DEVICE_ID = 'robot1'
UPLINKS = ('uts', 'all')          # UTS stage 1 + 2 (device defaults) / every sample, all tokens


class Robot:
    """A simulated robot beside a cloud: answers, uplinks, pulls, rounds, applies.

    Args:
        device: The device runtime.
        pipeline: Its uplink: an :class:`~cdcca_ros.core.uplink.pipeline.UplinkPipeline`
            (token packings, ``basis`` included: the node's) or a bare
            :class:`~cdcca_ros.core.uts.UtsPipeline` (stage 1 and 2, audit stream).
        ring: Its token ring (pulls).
        cloud: The cloud runtime.
        uplink: ``'uts'`` (what the pipeline selects), ``'all'`` (every sample, every token)
            or ``'stage1'`` (what stage 1 selects, every token).
        basis: The cloud's token basis (decodes ``basis``-packed samples, as the cloud node).
    """

    def __init__(self, device: DeviceRuntime, pipeline: Any, ring: Any, cloud: CloudRuntime,
                 uplink: str = 'uts', basis: Any = None) -> None:
        if uplink not in UPLINKS + ('stage1',):
            raise ConfigError(f'uplink must be one of {UPLINKS + ("stage1",)}, got {uplink!r}')
        self.device, self.pipeline, self.ring, self.cloud = device, pipeline, ring, cloud
        self.uplink = uplink
        self.basis = basis
        # Whole samples and pulls: the node packs them ecq under the basis packing.
        self.pack_dtype = getattr(pipeline, 'pull_dtype', None) or pipeline.cfg.pack_dtype
        self.space = device.model.vision_space()
        self.truth: dict[str, Sample] = {}
        self.label_hits: list[float] = []
        self.derived_hits: list[float] = []   # the cloud's derived questions, exact match
        self.counts = {'uplink_bytes': 0, 'pull_bytes': 0, 'downlink_bytes': 0, 'uplinked': 0,
                       'audit_samples': 0, 'shipped': 0, 'refused': 0, 'rollbacks': 0,
                       'local_rollbacks': 0}
        self._local_seen = 0

    def answer(self, sample: Sample, sid: str, now: float, truth: bool = False) -> list[str]:
        """Answer one sample and uplink it if selected; returns events (local rollbacks)."""
        from cdcca_ros.core.uts import pack_tokens, unpack_tokens, uplink_bytes

        answered = self.device.answer(sample.image, sample.question)
        tokens = indices = None
        audit = False
        if self.uplink == 'all' or (self.uplink == 'stage1' and self.pipeline.selector.offer(
                answered.entropy_mean)):
            packed = pack_tokens(answered.tokens.detach().cpu(), self.pack_dtype)
            tokens = unpack_tokens(packed)
            self.counts['uplink_bytes'] += uplink_bytes(len(packed.data), len(packed.scale), 0)
        elif self.uplink == 'uts':
            result = self.pipeline.process(answered.step_probs, answered.tokens)
            if result is not None:
                uts = getattr(result, 'uts', result)  # UplinkSample or UtsResult
                tokens, audit = self._decoded(result), result.audit
                indices = None if audit else uts.kept_indices
                self.counts['uplink_bytes'] += result.uplink_bytes
                self.ring.put(sid, answered.tokens, uts.kept_indices)
        events = []
        for event in self.device.local_rollbacks[self._local_seen:]:
            self.cloud.rolled_back(DEVICE_ID, event['version'], event['hash'])
            self.counts['local_rollbacks'] += 1
            events.append('local_rollback')
        self._local_seen = len(self.device.local_rollbacks)
        if tokens is not None:
            self.device.note_uplinked(answered.tokens)
            self.cloud.add_sample(DEVICE_ID, tokens, indices, sample.question,
                                  self.space.num_tokens, self.space.dim, sid,
                                  device_answer=answered.text, device_version=answered.version,
                                  audit=audit, label=sample.answer if truth else None, now=now,
                                  answer=partial(answer_of, sample.scene) if truth else None)
            self.counts['uplinked'] += 1
            self.counts['audit_samples'] += int(audit)
            self.truth[sid] = sample
        return events

    def _decoded(self, result: Any) -> Any:
        """The tokens of an uplinked sample as the cloud decodes them."""
        from cdcca_ros.core.uplink.pipeline import BASIS, decode_tokens
        from cdcca_ros.core.uts import unpack_tokens

        packed = getattr(result, 'uts', result).packed
        if packed.dtype != BASIS:
            return unpack_tokens(packed)
        tokens, _ = decode_tokens(BASIS, packed.data, list(packed.scale), [],
                                  self.space.num_tokens, self.space.dim,
                                  result.basis_version, self.basis)
        return tokens

    def round(self) -> list[tuple[str, Any]]:
        """The cloud's turn: audit (and a rollback it orders), labels and token pulls, the
        round, the delta applied. Returns ``(event, round result or None)`` pairs."""
        from cdcca_ros.core.uts import pack_tokens, unpack_tokens, uplink_bytes

        out: list[tuple[str, Any]] = []
        audit = self.cloud.audit(DEVICE_ID)
        if audit is not None and audit.rollback is not None:
            version = self.device.apply_rollback(audit.rollback)
            self.cloud.rolled_back(DEVICE_ID, version, audit.rollback.to_hash)
            self.counts['rollbacks'] += 1
            out.append(('rollback', None))
        for pulled in self.cloud.label(DEVICE_ID):
            rest = self.ring.rest(pulled)
            if rest is None:
                self.cloud.pull_unavailable(DEVICE_ID, pulled)
                continue
            packed = pack_tokens(rest[0], self.pack_dtype)
            self.counts['pull_bytes'] += uplink_bytes(len(packed.data), len(packed.scale),
                                                      int(rest[1].numel()))
            self.cloud.add_pulled(DEVICE_ID, pulled, unpack_tokens(packed), rest[1])
        self.cloud.label(DEVICE_ID)  # the pulled samples, from all their tokens now
        self._score_labels()
        result = self.cloud.run_round(DEVICE_ID)
        if result is None:
            return out
        if result.envelope is not None:
            self.device.apply(result.envelope)
            self.counts['downlink_bytes'] += len(result.envelope.payload)
            self.counts['shipped'] += 1
            out.append(('shipped', result))
        else:
            self.counts['refused'] += 1
            out.append(('refused', result))
        return out

    def _score_labels(self) -> None:
        """Score the labels the next round will use on samples it has not used (labelled
        now, pulls included) against the truth: VQA accuracy for the uplinked questions
        (:attr:`label_hits`), exact match for the cloud's derived ones
        (:attr:`derived_hits`)."""
        from cdcca_ros.core.rounds.round import normalise
        from cdcca_ros.sim.scoring import vqa_accuracy

        state = self.cloud.device(DEVICE_ID)
        for r in state.memory.select(since_seq=state.round_seq):
            sample = self.truth.get(r.parent or r.sample_id)
            if sample is None or not (r.labelled and r.label and r.pull != 'requested'):
                continue
            if r.parent:
                truth = answer_of(sample.scene, r.question)
                self.derived_hits.append(float(truth is not None
                                               and normalise(r.label) == normalise(truth)))
            else:
                self.label_hits.append(vqa_accuracy(r.label, sample.answers))

    def label_accuracy(self) -> float | None:
        """VQA accuracy (%) of the labels the cloud trained on, against the truth."""
        return 100.0 * float(np.mean(self.label_hits)) if self.label_hits else None

    def derived_label_accuracy(self) -> float | None:
        """Share (%) of the derived questions' labels that are the true answer."""
        return 100.0 * float(np.mean(self.derived_hits)) if self.derived_hits else None

    def fill(self, record: Any) -> None:
        """Copy the counters into a bench record (a :class:`~cdcca_ros.bench.stream.RunRecord`)."""
        for key, value in self.counts.items():
            setattr(record, key, value)
        record.label_accuracy = self.label_accuracy()
        record.derived_label_accuracy = self.derived_label_accuracy()


# --- figures ----------------------------------------------------------------------------------
