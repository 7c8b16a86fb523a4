"""Hot-apply (issue 5): time of ``DeviceRuntime.apply`` relative to one answer, answers lost.

Deltas are made the cloud's way, minus the training: a LoRA-like random change of the student's
trainable set (Gaussian, 5% of each tensor's RMS; the zero-initialised LoRA ``B`` matrices get
a small absolute change), compressed with the cloud node's default codec and byte budget,
committed to a cloud-side :class:`~cdcca_ros.core.dwc.ErrorFeedback` view and sealed with
Ed25519 (compact payloads, as the cloud node sends them), so each delta names the base the
device holds after the previous one. The device persists its adapter (a state folder, as
``device_node`` does) and runs its probe as the node does (``probe_trace``).

1. Sequential: answer, then apply the next delta, alternately; figure = median apply time /
   median answer time. Each apply reports its own steps (``ApplyReport.extra['steps_ms']``:
   gate = verify + decode + checks, build, finite, hash, swap, probe); before each apply the
   gate's verify and decode are also timed alone on a copy, and so is what the background
   writer does after apply returned (persist). For comparison, the path before issue 5's
   rework is timed on copies too (per-tensor build / finite / hash, a full-answer probe,
   synchronous persist): rows marked ``before:``.
2. Concurrent: a thread answers without pause while the main thread applies deltas; every
   answer that raises, returns non-finite probabilities or takes longer than the timeout is
   lost. The time the model lock was held per apply is reported too.
"""
from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cdcca_ros.bench.common import (
    BenchContext,
    BenchResult,
    Target,
    camera_size,
    describe_ms,
    device_params,
    median,
    ms_since,
    ratio,
    timed_ms,
    world_samples,
)

NAME = 'apply'
DESCRIPTION = 'hot-apply time relative to one answer, and answers lost while applying'
TARGETS = (Target('apply_over_answer', '<=', 0.5, 'issue 5'),
           Target('answers_lost', '==', 0, 'issue 5'))
RELATIVE_CHANGE = 0.05
ZERO_INIT_STD = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--applies', type=int, default=None,
                        help='deltas applied in the sequential phase (default 30, quick 3)')
    parser.add_argument('--concurrent', type=int, default=None,
                        help='deltas applied while answering (default 20, quick 3)')
    parser.add_argument('--timeout-factor', type=float, default=20.0,
                        help='an answer is lost when slower than this x the median answer '
                             '(at least 1 s)')


def delta_stream(base: dict[str, Any], private: Any, device_id: str, codec_name: str,
                 budget: int | None, seed: int) -> Iterator[tuple[Any, Any]]:
    """Endless sealed deltas in version order: ``(envelope, compress stats)``."""
    import torch

    from cdcca_ros.core import dwc
    from cdcca_ros.core.updates import seal_delta

    feedback = dwc.ErrorFeedback(base)
    trained = {k: v.detach().clone() for k, v in base.items()}
    gen = torch.Generator().manual_seed(seed)
    version = 0
    hash_ = feedback.view_hash()
    codec = dwc.get_codec(codec_name)
    while True:
        for t in trained.values():
            rms = float(t.float().pow(2).mean().sqrt()) if t.numel() else 0.0
            std = RELATIVE_CHANGE * rms if rms > 0 else ZERO_INIT_STD
            t += torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * std
        delta = dwc.compute_delta(trained, feedback.view)
        # Compact, as the cloud node sends them (the device decodes with its trainable set).
        compressed = dwc.compress(delta, codec, budget, self_describing=False)
        feedback.commit(delta, compressed.decoded)
        new_hash = feedback.view_hash()
        env = seal_delta(private, device_id=device_id, round=version + 1, base_version=version,
                         base_hash=hash_, new_version=version + 1, new_hash=new_hash,
                         codec=compressed.codec.name, payload=compressed.payload)
        version, hash_ = version + 1, new_hash
        yield env, compressed.stats


def _breakdown(runtime: Any, env: Any, public: Any, scratch: Path) -> dict[str, float]:
    """Steps timed alone on copies (the runtime is not changed): the gate's verify and
    decode, the background persist, and the pre-rework path (``before_*``)."""
    from cdcca_ros.core import dwc, wire
    from cdcca_ros.core.device import persist

    model = runtime.model
    out: dict[str, float] = {}
    out['verify_ms'], _ = timed_ms(lambda: env.verify(public))
    current = runtime.weights
    spec = current.tensors
    out['decode_ms'], delta = timed_ms(lambda: dwc.get_codec(env.codec).decode(env.payload,
                                                                               spec=spec))
    candidate = current.plus(delta)
    snapshot = persist.AdapterSnapshot(runtime.device_id, env.new_version, env.round,
                                       candidate.digest(), candidate)
    out['persist_ms'], _ = timed_ms(lambda: persist.write_adapter(scratch, snapshot))
    # Before: clone the state dict, per-tensor Eq. 8, finite check and hash, full-answer probe.
    out['before_state_dict_ms'], base = timed_ms(model.trainable_state_dict)
    out['before_build_ms'], built = timed_ms(lambda: dwc.apply_delta(base, delta))
    out['before_finite_ms'], _ = timed_ms(lambda: all(bool(t.isfinite().all())
                                                      for t in built.values() if t.numel()))
    out['before_hash_ms'], _ = timed_ms(lambda: wire.state_dict_hash(built))
    with runtime.lock:
        out['before_probe_ms'], _ = timed_ms(lambda: model.answer(
            [runtime.probe_image], [runtime.probe_question],
            max_new_tokens=runtime.max_new_tokens))
    return out


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring)."""
    from cdcca_ros.core import dwc
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.errors import CdccaError
    from cdcca_ros.nodes.tables import defaults
    from cdcca_ros.sim.domains import DRIFTED, SOURCE

    n_seq = ctx.args.applies or (3 if ctx.quick else 30)
    n_conc = ctx.args.concurrent or (3 if ctx.quick else 20)
    params = device_params()
    cloud = defaults('cloud_node')
    private, public = generate_keypair()
    runtime = DeviceRuntime(ctx.models.student(), 'robot1', public, ctx.workdir / 'device',
                            probe_question=params['probe_question'],
                            trace_probe=params['probe_trace'],
                            shadow_probe=params['probe_shadow'],
                            max_new_tokens=params['max_new_tokens'])
    base = runtime.model.trainable_state_dict()
    stream = delta_stream(base, private, 'robot1', cloud['dwc.codec'],
                          cloud['dwc.budget_bytes'], ctx.seed)
    envelopes = [next(stream) for _ in range(n_seq + n_conc)]
    samples = world_samples(ctx.seed, (SOURCE,) + DRIFTED, 2, camera_size())
    images = [(s.image, s.question) for s in samples]
    scratch = ctx.workdir / 'persist-scratch'

    # 1. sequential: answer / apply alternately, plus the step-by-step breakdown.
    for image, question in images[:2]:
        runtime.answer(image, question)  # warm-up
    answer_ms: list[float] = []
    apply_ms: list[float] = []
    lock_ms: list[float] = []
    steps: dict[str, list[float]] = {}
    probe_tv: list[float] = []
    probe_modes: set[str] = set()
    failures: list[str] = []
    for k in range(n_seq):
        image, question = images[k % len(images)]
        t, _ = timed_ms(lambda i=image, q=question: runtime.answer(i, q))
        answer_ms.append(t)
        env, _ = envelopes[k]
        for key, value in _breakdown(runtime, env, public, scratch).items():
            steps.setdefault(key, []).append(value)
        try:
            report = runtime.apply(env)
        except CdccaError as err:
            failures.append(f'sequential apply {k}: {err}')
            continue
        apply_ms.append(report.apply_ms)
        lock_ms.append(report.swap_ms)
        probe_tv.append(report.extra['probe_tv'])
        probe_modes.add(report.extra.get('probe_mode', 'eager'))
        for key, value in report.extra['steps_ms'].items():
            steps.setdefault(key, []).append(value)
        # The background write would otherwise share the CPU (and the GIL) with the next
        # timed answer; its cost on answers shows in the concurrent phase.
        runtime.flush(timeout=30.0)
    med_answer = median(answer_ms)

    # 2. concurrent: answers without pause while deltas are applied.
    timeout_ms = max(1000.0, ctx.args.timeout_factor * med_answer)
    stop = threading.Event()
    answers: list[tuple[float, float, str]] = []  # (start, ms, outcome)

    def answer_loop() -> None:
        i = 0
        while not stop.is_set():
            image, question = images[i % len(images)]
            i += 1
            t0 = time.perf_counter()
            try:
                sample = runtime.answer(image, question)
                outcome = 'ok' if np.isfinite(sample.step_probs).all() else 'non_finite'
            except Exception as err:  # noqa: BLE001 - any failure is a lost answer
                outcome = f'error: {type(err).__name__}: {err}'
            ms = ms_since(t0)
            if outcome == 'ok' and ms > timeout_ms:
                outcome = 'timeout'
            answers.append((t0, ms, outcome))

    thread = threading.Thread(target=answer_loop, daemon=True)
    thread.start()
    windows: list[tuple[float, float]] = []
    conc_apply_ms: list[float] = []
    conc_lock_ms: list[float] = []
    time.sleep(3 * med_answer / 1000.0)
    for k in range(n_seq, n_seq + n_conc):
        env, _ = envelopes[k]
        t0 = time.perf_counter()
        try:
            report = runtime.apply(env)
        except CdccaError as err:
            failures.append(f'concurrent apply {k}: {err}')
            continue
        windows.append((t0, time.perf_counter()))
        conc_apply_ms.append(report.apply_ms)
        conc_lock_ms.append(report.swap_ms)
        time.sleep(2 * med_answer / 1000.0)
    time.sleep(3 * med_answer / 1000.0)
    stop.set()
    thread.join(timeout=timeout_ms / 1000.0 + 10.0)
    lost = [a for a in answers if a[2] != 'ok']
    during = [ms for start, ms, _ in answers
              if any(a <= start + ms / 1000.0 and start <= b for a, b in windows)]
    outside = [ms for start, ms, _ in answers
               if not any(a <= start + ms / 1000.0 and start <= b for a, b in windows)]

    persisted = runtime.flush(timeout=30.0)
    stats = [s for _, s in envelopes]
    step_med = {k.removesuffix('_ms'): median(v) for k, v in steps.items()}
    before = (step_med['gate'] + step_med['before_state_dict'] + step_med['before_build']
              + step_med['before_finite'] + step_med['before_hash'] + step_med['swap']
              + step_med['before_probe'] + step_med['persist'])
    summary = {
        'apply_over_answer': ratio(median(apply_ms), med_answer),
        'lock_over_answer': ratio(median(lock_ms), med_answer),
        'answers_lost': len(lost),
        'answers_during_apply': len(during),
        'answers_total': len(answers),
        'apply_failures': len(failures),
        'apply_ms': median(apply_ms),
        'lock_held_ms': median(lock_ms),
        'answer_ms': med_answer,
        'apply_over_answer_before': ratio(before, med_answer),
        'persisted_latest': bool(persisted and runtime.persisted_version == runtime.version),
        'probe_tv_median': median(probe_tv),
        'probe_mode': '/'.join(sorted(probe_modes)),
        'probe_shadow': runtime.probe_shadow,
        'payload_bytes': float(np.mean([s.nbytes for s in stats])),
        'bits_per_param': float(np.mean([s.bits_per_param for s in stats])),
    }
    labels = [('gate', 'gate (verify + decode + checks)'), ('verify', '  verify (alone)'),
              ('decode', '  decode (alone)'), ('build', 'build (Eq. 8, flat)'),
              ('finite', 'finite (flat)'), ('hash', 'hash (flat)'), ('swap', 'swap (copy_)'),
              ('probe', f'probe (1 step, cached tokens, {"/".join(sorted(probe_modes))})')]
    rows: list[list[Any]] = [['answer', med_answer, 1.0],
                             ['apply (DeviceRuntime.apply)', median(apply_ms),
                              summary['apply_over_answer']],
                             [f'  lock held (swap{"" if runtime.probe_shadow else " + probe"})',
                              median(lock_ms),
                              summary['lock_over_answer']]]
    rows += [[f'    step: {label}', step_med[k], ratio(step_med[k], med_answer)]
             for k, label in labels]
    rows += [['  persist (background, after apply)', step_med['persist'],
              ratio(step_med['persist'], med_answer)]]
    rows += [[f'before: {k.removeprefix("before_")}', v, ratio(v, med_answer)]
             for k, v in step_med.items() if k.startswith('before_')]
    rows += [['before: apply (sum of steps)', before, summary['apply_over_answer_before']],
             ['answer during an apply (median)', median(during), ratio(median(during),
                                                                     med_answer)],
             ['answer during an apply (max)', max(during) if during else math.nan,
              ratio(max(during), med_answer) if during else math.nan]]
    return BenchResult(
        summary=summary, headers=['step', 'median ms', 'x answer'], rows=rows,
        detail={'answer_ms': describe_ms(answer_ms), 'apply_ms': describe_ms(apply_ms),
                'lock_held_ms': describe_ms(lock_ms), 'steps_ms': {
                    k: describe_ms(v) for k, v in steps.items()},
                'concurrent': {'apply_ms': describe_ms(conc_apply_ms),
                               'lock_held_ms': describe_ms(conc_lock_ms),
                               'answer_ms_during_apply': describe_ms(during),
                               'answer_ms_otherwise': describe_ms(outside),
                               'timeout_ms': timeout_ms,
                               'lost': [a[2] for a in lost][:20]},
                'failures': failures[:20],
                'delta': {'codec': cloud['dwc.codec'], 'budget_bytes': cloud['dwc.budget_bytes'],
                          'num_params': dwc.num_params(base),
                          'codec_chosen': stats[0].codec if stats else None,
                          'rel_l2_error': float(np.mean([s.rel_l2_error for s in stats]))},
                'probe_tv': describe_ms(probe_tv),
                'persisted_version': runtime.persisted_version, 'version': runtime.version,
                'before': 'gate + cloned state dict + per-tensor build, finite check and '
                          'hash + swap + full-answer probe + synchronous persist'},
        notes=[f'{n_seq} sequential applies (answer/apply alternately), {n_conc} applies '
               f'while a thread answered {len(answers)} times without pause',
               f'deltas: LoRA-like random change, {cloud["dwc.codec"]} codec under the cloud '
               f'default budget of {cloud["dwc.budget_bytes"]} B, '
               f'{summary["bits_per_param"]:.2f} bit/param, signed and persisted '
               '(in the background, after apply returns)',
               f'lost = raised, non-finite, or slower than {timeout_ms:.0f} ms'])
