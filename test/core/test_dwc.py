"""DWC (Eq. 7-8): delta arithmetic, codecs, payload robustness, byte budget, error feedback."""
from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.numpy
import torch

from cdcca_ros.core import dwc
from cdcca_ros.core.wire import state_dict_hash
from cdcca_ros.errors import CodecError, ConfigError, DeltaMismatchError, PayloadTooLargeError


def lora_like(seed: int = 0, hidden: int = 128, rank: int = 8, layers: int = 2,
              heavy: float = 0.0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A LoRA-like trainable-set delta: A/B pairs, norms, biases, query tokens."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for mod in ('q_proj', 'v_proj'):
            shapes[f'layers.{layer}.{mod}.lora_A.weight'] = (rank, hidden)
            shapes[f'layers.{layer}.{mod}.lora_B.weight'] = (hidden, rank)
        shapes[f'layers.{layer}.norm.weight'] = (hidden,)
        shapes[f'layers.{layer}.fc1.bias'] = (4 * hidden,)
    shapes['qformer.query_tokens'] = (1, 8, hidden)
    out = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g) * scale
        if heavy:
            # A heavy-tailed fraction: Student-t(2) values five times wider.
            mask = torch.rand(shape, generator=g) < heavy
            # (chi-squared with 2 degrees of freedom from the seeded generator, so the data
            # do not depend on the global RNG, i.e. on which tests ran before)
            chi2 = torch.randn(shape, generator=g) ** 2 + torch.randn(shape, generator=g) ** 2
            t = torch.randn(shape, generator=g) / torch.sqrt(chi2 / 2.0)
            x = torch.where(mask, t * 5 * scale, x)
        out[name] = x
    return out


def mixed_dtypes() -> dict[str, torch.Tensor]:
    """Small delta with every supported dtype, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(3)
    return {
        'w32': torch.randn(16, 24, generator=g) * 1e-3,
        'w16': (torch.randn(40, generator=g) * 1e-2).half(),
        'wbf': (torch.randn(4, 10, generator=g) * 1e-2).bfloat16(),
        'w64': torch.randn(33, generator=g, dtype=torch.float64) * 1e-3,
        'scalar': torch.tensor(0.25),
        'empty': torch.zeros(0, 5),
    }


# --- compute_delta / apply_delta ----------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_delta_round_trip_keeps_dtype_and_values(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    base = {'a': torch.randn(5, 7, generator=g).to(dtype), 'b': torch.randn(3, generator=g)
            .to(dtype)}
    trained = {k: (v.double() + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64))
               .to(dtype) for k, v in base.items()}
    delta = dwc.compute_delta(trained, base)
    assert all(d.dtype == torch.promote_types(dtype, torch.float32) for d in delta.values())
    back = dwc.apply_delta(base, delta)
    for k in base:
        assert back[k].dtype == dtype
        torch.testing.assert_close(back[k], trained[k])
    # apply_delta works on a copy.
    assert not torch.equal(back['a'], base['a'])


@pytest.mark.parametrize('case, error', [
    ('missing_key', 'missing'),
    ('extra_key', 'unexpected'),
    ('shape', 'shape'),
    ('dtype', 'dtype'),
    ('int', 'float dtype'),
])
def test_delta_arithmetic_is_strict(case: str, error: str) -> None:
    base = {'a': torch.zeros(2, 3), 'b': torch.zeros(4)}
    other = {'a': torch.ones(2, 3), 'b': torch.ones(4)}
    if case == 'missing_key':
        del other['b']
    elif case == 'extra_key':
        other['c'] = torch.ones(1)
    elif case == 'shape':
        other['a'] = torch.ones(3, 2)
    elif case == 'dtype':
        other['a'] = torch.ones(2, 3, dtype=torch.float64)
    else:
        other['b'] = torch.ones(4, dtype=torch.int64)
    with pytest.raises(DeltaMismatchError, match=error):
        dwc.compute_delta(other, base)
    if case != 'dtype':  # apply_delta accepts a float delta of another precision
        with pytest.raises(DeltaMismatchError, match=error):
            dwc.apply_delta(base, other)


# --- codecs: round trips ------------------------------------------------------------------
# (codec, knobs, max relative L2 error on lora_like(), max fraction of non-zero values)
CODEC_CASES = [
    ('fp16', {}, 1e-3, 1.0),
    ('nf4', {}, 0.11, 1.0),
    ('nf4', {'double_quant': True}, 0.11, 1.0),
    ('sparse', {}, 0.085, 1.0),
    ('sparse', {'bits': 3.7}, 0.10, 1.0),
    ('sparse', {'bits': 8.0}, 0.006, 1.0),
    ('sparse', {'density': 0.25, 'bits': 3.0}, 0.60, 0.25),
    ('sparse', {'density': 0.1, 'bits': 2.0, 'scope': 'global'}, 0.80, 0.10),
]


@pytest.mark.parametrize('name, knobs, max_err, max_nonzero', CODEC_CASES)
def test_codec_round_trip_within_stated_error(name: str, knobs: dict, max_err: float,
                                              max_nonzero: float) -> None:
    delta = lora_like()
    codec = dwc.get_codec(name, **knobs)
    payload = codec.encode(delta)
    out = codec.decode(payload)
    assert list(out) == list(delta)
    for k, v in delta.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    err = dwc.rel_l2_error(delta, out)
    assert err <= max_err
    nz = sum(int(torch.count_nonzero(t)) for t in out.values()) / dwc.num_params(delta)
    assert nz <= max_nonzero + 1e-9
    # Encoding is deterministic in what it carries (safetensors may order the header's
    # metadata differently from run to run, so the bytes themselves are not compared).
    again = dwc.decode_payload(codec.encode(delta))
    assert all(torch.equal(again[k], out[k]) for k in out)


@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_codec_handles_every_dtype_scalar_and_empty(name: str) -> None:
    delta = mixed_dtypes()
    out = dwc.get_codec(name).decode(dwc.get_codec(name).encode(delta))
    for k, v in delta.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
    assert out['empty'].numel() == 0
    assert dwc.rel_l2_error(delta, out) < 0.12


def test_sparse_decodes_with_any_knobs() -> None:
    delta = lora_like()
    payload = dwc.get_codec('sparse', density=0.3, bits=2.5, scope='global').encode(delta)
    a = dwc.get_codec('sparse').decode(payload)
    b = dwc.decode_payload(payload)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dwc.read_payload_codec(payload) == 'sparse'


def test_sparse_empty_and_zero_delta() -> None:
    codec = dwc.get_codec('sparse')
    assert codec.decode(codec.encode({})) == {}
    zero = {'a': torch.zeros(8, 8), 'b': torch.zeros(3)}
    out = codec.decode(codec.encode(zero))
    assert all(torch.equal(out[k], zero[k]) for k in zero)


def test_sparse_escapes_outliers_exactly_enough() -> None:
    # A few huge values beyond the direct symbol range travel as escapes.
    delta = lora_like(seed=5)
    delta['qformer.query_tokens'][0, 0, :4] = torch.tensor([5.0, -7.0, 11.0, -3.0])
    out = dwc.get_codec('sparse', bits=6).decode(dwc.get_codec('sparse', bits=6).encode(delta))
    torch.testing.assert_close(out['qformer.query_tokens'][0, 0, :4],
                               delta['qformer.query_tokens'][0, 0, :4], rtol=0.02, atol=0)


def test_sparse_importance_steers_selection() -> None:
    # Equal magnitudes: only the importance (input-activation scale) decides what is kept.
    g = torch.Generator().manual_seed(2)
    delta = {'w': torch.sign(torch.randn(32, 64, generator=g)) * 1e-3}
    act_scale = torch.cat([torch.full((32,), 10.0), torch.full((32,), 0.1)])
    codec = dwc.get_codec('sparse', density=0.5)
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
    for scope in dwc.SPARSE_SCOPES:
        codec = dwc.get_codec('sparse', density=0.1, bits=3, scope=scope)
        errs[scope] = dwc.rel_l2_error(delta, codec.decode(codec.encode(delta)))
    assert errs['global'] < 0.8 * errs['tensor']


def _nf4_bits_and_err(delta: dict[str, torch.Tensor], **knobs: object) -> tuple[float, float]:
    codec = dwc.get_codec('nf4', **knobs)
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
        ours = dwc.compress(delta, dwc.get_codec('sparse', bits=bits)).stats
        if ours.rel_l2_error <= target:
            break
    assert ours.rel_l2_error <= target
    assert ours.bits_per_param < 0.93 * dq_bits
    if heavy:
        # With heavy tails the many small values are cheap symbols for us, while NF4 still
        # spends 4 bits on each.
        assert ours.bits_per_param < 0.8 * dq_bits


@pytest.mark.parametrize('name, knobs', [('fp16', {}), ('sparse', {})])
def test_encode_refuses_bad_values(name: str, knobs: dict) -> None:
    codec = dwc.get_codec(name, **knobs)
    for bad in (float('nan'), float('inf')):
        with pytest.raises(CodecError, match='non-finite'):
            codec.encode({'a': torch.tensor([0.0, bad])})
    with pytest.raises(CodecError, match='float'):
        codec.encode({'a': torch.arange(3)})


def test_fp16_refuses_overflow_and_sparse_refuses_bad_knobs() -> None:
    with pytest.raises(CodecError, match='float16 range'):
        dwc.get_codec('fp16').encode({'a': torch.tensor([1e6])})
    for knobs in ({'density': 0.0}, {'density': 1.5}, {'bits': 0.0}, {'bits': 20},
                  {'scope': 'layer'}):
        with pytest.raises(ConfigError):
            dwc.get_codec('sparse', **knobs)
    with pytest.raises(CodecError, match='unknown codec'):
        dwc.get_codec('zip')


# --- payload robustness -------------------------------------------------------------------
@pytest.fixture(scope='module')
def payloads() -> dict[str, bytes]:
    delta = lora_like(hidden=32, layers=1)
    return {name: dwc.get_codec(name).encode(delta) for name in dwc.codec_names()}


@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_truncated_payload_raises_codec_error(name: str, payloads: dict[str, bytes]) -> None:
    payload = payloads[name]
    codec = dwc.get_codec(name)
    for cut in (0, 1, 7, 8, 9, 100, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut])
    with pytest.raises(CodecError):
        codec.decode(payload + b'\x00')


@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_corrupted_byte_never_decodes_to_other_values(name: str,
                                                      payloads: dict[str, bytes]) -> None:
    # Every single-byte corruption either raises CodecError or (a flip in whitespace or in
    # the informational params) decodes to exactly the same tensors.
    payload = payloads[name]
    codec = dwc.get_codec(name)
    ref = codec.decode(payload)
    rng = np.random.default_rng(0)
    positions = sorted(set(rng.integers(0, len(payload), 150).tolist()) | {0, 8, 9})
    raised = 0
    for pos in positions:
        bad = bytearray(payload)
        bad[pos] ^= 0x5A
        try:
            out = codec.decode(bytes(bad))
        except CodecError:
            raised += 1
            continue
        assert list(out) == list(ref) and all(torch.equal(out[k], ref[k]) for k in ref), pos
    assert raised >= 0.9 * len(positions)


@pytest.mark.parametrize('garbage', [
    b'', b'garbage', b'\xff' * 64, bytes(range(256)) * 3,
    safetensors.numpy.save({'x': np.zeros(3, np.float32)}),
    safetensors.numpy.save({'x': np.zeros(3, np.float32)},
                           metadata={'format': 'cdcca-dwc', 'version': '1', 'codec': 'fp16'}),
    safetensors.numpy.save({'x': np.zeros(3, np.float32)},
                           metadata={'format': 'cdcca-dwc', 'version': '9', 'codec': 'fp16'}),
])
def test_garbage_raises_codec_error(garbage: bytes) -> None:
    for name in dwc.codec_names():
        with pytest.raises(CodecError):
            dwc.get_codec(name).decode(garbage)
    with pytest.raises(CodecError):
        dwc.decode_payload(garbage)


def test_payload_of_another_codec_is_refused(payloads: dict[str, bytes]) -> None:
    with pytest.raises(CodecError, match="encoded by codec 'sparse'"):
        dwc.get_codec('fp16').decode(payloads['sparse'])
    with pytest.raises(CodecError):
        dwc.get_codec('sparse').decode('not bytes')  # type: ignore[arg-type]


def test_decode_respects_max_numel(payloads: dict[str, bytes]) -> None:
    with pytest.raises(CodecError, match='max_numel'):
        dwc.decode_payload(payloads['sparse'], max_numel=100)


# --- byte budget --------------------------------------------------------------------------
@pytest.mark.parametrize('knob, budgets', [
    ('auto', (1_500, 2_500, 4_000)),  # the smallest one needs density below 1 bit
    ('bits', (3_000, 4_000, 5_000)),
    ('density', (1_500, 2_500, 4_000)),
])
def test_compress_fits_budget_and_reports_stats(knob: str, budgets: tuple[int, ...]) -> None:
    delta = lora_like()  # ~6.3 kB at the codec's own setting
    n = dwc.num_params(delta)
    errs = []
    for budget in budgets:
        c = dwc.compress(delta, dwc.get_codec('sparse'), budget, knob=knob)
        assert len(c.payload) == c.stats.nbytes <= budget
        assert c.stats.num_params == n
        assert c.stats.bits_per_param == pytest.approx(8 * c.stats.nbytes / n)
        assert c.stats.rel_l2_error == pytest.approx(dwc.rel_l2_error(delta, c.decoded))
        # The budget is used, not wasted: within 15% of it.
        assert c.stats.nbytes > 0.85 * budget
        # The decoding is exactly what the device gets from the bytes.
        dev = dwc.decode_payload(c.payload)
        assert all(torch.equal(dev[k], c.decoded[k]) for k in dev)
        errs.append(c.stats.rel_l2_error)
    assert errs[0] > errs[1] > errs[2]


def test_compress_without_budget_and_over_budget() -> None:
    delta = lora_like()
    c = dwc.compress(delta, dwc.get_codec('sparse'))
    assert c.codec.describe() == dwc.get_codec('sparse').describe()
    # ~4 bits of symbols plus the fixed ~0.8 kB container spread over 10.5k values.
    assert 4.0 < c.stats.bits_per_param < 4.9
    with pytest.raises(PayloadTooLargeError, match='no knob'):
        dwc.compress(delta, dwc.get_codec('fp16'), 10_000)
    with pytest.raises(PayloadTooLargeError, match='budget'):
        dwc.compress(delta, dwc.get_codec('sparse'), 200)
    with pytest.raises(ConfigError):
        dwc.compress(delta, dwc.get_codec('sparse'), 10_000, knob='rank')


# --- error feedback -----------------------------------------------------------------------
def _run_rounds(enabled: bool, rounds: int = 20) -> tuple[list[float], list[float], bool]:
    """Cloud trains, compresses with (or without) feedback; a device applies the bytes."""
    g = torch.Generator().manual_seed(11)
    shapes = {'a': (8, 64), 'b': (64, 8), 'norm': (64,)}
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    # A consistent drift plus noise, like successive training rounds on a shifted domain.
    drift = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    codec = dwc.get_codec('sparse', bits=2.0, density=0.1)
    ef = dwc.ErrorFeedback(base, enabled=enabled)
    device = {k: v.clone() for k, v in base.items()}
    trained = {k: v.clone() for k, v in base.items()}
    gaps, update_norms = [], []
    hashes_match = True
    for _ in range(rounds):
        new = {k: v + drift[k] + torch.randn(v.shape, generator=g) * 1e-3
               for k, v in trained.items()}
        raw = dwc.compute_delta(new, trained)
        trained = new
        sent = ef.compensate(raw)
        c = dwc.compress(sent, codec)
        ef.commit(sent, c.decoded)
        device = dwc.apply_delta(device, dwc.decode_payload(c.payload))
        hashes_match &= state_dict_hash(device) == ef.view_hash()
        gap = dwc.compute_delta(trained, ef.view)
        gaps.append(math.sqrt(sum(float((v ** 2).sum()) for v in gap.values())))
        update_norms.append(math.sqrt(sum(float((v ** 2).sum()) for v in raw.values())))
        if enabled:
            # The residual is exactly what the device still lacks.
            for k in gap:
                torch.testing.assert_close(ef.residual[k], gap[k], atol=1e-6, rtol=1e-4)
    return gaps, update_norms, hashes_match


def test_error_feedback_bounds_the_gap_and_without_it_the_device_drifts() -> None:
    gaps_ef, updates, match_ef = _run_rounds(enabled=True)
    gaps_raw, _, match_raw = _run_rounds(enabled=False)
    # The cloud's view is bit-identical to the device copy, with or without feedback.
    assert match_ef and match_raw
    # With feedback the gap stays within a few rounds' worth of updates and stops growing.
    assert max(gaps_ef) < 3.0 * max(updates)
    assert gaps_ef[-1] <= 1.2 * max(gaps_ef[:10])
    # Without it the dropped parts pile up round after round.
    assert gaps_raw[-1] > 3.0 * gaps_ef[-1]
    assert gaps_raw[-1] > 2.0 * gaps_raw[4]


def test_error_feedback_state_round_trips_through_safetensors(tmp_path) -> None:
    base = {'a': torch.randn(4, 6), 'b': torch.randn(5).bfloat16()}
    ef = dwc.ErrorFeedback(base)
    sent = {k: torch.full(v.shape, 0.1) for k, v in base.items()}
    decoded = {k: torch.full(v.shape, 0.075) for k, v in base.items()}
    ef.commit(sent, decoded)
    path = tmp_path / 'ef.safetensors'
    ef.save(path)
    back = dwc.ErrorFeedback.load(path)
    assert back.enabled and back.view_hash() == ef.view_hash()
    for k in base:
        assert torch.equal(back.residual[k], ef.residual[k])
        assert back.view[k].dtype == base[k].dtype
    torch.testing.assert_close(back.residual['a'], torch.full((4, 6), 0.025))
    with pytest.raises(DeltaMismatchError, match='stray'):
        dwc.ErrorFeedback.from_state_dict({**ef.state_dict(), 'x': torch.zeros(1)})
    with pytest.raises(DeltaMismatchError):
        ef.compensate({'a': torch.zeros(4, 6)})


# --- compact payloads (what the cloud sends) ------------------------------------------------
def _sparse_arrays(payload: bytes, spec) -> dict[str, np.ndarray]:
    return dict(dwc._read_payload(payload, spec=spec).arrays)


@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_compact_payload_round_trips_with_the_spec_in_any_order(name: str) -> None:
    delta = lora_like(seed=8)
    codec = dwc.get_codec(name)
    full = codec.decode(codec.encode(delta))
    compact = codec.encode(delta, self_describing=False)
    assert not dwc.is_self_describing(compact) and dwc.is_self_describing(codec.encode(delta))
    assert dwc.read_payload_codec(compact) == name
    shapes = {k: tuple(v.shape) for k, v in reversed(list(delta.items()))}
    for spec in (delta, shapes):
        out = codec.decode(compact, spec=spec)
        assert list(out) == sorted(delta)  # compact payloads come out in name order
        for k, v in full.items():
            assert out[k].dtype == torch.float32 and torch.equal(out[k], v.float()), k
    assert len(compact) < len(codec.encode(delta))


def test_compact_container_overhead_is_small() -> None:
    # 13 tensors: the self-describing index (zlib'd names and shapes) costs ~190 bytes, the
    # compact spec digest 8.
    zero = {k: torch.zeros_like(v) for k, v in lora_like().items()}
    codec = dwc.get_codec('sparse')
    compact = len(codec.encode(zero, self_describing=False))
    assert compact < 64
    assert len(codec.encode(zero)) > compact + 150


def test_compact_payload_needs_the_matching_spec() -> None:
    delta = lora_like(seed=9)
    payload = dwc.get_codec('sparse').encode(delta, self_describing=False)
    with pytest.raises(CodecError, match='spec'):
        dwc.decode_payload(payload)
    renamed = {('x' + k if k.endswith('bias') else k): v for k, v in delta.items()}
    reshaped = dict(delta, **{'qformer.query_tokens': torch.zeros(1, 4, 256)})
    missing = dict(list(delta.items())[1:])
    for spec in (renamed, reshaped, missing):
        with pytest.raises(CodecError, match='another trainable set'):
            dwc.decode_payload(payload, spec=spec)
    for bad in ({'a': (-1, 2)}, {'a': 'x'}, [('a', (2,))]):
        with pytest.raises(CodecError, match='spec'):
            dwc.decode_payload(payload, spec=bad)
    with pytest.raises(CodecError, match='max_numel'):
        dwc.decode_payload(payload, spec=delta, max_numel=100)


def test_compress_compact_decodes_in_the_delta_order() -> None:
    delta = lora_like(seed=10)
    c = dwc.compress(delta, dwc.get_codec('sparse'), 2_000, self_describing=False)
    assert list(c.decoded) == list(delta) and len(c.payload) <= 2_000
    dev = dwc.decode_payload(c.payload, spec=delta)
    assert all(torch.equal(dev[k], c.decoded[k]) for k in delta)


def test_every_corrupted_byte_of_a_compact_payload_is_refused() -> None:
    delta = lora_like(hidden=32, layers=1)
    payload = dwc.get_codec('sparse').encode(delta, self_describing=False)
    for pos in range(len(payload)):
        bad = bytearray(payload)
        bad[pos] ^= 0x21
        with pytest.raises(CodecError):
            dwc.decode_payload(bytes(bad), spec=delta)


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
    payload = dwc.get_codec('sparse', bits=6).encode(delta, self_describing=False)
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
    entries = dwc._entries(delta, self_describing=False)
    bad = dwc._write_payload('sparse', {}, entries, arrays, self_describing=False)
    with pytest.raises(CodecError, match=error):
        dwc.decode_payload(bad, spec=delta)


def test_container_refuses_malformed_headers() -> None:
    good = dwc.get_codec('fp16').encode({'a': torch.ones(3)})

    def sealed(body: bytes) -> bytes:
        import hashlib

        return body + hashlib.sha256(body).digest()[:8]

    body = good[:-8]
    cases = {
        'version': body[:4] + bytes([9]) + body[5:],
        'flags': body[:5] + bytes([body[5] | 0x80]) + body[6:],
        'codec name': body[:6] + bytes([0]) + body[7:],
        'stray bytes': body + b'\x00',
        'shorter': body[:-3],
        'truncated': body[:12],
    }
    for what, bad in cases.items():
        with pytest.raises(CodecError, match=what.split()[0]):
            dwc.decode_payload(sealed(bad))
    with pytest.raises(CodecError, match='checksum'):
        dwc.decode_payload(good[:-1] + bytes([good[-1] ^ 1]))


# --- flat decoding (the device's path) ------------------------------------------------------
@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_decode_flat_is_decode_in_name_order(name: str) -> None:
    delta = dict(reversed(list(lora_like(seed=11, heavy=0.02).items())))
    delta['empty.bias'] = torch.zeros(0)
    delta['zero.bias'] = torch.zeros(7)
    codec = dwc.get_codec(name)
    payload = codec.encode(delta, self_describing=False)
    tensors = codec.decode(payload, spec=delta)
    flat = codec.decode_flat(payload, delta)
    assert flat.names == tuple(sorted(delta)) == tuple(tensors)
    assert flat.shapes == {k: tuple(v.shape) for k, v in delta.items()}
    assert flat.values.dtype == torch.float32 and flat.values.ndim == 1
    assert torch.equal(flat.values, torch.cat([tensors[k].reshape(-1) for k in flat.names]))
    assert all(torch.equal(v, tensors[k]) for k, v in flat.tensors().items())
    assert torch.equal(dwc.flatten_delta(tensors, delta).values, flat.values)
    assert flat.first_non_finite() is None


def test_decode_flat_reads_compact_payloads_only() -> None:
    delta = lora_like(seed=12)
    codec = dwc.get_codec('sparse')
    with pytest.raises(CodecError, match='self-describing'):
        codec.decode_flat(codec.encode(delta), delta)
    payload = codec.encode(delta, self_describing=False)
    with pytest.raises(CodecError, match='another trainable set'):
        codec.decode_flat(payload, dict(delta, extra=torch.zeros(2)))
    with pytest.raises(CodecError, match='not \'sparse\''):
        dwc.get_codec('sparse').decode_flat(
            dwc.get_codec('fp16').encode(delta, self_describing=False), delta)
    assert dwc.read_payload_kind(payload) == ('sparse', False)
    assert dwc.read_payload_kind(codec.encode(delta)) == ('sparse', True)


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_flat_delta_names_the_first_non_finite_tensor(value: float) -> None:
    delta = lora_like(seed=13)
    names = sorted(delta)
    bad = names[5]
    delta[bad] = delta[bad].clone()
    delta[bad].view(-1)[3] = value
    delta[names[9]] = delta[names[9]].clone()
    delta[names[9]].view(-1)[0] = value
    assert dwc.flatten_delta(delta, delta).first_non_finite() == bad


def test_flatten_delta_refuses_a_delta_of_another_set() -> None:
    delta = lora_like(seed=14)
    with pytest.raises(CodecError, match='missing'):
        dwc.flatten_delta(dict(list(delta.items())[1:]), delta)
    with pytest.raises(CodecError, match='unexpected'):
        dwc.flatten_delta(dict(delta, other=torch.zeros(1)), delta)
    with pytest.raises(CodecError, match='values'):
        dwc.flatten_delta(dict(delta, **{'qformer.query_tokens': torch.zeros(3)}), delta)
