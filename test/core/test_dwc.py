"""DWC (Eq. 7-8): delta arithmetic, byte budget, error feedback (the codecs: test/core/codecs)."""
from __future__ import annotations

import math

import pytest
import torch
from sample_deltas import lora_like

from cdcca_ros.core import codecs, dwc
from cdcca_ros.core.wire import state_dict_hash
from cdcca_ros.errors import ConfigError, DeltaMismatchError, PayloadTooLargeError


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


def test_dwc_reexports_the_codecs_public_names() -> None:
    # Users and other modules import the codecs from dwc: the same objects, listed in __all__.
    for name in codecs.__all__ + ['all_finite']:
        assert name in dwc.__all__, name
        assert getattr(dwc, name) is getattr(codecs.container if name == 'all_finite'
                                             else codecs, name), name


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


def test_compress_compact_decodes_in_the_delta_order() -> None:
    delta = lora_like(seed=10)
    c = dwc.compress(delta, dwc.get_codec('sparse'), 2_000, self_describing=False)
    assert list(c.decoded) == list(delta) and len(c.payload) <= 2_000
    dev = dwc.decode_payload(c.payload, spec=delta)
    assert all(torch.equal(dev[k], c.decoded[k]) for k in delta)


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
