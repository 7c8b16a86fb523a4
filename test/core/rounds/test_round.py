"""The guarded round on the bundled models: gate decisions, refusals, pulls, audit, restarts.

A cloud holds the bundled teacher and student and the student's anchor set; a device's fog
samples arrive with every token (or a subset for the pull tests). Candidates are built to be
worse or better than what the device holds, and the gate must tell them apart on held-out
samples the candidates never saw.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.core import dwc
from cdcca_ros.core.akd import AKDConfig
from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
from cdcca_ros.core.rounds.anchor import resolve_anchor
from cdcca_ros.core.rounds.config import GuardConfig, LabelConfig
from cdcca_ros.core.rounds.gate import ANCHOR, NEW
from cdcca_ros.core.updates import check_rollback
from cdcca_ros.core.wire import generate_keypair
from cdcca_ros.sim.world import World

DEVICE = 'robot1'
N_FOG = 90


@pytest.fixture(scope='module')
def models():
    from cdcca_ros.models import bundled

    return bundled.load('bundled:teacher'), bundled.load('bundled:student')


@pytest.fixture(scope='module')
def fog(models):
    """Fog samples' vision tokens (the shared encoder) and questions."""
    samples = World(3).samples('fog', N_FOG, 48, start=1_700_000)
    with torch.no_grad():
        tokens = models[1].vision_tokens([s.image for s in samples])
    return tokens, samples


def _cloud(models, tmp_path=None, **guard) -> tuple[CloudRuntime, object]:
    """A cloud runtime on the bundled pair; no derived questions unless asked (these tests
    count and split records: the defaults' guard.extra_questions / gate_questions would add
    four of the cloud's own questions to each frame)."""
    from cdcca_ros.models import bundled

    guard.setdefault('extra_questions', 0)
    guard.setdefault('gate_questions', 0)

    private, public = generate_keypair()
    teacher, student = models
    student.load_trainable_state_dict(bundled.load('bundled:student').trainable_state_dict())
    cfg = CloudConfig(min_samples=1, akd=AKDConfig(seed=0, lr=2e-3, batch_size=16),
                      guard=GuardConfig(anchor_limit=300, **guard))
    anchor = resolve_anchor('', bundled.resolve('bundled:student'))
    return CloudRuntime(teacher, student, private, cfg, state_dir=tmp_path,
                        anchor=anchor), public


def _add_fog(cloud, fog, n=N_FOG, partial=False):
    tokens, samples = fog
    space = cloud.space
    for i in range(n):
        idx = torch.tensor([0, 2, 4, 6]) if partial else None
        t = tokens[i][idx] if partial else tokens[i]
        assert cloud.add_sample(DEVICE, t, idx, samples[i].question, space.num_tokens,
                                space.dim, f'{DEVICE}-{i}', device_version=0)


def test_the_gate_refuses_a_harmful_candidate_and_ships_a_better_one(models, fog):
    cloud, _ = _cloud(models)
    _add_fog(cloud, fog)
    runner, state = cloud.runner, cloud.device(DEVICE)
    runner.label(state)
    view = state.feedback.view
    # Harmful: the trainable set scrambled -> answers flip on every slice, the anchor too.
    g = torch.Generator().manual_seed(0)
    harmful = {k: v + torch.randn(v.shape, generator=g) * 0.5 for k, v in view.items()}
    slices = runner._slices(state, view, harmful)
    decision = runner.guard.gate.decide(slices, anchor_base=runner.anchor_base)
    assert not decision.ship
    # Judged as a device with coverage answers: fresh fog frames get the candidate (and
    # break), fresh anchor-like frames the shipped student (nothing breaks there) ...
    assert slices[NEW].broken > slices[NEW].fixed + 3
    assert slices[ANCHOR].broken - slices[ANCHOR].fixed < 10
    # ... while a device without coverage would run the candidate on the anchor's scenes too.
    unrouted = runner.guard
    runner.guard = unrouted.with_(routing=None)
    try:
        plain = runner._slices(state, view, harmful)
    finally:
        runner.guard = unrouted
    assert plain[ANCHOR].broken > plain[ANCHOR].fixed + 10
    assert not runner.guard.gate.decide(plain, anchor_base=runner.anchor_base).ship
    # Better by construction: distilled on every labelled fog sample, the gate's held-out
    # ones included (a cheat no round does), the anchor distilled alongside.
    from cdcca_ros.core.rounds.trainer import RoundTrainer, TrainConfig, fill_targets

    records = [r for r in state.memory.select() if runner.trainable(r)]
    anchors = [r for r in runner.anchor if r.split == 'train']
    trainer = RoundTrainer(runner.teacher, runner.student, runner.akd,
                           TrainConfig(max_steps=150, min_steps=150, eval_every=150,
                                       mix_new=0.5, mix_anchor=0.5),
                           base=runner.base)
    fill_targets(trainer.akd, records)
    runner.student.load_trainable_state_dict(view)
    torch.manual_seed(0)  # the dropout of the distillation steps
    trainer.fit(records, None, anchors, [])
    better = runner.student.trainable_state_dict()
    slices = runner._slices(state, view, better)
    decision = runner.guard.gate.decide(slices, anchor_base=runner.anchor_base)
    assert slices[NEW].gain >= 10 and decision.ship, decision.reason


def test_the_gate_asks_the_anchor_of_the_devices_version_once(models, fog):
    cloud, _ = _cloud(models, routing=None)  # every sample answered by the adapters
    _add_fog(cloud, fog, n=24)
    runner, state = cloud.runner, cloud.device(DEVICE)
    runner.label(state)
    view = state.feedback.view
    asked: list[int] = []
    answers = runner.answers

    def counted(student, records):
        asked.append(len(records))
        return answers(student, records)

    runner.answers = counted
    g = torch.Generator().manual_seed(1)
    for scale in (0.5, 0.05):  # two candidates against the same version, as two rounds
        candidate = {k: v + torch.randn(v.shape, generator=g) * scale for k, v in view.items()}
        asked.clear()
        slices = runner._slices(state, view, candidate)
        anchor = runner._gate_anchor
        # The device's version (the base here) answers the anchor as computed at start: only
        # the candidate is asked about it, and the counts are those of asking both.
        assert sum(asked) == 2 * slices[NEW].n + len(anchor) + sum(
            c.n for name, c in slices.items() if name.startswith('replay'))
        want = runner.correct(view, anchor), runner.correct(candidate, anchor)
        assert slices[ANCHOR] == type(slices[ANCHOR]).of(*want)


def test_a_refused_round_sends_nothing_and_keeps_training(models, fog):
    cloud, _ = _cloud(models, gate=__import__('cdcca_ros.core.rounds.gate', fromlist=['x'])
                      .GateConfig(min_gain=100.0, anchor_tolerance=100.0, anchor_budget=100.0))
    _add_fog(cloud, fog, n=60)
    state = cloud.device(DEVICE)
    view_hash = state.hash
    result = cloud.run_round(DEVICE)
    assert result is not None and result.outcome == 'refused' and result.envelope is None
    assert 'needs >= 100' in result.decision.reason
    assert (state.version, state.hash) == (0, view_hash)
    # The trained copy is kept for the next round (not reset to what the device holds).
    moved = dwc.compute_delta(state.trained, state.feedback.view)
    assert sum(float(v.abs().sum()) for v in moved.values()) > 0
    assert state.counters['refused'] == 1 and state.refusals == 0  # not harmful: no reset


def test_unsure_labels_from_kept_tokens_pull_the_rest(models, fog):
    cloud, _ = _cloud(models, labels=LabelConfig(pull_below=0.999))
    _add_fog(cloud, fog, n=8, partial=True)
    pulls = cloud.label(DEVICE)
    assert pulls and set(pulls) == set(cloud.pull_requests(DEVICE))
    state = cloud.device(DEVICE)
    waiting = state.memory.get(pulls[0])
    assert waiting.pull == 'requested' and not cloud.runner.trainable(waiting)
    tokens, samples = fog
    i = int(pulls[0].rsplit('-', 1)[1])
    rest = torch.tensor([1, 3, 5, 7, 8, 9])
    assert cloud.add_pulled(DEVICE, pulls[0], tokens[i][rest], rest)
    merged = state.memory.get(pulls[0])
    assert merged.indices is None and merged.pull == 'done' and not merged.labelled
    torch.testing.assert_close(merged.tokens.float(), tokens[i].half().float())
    cloud.label(DEVICE)  # labelled again, from every token: no second pull
    assert merged.labelled and merged.pull == 'done' and cloud.runner.trainable(merged)
    assert not cloud.add_pulled(DEVICE, pulls[0], tokens[i][rest], rest)  # not asked now
    cloud.pull_unavailable(DEVICE, pulls[1])
    gone = state.memory.get(pulls[1])
    assert gone.pull == 'unavailable' and state.counters['pulls_unavailable'] == 1


def test_the_audit_orders_a_signed_rollback_of_a_worse_version(models, fog):
    cloud, public = _cloud(models)
    state = cloud.device(DEVICE)
    base_view, base_hash = dict(state.feedback.view), state.hash
    # The device was given v1 = a broken adapter (as if the gate had been fooled) ...
    g = torch.Generator().manual_seed(1)
    broken = {k: v + torch.randn(v.shape, generator=g) * 0.5 for k, v in base_view.items()}
    delta = dwc.compute_delta(broken, base_view)
    state.feedback.commit(delta, delta)
    state.version, state.hash = 1, state.feedback.view_hash()
    state.remember(1, state.hash, state.feedback.view)
    state.ship_seq = state.memory.next_seq
    # ... and its audit samples since then show it.
    tokens, samples = fog
    space = cloud.space
    for i in range(60):
        cloud.add_sample(DEVICE, tokens[i], None, samples[i].question, space.num_tokens,
                         space.dim, f'audit-{i}', device_version=1, audit=True)
    cloud.label(DEVICE)
    result = cloud.audit(DEVICE)
    order = result.rollback
    assert order is not None and result.counts.gain < -10
    assert (order.from_version, order.to_hash, order.new_version) == (1, base_hash, 2)
    check_rollback(order, public, DEVICE, 1, state.hash, base_hash)  # a device accepts it
    assert cloud.rolled_back(DEVICE, 2, base_hash)
    assert (state.version, state.hash) == (2, base_hash) and state.counters['rollbacks'] == 1
    assert cloud.audit(DEVICE).rollback is None  # no audit samples of v2 yet


@pytest.mark.parametrize('share', [1.0, 0.5, 0.0])
def test_a_share_of_the_audit_stream_trains_and_the_rest_stays_held_out(models, fog, share):
    cloud, _ = _cloud(models, audit_gate_fraction=share)
    tokens, samples = fog
    space = cloud.space
    for i in range(40):
        assert cloud.add_sample(DEVICE, tokens[i], None, samples[i].question, space.num_tokens,
                                space.dim, f'audit-{i}', device_version=0, audit=True)
    splits = [r.split for r in cloud.device(DEVICE).memory.select()]
    held = splits.count('gate')
    assert set(splits) <= {'gate', 'train'} and len(splits) == 40
    if share == 1.0:
        assert held == 40  # every audit sample is the gate's and the live audit's
    elif share == 0.0:
        assert held == 0
    else:
        assert 10 <= held <= 30  # about half (a hash of the id: the same on every cloud)
        again, _ = _cloud(models, audit_gate_fraction=share)
        for i in range(40):
            again.add_sample(DEVICE, tokens[i], None, samples[i].question, space.num_tokens,
                             space.dim, f'audit-{i}', device_version=0, audit=True)
        assert [r.split for r in again.device(DEVICE).memory.select()] == splits
    # Only held-out audit samples are judged by the live audit and the gate.
    assert len(cloud.device(DEVICE).memory.select('gate', audit=True)) == held


def test_memory_and_labels_survive_a_cloud_restart(models, fog, tmp_path):
    cloud, _ = _cloud(models, tmp_path, extra_questions=2)
    _add_fog(cloud, fog, n=10)
    cloud.label(DEVICE)
    before = {sid: (r.label, r.parent) for sid, r in cloud.device(DEVICE).memory.records.items()}
    cloud.device(DEVICE).save()
    again, _ = _cloud(models, tmp_path, extra_questions=2)
    after = {sid: (r.label, r.parent) for sid, r in again.device(DEVICE).memory.records.items()}
    # The cloud's own questions about the training frames survive with their parents.
    assert after == before and sum(not parent for _, parent in after.values()) == 10
    assert any(parent for _, parent in after.values())
    # A re-delivered sample is still refused after the restart.
    tokens, samples = fog
    assert not again.add_sample(DEVICE, tokens[0], None, samples[0].question,
                                again.space.num_tokens, again.space.dim, f'{DEVICE}-0')


def test_the_new_data_is_also_judged_per_cluster(models, fog):
    """Fog and night went up in the same stretch: the gate's new data is judged as a whole
    (the gain) and per memory cluster (harm), the clusters partitioning the whole."""
    from cdcca_ros.core.rounds.gate import GateConfig

    cloud, _ = _cloud(models, gate=GateConfig(min_slice=8, new_clusters=True))
    _add_fog(cloud, fog)
    night = World(3).samples('night', N_FOG, 48, start=1_800_000)
    with torch.no_grad():
        tokens = models[1].vision_tokens([s.image for s in night])
    space = cloud.space
    for i, s in enumerate(night):
        assert cloud.add_sample(DEVICE, tokens[i], None, s.question, space.num_tokens,
                                space.dim, f'{DEVICE}-n{i}', device_version=0)
    runner, state = cloud.runner, cloud.device(DEVICE)
    runner.label(state)
    state.memory.recluster()
    view = state.feedback.view
    g = torch.Generator().manual_seed(0)
    other = {k: v + torch.randn(v.shape, generator=g) * 0.5 for k, v in view.items()}
    slices = runner._slices(state, view, other)
    per_cluster = {k: v for k, v in slices.items() if k.startswith(f'{NEW}/')}
    assert per_cluster, sorted(slices)
    assert sum(c.n for c in per_cluster.values()) <= slices[NEW].n
    assert sum(c.broken for c in per_cluster.values()) <= slices[NEW].broken


def test_the_cloud_asks_more_questions_of_each_training_frame(models, fog):
    from functools import partial

    from cdcca_ros.core.rounds.memory import split_of
    from cdcca_ros.sim.questions import answer_of

    cloud, _ = _cloud(models, extra_questions=3)
    _add_fog(cloud, fog, n=30, partial=True)
    state = cloud.device(DEVICE)
    memory = state.memory
    parents = [r for r in memory.select() if not r.parent]
    kids = [r for r in memory.select() if r.parent]
    assert len(parents) == 30 and state.samples_seen == 30
    # A round starts on the frames the device sent, not on the questions derived from them.
    assert kids and state.pending() == 30
    # Every training frame (fog's questions are the templates') and nothing held out.
    assert {r.parent for r in kids} == {r.sample_id for r in parents if r.split == 'train'}
    assert state.counters['derived_questions'] == len(kids) <= 3 * 30
    for kid in kids:
        parent = memory.get(kid.parent)
        assert kid.split == 'train' and kid.question != parent.question
        assert torch.equal(kid.tokens, parent.tokens)
    # The teacher labels them like any other; they are never pulled themselves.
    pulls = cloud.label(DEVICE)
    assert all(r.labelled for r in kids) and not any(memory.get(p).parent for p in pulls)
    # A pull of a frame's other tokens reaches its questions: labelled again from all.
    tokens, samples = fog
    frame = next(r for r in parents if r.split == 'train')
    frame.pull = 'requested'
    assert cloud.add_pulled(DEVICE, frame.sample_id, tokens[int(frame.sample_id[7:])], None)
    for kid in (r for r in memory.select() if r.parent == frame.sample_id):
        assert kid.indices is None and kid.tokens.shape[0] == cloud.space.num_tokens
        assert not kid.labelled
    # The benchmarks' oracle: true answers for them too.
    s = samples[40]
    sid = next(f'oracle-{i}' for i in range(100) if split_of(f'oracle-{i}', 0.1, 0.25) == 'train')
    cloud.add_sample(DEVICE, tokens[40], None, s.question, cloud.space.num_tokens,
                     cloud.space.dim, sid, label=s.answer, answer=partial(answer_of, s.scene))
    told = [r for r in memory.select() if r.parent == sid]
    assert told and all(r.labelled and r.confidence == 1.0
                        and r.label == answer_of(s.scene, r.question) for r in told)
    # Off (the default): none.
    off, _ = _cloud(models)
    _add_fog(off, fog, n=10)
    assert not any(r.parent for r in off.device(DEVICE).memory.select())


def test_with_gate_questions_the_gate_counts_frames_not_questions(models, fog):
    from cdcca_ros.core.rounds.stats import PairedCounts, PairedScores

    cloud, _ = _cloud(models, gate_questions=3)
    _add_fog(cloud, fog, n=40, partial=True)
    runner, state = cloud.runner, cloud.device(DEVICE)
    memory = state.memory
    gate_frames = {r.sample_id for r in memory.select('gate') if not r.parent}
    gate_kids = [r for r in memory.select('gate') if r.parent]
    assert gate_frames and gate_kids and {r.parent for r in gate_kids} == gate_frames
    runner.label(state)
    view = state.feedback.view
    g = torch.Generator().manual_seed(0)
    scrambled = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in view.items()}
    slices = runner._slices(state, view, scrambled)
    new = slices[NEW]
    # One sample per held-out frame (its share of right answers), not one per question.
    held = [r for r in memory.select('gate') if runner.trainable(r)]
    assert isinstance(new, PairedScores)
    assert new.n == len({r.parent or r.sample_id for r in held}) < len(held)
    assert isinstance(slices[ANCHOR], PairedCounts)  # no derived questions there
    decision = cloud.runner.guard.gate.decide(slices, anchor_base=runner.anchor_base)
    assert not decision.ship


def test_paired_scores_a_frame_by_its_share_of_right_answers():
    from cdcca_ros.core.rounds.memory import Record
    from cdcca_ros.core.rounds.round import paired
    from cdcca_ros.core.rounds.stats import PairedCounts

    def rec(sid, parent=''):
        return Record(sample_id=sid, seq=0, tokens=torch.zeros(1, 1), indices=None,
                      question='q', split='gate', parent=parent)

    alone = [rec('a'), rec('b')]
    counts = paired(alone, np.array([1, 0], bool), np.array([0, 1], bool))
    assert counts == PairedCounts(n=2, old_right=1, new_right=1, fixed=1, broken=1)
    # Frames a (3 questions) and b (2): a loses one answer of 3, b gains both of 2.
    records = [rec('a'), rec('a~q0', 'a'), rec('b'), rec('a~q1', 'a'), rec('b~q0', 'b')]
    old = np.array([1, 1, 0, 1, 0], bool)
    new = np.array([1, 0, 1, 1, 1], bool)
    scores = paired(records, old, new)
    assert (scores.n, scores.fixed, scores.broken) == (2, 1, 1)
    assert scores.gain == pytest.approx(100 * ((2 / 3 + 1) - (1 + 0)) / 2)


def test_derived_questions_the_student_is_sure_of_are_not_trained_on(models, fog):
    cloud, _ = _cloud(models, extra_questions=3,
                      labels=LabelConfig(derived_min_confidence=0.0, derived_student_below=0.9))
    _add_fog(cloud, fog, n=30)
    state = cloud.device(DEVICE)
    cloud.label(DEVICE)
    kids = [r for r in state.memory.select() if r.parent]
    sure = state.counters['derived_student_sure']
    assert kids and 0 < sure < len(kids)
    assert sum(r.label is None for r in kids) >= sure
    # The student's own confidence decides: with the shipped weights, every kept one is a
    # question it answers with less than 0.9.
    kept = [r for r in kids if r.label]
    confidence = [c for _, c in cloud.runner.scored_answers(cloud.runner.student, kept)]
    assert max(confidence) < 0.9
