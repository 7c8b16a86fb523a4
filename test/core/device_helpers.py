"""A tiny device and the cloud's side of its deltas, for the DeviceRuntime tests (seeded).

A tiny BLIP-2 (LoRA on the language model and the Q-Former) plays the device; deltas are made
the cloud's way (error-feedback view, codec, Ed25519 seal) without the training.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import VOCAB

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.device_runtime import DeviceRuntime
from cdcca_ros.core.updates import DeltaEnvelope, seal_delta

DEVICE = 'robot1'


def save_student(path: Path) -> Path:
    """Save the tiny student (its trainable set configured) to ``path``."""
    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig

    model = build_tiny('blip2', VOCAB, seed=2, qformer_layers=1, dropout=0.0)
    model.configure_trainable(TrainableConfig(
        lora_r=4, lora_alpha=8, lora_targets=('q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1',
                                              'fc2', 'query', 'value')))
    model.save(path)
    return path


def load(path):
    """The model saved at ``path``."""
    from cdcca_ros.models import bundled

    return bundled.load(str(path))


class Cloud:
    """The cloud's side for one device: error-feedback view, compress, seal."""

    def __init__(self, base: dict[str, torch.Tensor], key, codec: str = 'fp16') -> None:
        self.ef = dwc.ErrorFeedback(base)
        self.key = key
        self.codec = dwc.get_codec(codec)
        self.version = 0

    def make(self, trained: dict[str, torch.Tensor]) -> DeltaEnvelope:
        base_hash = self.ef.view_hash()
        delta = dwc.compute_delta(trained, self.ef.view)
        c = dwc.compress(delta, self.codec)
        self.ef.commit(delta, c.decoded)
        self.version += 1
        return seal_delta(self.key, device_id=DEVICE, round=self.version,
                          base_version=self.version - 1, base_hash=base_hash,
                          new_version=self.version, new_hash=self.ef.view_hash(),
                          codec=self.codec.name, payload=c.payload)

    def step(self, seed: int, scale: float = 0.05) -> DeltaEnvelope:
        g = torch.Generator().manual_seed(seed)
        trained = {k: v + torch.randn(v.shape, generator=g) * scale
                   for k, v in self.ef.view.items()}
        return self.make(trained)


def runtime(student_dir, keys, state_dir=None, **kwargs) -> DeviceRuntime:
    """A runtime on a fresh load of the student, trusting ``keys``' public key."""
    return DeviceRuntime(load(student_dir), DEVICE, keys[1], state_dir, **kwargs)


def model_hash(rt: DeviceRuntime) -> str:
    """The hash of the trainable weights in the runtime's model (not its own copy)."""
    return wire.state_dict_hash(rt.model.trainable_state_dict())
