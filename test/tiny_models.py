"""Tiny models with known behaviour, shared by the loop tests (core and ROS graph)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB = ['what', 'color', 'is', 'the', 'circle', 'square', 'red', 'green', 'blue', '?']
QUESTION = 'what color is the circle?'


def random_images(n: int = 6, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def red_teacher_and_student(student_dir: Path, images: list[np.ndarray]):
    """A tiny BLIP-2 teacher trained to answer 'red' to everything, and a saved student.

    The student (half the Q-Former, LoRA configured) shares the teacher's vision encoder and
    answers something else; it is saved to ``student_dir`` so device and cloud load the same
    base. Returns the teacher.
    """
    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig

    torch.manual_seed(0)
    teacher = build_tiny('blip2', VOCAB, seed=1, qformer_layers=2, dropout=0.0)
    params = [p for p in teacher.torch_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    tokens = teacher.vision_tokens(images)
    teacher.torch_model.train()
    for _ in range(40):
        out = teacher.forward_train(tokens, None, [QUESTION] * len(images), ['red'] * len(images))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    teacher.torch_model.eval()
    assert teacher.answer(images[:1], [QUESTION])[0].text == 'red'
    student = build_tiny('blip2', VOCAB, seed=2, qformer_layers=1, dropout=0.1,
                         vision_from=teacher)
    student.configure_trainable(TrainableConfig(lora_r=4, lora_alpha=8))
    student.save(student_dir)
    return teacher
