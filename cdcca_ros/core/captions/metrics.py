"""BLEU-1..4 and CIDEr-D as the COCO caption evaluation computes them, without Java.

The reference is ``pycocoevalcap`` (the COCO caption evaluation: ``bleu/bleu_scorer.py``,
``cider/cider_scorer.py``). Its scorers are pure Python, but its tokenizer runs Stanford's PTB
tokenizer in Java, and the package is not in this project's environment; this module follows
the two scorers step by step so the numbers are the same on the same token sequences:

* **BLEU** (``Bleu(4)``, option ``'closest'``): clipped n-gram precisions summed over the whole
  corpus (counts clipped by each n-gram's largest count in any one reference), a geometric
  mean over n = 1..k, and one brevity penalty ``exp(1 - r / c)`` over the corpus, where ``r``
  adds up, per image, the reference length closest to the candidate's (the shorter on a tie)
  and ``c`` the candidate lengths. The reference's smoothing constants (``1e-15`` added to
  matches, ``1e-9`` to guesses) are kept, so a corpus without any 4-gram match scores ~0, not
  an error.
* **CIDEr-D** (``Cider()``): per n = 1..4, TF-IDF vectors of n-gram counts, with document
  frequencies counted over the *references of the evaluated set* (an n-gram counts once per
  image whose references contain it) and ``log(number of images)`` as the IDF's numerator;
  the candidate's weights are clipped at the reference's (``min(h, r) * r``), the cosine is
  damped by a gaussian of the length difference (``sigma = 6``), averaged over n and over the
  references, and scaled by 10. As in the reference, the 'length' of a sentence is the number
  of its bigrams (the count it keeps is of 2-grams), which differs from the word count by one.

Tokenisation: the COCO evaluation lower-cases, runs the PTB tokenizer and drops punctuation
tokens (``. , ? ! : ; - -- ... ' '' ` `` -LRB- -RRB-`` ...). :func:`tokenize_caption` does the
same for the text our world and models produce: lower-case, words are runs of letters and
digits (an inner hyphen or apostrophe kept, 't-shirt', "robot's"), every other character
separates words and is dropped. It differs from PTB only on clitics ("don't" stays one word;
PTB gives "do n't"), which no caption here contains.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from cdcca_ros.errors import ConfigError

NGRAMS = 4
"""Longest n-gram of BLEU-4 and CIDEr-D."""
CIDER_SIGMA = 6.0
"""Standard deviation of CIDEr-D's gaussian length penalty."""

_TINY = 1e-15  # added to BLEU's matches (the reference's 'tiny')
_SMALL = 1e-9  # added to BLEU's guesses and reference lengths (the reference's 'small')
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")

Ngrams = Counter[tuple[str, ...]]


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``, punctuation dropped (see the module docstring)."""
    if not isinstance(text, str):
        raise ConfigError(f'a caption must be a string, got {type(text).__name__}')
    return _WORD.findall(text.lower())


def ngram_counts(words: Sequence[str], n: int = NGRAMS) -> Ngrams:
    """Counts of every 1..``n``-gram of ``words``."""
    counts: Ngrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _prepare(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
             ) -> list[tuple[list[str], list[list[str]]]]:
    """Tokenised ``(candidate, references)`` per image, in the references' key order."""
    if set(references) != set(candidates):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise ConfigError(f'references and candidates must have the same images; differing: '
                          f'{missing}')
    if not references:
        raise ConfigError('caption scoring needs at least one image')
    out = []
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ConfigError(f'image {key!r}: references must be a non-empty list of strings')
        out.append((tokenize_caption(candidates[key]), [tokenize_caption(r) for r in refs]))
    return out


@dataclass(frozen=True)
class BleuResult:
    """Corpus BLEU and the per-image scores the reference reports beside it.

    Attributes:
        scores: Corpus BLEU-1 .. BLEU-n (``scores[3]`` is BLEU-4).
        per_image: Per image, its own BLEU-1 .. BLEU-n (own brevity penalty).
        ratio: Candidate length over effective reference length, corpus-wide.
    """

    scores: tuple[float, ...]
    per_image: tuple[tuple[float, ...], ...]
    ratio: float


def _bleu_of(correct: Sequence[float], guess: Sequence[float], testlen: float,
             reflen: float) -> list[float]:
    """BLEU-1..n from match and guess counts and the lengths (the reference's formula)."""
    out, product = [], 1.0
    for k in range(len(correct)):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        out.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
         n: int = NGRAMS) -> BleuResult:
    """Corpus BLEU-1..``n`` of one candidate caption per image against its references.

    Args:
        references: Image key -> reference captions (raw text, tokenised here).
        candidates: Image key -> the candidate caption; the same keys as ``references``.
        n: Longest n-gram.

    Raises:
        ConfigError: Keys differ, no images, an image without references, ``n < 1``.
    """
    if n < 1:
        raise ConfigError(f'BLEU needs n >= 1, got {n}')
    total_correct, total_guess = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image = []
    for test, refs in _prepare(references, candidates):
        max_counts: Ngrams = Counter()
        for ref in refs:
            for gram, count in ngram_counts(ref, n).items():
                max_counts[gram] = max(max_counts[gram], count)
        testlen = len(test)
        # closest reference length; ties go to the shorter (min over (|diff|, length))
        reflen = min((abs(len(r) - testlen), len(r)) for r in refs)[1]
        guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in ngram_counts(test, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        per_image.append(tuple(_bleu_of(correct, guess, testlen, reflen)))
        total_test += testlen
        total_ref += reflen
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
    scores = tuple(_bleu_of(total_correct, total_guess, total_test, total_ref))
    ratio = (total_test + _TINY) / (total_ref + _SMALL)
    return BleuResult(scores=scores, per_image=tuple(per_image), ratio=ratio)


@dataclass(frozen=True)
class CiderResult:
    """Corpus CIDEr-D (the mean of the per-image scores) and the per-image scores."""

    score: float
    per_image: tuple[float, ...]


def _tfidf(counts: Ngrams, df: Mapping[tuple[str, ...], float], log_images: float, n: int
           ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """The reference's ``counts2vec``: TF-IDF per n, the vectors' norms and the 'length'."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        value = float(tf) * (log_images - math.log(max(1.0, df.get(gram, 0.0))))
        vec[k][gram] = value
        norm[k] += value * value
        if k == 1:  # the reference counts bigrams as the length (see module docstring)
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
            n: int = NGRAMS, sigma: float = CIDER_SIGMA) -> CiderResult:
    """CIDEr-D of one candidate caption per image against its references.

    Document frequencies come from the references of exactly these images, so a score depends
    on the evaluated set (as in the COCO evaluation: score a split in one call).

    Args:
        references: Image key -> reference captions (raw text).
        candidates: Image key -> the candidate caption; the same keys as ``references``.
        n: Longest n-gram.
        sigma: Standard deviation of the gaussian length penalty.

    Raises:
        ConfigError: Keys differ, no images, an image without references, bad ``n``/``sigma``.
    """
    if n < 1 or not sigma > 0:
        raise ConfigError(f'CIDEr-D needs n >= 1 and sigma > 0, got n={n}, sigma={sigma}')
    items = [(ngram_counts(test, n), [ngram_counts(r, n) for r in refs])
             for test, refs in _prepare(references, candidates)]
    df: Counter[tuple[str, ...]] = Counter()
    for _, refs in items:
        df.update(set().union(*refs))
    log_images = math.log(float(len(items)))
    penalty_den = 2.0 * sigma ** 2
    scores = []
    for test, refs in items:
        vec, norm, length = _tfidf(test, df, log_images, n)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = _tfidf(ref, df, log_images, n)
            penalty = math.exp(-float(length - length_r) ** 2 / penalty_den)
            for k in range(n):
                val = sum(min(h, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0)
                          for g, h in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return CiderResult(score=sum(scores) / len(scores), per_image=tuple(scores))


def score_captions(references: Mapping[Hashable, Sequence[str]],
                   candidates: Mapping[Hashable, str]) -> dict[str, float]:
    """``{'bleu4', 'cider'}`` of a set of captions, on the COCO evaluation's scales (BLEU in
    [0, 1], CIDEr-D in [0, 10]; papers print both times 100)."""
    return {'bleu4': bleu(references, candidates).scores[NGRAMS - 1],
            'cider': cider_d(references, candidates).score}


__all__ = ['NGRAMS', 'CIDER_SIGMA', 'BleuResult', 'CiderResult', 'tokenize_caption',
           'ngram_counts', 'bleu', 'cider_d', 'score_captions']
