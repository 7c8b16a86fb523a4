"""The device-side delta gate: envelopes, every way to be refused, and a full round trip."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.codecs import container
from cdcca_ros.core.codecs.container import all_finite
from cdcca_ros.core.updates import (
    DeltaEnvelope,
    DeltaGate,
    RejectReason,
    seal_delta,
)
from cdcca_ros.errors import ConfigError, DeltaGateRejection, DeltaRejectedError, WireError

DEVICE = 'robot-1'


def trainable(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {'lora_A': torch.randn(4, 32, generator=g) * 0.02,
            'lora_B': torch.zeros(32, 4),
            'norm': torch.ones(32),
            'query_tokens': torch.randn(1, 4, 32, generator=g) * 0.02}


def update(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}


class Cloud:
    """What the cloud does per device: delta vs the device's view, compress, seal."""

    def __init__(self, base: dict[str, torch.Tensor], key, codec: dwc.Codec) -> None:
        self.ef = dwc.ErrorFeedback(base)
        self.key = key
        self.codec = codec
        self.version = 0
        self.round = 0

    def make(self, trained: dict[str, torch.Tensor], device_id: str = DEVICE
             ) -> DeltaEnvelope:
        base_hash = self.ef.view_hash()
        delta = dwc.compute_delta(trained, self.ef.view)  # error feedback built in
        c = dwc.compress(delta, self.codec)
        self.ef.commit(delta, c.decoded)
        self.round += 1
        env = seal_delta(self.key, device_id=device_id, round=self.round,
                         base_version=self.version, base_hash=base_hash,
                         new_version=self.version + 1, new_hash=self.ef.view_hash(),
                         codec=self.codec.name, payload=c.payload)
        self.version += 1
        return env


@pytest.fixture(scope='module')
def keys():
    return wire.generate_keypair()


@pytest.fixture
def setup(keys):
    base = trainable()
    gate = DeltaGate(DEVICE, keys[1], 0, wire.state_dict_hash(base), base)
    return base, gate


def _sealed(key, base: dict[str, torch.Tensor], *, payload: bytes | None = None,
            **fields: object) -> DeltaEnvelope:
    """A validly signed envelope for ``base`` (version 0 -> 1) with fields overridden."""
    if payload is None:
        payload = dwc.get_codec('sparse').encode(dwc.compute_delta(update(base), base))
    args = dict(device_id=DEVICE, round=1, base_version=0,
                base_hash=wire.state_dict_hash(base), new_version=1, new_hash='ff' * 32,
                codec='sparse', payload=payload)
    args.update(fields)
    return seal_delta(key, **args)


def _state(gate: DeltaGate) -> tuple:
    return gate.version, gate.base_hash, gate._pending


# --- envelope bytes -------------------------------------------------------------------------
def test_envelope_round_trips_through_bytes(keys) -> None:
    env = _sealed(keys[0], trainable())
    back = DeltaEnvelope.decode(env.encode())
    assert back == env
    back.verify(keys[1])


@pytest.mark.parametrize('mangle, match', [
    (lambda b: b'', 'magic'),
    (lambda b: b'XXXX' + b[4:], 'magic'),
    (lambda b: b[:4] + b'\x07' + b[5:], 'version'),
    (lambda b: b[:4], 'version'),
    (lambda b: b[:20], 'overruns|truncated'),
    (lambda b: b[:-1], 'overruns|truncated'),
    (lambda b: b + b'\x00', 'trailing'),
])
def test_bad_envelope_bytes_raise_wire_error(keys, mangle, match: str) -> None:
    data = _sealed(keys[0], trainable()).encode()
    with pytest.raises(WireError, match=match):
        DeltaEnvelope.decode(mangle(data))


def test_envelope_fields_are_typed() -> None:
    good = dict(device_id='d', round=1, base_version=0, base_hash='h', new_version=1,
                new_hash='n', codec='sparse', payload=b'p', signature=b's' * 64)
    DeltaEnvelope(**good)
    for field, value in (('round', -1), ('new_version', 1.0), ('device_id', b'd'),
                         ('payload', 'p'), ('round', 1 << 64)):
        with pytest.raises(WireError, match=field):
            DeltaEnvelope(**dict(good, **{field: value}))


# --- the gate: accepted path ----------------------------------------------------------------
def test_good_delta_is_accepted_applied_and_committed(keys, setup) -> None:
    base, gate = setup
    cloud = Cloud(base, keys[0], dwc.get_codec('sparse'))
    env = cloud.make(update(base))
    delta = gate.accept(env)
    assert gate.version == 0  # nothing changes before commit
    new = dwc.apply_delta(base, delta)
    assert wire.state_dict_hash(new) == env.new_hash
    gate.commit(env.new_version, wire.state_dict_hash(new))
    assert gate.version == 1 and gate.base_hash == env.new_hash
    # The same envelope again is a replay now.
    with pytest.raises(DeltaGateRejection) as err:
        gate.accept(env)
    assert err.value.reason == RejectReason.REPLAY


# --- the gate: every way to be refused ------------------------------------------------------
def _nonfinite_payload(value: float, index: int = 5) -> bytes:
    # The encoders refuse non-finite values, so build the container by hand, as an attacker
    # (or a broken cloud) would.
    base = trainable()
    entries = [container.Entry(k, 'float32', tuple(v.shape)) for k, v in base.items()]
    values = np.zeros(sum(v.numel() for v in base.values()), np.float16)
    values[index] = value
    return container.write_payload('fp16', {}, entries, {'values': values})


def _bad_envelopes(keys) -> dict[str, tuple[RejectReason, DeltaEnvelope]]:
    priv = keys[0]
    base = trainable()
    good = _sealed(priv, base)
    other_key = wire.generate_keypair()[0]
    bad_sig = bytearray(good.signature)
    bad_sig[10] ^= 1
    fp16 = dwc.get_codec('fp16')
    wrong_shape = {k: v.clone() for k, v in base.items()}
    wrong_shape['norm'] = torch.ones(31)
    extra_key = dict(base, extra=torch.ones(2))
    return {
        'bad_signature': (RejectReason.BAD_SIGNATURE,
                          dataclasses.replace(good, signature=bytes(bad_sig))),
        'tampered_device': (RejectReason.BAD_SIGNATURE,
                            dataclasses.replace(good, device_id='robot-2')),
        'tampered_payload': (RejectReason.BAD_SIGNATURE,
                             dataclasses.replace(good, payload=good.payload + b'\x00')),
        'tampered_version': (RejectReason.BAD_SIGNATURE,
                             dataclasses.replace(good, new_version=5)),
        'other_key': (RejectReason.UNKNOWN_KEY, _sealed(other_key, base)),
        'other_key_naming_ours': (RejectReason.BAD_SIGNATURE, dataclasses.replace(
            _sealed(other_key, base), key_id=good.key_id)),
        'tampered_key_id': (RejectReason.UNKNOWN_KEY,
                            dataclasses.replace(good, key_id='00' * 16)),
        'tampered_expiry': (RejectReason.BAD_SIGNATURE,
                            dataclasses.replace(good, expires=good.expires + 3600)),
        'expired': (RejectReason.EXPIRED, _sealed(priv, base, now=1_000_000)),
        'version_jump': (RejectReason.VERSION_JUMP,
                         _sealed(priv, base, new_version=(1 << 64) - 1)),
        'wrong_device': (RejectReason.WRONG_DEVICE, _sealed(priv, base, device_id='robot-2')),
        'wrong_base_hash': (RejectReason.WRONG_BASE,
                            _sealed(priv, base, base_hash='00' * 32)),
        'wrong_base_version': (RejectReason.WRONG_BASE,
                               _sealed(priv, base, base_version=3, new_version=4)),
        'replayed': (RejectReason.REPLAY, _sealed(priv, base, new_version=0)),
        'codec_mismatch': (RejectReason.CODEC_MISMATCH, _sealed(priv, base, codec='fp16')),
        'garbage_payload': (RejectReason.UNDECODABLE,
                            _sealed(priv, base, payload=b'\x00garbage' * 10)),
        'unknown_codec': (RejectReason.UNDECODABLE,
                          _sealed(priv, base, codec='zip',
                                  payload=container.write_payload('zip', {}, [], {}))),
        'nan': (RejectReason.NON_FINITE,
                _sealed(priv, base, codec='fp16', payload=_nonfinite_payload(np.nan))),
        'inf': (RejectReason.NON_FINITE,
                _sealed(priv, base, codec='fp16', payload=_nonfinite_payload(np.inf))),
        'wrong_shape': (RejectReason.WRONG_SHAPE,
                        _sealed(priv, base, codec='fp16', payload=fp16.encode(wrong_shape))),
        'wrong_keys': (RejectReason.WRONG_KEYS,
                       _sealed(priv, base, codec='fp16', payload=fp16.encode(extra_key))),
    }


BAD_KINDS = ['bad_signature', 'tampered_device', 'tampered_payload', 'tampered_version',
             'other_key', 'other_key_naming_ours', 'tampered_key_id', 'tampered_expiry',
             'expired', 'version_jump', 'wrong_device', 'wrong_base_hash',
             'wrong_base_version', 'replayed', 'codec_mismatch', 'garbage_payload',
             'unknown_codec', 'nan', 'inf', 'wrong_shape', 'wrong_keys']


@pytest.fixture(scope='module')
def bad_envelopes(keys):
    return _bad_envelopes(keys)


@pytest.mark.parametrize('method', ['accept', 'accept_flat'])
@pytest.mark.parametrize('kind', BAD_KINDS)
def test_bad_envelope_is_rejected_and_gate_unchanged(keys, setup, bad_envelopes,
                                                     kind: str, method: str) -> None:
    base, gate = setup
    reason, env = bad_envelopes[kind]
    before = _state(gate)
    with pytest.raises(DeltaRejectedError) as err:
        getattr(gate, method)(env)
    assert isinstance(err.value, DeltaGateRejection)
    assert err.value.reason == reason, str(err.value)
    assert _state(gate) == before
    # A genuine delta is still accepted afterwards.
    assert set(gate.accept(_sealed(keys[0], base))) == set(base)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_any_nan_or_inf(dtype) -> None:
    x = torch.linspace(-3e4, 3e4, 257).to(dtype)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(x.reshape(1, 257).t())
    for value in (float('nan'), float('inf'), -float('inf')):
        for pos in (0, 128, 256):
            y = x.clone()
            y[pos] = value
            assert not all_finite(y), (value, pos)
            assert not all_finite(y.reshape(257, 1).t())  # strided views too


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('tensor', ['lora_A', 'norm', 'query_tokens'])
def test_non_finite_value_is_named_wherever_it_sits(keys, setup, value: float,
                                                    tensor: str) -> None:
    base, gate = setup
    names = list(base)
    # First element of the named tensor in the payload's flat order.
    index = sum(base[n].numel() for n in names[:names.index(tensor)])
    env = _sealed(keys[0], base, codec='fp16', payload=_nonfinite_payload(value, index))
    before = _state(gate)
    with pytest.raises(DeltaGateRejection, match=repr(tensor)) as err:
        gate.accept(env)
    assert err.value.reason == RejectReason.NON_FINITE
    assert _state(gate) == before


def _compact_nonfinite_payload(value: float, tensor: str) -> bytes:
    base = trainable()
    entries = [container.Entry(k, 'float32', tuple(base[k].shape)) for k in sorted(base)]
    values = np.zeros(sum(v.numel() for v in base.values()), np.float16)
    values[sum(base[k].numel() for k in sorted(base)[:sorted(base).index(tensor)])] = value
    return container.write_payload('fp16', {}, entries, {'values': values}, self_describing=False)


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_accept_flat_names_a_non_finite_tensor_of_a_compact_payload(keys, setup,
                                                                    value: float) -> None:
    base, gate = setup
    tensor = sorted(base)[len(base) // 2]
    env = _sealed(keys[0], base, codec='fp16',
                  payload=_compact_nonfinite_payload(value, tensor))
    before = _state(gate)
    with pytest.raises(DeltaGateRejection, match=repr(tensor)) as err:
        gate.accept_flat(env)
    assert err.value.reason == RejectReason.NON_FINITE
    assert _state(gate) == before


@pytest.mark.parametrize('method', ['accept', 'accept_flat'])
def test_compact_payload_for_another_trainable_set_is_wrong_keys(keys, setup,
                                                                 method: str) -> None:
    base, gate = setup
    other = dict(base, extra=torch.zeros(3))
    env = _sealed(keys[0], base, codec='sparse', payload=dwc.get_codec('sparse').encode(
        dwc.compute_delta(update(other), other), self_describing=False))
    before = _state(gate)
    with pytest.raises(DeltaGateRejection, match='another trainable set') as err:
        getattr(gate, method)(env)
    assert err.value.reason == RejectReason.WRONG_KEYS
    assert _state(gate) == before


@pytest.mark.parametrize('compact', [True, False], ids=['compact', 'self_describing'])
def test_accept_flat_is_accept_in_name_order(keys, setup, compact: bool) -> None:
    base, gate = setup
    delta = update(base, 3)
    codec = dwc.get_codec('sparse')
    env = _sealed(keys[0], base, codec='sparse',
                  payload=codec.encode(delta, self_describing=not compact))
    tensors = gate.accept(env)
    flat = gate.accept_flat(env)
    assert flat.names == tuple(sorted(base))
    assert torch.equal(flat.values, torch.cat([tensors[k].float().reshape(-1)
                                               for k in flat.names]))


def test_older_version_is_a_rollback(keys, setup) -> None:
    base, gate = setup
    cloud = Cloud(base, keys[0], dwc.get_codec('sparse'))
    first = cloud.make(update(base, 1))
    second = cloud.make(update(base, 2))
    gate.accept(first)
    gate.commit(first.new_version, first.new_hash)
    gate.accept(second)
    gate.commit(second.new_version, second.new_hash)
    before = _state(gate)
    with pytest.raises(DeltaGateRejection) as err:
        gate.accept(first)
    assert err.value.reason == RejectReason.ROLLBACK
    assert _state(gate) == before


def test_too_large_payload_is_refused_before_anything_else(keys) -> None:
    base = trainable()
    gate = DeltaGate(DEVICE, keys[1], 0, wire.state_dict_hash(base), base,
                     max_payload_bytes=100)
    with pytest.raises(DeltaGateRejection) as err:
        gate.accept(_sealed(keys[0], base))
    assert err.value.reason == RejectReason.TOO_LARGE


def test_commit_checks_version_and_the_cloud_hash(keys, setup) -> None:
    base, gate = setup
    env = _sealed(keys[0], base)
    gate.accept(env)
    before = _state(gate)
    with pytest.raises(DeltaGateRejection) as err:
        gate.commit(1, '00' * 32)  # the device's weights are not what the cloud computed
    assert err.value.reason == RejectReason.HASH_MISMATCH and _state(gate) == before
    with pytest.raises(DeltaGateRejection) as err:
        gate.commit(0, env.new_hash)
    assert err.value.reason == RejectReason.REPLAY and _state(gate) == before
    with pytest.raises(ConfigError):
        gate.commit(1, '')
    gate.commit(1, env.new_hash)
    assert gate.version == 1
    with pytest.raises(DeltaGateRejection) as err:
        gate.commit(0, 'aa' * 32)
    assert err.value.reason == RejectReason.ROLLBACK


def test_gate_validates_its_arguments(keys) -> None:
    base = trainable()
    for args in (('', keys[1], 0, 'h', base), (DEVICE, keys[1], -1, 'h', base),
                 (DEVICE, keys[1], 0, '', base)):
        with pytest.raises(ConfigError):
            DeltaGate(*args)
    gate = DeltaGate(DEVICE, keys[1], 0, 'h', {k: tuple(v.shape) for k, v in base.items()})
    with pytest.raises(DeltaGateRejection) as err:
        gate.accept(b'bytes')  # type: ignore[arg-type]
    assert err.value.reason == RejectReason.UNDECODABLE


# --- end to end -----------------------------------------------------------------------------
@pytest.mark.parametrize('codec', [dwc.get_codec('sparse', bits=3.0, density=0.5),
                                   dwc.get_codec('fp16')], ids=lambda c: c.name)
def test_rounds_over_chunks_keep_device_and_cloud_identical(keys, codec: dwc.Codec) -> None:
    base = trainable()
    cloud = Cloud(base, keys[0], codec)
    gate = DeltaGate(DEVICE, keys[1], 0, wire.state_dict_hash(base), base)
    device = {k: v.clone() for k, v in base.items()}
    trained = base
    asm = wire.ChunkAssembler()
    rng = random.Random(0)
    for r in range(5):
        trained = update(trained, seed=10 + r)
        env = cloud.make(trained)
        chunks = wire.split_chunks(env.encode(), 700)
        rng.shuffle(chunks)
        data = [out for c in chunks if (out := asm.add(c)) is not None]
        assert len(data) == 1
        delta = gate.accept(DeltaEnvelope.decode(data[0]))
        candidate = dwc.apply_delta(device, delta)
        gate.commit(env.new_version, wire.state_dict_hash(candidate))
        device = candidate
        assert wire.state_dict_hash(device) == cloud.ef.view_hash() == gate.base_hash
        assert gate.version == r + 1
    # Error feedback keeps the device close to what the cloud trained.
    gap = dwc.rel_l2_error(dwc.compute_delta(trained, base), dwc.compute_delta(device, base))
    assert gap < (0.2 if codec.name == 'sparse' else 1e-3)
