"""The payload container: headers, checksum, compact payloads and their spec, flat deltas."""
from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
import torch
from sample_deltas import lora_like

from cdcca_ros.core import codecs
from cdcca_ros.errors import CodecError


# --- headers and checksum -----------------------------------------------------------------
@pytest.mark.parametrize('garbage', [
    b'', b'garbage', b'\xff' * 64, bytes(range(256)) * 3,
    safetensors.numpy.save({'x': np.zeros(3, np.float32)}),
    safetensors.numpy.save({'x': np.zeros(3, np.float32)},
                           metadata={'format': 'cdcca-dwc', 'version': '1', 'codec': 'fp16'}),
    safetensors.numpy.save({'x': np.zeros(3, np.float32)},
                           metadata={'format': 'cdcca-dwc', 'version': '9', 'codec': 'fp16'}),
])
def test_garbage_raises_codec_error(garbage: bytes) -> None:
    for name in codecs.codec_names():
        with pytest.raises(CodecError):
            codecs.get_codec(name).decode(garbage)
    with pytest.raises(CodecError):
        codecs.decode_payload(garbage)


def test_decode_respects_max_numel(payloads: dict[str, bytes]) -> None:
    with pytest.raises(CodecError, match='max_numel'):
        codecs.decode_payload(payloads['sparse'], max_numel=100)


def test_container_refuses_malformed_headers() -> None:
    good = codecs.get_codec('fp16').encode({'a': torch.ones(3)})

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
            codecs.decode_payload(sealed(bad))
    with pytest.raises(CodecError, match='checksum'):
        codecs.decode_payload(good[:-1] + bytes([good[-1] ^ 1]))


# --- compact payloads (what the cloud sends) ----------------------------------------------
@pytest.mark.parametrize('name', ['fp16', 'nf4', 'sparse'])
def test_compact_payload_round_trips_with_the_spec_in_any_order(name: str) -> None:
    delta = lora_like(seed=8)
    codec = codecs.get_codec(name)
    full = codec.decode(codec.encode(delta))
    compact = codec.encode(delta, self_describing=False)
    assert not codecs.is_self_describing(compact)
    assert codecs.is_self_describing(codec.encode(delta))
    assert codecs.read_payload_codec(compact) == name
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
    codec = codecs.get_codec('sparse')
    compact = len(codec.encode(zero, self_describing=False))
    assert compact < 64
    assert len(codec.encode(zero)) > compact + 150


def test_compact_payload_needs_the_matching_spec() -> None:
    delta = lora_like(seed=9)
    payload = codecs.get_codec('sparse').encode(delta, self_describing=False)
    with pytest.raises(CodecError, match='spec'):
        codecs.decode_payload(payload)
    renamed = {('x' + k if k.endswith('bias') else k): v for k, v in delta.items()}
    reshaped = dict(delta, **{'qformer.query_tokens': torch.zeros(1, 4, 256)})
    missing = dict(list(delta.items())[1:])
    for spec in (renamed, reshaped, missing):
        with pytest.raises(CodecError, match='another trainable set'):
            codecs.decode_payload(payload, spec=spec)
    for bad in ({'a': (-1, 2)}, {'a': 'x'}, [('a', (2,))]):
        with pytest.raises(CodecError, match='spec'):
            codecs.decode_payload(payload, spec=bad)
    with pytest.raises(CodecError, match='max_numel'):
        codecs.decode_payload(payload, spec=delta, max_numel=100)


def test_every_corrupted_byte_of_a_compact_payload_is_refused() -> None:
    delta = lora_like(hidden=32, layers=1)
    payload = codecs.get_codec('sparse').encode(delta, self_describing=False)
    for pos in range(len(payload)):
        bad = bytearray(payload)
        bad[pos] ^= 0x21
        with pytest.raises(CodecError):
            codecs.decode_payload(bytes(bad), spec=delta)


# --- flat deltas --------------------------------------------------------------------------
@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_flat_delta_names_the_first_non_finite_tensor(value: float) -> None:
    delta = lora_like(seed=13)
    names = sorted(delta)
    bad = names[5]
    delta[bad] = delta[bad].clone()
    delta[bad].view(-1)[3] = value
    delta[names[9]] = delta[names[9]].clone()
    delta[names[9]].view(-1)[0] = value
    assert codecs.flatten_delta(delta, delta).first_non_finite() == bad


def test_flatten_delta_refuses_a_delta_of_another_set() -> None:
    delta = lora_like(seed=14)
    with pytest.raises(CodecError, match='missing'):
        codecs.flatten_delta(dict(list(delta.items())[1:]), delta)
    with pytest.raises(CodecError, match='unexpected'):
        codecs.flatten_delta(dict(delta, other=torch.zeros(1)), delta)
    with pytest.raises(CodecError, match='values'):
        codecs.flatten_delta(dict(delta, **{'qformer.query_tokens': torch.zeros(3)}), delta)
