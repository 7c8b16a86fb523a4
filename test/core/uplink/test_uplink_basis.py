"""Tests of cdcca_ros.core.uplink.basis: the token basis shared by device and cloud."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, fit_basis
from cdcca_ros.core.uplink.pipeline import decode_tokens
from cdcca_ros.errors import BasisMismatchError, ConfigError, WireError

SPACE = 'test-vit#0123:d24:n17:g4x4:cls'


def correlated_tokens(count: int, dim: int = 24, seed: int = 0, space: int = 0
                      ) -> torch.Tensor:
    """Tokens with a decaying spectrum (as vision tokens have): a few strong directions,
    rotated by a fixed random matrix per ``space`` (an encoder); ``seed`` draws the tokens."""
    scales = torch.logspace(0.5, -2.0, dim)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(
        1000 + space)))[0]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(count, dim, generator=gen) * scales) @ mix + 0.3


@pytest.fixture(scope='module')
def basis() -> TokenBasis:
    return fit_basis(correlated_tokens(600), SPACE)


def test_fit_keeps_orthonormal_directions_sorted_by_spread(basis):
    eye = basis.components @ basis.components.T
    assert torch.allclose(eye, torch.eye(basis.rank), atol=1e-4)
    assert bool((basis.spread[:-1] >= basis.spread[1:] - 1e-6).all())
    # Fitting again gives the same basis and version (signs are fixed).
    assert fit_basis(correlated_tokens(600), SPACE).version == basis.version


@pytest.mark.parametrize('budget', [24, 48, 96, 400])
def test_pack_respects_the_budget_and_round_trips_the_kept_set(basis, budget):
    tokens = correlated_tokens(17, seed=3)
    kept = torch.tensor([0, 2, 3, 9, 16])
    packed = basis.pack(tokens[kept], kept, 17, budget_bytes=budget)
    assert len(packed.data) <= budget
    decoded, indices = basis.unpack(packed.data, packed.step, 17, 24)
    assert indices.tolist() == kept.tolist()
    assert decoded.shape == (5, 24) and bool(torch.isfinite(decoded).all())
    # Decoding gives exactly what quantising at that step gives.
    assert torch.allclose(decoded, basis.reconstruct(tokens[kept], packed.step), atol=1e-5)


def test_more_bytes_give_smaller_errors(basis):
    tokens = correlated_tokens(17, seed=4)
    kept = torch.arange(17)
    errors = []
    for budget in (24, 64, 160, 600):
        packed = basis.pack(tokens, kept, 17, budget_bytes=budget)
        decoded, _ = basis.unpack(packed.data, packed.step, 17, 24)
        errors.append(float((decoded - tokens).norm() / tokens.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 < 0.3 < errors[0]


def _rel_error(basis, tokens, packed):
    decoded, _ = basis.unpack(packed.data, packed.step, tokens.shape[0], tokens.shape[1])
    return float((decoded - tokens).norm() / tokens.norm())


def test_an_error_target_spends_bytes_where_the_basis_codes_badly(basis):
    kept = torch.arange(17)
    like = correlated_tokens(17, seed=5)               # the basis's own kind of tokens
    unlike = correlated_tokens(17, seed=5, space=1)    # a shift the basis was not fitted on
    fixed = [basis.pack(t, kept, 17, budget_bytes=900) for t in (like, unlike)]
    sized = [basis.pack(t, kept, 17, budget_bytes=900, max_error=0.05) for t in (like, unlike)]
    for tokens, packed in zip((like, unlike), sized):
        assert _rel_error(basis, tokens, packed) <= 0.05
        # The coarsest step that meets it: a step 5% coarser does not.
        coarser = basis.reconstruct(tokens, packed.step * 1.05)
        assert float((coarser - tokens).norm() / tokens.norm()) > 0.05
    # Tokens the basis codes well cost less than the budget, and less than unlike ones.
    assert len(sized[0].data) < len(fixed[0].data) and len(sized[0].data) < len(sized[1].data)
    # A target the budget cannot meet: the budget's step, as without a target.
    tight = basis.pack(unlike, kept, 17, budget_bytes=400, max_error=0.05)
    assert tight.data == basis.pack(unlike, kept, 17, budget_bytes=400).data
    assert len(tight.data) <= 400 and _rel_error(basis, unlike, tight) > 0.05


def test_a_budget_below_the_bitmap_is_refused(basis):
    with pytest.raises(ConfigError, match='budget'):
        basis.pack(correlated_tokens(1), [0], 200, budget_bytes=20)
    with pytest.raises(ConfigError, match='exactly one'):
        basis.pack(correlated_tokens(1), [0], 17)
    with pytest.raises(ConfigError, match='ascend'):
        basis.pack(correlated_tokens(2), [3, 1], 17, step=0.1)


def test_save_load_round_trip_and_binding(basis, tmp_path):
    path = basis.save(tmp_path / BASIS_FILE)
    again = TokenBasis.load(path, SPACE)
    assert again.version == basis.version
    assert torch.equal(again.components, basis.components)
    with pytest.raises(BasisMismatchError, match='fitted for'):
        TokenBasis.load(path, 'another-vit#ffff:d24:n17:g4x4:cls')


def test_an_edited_basis_file_is_refused(basis, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / 'edited.safetensors'
    save_file({'mean': basis.mean + 1e-3, 'components': basis.components,
               'spread': basis.spread}, str(path),
              metadata={'format': 'cdcca-token-basis-v1', 'vision_space': SPACE,
                        'version': basis.version})
    with pytest.raises(ConfigError, match='hashes to'):
        TokenBasis.load(path)
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ConfigError, match='cannot read'):
        TokenBasis.load(tmp_path / 'junk.safetensors')


def test_a_sample_coded_in_another_basis_version_is_refused(basis):
    tokens = correlated_tokens(17, seed=5)
    other = fit_basis(correlated_tokens(600, seed=9, space=1), SPACE)
    assert other.version != basis.version
    packed = other.pack(tokens, torch.arange(17), 17, budget_bytes=120)
    with pytest.raises(BasisMismatchError, match=other.version):
        decode_tokens('basis', packed.data, [packed.step], [], 17, 24, other.version, basis)
    with pytest.raises(WireError, match='holds no token basis'):
        decode_tokens('basis', packed.data, [packed.step], [], 17, 24, other.version, None)
    # The right basis decodes it.
    decoded, indices = decode_tokens('basis', packed.data, [packed.step], [], 17, 24,
                                     other.version, other)
    assert indices.tolist() == list(range(17)) and decoded.shape == (17, 24)


def _corruptions(data: bytes) -> list[tuple[str, bytes]]:
    return [('truncated', data[:-3]), ('bitmap beyond N', bytes([data[0], data[1],
                                                                 data[2] | 0x80]) + data[3:]),
            ('no token', bytes(3) + data[3:]), ('extra word', data + bytes(4)),
            ('bitmap only', data[:3])]


@pytest.mark.parametrize('case', range(5))
def test_corrupt_payloads_raise_wire_errors(basis, case):
    tokens = correlated_tokens(17, seed=6)
    packed = basis.pack(tokens[:5], torch.arange(5), 17, budget_bytes=80)
    name, data = _corruptions(packed.data)[case]
    with pytest.raises(WireError):
        basis.unpack(data, packed.step, 17, 24)
    with pytest.raises(WireError, match='token_dim'):
        basis.unpack(packed.data, packed.step, 17, 25)
    with pytest.raises(WireError, match='step'):
        basis.unpack(packed.data, float('nan'), 17, 24)


def test_random_bytes_never_escape_as_anything_but_wire_errors(basis):
    rng = np.random.default_rng(0)
    for _ in range(50):
        data = rng.integers(0, 256, size=int(rng.integers(0, 60)), dtype=np.uint8).tobytes()
        try:
            tokens, _ = basis.unpack(data, 0.5, 17, 24)
        except WireError:
            continue
        assert bool(torch.isfinite(tokens).all())
