"""The in-process word-level tokenizer: specials, splitting, save/load round trip."""
from __future__ import annotations

import pytest

from cdcca_ros.errors import ConfigError, ModelLoadError
from cdcca_ros.models.tokenizer import (
    EXTRA_SPECIALS,
    IMAGE,
    IMAGE_PAD,
    SPECIALS,
    build_word_tokenizer,
    load_tokenizer,
    save_tokenizer,
    words_of,
)

WORDS = ['red', 'green', 'circle', 'what', 'colour', 'is', 'the', 'shape', '?']


@pytest.fixture(scope='module')
def tok():
    return build_word_tokenizer(WORDS, ['Question: {question} Answer:'])


def test_specials_come_first_and_are_special(tok):
    assert tok.convert_tokens_to_ids(list(SPECIALS)) == list(range(len(SPECIALS)))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert set(EXTRA_SPECIALS) <= set(tok.all_special_tokens)
    assert tok.padding_side == 'left'


@pytest.mark.parametrize(('text', 'tokens'), [
    ('What colour is the SHAPE?', ['what', 'colour', 'is', 'the', 'shape', '?']),
    (f'{IMAGE}{IMAGE}red', [IMAGE, IMAGE, 'red']),                 # never split
    (f'{IMAGE_PAD}{IMAGE_PAD} green', [IMAGE_PAD, IMAGE_PAD, 'green']),
    ('Question: red? Answer:', ['question', ':', 'red', '?', 'answer', ':']),
    ('purple circle', ['<unk>', 'circle']),
])
def test_tokenize(tok, text, tokens):
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert tok.convert_ids_to_tokens(ids) == tokens


def test_decode_skips_specials(tok):
    ids = tok(f'{IMAGE} red circle', add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == 'red circle'


def test_words_of_matches_the_tokenizer(tok):
    text = 'What colour, is the shape?'
    assert words_of(text) == ['what', 'colour', ',', 'is', 'the', 'shape', '?']


def test_save_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    text = f'{IMAGE}{IMAGE} what colour is the shape? purple'
    assert again(text)['input_ids'] == tok(text)['input_ids']
    assert again.get_vocab() == tok.get_vocab()
    assert (again.pad_token, again.eos_token, again.padding_side) == ('<pad>', '</s>', 'left')
    assert set(EXTRA_SPECIALS) <= set(again.all_special_tokens)


def test_bad_vocabulary():
    with pytest.raises(ConfigError, match='no word'):
        build_word_tokenizer(['   '])
    with pytest.raises(ConfigError, match='must be str'):
        build_word_tokenizer(['red', 3])  # type: ignore[list-item]


def test_load_missing(tmp_path):
    with pytest.raises(ModelLoadError, match='cannot load a tokenizer'):
        load_tokenizer(tmp_path / 'nothing')
