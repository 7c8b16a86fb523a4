"""FlatWeights: Eq. 8, the finite check and the hash on flat buffers, bit-identical to the
per-tensor way (:mod:`cdcca_ros.core.device.weights`)."""
from __future__ import annotations

import pytest
import torch

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.device.weights import FlatWeights
from cdcca_ros.errors import DeltaMismatchError


def _mixed(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {'z.lora_B': torch.randn(6, 4, generator=g),
            'a.norm': torch.randn(5, generator=g).half(),
            'm.lora_A': torch.randn(4, 6, generator=g).bfloat16(),
            'q.query_tokens': torch.randn(1, 3, 4, generator=g),
            'd.double': torch.randn(3, generator=g, dtype=torch.float64),
            'e.empty': torch.zeros(0, 4),
            's.scalar': torch.tensor(0.25)}


@pytest.mark.parametrize('delta_dtype', [torch.float32, torch.float16, torch.float64])
def test_flat_build_is_bit_identical_to_apply_delta(delta_dtype) -> None:
    base = _mixed(0)
    g = torch.Generator().manual_seed(1)
    delta = {k: (torch.randn(v.shape, generator=g) * 1e-2).to(delta_dtype)
             for k, v in base.items()}
    flat = FlatWeights.pack(base).plus(delta)
    ref = dwc.apply_delta(base, delta)
    for name, t in ref.items():
        got = flat.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name
    assert flat.digest() == wire.state_dict_hash(ref)
    assert FlatWeights.pack(base).digest() == wire.state_dict_hash(base)


def test_flat_build_refuses_a_delta_that_does_not_fit() -> None:
    base = _mixed(0)
    weights = FlatWeights.pack(base)
    zeros = {k: torch.zeros(v.shape) for k, v in base.items()}
    bad = {'missing': {k: v for k, v in zeros.items() if k != 'a.norm'},
           'extra': dict(zeros, other=torch.zeros(1)),
           'shape': dict(zeros, **{'z.lora_B': torch.zeros(4, 6)}),
           'dtype': dict(zeros, **{'a.norm': torch.zeros(5, dtype=torch.int64)})}
    for kind, delta in bad.items():
        with pytest.raises(DeltaMismatchError):
            weights.plus(delta)
        assert weights.digest() == wire.state_dict_hash(base), kind


@pytest.mark.parametrize('codec', ['fp16', 'sparse'])
def test_flat_delta_build_is_bit_identical_to_the_tensor_build(codec: str) -> None:
    g = torch.Generator().manual_seed(2)
    base = {k: torch.randn(s, generator=g) for k, s in
            {'z.lora_B': (6, 4), 'a.norm': (5,), 'q.query_tokens': (1, 3, 4)}.items()}
    delta = {k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in base.items()}
    c = dwc.get_codec(codec)
    payload = c.encode(delta, self_describing=False)
    weights = FlatWeights.pack(base)
    flat = weights.plus_flat(c.decode_flat(payload, base))
    ref = weights.plus(c.decode(payload, spec=base))
    assert len(flat.buffers) == 1 and torch.equal(flat.buffers[0], ref.buffers[0])
    assert flat.digest() == ref.digest()
    # Weights in several buffers (mixed dtypes) take the per-tensor way, same result.
    mixed = dict(base, **{'a.norm': base['a.norm'].half()})
    mixed_flat = FlatWeights.pack(mixed).plus_flat(c.decode_flat(payload, base))
    assert mixed_flat.digest() == FlatWeights.pack(mixed).plus(
        c.decode(payload, spec=base)).digest()
    with pytest.raises(DeltaMismatchError):
        FlatWeights.pack(dict(base, **{'z.lora_B': torch.zeros(4, 6)})).plus_flat(
            c.decode_flat(payload, base))


def test_overflow_of_finite_values_is_caught() -> None:
    base = {'a': torch.ones(3), 'b': torch.full((2,), 3e38)}
    flat = FlatWeights.pack(base).plus({'a': torch.ones(3), 'b': torch.full((2,), 3e38)})
    assert flat.first_non_finite() == 'b'
    assert FlatWeights.pack(base).first_non_finite() is None
