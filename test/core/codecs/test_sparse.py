"""The sparse codec (ours): selection, escapes, scopes, rate against NF4, stream checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sample_deltas import lora_like

from cdcca_ros.core import codecs, dwc
from cdcca_ros.core.codecs import container
from cdcca_ros.errors import CodecError, ConfigError


# --- encoding and decoding ----------------------------------------------------------------
def test_sparse_decodes_with_any_knobs() -> None:
    delta = lora_like()
    payload = codecs.get_codec('sparse', density=0.3, bits=2.5, scope='global').encode(delta)
    a = codecs.get_codec('sparse').decode(payload)
    b = codecs.decode_payload(payload)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert codecs.read_payload_codec(payload) == 'sparse'


def test_sparse_empty_and_zero_delta() -> None:
    codec = codecs.get_codec('sparse')
    assert codec.decode(codec.encode({})) == {}
    zero = {'a': torch.zeros(8, 8), 'b': torch.zeros(3)}
    out = codec.decode(codec.encode(zero))
    assert all(torch.equal(out[k], zero[k]) for k in zero)


def test_sparse_escapes_outliers_exactly_enough() -> None:
    # A few huge values beyond the direct symbol range travel as escapes.
    delta = lora_like(seed=5)
    delta['qformer.query_tokens'][0, 0, :4] = torch.tensor([5.0, -7.0, 11.0, -3.0])
    codec = codecs.get_codec('sparse', bits=6)
    out = codec.decode(codec.encode(delta))
    torch.testing.assert_close(out['qformer.query_tokens'][0, 0, :4],
                               delta['qformer.query_tokens'][0, 0, :4], rtol=0.02, atol=0)


def test_sparse_importance_steers_selection() -> None:
    # Equal magnitudes: only the importance (input-activation scale) decides what is kept.
    g = torch.Generator().manual_seed(2)
    delta = {'w': torch.sign(torch.randn(32, 64, generator=g)) * 1e-3}
    act_scale = torch.cat([torch.full((32,), 10.0), torch.full((32,), 0.1)])
    codec = codecs.get_codec('sparse', density=0.5)
    out = codec.decode(codec.encode(delta, importance={'w': act_scale}))['w']
    assert int(torch.count_nonzero(out[:, :32])) == 32 * 32
    assert int(torch.count_nonzero(out[:, 32:])) == 0
    with pytest.raises(CodecError, match='broadcast'):
        codec.encode(delta, importance={'w': torch.ones(7)})


def test_global_scope_beats_tensor_scope_on_uneven_tensors() -> None:
    # One tensor 30x larger than the others: a global threshold spends the bits where the
    # L2 error is, so at the same density its total error is lower.
    delta = lora_like(seed=4)
    delta['layers.0.q_proj.lora_A.weight'] *= 30
    errs = {}
    for scope in codecs.SPARSE_SCOPES:
        codec = codecs.get_codec('sparse', density=0.1, bits=3, scope=scope)
        errs[scope] = dwc.rel_l2_error(delta, codec.decode(codec.encode(delta)))
    assert errs['global'] < 0.8 * errs['tensor']


def test_sparse_refuses_bad_knobs() -> None:
    for knobs in ({'density': 0.0}, {'density': 1.5}, {'bits': 0.0}, {'bits': 20},
                  {'scope': 'layer'}):
        with pytest.raises(ConfigError):
            codecs.get_codec('sparse', **knobs)


def _nf4_bits_and_err(delta: dict[str, torch.Tensor], **knobs: object) -> tuple[float, float]:
    codec = codecs.get_codec('nf4', **knobs)
    payload = codec.encode(delta)
    return (8 * len(payload) / dwc.num_params(delta),
            dwc.rel_l2_error(delta, codec.decode(payload)))


@pytest.mark.parametrize('heavy', [0.0, 0.02])
def test_ours_needs_fewer_bits_than_nf4_at_equal_accuracy(heavy: float) -> None:
    # ~63k values: big enough that the container's ~0.8 kB is not what is compared.
    delta = lora_like(hidden=768, heavy=heavy, seed=7)
    nf4_bits, nf4_err = _nf4_bits_and_err(delta)
    dq_bits, dq_err = _nf4_bits_and_err(delta, double_quant=True)
    assert 4.45 < nf4_bits < 4.7 and 4.1 < dq_bits < nf4_bits
    # Equal accuracy: the coarsest of our settings that is at least as accurate as NF4.
    target = min(nf4_err, dq_err)
    for bits in np.arange(3.5, 5.0, 0.05).tolist():
        ours = dwc.compress(delta, codecs.get_codec('sparse', bits=bits)).stats
        if ours.rel_l2_error <= target:
            break
    assert ours.rel_l2_error <= target
    assert ours.bits_per_param < 0.93 * dq_bits
    if heavy:
        # With heavy tails the many small values are cheap symbols for us, while NF4 still
        # spends 4 bits on each.
        assert ours.bits_per_param < 0.8 * dq_bits


# --- stream checks ------------------------------------------------------------------------
def _sparse_arrays(payload: bytes, spec) -> dict[str, np.ndarray]:
    return dict(container.read_payload(payload, spec=spec).arrays)


@pytest.mark.parametrize('tamper, error', [
    ('extra_word', 'more data'),
    ('no_escapes', 'escapes'),
    ('freq_sum', 'sums to'),
    ('freq_odd', 'entries'),
    ('step_count', "'step'"),
    ('lv1_dtype', "'lv1'"),
    ('no_ans', "'ans'"),
    ('last_word_zero', 'ANS stream is invalid'),
])
def test_consistent_checksum_but_inconsistent_stream_is_refused(tamper: str, error: str) -> None:
    # A payload rebuilt with a valid checksum (as a broken encoder would) but arrays that do
    # not agree with each other: the decoder checks the coder, the counts and the tables.
    delta = lora_like(seed=12)
    delta['qformer.query_tokens'][0, 0, 0] = 5.0  # one escape
    payload = codecs.get_codec('sparse', bits=6).encode(delta, self_describing=False)
    arrays = _sparse_arrays(payload, delta)
    assert arrays['esc'].size >= 1
    if tamper == 'extra_word':
        arrays['ans'] = np.concatenate([arrays['ans'], np.asarray([7], np.uint32)])
    elif tamper == 'no_escapes':
        del arrays['esc']
    elif tamper == 'freq_sum':
        arrays['freq'] = arrays['freq'].copy()
        arrays['freq'][0] += 1
    elif tamper == 'freq_odd':
        arrays['freq'] = arrays['freq'][:-1]
    elif tamper == 'step_count':
        arrays['step'] = arrays['step'][:-1]
    elif tamper == 'lv1_dtype':
        arrays['lv1'] = arrays['lv1'].astype(np.int32)
    elif tamper == 'no_ans':
        del arrays['ans']
    else:
        arrays['ans'] = np.concatenate([arrays['ans'], np.zeros(1, np.uint32)])
    entries = container.entries(delta, self_describing=False)
    bad = container.write_payload('sparse', {}, entries, arrays, self_describing=False)
    with pytest.raises(CodecError, match=error):
        codecs.decode_payload(bad, spec=delta)
