"""BLEU and CIDEr-D against hand-computed values and values of the reference implementation."""
from __future__ import annotations

import math

import pytest

from cdcca_ros.core.captions import metrics
from cdcca_ros.errors import ConfigError

# Computed by pycocoevalcap 1.2's own scorers (bleu/bleu_scorer.py with option 'closest',
# cider/cider_scorer.py), fed these already tokenised captions.
REF_GTS = {
    'a': ['a red square on a grey background', 'a big red square',
          'one red square in the middle'],
    'b': ['a blue circle left of a green triangle', 'a blue circle and a green triangle'],
    'c': ['two shapes a yellow diamond and a red circle', 'a yellow diamond above a red circle'],
}
REF_RES = {'a': 'a red square', 'b': 'a blue circle and a green square',
           'c': 'a yellow diamond above a red circle'}
REF_BLEU = (0.8874100176413634, 0.8814475087874692, 0.8732752732331567, 0.8609515299896318)
REF_CIDER = 4.905936712969001
REF_CIDER_PER_IMAGE = (2.6609420489982045, 5.296340248794129, 6.760527841114668)


def test_matches_reference_implementation() -> None:
    b = metrics.bleu(REF_GTS, REF_RES)
    c = metrics.cider_d(REF_GTS, REF_RES)
    assert b.scores == pytest.approx(REF_BLEU, abs=1e-12)
    assert c.score == pytest.approx(REF_CIDER, abs=1e-12)
    assert c.per_image == pytest.approx(REF_CIDER_PER_IMAGE, abs=1e-12)


def test_tokenizer_drops_punctuation_and_case() -> None:
    assert metrics.tokenize_caption('A Red t-shirt, on the LEFT... (robot\'s)!') == [
        'a', 'red', 't-shirt', 'on', 'the', 'left', "robot's"]
    # punctuation does not change a score
    gts = {0: ['a red square.'], 1: ['two blue circles']}
    assert metrics.bleu(gts, {0: 'A red square', 1: 'two blue circles!'}).scores == \
        metrics.bleu(gts, {0: 'a red square', 1: 'two blue circles'}).scores


def test_identical_caption_scores_one() -> None:
    gts = {0: ['a big red square left of a small blue circle']}
    result = metrics.bleu(gts, {0: gts[0][0]})
    assert result.scores == pytest.approx((1.0,) * 4, abs=1e-8)


def test_brevity_penalty_by_hand() -> None:
    # c = 3 words, r = 5: precisions 3/3, 2/2, 1/1, 0/0 -> BP = exp(1 - 5/3)
    result = metrics.bleu({0: ['a red square on grey']}, {0: 'a red square'})
    bp = math.exp(1 - 5 / 3)
    assert result.scores[0] == pytest.approx(bp, rel=1e-9)
    assert result.scores[2] == pytest.approx(bp, rel=1e-9)
    # no 4-gram to match: the reference's smoothing gives (1e-15 / 1e-9) ** (1/4) * BP
    assert result.scores[3] == pytest.approx((1e-6) ** 0.25 * bp, rel=1e-6)


def test_closest_reference_length_tie_goes_to_the_shorter() -> None:
    # candidate of 4 words, references of 3 and 5: the shorter one -> no brevity penalty
    result = metrics.bleu({0: ['a red square', 'a big red square too']}, {0: 'a red big square'})
    assert result.scores[0] == pytest.approx(1.0, abs=1e-9)
    # against the 5-word one alone the penalty applies
    alone = metrics.bleu({0: ['a big red square too']}, {0: 'a red big square'})
    assert alone.scores[0] == pytest.approx(math.exp(1 - 5 / 4), rel=1e-9)


def test_bleu_clips_repeated_words() -> None:
    result = metrics.bleu({0: ['the red square']}, {0: 'red red red red'})
    # 'red' counts once: unigram precision 1/4, with closest length 3 < 4 so no penalty
    assert result.scores[0] == pytest.approx(0.25, rel=1e-9)


def test_cider_identical_is_ten_with_disjoint_images() -> None:
    gts = {0: ['a big red square on the left'], 1: ['two small blue circles at the top']}
    # the images share 'the' and nothing else of length >= 2; an exact copy still scores 10
    result = metrics.cider_d(gts, {k: v[0] for k, v in gts.items()})
    assert result.per_image == pytest.approx((10.0, 10.0), abs=1e-9)


def test_cider_single_image_is_zero() -> None:
    # idf = log(1 image) - log(df = 1) = 0 for every n-gram: nothing carries weight
    assert metrics.cider_d({0: ['a red square']}, {0: 'a red square'}).score == 0.0


def test_cider_length_penalty_and_clipping() -> None:
    gts = {0: ['a big red square on the left'], 1: ['two small blue circles at the top']}
    exact = metrics.cider_d(gts, {0: 'a big red square on the left', 1: 'two'}).per_image[0]
    doubled = metrics.cider_d(
        gts, {0: 'a big red square on the left a big red square on the left', 1: 'two'})
    assert exact == pytest.approx(10.0)
    # repeating the caption neither raises the clipped overlap nor escapes the length penalty:
    # 6 bigrams more -> gaussian exp(-36 / 72) at most
    assert doubled.per_image[0] <= 10.0 * math.exp(-36 / 72) + 1e-9


def test_document_frequency_comes_from_the_evaluated_references() -> None:
    gts = {0: ['a red square'], 1: ['a blue circle'], 2: ['a green diamond']}
    res = {0: 'a red square', 1: 'a blue circle', 2: 'a green diamond'}
    # 'a' is in every image's references: idf 0, so the unigram cosine only sees the rest;
    # three words have no 4-gram, so n = 4 adds 0: (1 + 1 + 1 + 0) / 4 * 10
    one = metrics.cider_d(gts, res)
    assert one.per_image == pytest.approx((7.5,) * 3)
    partial = metrics.cider_d(gts, {0: 'a', 1: 'a blue circle', 2: 'a green diamond'})
    assert partial.per_image[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(('gts', 'res'), [
    ({0: ['a']}, {1: 'a'}),
    ({}, {}),
    ({0: []}, {0: 'a'}),
    ({0: 'a red square'}, {0: 'a'}),
])
def test_bad_input_is_a_config_error(gts: dict, res: dict) -> None:
    with pytest.raises(ConfigError):
        metrics.bleu(gts, res)
    with pytest.raises(ConfigError):
        metrics.cider_d(gts, res)


def test_score_captions_keys() -> None:
    out = metrics.score_captions(REF_GTS, REF_RES)
    assert out == pytest.approx({'bleu4': REF_BLEU[3], 'cider': REF_CIDER})
