"""Helpers for tests that run nodes on a real ROS graph."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


def spin_until(executors: Iterable, condition: Callable[[], bool], timeout_s: float = 10.0,
               step_s: float = 0.02) -> bool:
    """Spin every executor in turn until ``condition()`` holds or ``timeout_s`` passes.

    Returns:
        Whether the condition held before the deadline.
    """
    executors = list(executors)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for executor in executors:
            executor.spin_once(timeout_sec=step_s)
        if condition():
            return True
    return condition()


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
