"""Managed (lifecycle) nodes: the nodes that hold models, as nav2 and llama_ros run theirs.

``device_node`` and ``cloud_node`` are :class:`ManagedNode` s. Their transitions, driven through
the standard ``lifecycle_msgs`` services (``ros2 lifecycle set /robot1/device_node configure``,
a nav2 lifecycle manager) or by ``autostart``:

* **configure**: check the parameters that need the machine (the torch device) and load the
  model(s); a failure leaves the node unconfigured with the reason logged and on /diagnostics.
* **activate**: start answering (device) / running rounds (cloud).
* **deactivate**: stop that; the model stays loaded.
* **cleanup**: unload the model.
* **shutdown** (from any state): persist what must survive (the adapter in use, the cloud's
  per-device state) and unload; the process stays up, finalized, until it is stopped.

Every transition is logged, timed and reported on /diagnostics at once (``lifecycle_state``,
``last_transition``). With ``autostart`` (the default; launch argument and runner switch
``autostart``) the node configures and activates itself at start in a thread of its own, so
the node answers its parameter and lifecycle services while the model loads; a configure that
fails there is one FATAL line and the process exits, as a node that can never work does.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn

from cdcca_ros.nodes.process import fail, one_line

# The state each transition ends in when its step succeeds, and when it fails.
_OUTCOME: dict[str, tuple[str, str]] = {
    'configure': ('inactive', 'unconfigured'), 'activate': ('active', 'inactive'),
    'deactivate': ('inactive', 'active'), 'cleanup': ('unconfigured', 'inactive'),
    'shutdown': ('finalized', 'finalized'),
}
AUTOSTART_THREAD = 'model-loader'
"""Name of the autostart thread (it may be loading a model: nobody waits for it)."""


class ManagedNode(LifecycleNode):
    """A lifecycle node whose transitions run the subclass's steps (``_configure``,
    ``_activate``, ``_deactivate``, ``_cleanup``, ``_shutdown``): each timed, logged, any
    exception turned into a failed transition with its reason, and reported on /diagnostics
    through ``_report(lifecycle_state=...)``."""

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.last_transition = ''
        self.transition_error = ''
        self.transitions = 0
        self._autostarting = False  # a failure then becomes the one FATAL line, not an ERROR

    # ---------------------------------------------------------------- the subclass's steps
    def _configure(self) -> None:
        """Load and check; raise to refuse."""

    def _activate(self) -> None:
        """Start serving."""

    def _deactivate(self) -> None:
        """Stop serving, keep what is loaded."""

    def _cleanup(self) -> None:
        """Unload."""

    def _shutdown(self) -> None:
        """Persist and unload."""

    def _report(self, lifecycle_state: str | None = None) -> None:
        """Publish diagnostics now (``lifecycle_state``: the state being entered)."""

    # ---------------------------------------------------------------- lifecycle plumbing
    @property
    def lifecycle_state(self) -> str:
        """The current state's label (``unconfigured``, ``inactive``, ``active``,
        ``finalized``, or a transition state such as ``configuring``)."""
        return self._state_machine.current_state[1]

    def _transition(self, name: str, step: Callable[[], None]) -> TransitionCallbackReturn:
        t0 = time.monotonic()
        try:
            step()
        except Exception as err:  # noqa: BLE001 - a refused transition, with its reason
            self.transition_error = f'{name} failed: {one_line(err)}'
            self.last_transition = self.transition_error
            if not self._autostarting:
                self.get_logger().error(self.transition_error)
            result, state = TransitionCallbackReturn.FAILURE, _OUTCOME[name][1]
        else:
            self.last_transition = f'{name}: ok in {time.monotonic() - t0:.2f} s'
            self.get_logger().info(f'lifecycle {self.last_transition}')
            result, state = TransitionCallbackReturn.SUCCESS, _OUTCOME[name][0]
        self.transitions += 1
        try:
            self._report(lifecycle_state=state)
        except Exception as err:  # noqa: BLE001 - a report must not undo the transition
            self.get_logger().warning(f'diagnostics after {name}: {one_line(err)}')
        return result

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        return self._transition('configure', self._configure)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        return self._transition('activate', self._activate)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        return self._transition('deactivate', self._deactivate)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        return self._transition('cleanup', self._cleanup)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        return self._transition('shutdown', self._shutdown)

    def autostart(self, in_thread: bool, stopping: Callable[[], bool]) -> None:
        """Configure, then activate; a failure is fatal (:func:`fail`: one FATAL line, the
        process ends). ``in_thread``: in a daemon thread, so the executor keeps serving while
        a model loads; ``stopping`` tells that thread the node is going away."""
        def run() -> None:
            self._autostarting = True
            try:
                for name, trigger in (('configure', self.trigger_configure),
                                      ('activate', self.trigger_activate)):
                    if stopping():
                        return
                    if trigger() != TransitionCallbackReturn.SUCCESS:
                        if not stopping():
                            fail(self, self.transition_error or f'{name} failed')
                        return
            finally:
                self._autostarting = False
        if in_thread:
            threading.Thread(target=run, daemon=True, name=AUTOSTART_THREAD).start()
        else:
            run()
