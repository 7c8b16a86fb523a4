"""The batching teacher service: merged forwards, the same answers, the proxy's cache."""
from __future__ import annotations

import asyncio

import pytest
import torch

from cdcca_ros.core.fleet.teacher import LocalTeacherClient, TeacherBatcher, TeacherProxy
from cdcca_ros.errors import ModelError


@pytest.fixture(scope='module')
def teacher(tiny_dirs):
    from cdcca_ros.models import bundled

    return bundled.load(tiny_dirs['teacher'])


def _subset(tokens, rows, k, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(tokens.shape[1], generator=gen)[:k].sort().values
                       for _ in rows])
    return torch.stack([tokens[r][i] for r, i in zip(rows, idx, strict=True)]), idx


def test_concurrent_requests_share_forwards_and_get_what_they_would_alone(teacher,
                                                                         tiny_tokens):
    tokens, questions, _ = tiny_tokens
    requests = [_subset(tokens, range(4 * i, 4 * i + 4), 8, i) for i in range(3)]
    other = _subset(tokens, range(20, 23), 12, 9)  # another kept-token count: its own forward
    batcher = TeacherBatcher(teacher, max_batch=64, wait_ms=200.0)

    async def together():
        calls = [batcher.label(t, i, questions[4 * n:4 * n + 4], 4)
                 for n, (t, i) in enumerate(requests)]
        calls.append(batcher.label(other[0], other[1], questions[20:23], 4))
        return await asyncio.gather(*calls)

    results = asyncio.run(together())
    stats = batcher.report()['label']
    assert stats['requests'] == 4 and stats['forwards'] == 2 and stats['samples'] == 15
    assert stats['forwards_merged'] == 1
    for n, (t, i) in enumerate(requests + [other]):
        qs = questions[4 * n:4 * n + 4] if n < 3 else questions[20:23]
        alone = teacher.answer_from_tokens(t, i, qs, max_new_tokens=4)
        assert [text for text, _ in results[n]] == [r.text.strip() for r in alone]


def test_the_proxy_gives_the_teachers_targets_and_asks_once_per_sample(teacher, tiny_tokens):
    tokens, questions, space = tiny_tokens
    client = LocalTeacherClient(teacher)
    proxy = TeacherProxy(client, space)
    answers = ['red', 'two', 'yes', 'left']
    out = proxy.forward_train(tokens[:4], None, questions[:4], answers)
    with torch.no_grad():
        ref = teacher.forward_train(tokens[:4], None, questions[:4], answers)
    torch.testing.assert_close(out.query, ref.query.half().float())
    assert torch.equal(out.answer_mask, ref.answer_mask.bool())
    torch.testing.assert_close(out.fused[out.answer_mask],
                               ref.fused[ref.answer_mask].half().float())
    forwards = client.batcher.report()['targets']['forwards']
    again = proxy.forward_train(tokens[[2, 0]], None, [questions[2], questions[0]],
                                [answers[2], answers[0]])
    assert client.batcher.report()['targets']['forwards'] == forwards  # from the cache
    torch.testing.assert_close(again.query, out.query[[2, 0]])
    labels = proxy.answer_from_tokens(tokens[:2], None, questions[:2], max_new_tokens=4)
    assert [r.text for r in labels] == [r.text.strip() for r in teacher.answer_from_tokens(
        tokens[:2], None, questions[:2], max_new_tokens=4)]
    assert labels[0].token_probs.size >= 1


def test_a_request_that_does_not_add_up_is_refused(teacher, tiny_tokens):
    tokens, questions, _ = tiny_tokens
    batcher = TeacherBatcher(teacher)
    with pytest.raises(ModelError):
        asyncio.run(batcher.label(tokens[:3], None, questions[:2], 4))
    with pytest.raises(ModelError):
        asyncio.run(batcher.targets(tokens[:2], None, questions[:2], ['a']))
