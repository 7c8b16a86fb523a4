"""Fixtures for node tests: a small saved device model and an executor running nodes."""
from __future__ import annotations

import threading

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


class Spinner:
    """A multi-threaded executor spinning some nodes in a background thread."""

    def __init__(self, context, nodes) -> None:
        from rclpy.executors import MultiThreadedExecutor

        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.nodes = list(nodes)
        for n in self.nodes:
            self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        for n in reversed(self.nodes):
            n.destroy_node()
        self.thread.join(timeout=5.0)
