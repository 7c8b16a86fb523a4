"""Fixtures for node tests: a small saved device model (the executor helper is in ros_graph)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope='session')
def tiny_student_dir(tmp_path_factory):
    """A tiny BLIP-2 over the synthetic world's vocabulary, saved like a real model.

    Its answers are meaningless (random init); node tests check plumbing, not accuracy.
    """
    import torch

    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig
    from cdcca_ros.sim.questions import vocabulary

    torch.manual_seed(0)
    model = build_tiny('blip2', vocabulary(), seed=0)
    model.configure_trainable(TrainableConfig(lora_r=4, lora_alpha=8))
    path = tmp_path_factory.mktemp('models') / 'student'
    model.save(path)
    return path


@pytest.fixture(scope='session')
def red_models(tmp_path_factory):
    """``tiny_models``' red-answering teacher, its saved student folder and the images: trained
    once per session for every node test that runs a round (training takes seconds)."""
    from tiny_models import random_images, red_teacher_and_student

    images = random_images()
    path = tmp_path_factory.mktemp('red_student')
    return red_teacher_and_student(path, images), path, images
