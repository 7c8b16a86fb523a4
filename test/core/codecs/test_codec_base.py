"""The codec interface over every registered codec: round trips, refusals, flat decoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sample_deltas import lora_like, mixed_dtypes

from cdcca_ros.core import codecs, dwc
from cdcca_ros.errors import CodecError

# --- round trips --------------------------------------------------------------------------
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
    codec = codecs.get_codec(name, **knobs)
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
    again = codecs.decode_payload(codec.encode(delta))
    assert all(torch.equal(again[k], out[k]) for k in out)


@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_codec_handles_every_dtype_scalar_and_empty(name: str) -> None:
    delta = mixed_dtypes()
    out = codecs.get_codec(name).decode(codecs.get_codec(name).encode(delta))
    for k, v in delta.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
    assert out['empty'].numel() == 0
    assert dwc.rel_l2_error(delta, out) < 0.12


@pytest.mark.parametrize('name, knobs', [('fp16', {}), ('sparse', {})])
def test_encode_refuses_bad_values(name: str, knobs: dict) -> None:
    codec = codecs.get_codec(name, **knobs)
    for bad in (float('nan'), float('inf')):
        with pytest.raises(CodecError, match='non-finite'):
            codec.encode({'a': torch.tensor([0.0, bad])})
    with pytest.raises(CodecError, match='float'):
        codec.encode({'a': torch.arange(3)})


def test_get_codec_refuses_an_unknown_name() -> None:
    with pytest.raises(CodecError, match='unknown codec'):
        codecs.get_codec('zip')


# --- payload robustness -------------------------------------------------------------------
@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_truncated_payload_raises_codec_error(name: str, payloads: dict[str, bytes]) -> None:
    payload = payloads[name]
    codec = codecs.get_codec(name)
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
    codec = codecs.get_codec(name)
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


def test_payload_of_another_codec_is_refused(payloads: dict[str, bytes]) -> None:
    with pytest.raises(CodecError, match="encoded by codec 'sparse'"):
        codecs.get_codec('fp16').decode(payloads['sparse'])
    with pytest.raises(CodecError):
        codecs.get_codec('sparse').decode('not bytes')  # type: ignore[arg-type]


# --- flat decoding (the device's path) ----------------------------------------------------
@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_decode_flat_is_decode_in_name_order(name: str) -> None:
    delta = dict(reversed(list(lora_like(seed=11, heavy=0.02).items())))
    delta['empty.bias'] = torch.zeros(0)
    delta['zero.bias'] = torch.zeros(7)
    codec = codecs.get_codec(name)
    payload = codec.encode(delta, self_describing=False)
    tensors = codec.decode(payload, spec=delta)
    flat = codec.decode_flat(payload, delta)
    assert flat.names == tuple(sorted(delta)) == tuple(tensors)
    assert flat.shapes == {k: tuple(v.shape) for k, v in delta.items()}
    assert flat.values.dtype == torch.float32 and flat.values.ndim == 1
    assert torch.equal(flat.values, torch.cat([tensors[k].reshape(-1) for k in flat.names]))
    assert all(torch.equal(v, tensors[k]) for k, v in flat.tensors().items())
    assert torch.equal(codecs.flatten_delta(tensors, delta).values, flat.values)
    assert flat.first_non_finite() is None


def test_decode_flat_reads_compact_payloads_only() -> None:
    delta = lora_like(seed=12)
    codec = codecs.get_codec('sparse')
    with pytest.raises(CodecError, match='self-describing'):
        codec.decode_flat(codec.encode(delta), delta)
    payload = codec.encode(delta, self_describing=False)
    with pytest.raises(CodecError, match='another trainable set'):
        codec.decode_flat(payload, dict(delta, extra=torch.zeros(2)))
    with pytest.raises(CodecError, match='not \'sparse\''):
        codecs.get_codec('sparse').decode_flat(
            codecs.get_codec('fp16').encode(delta, self_describing=False), delta)
    assert codecs.read_payload_kind(payload) == ('sparse', False)
    assert codecs.read_payload_kind(codec.encode(delta)) == ('sparse', True)
