"""The teacher as a shared service that batches the requests of many rounds (no rclpy).

A round asks the teacher for two things: pseudo-labels (greedy answers with their token
probabilities) and AKD targets (query features and fused answer states, teacher-forced).
:class:`TeacherBatcher` takes such requests from any number of rounds at once, merges those
whose tokens stack (same kept-token count and layout, same generation length), and runs
one forward per merged batch (at most ``max_batch`` samples): requests that arrive while a
forward runs, or within ``wait_ms`` of the first one, share the next. On Ray it is the body
of an async actor, one per GPU (:mod:`~cdcca_ros.core.fleet.engine`).

A round reaches the service through :class:`TeacherProxy`, which stands where
:class:`~cdcca_ros.core.rounds.round.RoundRunner` expects the teacher model
(``answer_from_tokens``, ``forward_train``, ``vision_space``): the round's code is unchanged.
The proxy keeps each sample's targets, so the compression refit, which asks for the same
samples' targets in many batches, asks the service once per sample.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cdcca_ros.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.akd import TeacherBatch
    from cdcca_ros.models.base import MLLM, AnswerResult, VisionSpace

LABEL, TARGETS = 'label', 'targets'
Labels = list[tuple[str, list[float]]]        # per sample: answer text, its token probabilities
Targets = list[tuple['Tensor', 'Tensor']]     # per sample: query [L, C], fused [A, H] (float16)


@dataclass
class _Request:
    kind: str
    key: tuple[Any, ...]
    tokens: Tensor
    indices: Tensor | None
    questions: list[str]
    extra: Any  # max_new_tokens (labels) or the answers (targets)
    future: asyncio.Future[Any] = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class TeacherStats:
    """What the service did (per kind of request)."""

    requests: dict[str, int] = field(default_factory=lambda: {LABEL: 0, TARGETS: 0})
    forwards: dict[str, int] = field(default_factory=lambda: {LABEL: 0, TARGETS: 0})
    samples: dict[str, int] = field(default_factory=lambda: {LABEL: 0, TARGETS: 0})
    merged: dict[str, int] = field(default_factory=lambda: {LABEL: 0, TARGETS: 0})
    busy_s: dict[str, float] = field(default_factory=lambda: {LABEL: 0.0, TARGETS: 0.0})

    def to_dict(self, max_batch: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in (LABEL, TARGETS):
            f, n = self.forwards[kind], self.samples[kind]
            out[kind] = {'requests': self.requests[kind], 'forwards': f, 'samples': n,
                         'forwards_merged': self.merged[kind],
                         'samples_per_forward': n / f if f else None,
                         'occupancy': n / (f * max_batch) if f else None,
                         'busy_s': round(self.busy_s[kind], 4),
                         'ms_per_sample': 1000.0 * self.busy_s[kind] / n if n else None}
        return out


class TeacherBatcher:
    """Runs a teacher for many concurrent callers, batching their requests.

    Args:
        teacher: The teacher model (eval mode).
        max_batch: Most samples in one forward.
        wait_ms: How long the first request of a batch waits for others.
    """

    def __init__(self, teacher: MLLM, max_batch: int = 64, wait_ms: float = 5.0) -> None:
        if max_batch < 1 or wait_ms < 0:
            raise ConfigError(f'teacher max_batch={max_batch} must be >= 1 and '
                              f'wait_ms={wait_ms} >= 0')
        self.teacher = teacher
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_ms) / 1000.0
        self.stats = TeacherStats()
        self._queue: asyncio.Queue[_Request] | None = None
        self._runner: asyncio.Task[None] | None = None
        # One thread runs the forwards, so the event loop keeps taking requests meanwhile.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix='teacher')

    def space(self) -> dict[str, Any]:
        """The teacher's vision-token space (as a dict, for the workers' check)."""
        from dataclasses import asdict

        return asdict(self.teacher.vision_space())

    def report(self) -> dict[str, Any]:
        return self.stats.to_dict(self.max_batch)

    def reset(self) -> None:
        self.stats = TeacherStats()

    async def label(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                    max_new_tokens: int) -> Labels:
        """Greedy answers and their token probabilities, one per row."""
        key = (LABEL, tuple(tokens.shape[1:]), indices is None, int(max_new_tokens))
        return await self._submit(_Request(LABEL, key, tokens, indices, list(questions),
                                           int(max_new_tokens)))

    async def targets(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                      answers: Sequence[str]) -> Targets:
        """Teacher-forced AKD targets ``(query [L, C], fused [A_i, H])``, one per row."""
        if len(answers) != len(questions):
            raise ModelError(f'{len(questions)} questions but {len(answers)} answers')
        key = (TARGETS, tuple(tokens.shape[1:]), indices is None)
        return await self._submit(_Request(TARGETS, key, tokens, indices, list(questions),
                                           list(answers)))

    async def _submit(self, request: _Request) -> Any:
        if request.size != len(request.questions):
            raise ModelError(f'{request.size} token rows but {len(request.questions)} questions')
        loop = asyncio.get_running_loop()
        if self._queue is None or self._runner is None or self._runner.done():
            self._queue = asyncio.Queue()
            self._runner = loop.create_task(self._run())
        request.future = loop.create_future()
        self.stats.requests[request.kind] += 1
        await self._queue.put(request)
        return await request.future

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while sum(r.size for r in batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            while not queue.empty():  # whatever else is already waiting joins
                batch.append(queue.get_nowait())
            groups: dict[tuple[Any, ...], list[_Request]] = {}
            for r in batch:
                groups.setdefault(r.key, []).append(r)
            for requests in groups.values():
                try:
                    results = await loop.run_in_executor(self._pool, self._forward, requests)
                except Exception as err:  # noqa: BLE001 - every caller gets the error
                    for r in requests:
                        if not r.future.done():
                            r.future.set_exception(err)
                    continue
                for r, out in zip(requests, results, strict=True):
                    if not r.future.done():
                        r.future.set_result(out)

    def _forward(self, requests: list[_Request]) -> list[Any]:
        """Merged forwards over ``requests`` (one stackable group), split back per request."""
        import torch

        kind = requests[0].kind
        tokens = torch.cat([r.tokens for r in requests])
        indices = (None if requests[0].indices is None
                   else torch.cat([r.indices for r in requests]))
        questions = [q for r in requests for q in r.questions]
        extra = [a for r in requests for a in r.extra] if kind == TARGETS else requests[0].extra
        flat: list[Any] = []
        for start in range(0, len(questions), self.max_batch):
            stop = start + self.max_batch
            t0 = time.perf_counter()
            part_idx = None if indices is None else indices[start:stop]
            if kind == LABEL:
                flat += self._labels(tokens[start:stop], part_idx, questions[start:stop], extra)
            else:
                flat += self._targets(tokens[start:stop], part_idx, questions[start:stop],
                                      extra[start:stop])
            self.stats.busy_s[kind] += time.perf_counter() - t0
            self.stats.forwards[kind] += 1
            self.stats.samples[kind] += len(questions[start:stop])
            if stop - start > 0 and len(requests) > 1:
                self.stats.merged[kind] += 1
        out, start = [], 0
        for r in requests:
            out.append(flat[start:start + r.size])
            start += r.size
        return out

    def _labels(self, tokens: Tensor, indices: Tensor | None, questions: list[str],
                max_new_tokens: int) -> Labels:
        import torch

        model = self.teacher.torch_model
        model.eval()
        with torch.no_grad():
            results = self.teacher.answer_from_tokens(tokens.float(), indices, questions,
                                                      max_new_tokens=max_new_tokens)
        if len(results) != len(questions):
            raise ModelError(f'teacher {self.teacher.family} returned {len(results)} answers '
                             f'for {len(questions)} questions')
        return [(r.text.strip(), [float(p) for p in np.asarray(r.token_probs).reshape(-1)])
                for r in results]

    def _targets(self, tokens: Tensor, indices: Tensor | None, questions: list[str],
                 answers: list[str]) -> Targets:
        import torch

        from cdcca_ros.core.akd import split_targets

        model = self.teacher.torch_model
        model.eval()
        with torch.no_grad():
            out = self.teacher.forward_train(tokens.float(), indices, questions, answers)
        return split_targets(out)


# --- clients -------------------------------------------------------------------------------
class TeacherClient(Protocol):
    """How a worker reaches the teacher (blocking calls)."""

    def label(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
              max_new_tokens: int) -> Labels: ...

    def targets(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                answers: Sequence[str]) -> Targets: ...


class LocalTeacherClient:
    """The teacher in this process (no service: tests, a single worker without Ray)."""

    def __init__(self, teacher: MLLM, max_batch: int = 64) -> None:
        self.batcher = TeacherBatcher(teacher, max_batch=max_batch, wait_ms=0.0)
        self._lock = threading.Lock()

    def label(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
              max_new_tokens: int) -> Labels:
        with self._lock:
            return asyncio.run(self.batcher.label(tokens, indices, questions, max_new_tokens))

    def targets(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                answers: Sequence[str]) -> Targets:
        with self._lock:
            return asyncio.run(self.batcher.targets(tokens, indices, questions, answers))


class RayTeacherClient:
    """The teacher service's actors (round-robin over replicas)."""

    def __init__(self, handles: Sequence[Any]) -> None:
        if not handles:
            raise ConfigError('no teacher replica to reach')
        self.handles = list(handles)
        self._next = 0
        self._lock = threading.Lock()

    def _pick(self) -> Any:
        with self._lock:
            handle = self.handles[self._next % len(self.handles)]
            self._next += 1
        return handle

    def label(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
              max_new_tokens: int) -> Labels:
        import ray

        return ray.get(self._pick().label.remote(tokens, indices, list(questions),
                                                 int(max_new_tokens)))

    def targets(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                answers: Sequence[str]) -> Targets:
        import ray

        return ray.get(self._pick().targets.remote(tokens, indices, list(questions),
                                                   list(answers)))


# --- the proxy the round sees --------------------------------------------------------------
def _sample_key(tokens: Tensor, indices: Tensor | None, question: str, answer: str) -> bytes:
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(tokens.detach().to(torch.float16).contiguous().cpu().numpy().tobytes())
    if indices is not None:
        h.update(indices.detach().long().contiguous().cpu().numpy().tobytes())
    h.update(question.encode())
    h.update(b'\0')
    h.update(answer.encode())
    return h.digest()


class TeacherProxy:
    """Stands for the teacher model in a round; forwards to a :class:`TeacherClient`.

    Args:
        client: The service (or a local teacher).
        space: The teacher's vision-token space.
        cache_samples: Per-sample targets kept (least recently used dropped).
    """

    family = 'teacher-service'

    def __init__(self, client: TeacherClient, space: VisionSpace,
                 cache_samples: int = 8192) -> None:
        import torch

        self.client = client
        self._space = space
        self.torch_model = torch.nn.Module()  # no weights: the round's eval()/train() are no-ops
        self._cache: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
        self._labels: OrderedDict[bytes, tuple[str, list[float]]] = OrderedDict()
        self._cache_max = int(cache_samples)
        self._lock = threading.Lock()
        self.calls = {LABEL: 0, TARGETS: 0, 'cached': 0}

    def vision_space(self) -> VisionSpace:
        return self._space

    def answer_from_tokens(self, tokens: Tensor, indices: Tensor | None,
                           questions: Sequence[str], max_new_tokens: int = 6
                           ) -> list[AnswerResult]:
        """The teacher's greedy answers (from :meth:`prefetch_labels` when it fetched them)."""
        from cdcca_ros.models.base import AnswerResult

        t0 = time.perf_counter()
        labels = self._fetch_labels(tokens, indices, list(questions), max_new_tokens)
        ms = (time.perf_counter() - t0) * 1000.0
        return [AnswerResult(text=text, token_ids=[], step_probs=np.zeros((0, 0), np.float32),
                             token_probs=np.asarray(probs, np.float32), latency_ms=ms)
                for text, probs in labels]

    def prefetch_labels(self, items: Sequence[tuple[Tensor, Tensor | None, str]],
                        max_new_tokens: int) -> int:
        """Fetch the answers for ``(tokens [K, D], indices [K] or None, question)`` samples,
        many devices' at once: one request per stackable shape. Returns the requests made."""
        return self._prefetch(items, lambda t, i, q, _: self._fetch_labels(t, i, q,
                                                                            max_new_tokens))

    def prefetch_targets(self, items: Sequence[tuple[Tensor, Tensor | None, str, str]]) -> int:
        """Fetch the AKD targets for ``(tokens, indices, question, answer)`` samples, many
        devices' at once. Returns the requests made."""
        return self._prefetch(items, lambda t, i, q, a: self.forward_train(t, i, q, a))

    @staticmethod
    def _prefetch(items: Sequence[tuple[Any, ...]], fetch: Any) -> int:
        import torch

        groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for item in items:
            tokens, indices = item[0], item[1]
            groups.setdefault((tuple(tokens.shape), indices is None), []).append(item)
        for members in groups.values():
            tokens = torch.stack([m[0].float() for m in members])
            indices = (None if members[0][1] is None
                       else torch.stack([m[1].long() for m in members]))
            answers = [m[3] for m in members] if len(members[0]) > 3 else None
            fetch(tokens, indices, [m[2] for m in members], answers)
        return len(groups)

    def _fetch_labels(self, tokens: Tensor, indices: Tensor | None, questions: list[str],
                      max_new_tokens: int) -> list[tuple[str, list[float]]]:
        tag = f'\0label:{int(max_new_tokens)}'
        keys = [_sample_key(tokens[i], None if indices is None else indices[i], q, tag)
                for i, q in enumerate(questions)]
        with self._lock:
            have = {k: self._labels[k] for k in keys if k in self._labels}
        missing = [i for i, k in enumerate(keys) if k not in have]
        self.calls['cached'] += len(keys) - len(missing)
        if missing:
            self.calls[LABEL] += 1
            pick = _index(missing)
            got = self.client.label(tokens.detach().cpu()[pick],
                                    None if indices is None else indices.detach().cpu()[pick],
                                    [questions[i] for i in missing], max_new_tokens)
            if len(got) != len(missing):
                raise ModelError(f'the teacher service returned {len(got)} answers for '
                                 f'{len(missing)} questions')
            with self._lock:
                for i, item in zip(missing, got, strict=True):
                    have[keys[i]] = item
                    self._labels[keys[i]] = item
                while len(self._labels) > self._cache_max:
                    self._labels.popitem(last=False)
        return [have[k] for k in keys]

    def forward_train(self, tokens: Tensor, indices: Tensor | None, questions: Sequence[str],
                      answers: Sequence[str]) -> TeacherBatch:
        """The teacher's targets for one batch (only what AKD reads: query, fused, mask)."""
        from cdcca_ros.core.akd import stack_targets

        keys = [_sample_key(tokens[i], None if indices is None else indices[i], q, a)
                for i, (q, a) in enumerate(zip(questions, answers, strict=True))]
        with self._lock:
            have = {k: self._cache[k] for k in keys if k in self._cache}
            for k in have:
                self._cache.move_to_end(k)
        missing = [i for i, k in enumerate(keys) if k not in have]
        self.calls['cached'] += len(keys) - len(missing)
        if missing:
            self.calls[TARGETS] += 1
            pick = _index(missing)
            got = self.client.targets(tokens.detach().cpu()[pick],
                                      None if indices is None else indices.detach().cpu()[pick],
                                      [questions[i] for i in missing],
                                      [answers[i] for i in missing])
            with self._lock:
                for i, item in zip(missing, got, strict=True):
                    have[keys[i]] = item
                    self._cache[keys[i]] = item
                while len(self._cache) > self._cache_max:
                    self._cache.popitem(last=False)
        return stack_targets([have[k] for k in keys])


def _index(rows: list[int]) -> Any:
    import torch

    return torch.as_tensor(rows, dtype=torch.long)

