"""Tests of cdcca_ros.core.uts: entropy (Eq. 2), selectors, token variance (Eq. 3-4),
packing of the kept tokens, the rviz heatmap and the two-stage pipeline."""
from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cdcca_ros.core.uts import (
    ECQ_CODE_LENGTHS,
    ECQ_LIMIT,
    ECQ_STEPS_PER_SIGMA,
    INDEX_BYTES,
    MAX_TOKENS,
    PACK_DTYPES,
    PackedTokens,
    SampleSelector,
    UtsConfig,
    UtsPipeline,
    UtsResult,
    answer_entropy,
    canonical_codes,
    pack_stats,
    pack_tokens,
    select_tokens,
    token_variance,
    unpack_tokens,
    uplink_bytes,
    variance_heatmap,
)
from cdcca_ros.errors import CodecError, ConfigError, ModelError, WireError


# --- Eq. 2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize('vocab', [2, 7, 50, 32000])
def test_entropy_of_uniform_is_log_v(vocab: int) -> None:
    probs = np.full((3, vocab), 1.0 / vocab, dtype=np.float32)
    stats = answer_entropy(probs)
    assert stats.mean == pytest.approx(math.log(vocab), rel=1e-5)
    assert stats.max == pytest.approx(math.log(vocab), rel=1e-5)
    assert stats.per_step.shape == (3,)


def test_entropy_of_one_hot_is_zero_without_warnings() -> None:
    probs = np.eye(5, dtype=np.float32)[[1, 3]]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # log(0) must never be evaluated
        stats = answer_entropy(probs)
    assert stats.mean == 0.0 and stats.max == 0.0
    assert np.all(stats.per_step == 0.0) and not np.any(np.signbit(stats.per_step))


def test_entropy_mean_and_max_over_steps() -> None:
    probs = np.array([[0.25, 0.25, 0.25, 0.25],   # log 4
                      [0.0, 1.0, 0.0, 0.0],       # 0
                      [0.5, 0.0, 0.5, 0.0]])      # log 2
    stats = answer_entropy(probs)
    np.testing.assert_allclose(stats.per_step, [math.log(4), 0.0, math.log(2)], atol=1e-12)
    assert stats.mean == pytest.approx((math.log(4) + math.log(2)) / 3)
    assert stats.max == pytest.approx(math.log(4))


def test_entropy_uses_full_distribution_not_max_prob() -> None:
    # Same chosen-token probability (0.5), different spread of the rest.
    peaked = answer_entropy(np.array([[0.5, 0.5, 0.0, 0.0]])).mean
    spread = answer_entropy(np.array([[0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]])).mean
    assert peaked == pytest.approx(math.log(2))
    assert spread == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 3)))
    assert spread > peaked


def test_entropy_renormalises_rows_and_handles_empty() -> None:
    assert answer_entropy(np.array([[2.0, 2.0]])).mean == pytest.approx(math.log(2))
    empty = answer_entropy(np.zeros((0, 11), dtype=np.float32))
    assert (empty.mean, empty.max, empty.per_step.shape) == (0.0, 0.0, (0,))


@pytest.mark.parametrize('bad', [
    np.array([0.5, 0.5]),                 # 1-D
    np.array([[0.5, -0.1, 0.6]]),         # negative
    np.array([[np.nan, 1.0]]),            # NaN
    np.array([[0.0, 0.0], [0.5, 0.5]]),   # a row summing to 0
])
def test_entropy_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        answer_entropy(bad)


# --- stage-1 selector ------------------------------------------------------------------------
def test_threshold_selector_and_stats() -> None:
    sel = SampleSelector(mode='threshold', threshold=0.5)
    assert [sel.offer(e) for e in (0.1, 0.6, 0.5, 0.9)] == [False, True, False, True]
    assert sel.stats() == {'offered': 4, 'passed': 2, 'pass_rate': 0.5}
    sel.reset()
    assert (sel.offered, sel.passed, sel.pass_rate) == (0, 0, 0.0)


def test_top_fraction_forgets_old_window_entries() -> None:
    # window 3, fraction 0.34: pass when fewer than 0.34 * n earlier entries are >= it.
    sel = SampleSelector(mode='top_fraction', fraction=0.34, window=3)
    got = [sel.offer(e) for e in (10, 10, 10, 1, 1, 1, 2)]
    # The last 2 passes only because the 10s have left the window.
    assert got == [True, False, False, False, False, False, True]


@pytest.mark.parametrize('stream,expected', [
    ([1, 2, 3, 4, 5], [True] * 5),                       # each newcomer is the window max
    ([5, 4, 3, 2, 1], [True, False, False, False, False]),
    ([3.0] * 6, [True] + [False] * 5),                   # ties count against the newcomer
])
def test_top_fraction_on_monotone_and_constant_streams(stream: list[float],
                                                       expected: list[bool]) -> None:
    sel = SampleSelector(mode='top_fraction', fraction=0.5, window=4)
    assert [sel.offer(e) for e in stream] == expected


@pytest.mark.parametrize('fraction', [0.1, 0.2, 0.5])
def test_top_fraction_pass_rate_tracks_fraction(fraction: float) -> None:
    rng = np.random.default_rng(0)
    sel = SampleSelector(mode='top_fraction', fraction=fraction, window=100)
    for e in rng.gamma(2.0, 0.5, size=3000):
        sel.offer(float(e))
    assert sel.pass_rate == pytest.approx(fraction, abs=0.03)


@pytest.mark.parametrize('kwargs', [
    {'mode': 'median'}, {'threshold': -0.1}, {'threshold': math.inf}, {'fraction': 0.0},
    {'fraction': 1.5}, {'window': 0},
])
def test_selector_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SampleSelector(**kwargs)


def test_selector_rejects_nan_entropy() -> None:
    with pytest.raises(ValueError):
        SampleSelector().offer(float('nan'))


# --- Eq. 3-4 ---------------------------------------------------------------------------------
def test_token_variance_finds_noisy_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    m, b, n, f = 16, 2, 10, 8
    feats = torch.randn(1, b, n, f, generator=gen).expand(m, b, n, f).clone()
    noisy = {0: [3, 7], 1: [1, 8]}
    for row, cols in noisy.items():
        feats[:, row, cols] += 3.0 * torch.randn(m, len(cols), f, generator=gen)
    feats += 0.01 * torch.randn(m, b, n, f, generator=gen)
    var = token_variance(feats)
    assert var.shape == (b, n) and var.dtype == torch.float32
    for row, cols in noisy.items():
        assert sorted(torch.topk(var[row], 2).indices.tolist()) == cols
        kept = select_tokens(var[row], mode='threshold', beta=1.0)
        assert kept.tolist() == cols


def test_token_variance_is_population_variance_over_masks() -> None:
    # Values 0 and 2 over M=2 masks: population variance 1 (the unbiased estimate would be 2);
    # the second channel is constant, so the mean over F is 0.5.
    feats = torch.zeros(2, 1, 1, 2)
    feats[1, 0, 0, 0] = 2.0
    assert token_variance(feats).item() == pytest.approx(0.5)


@pytest.mark.parametrize('shape', [(4, 3, 5), (1, 1, 3, 2)])
def test_token_variance_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        token_variance(torch.zeros(shape))


VAR = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
SELECT_CASES = [
    # kwargs, expected kept indices
    ({'mode': 'threshold', 'beta': 0.25}, [0, 2, 3, 4]),
    ({'mode': 'threshold', 'beta': 0.3}, [0, 2, 4]),                   # strict > (Eq. 4)
    ({'mode': 'threshold', 'beta': 0.8}, [2]),
    ({'mode': 'threshold', 'beta': 0.8, 'min_keep': 3}, [0, 2, 4]),
    ({'mode': 'threshold', 'beta': 0.95, 'min_keep': 0}, []),
    ({'mode': 'threshold', 'beta': 0.95}, [2]),                        # min_keep=1 default
    ({'mode': 'threshold', 'beta': 0.8, 'always_keep_cls': True}, [0, 2]),
    ({'mode': 'threshold', 'beta': 0.0, 'min_keep': 10}, [0, 1, 2, 3, 4, 5]),
    ({'mode': 'keep_ratio', 'keep_ratio': 0.4}, [0, 2, 4]),            # ceil(2.4) = 3
    ({'mode': 'keep_ratio', 'keep_ratio': 0.2}, [2, 4]),               # ceil(1.2) = 2
    ({'mode': 'keep_ratio', 'keep_ratio': 0.2, 'always_keep_cls': True}, [0, 2]),
    ({'mode': 'keep_ratio', 'keep_ratio': 0.4, 'always_keep_cls': True}, [0, 2, 4]),
    ({'mode': 'keep_ratio', 'keep_ratio': 0.2, 'min_keep': 4}, [0, 2, 3, 4]),
    ({'mode': 'keep_ratio', 'keep_ratio': 1.0}, [0, 1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize('kwargs,expected', SELECT_CASES)
def test_select_tokens_table(kwargs: dict, expected: list[int]) -> None:
    kept = select_tokens(VAR, **kwargs)
    assert kept.dtype == torch.long
    assert kept.tolist() == expected


def test_select_tokens_breaks_ties_by_lower_index() -> None:
    assert select_tokens(torch.ones(4), mode='keep_ratio', keep_ratio=0.5).tolist() == [0, 1]


@pytest.mark.parametrize('kwargs', [
    {'mode': 'top'}, {'beta': -1.0}, {'keep_ratio': 0.0}, {'keep_ratio': 1.2},
    {'min_keep': -1},
])
def test_select_tokens_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        select_tokens(VAR, **kwargs)


@pytest.mark.parametrize('variance', [torch.zeros(2, 3), torch.zeros(0),
                                      torch.tensor([0.1, float('nan')])])
def test_select_tokens_rejects_bad_variance(variance: Tensor) -> None:
    with pytest.raises(ValueError):
        select_tokens(variance)


# --- packing ---------------------------------------------------------------------------------
def layernorm_like_tokens(k: int, d: int, seed: int = 0, outliers: int = 0) -> Tensor:
    """N(0,1) tokens through a LayerNorm with per-channel gain/bias (+ outlier channels)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, d, generator=gen)
    if k and d > 1:
        x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    gain = torch.empty(d).uniform_(0.5, 1.5, generator=gen)
    bias = 0.1 * torch.randn(d, generator=gen)
    x = x * gain + bias
    if outliers:
        x[:, :outliers] *= 20.0  # ViT-style massive activations in a few channels
    return x


@pytest.mark.parametrize('dtype', PACK_DTYPES)
@pytest.mark.parametrize('k,d', [(0, 8), (1, 1), (5, 48), (6, 64), (7, 9), (64, 768)])
def test_pack_round_trip_sizes_and_error(dtype: str, k: int, d: int) -> None:
    x = layernorm_like_tokens(k, d)
    packed = pack_tokens(x, dtype)
    assert packed.shape == (k, d) and packed.dtype == dtype
    # Scales are float32 values, so a float32 wire field carries them exactly.
    assert all(float(np.float32(s)) == s for s in packed.scale)
    if dtype == 'fp16':
        assert len(packed.data) == 2 * k * d and packed.scale == []
    elif dtype == 'int8':
        assert len(packed.data) == k * d and len(packed.scale) == k
    elif dtype == 'int4':
        assert len(packed.data) == (k * d + 1) // 2 and len(packed.scale) == k
    else:
        assert len(packed.scale) == 1
        assert 8 * len(packed.data) >= 3 * k * d  # every code is >= 3 bits
    assert packed.nbytes == len(packed.data) + 4 * len(packed.scale)
    y = unpack_tokens(packed)
    assert y.shape == (k, d) and y.dtype == torch.float32
    err = (y - x).abs()
    if dtype == 'fp16':
        # Half precision: relative rounding 2^-11, plus the subnormal step near 0.
        assert torch.all(err <= x.abs() * 2.0 ** -11 + 2.0 ** -24)
    elif dtype == 'ecq':
        # Round to nearest step, escapes included: at most half a step anywhere.
        assert torch.all(err <= packed.scale[0] * 0.5 * (1 + 1e-5) + 1e-12)
    else:
        # Round to nearest code: at most half a step of the token's own scale.
        scale = torch.tensor(packed.scale).reshape(k, 1)
        assert torch.all(err <= scale * 0.5 * (1 + 1e-6) + 1e-12)


@pytest.mark.parametrize('outliers,max_rel', [
    (0, {'fp16': 5e-4, 'int8': 0.015, 'int4': 0.2, 'ecq': 0.13}),
    (4, {'fp16': 5e-4, 'int8': 0.07, 'int4': 0.9, 'ecq': 0.13}),
])
def test_pack_error_on_realistic_tokens(outliers: int, max_rel: dict[str, float]) -> None:
    x = layernorm_like_tokens(64, 1408, outliers=outliers)
    stats = {dtype: pack_stats(x, dtype) for dtype in PACK_DTYPES}
    assert stats['fp16'].nbytes == 64 * 1408 * 2
    assert stats['int8'].nbytes == 64 * 1408 + 64 * 4
    assert stats['int4'].nbytes == 64 * 1408 // 2 + 64 * 4
    for dtype, st in stats.items():
        assert st.rel_l2 < max_rel[dtype], dtype
    assert stats['int8'].cosine > 0.998 and stats['fp16'].cosine > 0.99999
    assert stats['int8'].rel_l2 > stats['fp16'].rel_l2  # the price of half the bytes
    # ecq: ~3.4 bits a value on Gaussian-like tokens, fewer bytes than int4 and (with
    # outlier channels) far less error: its step ignores them, they go out as escapes.
    bits = 8 * stats['ecq'].nbytes / x.numel()
    assert 3.2 < bits < (3.6 if not outliers else 3.8)
    assert stats['ecq'].nbytes < stats['int4'].nbytes
    if outliers:
        assert stats['ecq'].rel_l2 < stats['int4'].rel_l2 / 3


def test_int8_exact_for_multiples_of_the_scale_and_zero_tokens() -> None:
    x = torch.tensor([[127.0, -64.0, 1.0], [0.0, 0.0, 0.0], [0.5, -0.25, 0.0]])
    packed = pack_tokens(x, 'int8')
    assert packed.scale[1] == 0.0
    y = unpack_tokens(packed)
    assert torch.equal(y[:2], x[:2])
    assert torch.allclose(y[2], x[2], atol=0.5 / 127)


def test_int4_nibble_layout() -> None:
    x = torch.tensor([[7.0, -7.0, 1.0], [0.0, -1.0, 3.0], [0.0, 0.0, 0.0]])
    packed = pack_tokens(x, 'int4')
    assert packed.scale == [1.0, float(np.float32(3.0 / 7.0)), 0.0]
    # Codes 7 -7 1 | 0 -2 7 | 0 0 0 as two's-complement nibbles, low nibble first; the
    # ninth value leaves the last high nibble 0.
    assert packed.data == bytes([0x97, 0x01, 0x7E, 0x00, 0x00])
    y = unpack_tokens(packed)
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert torch.allclose(y[1], torch.tensor([0.0, -2.0, 7.0]) * packed.scale[1])


def test_ecq_code_is_complete_and_optimal_for_its_gaussian() -> None:
    lengths = ECQ_CODE_LENGTHS
    assert len(lengths) == 2 * ECQ_LIMIT + 1
    assert sum(2.0 ** -n for n in lengths) == 1.0  # complete: every bit string decodes
    codes = canonical_codes(lengths)
    words = [format(c, f'0{n}b') for c, n in zip(codes, lengths, strict=True)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)  # prefix-free
    # P(round(2.5 z) = q), z ~ N(0, 1), the ends taking the tails; a Huffman code for it.
    k, edges = ECQ_STEPS_PER_SIGMA, np.arange(-ECQ_LIMIT + 0.5, ECQ_LIMIT)
    cdf = np.array([0.5 * math.erfc(-e / k / math.sqrt(2.0)) for e in edges])
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    heap = [(p, i, (i,)) for i, p in enumerate(probs)]
    huffman = [0] * len(probs)
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for symbol in a[2] + b[2]:
            huffman[symbol] += 1
        heapq.heappush(heap, (a[0] + b[0], a[1], a[2] + b[2]))
    mean_bits = float(probs @ np.asarray(lengths))
    assert mean_bits == pytest.approx(float(probs @ np.asarray(huffman)), abs=1e-12)
    entropy = float(-(probs * np.log2(probs)).sum())
    assert entropy <= mean_bits < entropy + 0.05


@pytest.mark.parametrize('x', [
    torch.zeros(3, 4),                                                 # step 0
    torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, -1.0]]),       # median 0: rms step
    torch.tensor([[0.1, -0.2, 0.3, 1e4], [-3e5, 0.2, -0.1, 0.05]]),    # escapes, both signs
    torch.tensor([[1e30, -1e30, 2.0, 1.0]]),
])
def test_ecq_edge_values_round_trip(x: Tensor) -> None:
    packed = pack_tokens(x, 'ecq')
    y = unpack_tokens(packed)
    # Half a step, plus the float32 rounding of the decoded value.
    assert torch.all((y - x).abs() <= packed.scale[0] * 0.5 * (1 + 1e-5) + x.abs() * 2.0 ** -24)
    assert not torch.any((y == 0) & (x.abs() > packed.scale[0]))  # nothing clipped to 0


def test_ecq_bit_stream_layout() -> None:
    x = torch.tensor([[0.0, 1.0, -1.0, 12.0]])
    packed = pack_tokens(x, 'ecq')
    # median |x| = 1: sigma = 1 / 0.6745, step = sigma / 2.5, as a float32.
    step = float(np.float32(1.0 / 0.6744897501960817 / ECQ_STEPS_PER_SIGMA))
    assert packed.scale == [step]
    q = [round(v / step) for v in x[0].tolist()]
    assert q == [0, 2, -2, 20]
    codes, lengths = canonical_codes(ECQ_CODE_LENGTHS), ECQ_CODE_LENGTHS
    symbols = [min(max(v, -ECQ_LIMIT), ECQ_LIMIT) + ECQ_LIMIT for v in q]
    bits = ''.join(format(codes[s], f'0{lengths[s]}b') for s in symbols)
    bits += '0' * (-len(bits) % 8)
    stream = int(bits, 2).to_bytes(len(bits) // 8, 'big')
    assert packed.data == stream + bytes([20 - ECQ_LIMIT])  # the escape's remainder, LEB128


def test_uplink_bytes_count_every_token_field() -> None:
    assert INDEX_BYTES == 2 and MAX_TOKENS == 65536
    # payload + scales + kept_indices, each with its 4-byte CDR count.
    assert uplink_bytes(160, 1, 6) == 12 + 160 + 4 + 12
    packed = pack_tokens(layernorm_like_tokens(6, 64), 'ecq')
    result = UtsResult(entropy=answer_entropy(np.full((1, 4), 0.25)),
                       kept_indices=torch.arange(6), variance=torch.zeros(10), packed=packed,
                       stage2_ms=0.0)
    assert result.uplink_bytes == 12 + len(packed.data) + 4 + 2 * 6


@pytest.mark.parametrize('tokens,dtype', [
    (torch.full((2, 3), 1e5), 'fp16'),       # beyond the fp16 range
    (torch.tensor([[1.0, float('nan')]]), 'int8'),
    (torch.tensor([[1.0, float('inf')]]), 'ecq'),
    (torch.zeros(2, 3, 4), 'fp16'),
    (torch.zeros(2, 3, 4), 'ecq'),
])
def test_pack_rejects_unencodable(tokens: Tensor, dtype: str) -> None:
    with pytest.raises(CodecError):
        pack_tokens(tokens, dtype)


def test_pack_rejects_unknown_dtype() -> None:
    with pytest.raises(ConfigError):
        pack_tokens(torch.zeros(2, 2), 'int3')


GOOD_FP16 = pack_tokens(layernorm_like_tokens(3, 4), 'fp16')
GOOD_INT8 = pack_tokens(layernorm_like_tokens(3, 4), 'int8')
GOOD_INT4 = pack_tokens(layernorm_like_tokens(3, 5), 'int4')   # 15 values: one pad nibble
GOOD_ECQ = pack_tokens(layernorm_like_tokens(3, 4), 'ecq')
ESCAPED = torch.tensor([[0.1, -0.2, 0.3, 1e4]])
GOOD_ECQ_ESC = pack_tokens(ESCAPED, 'ecq')
CORRUPT = [
    ('truncated fp16', replace(GOOD_FP16, data=GOOD_FP16.data[:-1])),
    ('extra byte int8', replace(GOOD_INT8, data=GOOD_INT8.data + b'\x00')),
    ('scale count', replace(GOOD_INT8, scale=GOOD_INT8.scale[:-1])),
    ('fp16 with scale', replace(GOOD_FP16, scale=[1.0, 1.0, 1.0])),
    ('unknown dtype', replace(GOOD_INT8, dtype='int3')),
    ('negative scale', replace(GOOD_INT8, scale=[-1.0, 1.0, 1.0])),
    ('nan scale', replace(GOOD_INT8, scale=[float('nan'), 1.0, 1.0])),
    ('negative shape', replace(GOOD_FP16, shape=(-3, -4))),
    ('3-d shape', replace(GOOD_FP16, shape=(3, 2, 2))),
    ('float shape', replace(GOOD_FP16, shape=(3.0, 4.0))),
    ('swapped shape', replace(GOOD_INT8, shape=(4, 3))),
    ('fp16 NaN bytes', replace(GOOD_FP16, data=b'\x00\x7e' + GOOD_FP16.data[2:])),
    ('int8 -128', replace(GOOD_INT8, data=b'\x80' + GOOD_INT8.data[1:])),
    ('truncated int4', replace(GOOD_INT4, data=GOOD_INT4.data[:-1])),
    ('int4 -8', replace(GOOD_INT4, data=b'\x08' + GOOD_INT4.data[1:])),
    ('int4 pad nibble', replace(GOOD_INT4, data=GOOD_INT4.data[:-1]
                                + bytes([GOOD_INT4.data[-1] | 0x10]))),
    ('int4 scale count', replace(GOOD_INT4, scale=GOOD_INT4.scale[:2])),
    ('ecq two scales', replace(GOOD_ECQ, scale=GOOD_ECQ.scale * 2)),
    ('ecq no scale', replace(GOOD_ECQ, scale=[])),
    ('ecq inf scale', replace(GOOD_ECQ, scale=[float('inf')])),
    ('ecq overflowing scale', replace(GOOD_ECQ_ESC, scale=[3e38])),
    ('ecq truncated', replace(GOOD_ECQ, data=GOOD_ECQ.data[:-2])),
    ('ecq extra byte', replace(GOOD_ECQ, data=GOOD_ECQ.data + b'\x01')),
    ('ecq bytes for no value', replace(GOOD_ECQ, shape=(0, 4))),
    ('ecq huge shape', replace(GOOD_ECQ, shape=(1 << 20, 1 << 20))),
    ('ecq empty', replace(GOOD_ECQ, data=b'')),
    ('ecq escape truncated', replace(GOOD_ECQ_ESC, data=GOOD_ECQ_ESC.data[:-1])),
    ('ecq byte after escapes', replace(GOOD_ECQ_ESC, data=GOOD_ECQ_ESC.data + b'\x00')),
]


@pytest.mark.parametrize('name,packed', CORRUPT, ids=[c[0] for c in CORRUPT])
def test_unpack_rejects_corrupt(name: str, packed: PackedTokens) -> None:
    with pytest.raises(WireError):
        unpack_tokens(packed)


def _escape_varint_bytes(packed: PackedTokens) -> int:
    """Length of the single escape varint at the end of ``packed`` (built from ESCAPED)."""
    step = packed.scale[0]
    remainder = round(float(ESCAPED[0, 3]) / step) - ECQ_LIMIT
    return max(1, -(-remainder.bit_length() // 7))


def test_ecq_rejects_bad_padding_and_escapes() -> None:
    packed = pack_tokens(torch.tensor([[0.0, 0.0, 0.0]]), 'ecq')  # 3 x 3 bits: 7 pad bits
    assert len(packed.data) == 2
    with pytest.raises(WireError, match='padding'):
        unpack_tokens(replace(packed, data=packed.data[:1] + bytes([packed.data[1] | 1])))
    n = _escape_varint_bytes(GOOD_ECQ_ESC)
    stream, varint = GOOD_ECQ_ESC.data[:-n], GOOD_ECQ_ESC.data[-n:]
    assert n >= 2 and all(b & 0x80 for b in varint[:-1]) and not varint[-1] & 0x80
    with pytest.raises(WireError, match='minimally'):  # same value, one byte longer
        unpack_tokens(replace(GOOD_ECQ_ESC, data=stream + varint[:-1]
                              + bytes([varint[-1] | 0x80, 0x00])))
    with pytest.raises(WireError, match='longer than'):
        unpack_tokens(replace(GOOD_ECQ_ESC, data=stream + b'\xff' * 5 + b'\x01'))


# --- heatmap ---------------------------------------------------------------------------------
@pytest.mark.parametrize('height,width', [(480, 640), (481, 643)])
def test_heatmap_shape_and_hot_patch(height: int, width: int) -> None:
    rows, cols = 4, 5
    var = torch.full((1 + rows * cols,), 0.1)
    hot = 1 + 2 * cols + 3          # patch (2, 3)
    var[hot] = 5.0
    var[0] = 100.0                  # CLS must not dominate the colour scale
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame_copy = frame.copy()
    out = variance_heatmap(var, (rows, cols), True, frame, kept=None, alpha=1.0)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(frame, frame_copy)
    ph, pw = height // rows, width // cols
    hot_px = out[2 * ph + 5:3 * ph - 5, 3 * pw + 5:4 * pw - 5].reshape(-1, 3).mean(0)
    cold_px = out[5:ph - 5, 5:pw - 5].reshape(-1, 3).mean(0)
    assert hot_px[0] > hot_px[2] + 50      # red over blue where the variance is high
    assert cold_px[2] > cold_px[0] + 10    # blue over red where it is low


def test_heatmap_outlines_kept_patches() -> None:
    rows, cols = 2, 2
    var = torch.tensor([0.0, 1.0, 2.0, 3.0])
    frame = np.full((40, 60, 3), 40, dtype=np.uint8)
    plain = variance_heatmap(var, (rows, cols), False, frame, kept=None)
    boxed = variance_heatmap(var, (rows, cols), False, frame, kept=torch.tensor([1]))
    changed = np.any(plain != boxed, axis=2)
    ys, xs = np.nonzero(changed)
    # Patch 1 is row 0, col 1: pixels y 0..19, x 30..59; only its outline is white.
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 19, 30, 59)
    assert np.all(boxed[changed] == 255)
    assert not changed[10, 45]  # inside the box: untouched


@pytest.mark.parametrize('kwargs', [
    {'variance': torch.zeros(5)},                           # wrong token count
    {'frame': np.zeros((48, 64), dtype=np.uint8)},          # not HxWx3
    {'frame': np.zeros((48, 64, 3), dtype=np.float32)},
    {'kept': [99]},
    {'grid': (0, 4)},
])
def test_heatmap_rejects_bad_input(kwargs: dict) -> None:
    args = {'variance': torch.zeros(17), 'grid': (4, 4), 'has_cls': True,
            'frame': np.zeros((48, 64, 3), dtype=np.uint8), 'kept': None}
    args.update(kwargs)
    with pytest.raises(ValueError):
        variance_heatmap(**args)


# --- config and pipeline ---------------------------------------------------------------------
@pytest.mark.parametrize('kwargs', [
    {'mc_masks': 1}, {'dropout_p': 0.0}, {'dropout_p': 1.0}, {'stage1_mode': 'x'},
    {'stage1_threshold': -1.0}, {'stage1_fraction': 0.0}, {'stage1_window': 0},
    {'stage2_mode': 'x'}, {'beta': -0.5}, {'keep_ratio': 0.0}, {'min_keep': 0},
    {'pack_dtype': 'bf16'},
])
def test_uts_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=list(kwargs)[0]):
        UtsConfig(**kwargs)


class CrossAttentionProbe(nn.Module):
    """A small fixed cross-attention (learned queries over tokens), like the device model's
    Q-Former stage: per-token contribution = attention probability x value, summed over
    queries, under M dropout masks in one batched forward."""

    def __init__(self, dim: int, width: int = 16, queries: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.queries = nn.Parameter(torch.randn(queries, width, generator=gen))
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        with torch.no_grad():
            for layer in (self.key, self.value):
                layer.weight.copy_(torch.randn(width, dim, generator=gen) / math.sqrt(dim))
                layer.bias.zero_()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, tokens: Tensor, p: float, m: int) -> Tensor:
        b, n, d = tokens.shape
        self.calls.append((m * b, n, d))
        gen = torch.Generator().manual_seed(1)
        keep = (torch.rand(m, b, n, d, generator=gen) >= p).float() / (1.0 - p)
        x = (tokens[None] * keep).reshape(m * b, n, d)
        k, v = self.key(x), self.value(x)
        attn = torch.softmax(self.queries @ k.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1)
        contrib = attn.sum(dim=1)[..., None] * v          # [M*B, N, width]
        return contrib.reshape(m, b, n, -1)


def make_tokens(n_patches: int = 16, dim: int = 24, loud: tuple[int, ...] = (5, 11)) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    tokens = 0.3 * torch.randn(1 + n_patches, dim, generator=gen)
    tokens[list(loud)] *= 15.0
    return tokens


def test_pipeline_skips_confident_and_keeps_noisy_tokens() -> None:
    tokens = make_tokens()
    probe = CrossAttentionProbe(tokens.shape[1])
    cfg = UtsConfig(mc_masks=8, dropout_p=0.2, stage1_threshold=0.5, stage2_mode='keep_ratio',
                    keep_ratio=2 / 16, pack_dtype='fp16')
    pipe = UtsPipeline(cfg, probe, has_cls=True)
    confident = np.eye(10, dtype=np.float32)[[2, 4]]
    assert pipe.process(confident, tokens) is None
    assert probe.calls == []  # stage 2 never ran for an unselected sample
    unsure = np.full((2, 10), 0.1, dtype=np.float32)
    result = pipe.process(unsure, tokens)
    assert result is not None
    assert probe.calls == [(8, 17, 24)]  # one batched forward, batch M * B
    assert result.entropy.mean == pytest.approx(math.log(10), rel=1e-5)
    assert result.variance.shape == (17,)
    assert result.kept_indices.tolist() == [0, 5, 11]  # CLS + the two loud tokens
    assert result.packed.shape == (3, 24) and result.packed.nbytes == 3 * 24 * 2
    torch.testing.assert_close(unpack_tokens(result.packed), tokens[[0, 5, 11]],
                               atol=1e-2, rtol=1e-3)
    assert result.stage2_ms >= 0.0
    assert pipe.selector.stats()['passed'] == 1


def test_pipeline_threshold_mode_without_cls() -> None:
    tokens = make_tokens(loud=(3,))
    probe = CrossAttentionProbe(tokens.shape[1])
    cfg = UtsConfig(stage1_mode='top_fraction', stage1_fraction=1.0, stage2_mode='threshold',
                    beta=0.0, min_keep=1, pack_dtype='int8')
    feats = probe(tokens[None], cfg.dropout_p, cfg.mc_masks)
    beta = float(token_variance(feats)[0].sort().values[-2])  # between the top two
    pipe = UtsPipeline(replace(cfg, beta=beta), probe, has_cls=False)
    result = pipe.process(np.full((1, 4), 0.25), tokens)
    assert result is not None
    assert result.kept_indices.tolist() == [3]
    assert len(result.packed.scale) == 1 and result.packed.dtype == 'int8'


def test_pipeline_rejects_wrong_feature_shape() -> None:
    cfg = UtsConfig(stage1_threshold=0.0)
    pipe = UtsPipeline(cfg, lambda t, p, m: torch.zeros(m, 1, t.shape[1] - 1, 4))
    with pytest.raises(ModelError, match='mc_features'):
        pipe.process(np.full((1, 4), 0.25), make_tokens())


def test_pipeline_packs_ecq_and_counts_uplink_bytes() -> None:
    tokens = make_tokens()
    probe = CrossAttentionProbe(tokens.shape[1])
    cfg = UtsConfig(stage1_threshold=0.0, keep_ratio=0.5, pack_dtype='ecq')
    result = UtsPipeline(cfg, probe, has_cls=True).process(np.full((1, 4), 0.25), tokens)
    assert result is not None and result.packed.dtype == 'ecq'
    k = result.kept_indices.numel()
    assert k == 1 + 8  # CLS + half the patches
    kept = tokens[result.kept_indices]
    assert torch.all((unpack_tokens(result.packed) - kept).abs()
                     <= result.packed.scale[0] * 0.5 * (1 + 1e-5))
    assert result.uplink_bytes == 12 + len(result.packed.data) + 4 + 2 * k


def test_pipeline_rejects_more_tokens_than_uint16_indices() -> None:
    calls = []
    pipe = UtsPipeline(UtsConfig(stage1_threshold=0.0), lambda t, p, m: calls.append(t))
    with pytest.raises(ValueError, match='uint16'):
        pipe.process(np.full((1, 4), 0.25), torch.zeros(MAX_TOKENS + 1, 2))
    assert calls == [] and pipe.selector.offered == 0


# --- the audit stream and the token ring ---------------------------------------------------
def test_audit_samples_are_drawn_whatever_the_uncertainty():
    from cdcca_ros.core.uts import UtsConfig, UtsPipeline

    tokens = torch.randn(10, 8)
    sure = np.zeros((2, 5), np.float32)
    sure[:, 0] = 1.0  # zero entropy: stage 1 never selects it
    feats = lambda t, p, m: torch.rand(m, 1, t.shape[1], 4)  # noqa: E731
    never = UtsPipeline(UtsConfig(stage1_threshold=10.0, audit_fraction=0.0), feats)
    assert all(never.process(sure, tokens) is None for _ in range(50))
    half = UtsPipeline(UtsConfig(stage1_threshold=10.0, audit_fraction=0.5, audit_seed=1), feats)
    results = [half.process(sure, tokens) for _ in range(400)]
    audits = [r for r in results if r is not None]
    assert 0.4 < len(audits) / 400 < 0.6 and half.audits == len(audits)
    r = audits[0]
    assert r.audit and r.kept_indices.tolist() == list(range(10))
    assert r.packed.shape == (10, 8)
    with pytest.raises(ConfigError):
        UtsConfig(audit_fraction=1.5)


def test_token_ring_returns_the_rest_and_stays_bounded():
    from cdcca_ros.core.uts import TokenRing

    ring = TokenRing(max_samples=3, max_bytes=10_000)
    full = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    ring.put('a', full, torch.tensor([0, 2, 5]))
    tokens, idx = ring.rest('a')
    assert idx.tolist() == [1, 3, 4, 6, 7, 8, 9] and torch.equal(tokens, full[idx])
    for name in 'bcd':
        ring.put(name, full, torch.tensor([0]))
    assert len(ring) == 3 and ring.rest('a') is None  # the oldest went
    assert ring.missed == 1 and ring.served == 1
    big = TokenRing(max_samples=100, max_bytes=400)
    for i in range(5):
        big.put(str(i), full, torch.tensor([0]))  # 160 bytes each
    assert big.nbytes <= 400 and len(big) == 2
