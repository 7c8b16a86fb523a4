"""Questions no model can take: too long for the context, and the prompt cache's memory."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize('words', [600, 20_000])
def test_question_longer_than_the_context_is_refused(model, images, words: int) -> None:
    """Every family: a clear PromptTooLongError, not an IndexError from a position table; the
    model answers normally afterwards."""
    from cdcca_ros.errors import PromptTooLongError

    long = ' '.join(['what'] * words) + '?'
    tokens = model.vision_tokens(images[:1])
    with pytest.raises(PromptTooLongError, match='context'):
        model.answer_from_tokens(tokens, None, [long])
    with pytest.raises(PromptTooLongError):
        model.next_token_probs(tokens, None, [long])
    assert long not in model._prompt_cache
    assert model.answer_from_tokens(tokens, None, ['what colour is the shape?'])[0].step_probs.size


def test_prompt_that_fits_only_without_the_answer_is_refused(model, images) -> None:
    """A prompt that fits the context but leaves no room for the answer tokens."""
    from cdcca_ros.errors import PromptTooLongError

    tokens = model.vision_tokens(images[:1])
    image_ids = model._image_placeholder_ids(model._image_embeds(
        model._check_tokens(tokens, None, 1), None)[0].shape[1])

    def length(n: int) -> int:
        return len(model._sequence(image_ids, model._prompt_ids(' '.join(['what'] * n))))

    per_word = length(2) - length(1)
    n = 1 + (model.context_length - 10 - length(1)) // per_word
    assert model.context_length - 10 - per_word < length(n) <= model.context_length - 10
    question = ' '.join(['what'] * n)
    model.answer_from_tokens(tokens, None, [question], max_new_tokens=4)  # fits
    with pytest.raises(PromptTooLongError, match='plus 64 to generate'):
        model.answer_from_tokens(tokens, None, [question], max_new_tokens=64)


def test_prompt_cache_is_bounded_in_bytes(make_model) -> None:
    """Many distinct long questions: the cache holds at most its byte bound (it was bounded
    only in entries, so 4096 long questions were all kept)."""
    from cdcca_ros.models import _hf

    model = make_model('blip2')
    for i in range(3000):
        model._prompt_ids(f'{i} ' + 'what colour is the shape ' * 60)
    cached = sum(_hf._prompt_cost(q, ids) for q, ids in model._prompt_cache.items())
    assert cached == model.prompt_cache_bytes <= _hf._PROMPT_CACHE_BYTES
    assert 0 < len(model._prompt_cache) < 3000
    # Short, repeated questions are still served from the cache.
    ids = model._prompt_ids('what colour is the shape?')
    assert model._prompt_ids('what colour is the shape?') is ids
