"""The ``ask`` action of device_node: the answer streamed token by token, cancelable.

Beside the ``ask`` service (one request, one reply), ``device_node`` serves the action
``cdcca_ros/action/Ask`` under the same name: the goal is the service's request (question,
choices, optional image), each generated step comes back as feedback the moment the model
computed it (the token's text, id, probability, the step's entropy, the answer so far), and the
result is the :class:`~cdcca_ros.msg.Answer` (confidence, entropy, model version) with the
number of steps. A cancel is checked after every step: generation stops after the step in
progress, at most one token after the cancel was accepted (``Result.cancel_step`` and
``Result.steps`` say when).

Generation runs in a thread of its own per goal, never in the executor: on the one-thread
``events`` executor the cancel request is served while the model computes. Answers of the
action go through the same path as the service's (``answer`` topic, annotated image, UTS).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.task import Future

from cdcca_ros.action import Ask
from cdcca_ros.errors import GenerationCancelled
from cdcca_ros.models.base import GenerationStep


class Answerer(Protocol):
    """What the action needs of the node that serves it (``device_node``'s node)."""

    def answer(self, question_id: str, question: str, choices: list[str], image: Any,
               uplink: bool = True, *, on_step: Callable[..., None] | None = None
               ) -> tuple[Any, str]:
        """Answer one question (the ``ask`` service's path): the Answer (or None) and why."""


class _Goal:
    """Progress of one goal, shared by its generation thread and the cancel callback."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.steps = 0
        self.cancel_step: int | None = None
        self.text = ''


class AskActionServer:
    """Serves ``cdcca_ros/action/Ask`` for ``device_node`` (named like its service); ``node``
    is that rclpy node, an :class:`Answerer`."""

    def __init__(self, node: Any, name: str = 'ask') -> None:
        self._node = node
        self._answerer: Answerer = node
        self._goals: dict[bytes, _Goal] = {}
        self._lock = threading.Lock()
        self.goals_done = {'succeeded': 0, 'canceled': 0, 'aborted': 0}
        self.server = ActionServer(node, Ask, name, execute_callback=self._execute,
                                   goal_callback=self._on_goal,
                                   cancel_callback=self._on_cancel,
                                   callback_group=ReentrantCallbackGroup())

    def _on_goal(self, goal: Ask.Goal) -> GoalResponse:
        accepting = getattr(self._node, 'accepting_questions', None)
        if accepting is not None and not accepting():
            return GoalResponse.REJECT  # an inactive (lifecycle) node takes no goal
        return GoalResponse.ACCEPT

    def _on_cancel(self, handle: Any) -> CancelResponse:
        with self._lock:
            goal = self._goals.get(bytes(handle.goal_id.uuid))
            if goal is not None and goal.cancel_step is None:
                goal.cancel_step = goal.steps
        return CancelResponse.ACCEPT

    async def _execute(self, handle: Any) -> Ask.Result:
        goal = _Goal(handle)
        key = bytes(handle.goal_id.uuid)
        with self._lock:
            self._goals[key] = goal
        done: Future = Future()
        thread = threading.Thread(target=self._generate, args=(goal, done), daemon=True,
                                  name='ask-goal')
        thread.start()
        try:
            return await done
        finally:
            with self._lock:
                self._goals.pop(key, None)

    def _generate(self, goal: _Goal, done: Future) -> None:
        try:
            result = self._answer(goal)
        except Exception as err:  # noqa: BLE001 - the goal must end, whatever went wrong
            goal.handle.abort()
            self.goals_done['aborted'] += 1
            result = Ask.Result(success=False, message=f'{type(err).__name__}: {err}',
                                steps=goal.steps)
        done.set_result(result)

    def _answer(self, goal: _Goal) -> Ask.Result:
        handle, request = goal.handle, goal.handle.request

        def on_step(step: GenerationStep) -> None:
            if handle.is_cancel_requested:
                raise GenerationCancelled(f'canceled after {goal.steps} step(s)')
            text = step.texts[0]
            token = text[len(goal.text):] if text.startswith(goal.text) else text
            goal.text = text
            goal.steps = step.index + 1
            handle.publish_feedback(Ask.Feedback(
                step=step.index, token=token, token_id=step.token_ids[0],
                probability=step.probabilities[0], entropy=step.entropies[0],
                partial_answer=text, final=step.finished[0]))

        answer, error = (None, 'canceled before generation started') \
            if handle.is_cancel_requested else self._answerer.answer(
                request.question_id, request.question, list(request.choices),
                request.image if request.use_image else None, uplink=not request.no_uplink,
                on_step=on_step)
        if answer is None and handle.is_cancel_requested:
            handle.canceled()
            self.goals_done['canceled'] += 1
            return Ask.Result(success=False, message=error or 'canceled', steps=goal.steps,
                              cancel_step=goal.cancel_step or 0)
        if answer is None:
            handle.abort()
            self.goals_done['aborted'] += 1
            return Ask.Result(success=False, message=error, steps=goal.steps)
        handle.succeed()
        self.goals_done['succeeded'] += 1
        return Ask.Result(success=True, answer=answer, steps=goal.steps)

    def destroy(self) -> None:
        self.server.destroy()
