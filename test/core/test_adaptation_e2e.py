"""End to end on the bundled models: one guarded cloud round (the cloud node's defaults) makes
the device better where its camera drifted, and costs the source domain no more than a bound.

The device (``bundled:student``, trained on the source domain) answers a stream of fog frames
with some source frames among them (a robot still sees where it came from) and uplinks every
answered sample's vision tokens; the cloud (``bundled:teacher``, the student's anchor set, every
other setting the ``cloud_node`` default) pseudo-labels them, trains with replay, anchor and
early stopping, gates the candidate on samples it never trained on, compresses the delta with
the default codec and signs it; the device verifies and hot-applies it. Only the public API
runs: ``CloudRuntime.add_sample / run_round`` and ``DeviceRuntime.answer / apply``.

Accuracy is the VQA accuracy of the device's own answers on held-out samples (the evaluation
range, disjoint from the stream), before and after the round, on the same samples: paired.
Everything is seeded; about 15 s here.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cdcca_ros.bench.common import BENCH_START, EVAL_START, model_image_size
from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
from cdcca_ros.core.device_runtime import DeviceRuntime
from cdcca_ros.core.rounds.anchor import resolve_anchor
from cdcca_ros.core.wire import generate_keypair
from cdcca_ros.nodes.tables import defaults
from cdcca_ros.sim.domains import SOURCE
from cdcca_ros.sim.scoring import vqa_accuracy
from cdcca_ros.sim.world import World

SEED = 0
DRIFTED = 'fog'            # the bundled student's weakest drifted domain (~45% DA)
STREAM_DRIFTED = 192       # uplinked samples of the round: fog ...
STREAM_SOURCE = 96         # ... and source (a quarter of them held out by the gate)
HELD_OUT = 150             # per domain, scored before and after
DEVICE_ID = 'robot1'
# How far the round must move the drifted domain and may move the source (see the test).
MIN_NET_FIXED = 15         # fixed minus broken held-out fog samples (10% of them)
MAX_SIGN_P = 1e-3          # one-sided sign test: the gain is not a coin flip
MAX_SOURCE_DROP = 5.0      # points of source accuracy


def _sign_test_p(fixed: int, broken: int) -> float:
    """P(at least ``fixed`` of the ``fixed + broken`` changed samples are fixes) when a
    change is as likely to break a sample as to fix it (a round that does not help)."""
    n = fixed + broken
    return sum(math.comb(n, k) for k in range(fixed, n + 1)) / 2 ** n


def _scores(device: DeviceRuntime, samples) -> np.ndarray:
    """The device's per-sample VQA accuracy (0..1) on ``samples``."""
    return np.array([vqa_accuracy(device.answer(s.image, s.question).text, s.answers)
                     for s in samples])


def test_one_round_raises_drifted_accuracy_and_bounds_forgetting():
    from cdcca_ros.models import bundled

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # dropout of the distillation steps
        private, public = generate_keypair()
        device = DeviceRuntime(bundled.load('bundled:student'), DEVICE_ID, public)
        cfg = dataclasses.replace(CloudConfig.from_params(defaults('cloud_node')),
                                  min_samples=1)
        cloud = CloudRuntime(bundled.load('bundled:teacher'), bundled.load('bundled:student'),
                             private, cfg,
                             anchor=resolve_anchor('', bundled.resolve('bundled:student')))
        world = World(SEED)
        size = model_image_size(device.model)  # the scenes the camera shows, at model size
        stream = (world.samples(DRIFTED, STREAM_DRIFTED, size, start=BENCH_START)
                  + world.samples(SOURCE, STREAM_SOURCE, size, start=BENCH_START))
        held_out = {d: world.samples(d, HELD_OUT, size, start=EVAL_START)
                    for d in (DRIFTED, SOURCE)}
        before = {d: _scores(device, s) for d, s in held_out.items()}

        space = device.model.vision_space()
        for i, s in enumerate(stream):
            answered = device.answer(s.image, s.question)
            assert cloud.add_sample(DEVICE_ID, answered.tokens.detach().cpu(), None,
                                    s.question, space.num_tokens, space.dim, f'{DEVICE_ID}-{i}')
        result = cloud.run_round(DEVICE_ID)
        assert result is not None and result.shipped, result and result.decision
        device.apply(result.envelope)
        assert device.version == 1 and device.base_hash == cloud.device(DEVICE_ID).hash
        after = {d: _scores(device, s) for d, s in held_out.items()}

    diff = after[DRIFTED] - before[DRIFTED]
    fixed, broken = int((diff > 0).sum()), int((diff < 0).sum())
    gain = 100.0 * float(diff.mean())
    source_drop = 100.0 * float(before[SOURCE].mean() - after[SOURCE].mean())
    report = (f'{DRIFTED}: {100 * before[DRIFTED].mean():.1f} -> '
              f'{100 * after[DRIFTED].mean():.1f} % ({fixed} fixed, {broken} broken of '
              f'{HELD_OUT}); {SOURCE}: {100 * before[SOURCE].mean():.1f} -> '
              f'{100 * after[SOURCE].mean():.1f} %')
    # The margins. Paired, on 150 held-out fog samples: under "the round does not help" a
    # changed sample is as likely broken as fixed, so fixed ~ Binomial(fixed + broken, 1/2).
    # Here (seed 0): 44.0 -> 80.7 %, 62 fixed and 7 broken (p ~ 1e-12); seed 1: 40 -> 81 %.
    # The test asks for a net 15 fixed samples (10 points) AND p < 1e-3. Forgetting: the
    # guarded round costs the source 0.7-2.7 points on these seeds (the paper's round of 40
    # steps, unguarded, costs 13); 5 points bounds it. Measured on deliberate breaks of the
    # paper's round: delta sent with the wrong sign: fog 44 -> 33 % (0 fixed, 17 broken);
    # teacher labels shifted by one sample: fog 13 %, source 37 %; delta sent twice its size:
    # fog 45 % (50 fixed, 48 broken), source 46 %. Each fails here.
    assert fixed - broken >= MIN_NET_FIXED, report
    assert _sign_test_p(fixed, broken) < MAX_SIGN_P, report
    assert gain >= 100.0 * MIN_NET_FIXED / HELD_OUT, report
    assert source_drop <= MAX_SOURCE_DROP, report


def test_sign_test_values():
    assert _sign_test_p(0, 0) == 1.0
    assert _sign_test_p(1, 0) == 0.5
    assert _sign_test_p(3, 1) == pytest.approx(5 / 16)
    assert _sign_test_p(40, 8) < 1e-5
