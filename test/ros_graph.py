"""Helpers for tests that run nodes on a real ROS graph."""
from __future__ import annotations

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
