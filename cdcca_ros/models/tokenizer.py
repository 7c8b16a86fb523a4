"""A word-level tokenizer built in-process (no hub) for the tiny models.

The vocabulary is a list of words; the tokenizer lower-cases, splits on whitespace and
punctuation, and maps unknown words to ``<unk>``. Image placeholders are *special added
tokens*, so ``<image><image>`` stays two tokens (a processor otherwise sees a count
mismatch).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cdcca_ros.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = '<pad>', '<s>', '</s>', '<unk>'
IMAGE = '<image>'
# Qwen2-VL's names, kept so a tiny Qwen2-VL reads like the real one.
VISION_START, VISION_END, IMAGE_PAD = '<|vision_start|>', '<|vision_end|>', '<|image_pad|>'
EXTRA_SPECIALS = (IMAGE, VISION_START, VISION_END, IMAGE_PAD)
SPECIALS = (PAD, BOS, EOS, UNK) + EXTRA_SPECIALS

_WORD = re.compile(r'\w+|[^\w\s]')


def words_of(text: str) -> list[str]:
    """Split ``text`` the way the tokenizer does (lower case, words and punctuation)."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(vocabulary: Iterable[str],
                         extra_texts: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Build a WordLevel tokenizer wrapped in ``PreTrainedTokenizerFast``.

    Args:
        vocabulary: Words (or short texts, split with :func:`words_of`) to know.
        extra_texts: More texts whose words are added (e.g. the prompt template).

    Returns:
        A tokenizer with ids ``0..3`` = pad, bos, eos, unk, then the image tokens, then
        the words in first-seen order.

    Raises:
        ConfigError: The vocabulary holds no word.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for text in [*vocabulary, *extra_texts]:
        if not isinstance(text, str):
            raise ConfigError(f'vocabulary entries must be str, got {text!r}')
        for word in words_of(text):
            vocab.setdefault(word, len(vocab))
    if len(vocab) == len(SPECIALS):
        raise ConfigError(f'vocabulary holds no word: {list(vocabulary)!r}')
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    # Special added tokens are matched before normalisation and never split.
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens=list(EXTRA_SPECIALS), padding_side='left',
        clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Save ``tokenizer`` into directory ``path`` (``tokenizer.json`` + configs)."""
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (or any HF tokenizer directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f'cannot load a tokenizer from {str(path)!r}: {err}') from err
