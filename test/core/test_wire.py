"""Wire helpers: state-dict hash, Ed25519 delta signatures, chunking and reassembly."""
from __future__ import annotations

import hashlib
import os
import random
import stat
import struct

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cdcca_ros.core import wire
from cdcca_ros.errors import (
    ChecksumError,
    ChunkError,
    ConfigError,
    PayloadTooLargeError,
    SignatureError,
)


# --- state_dict_hash ----------------------------------------------------------------------
def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {'b': torch.randn(3, 4, generator=g), 'a': torch.randn(5, generator=g).bfloat16(),
            's': torch.tensor(1.5), 'e': torch.zeros(0, 2)}


def _spec_hash(sd: dict[str, torch.Tensor]) -> str:
    """The documented digest, written out independently: sha256 over a tag, then per name in
    sorted order its length-prefixed UTF-8 name, dtype name and comma-joined shape, the byte
    length (8-byte little endian) and the little-endian bytes."""
    def lp(data: bytes) -> bytes:
        return struct.pack('<Q', len(data)) + data

    h = hashlib.sha256(b'cdcca-state-dict-v1')
    for name in sorted(sd):
        t = sd[name].contiguous()
        arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # no bf16
        raw = arr.astype(arr.dtype.newbyteorder('<')).tobytes()
        h.update(lp(name.encode()) + lp(str(t.dtype).removeprefix('torch.').encode())
                 + lp(','.join(map(str, t.shape)).encode()) + struct.pack('<Q', len(raw)) + raw)
    return h.hexdigest()


def test_hash_is_deterministic_and_ignores_order_layout_and_copies() -> None:
    sd = _sd()
    h = wire.state_dict_hash(sd)
    assert h == _spec_hash(sd)
    assert wire.state_dict_hash(dict(reversed(list(sd.items())))) == h
    assert wire.state_dict_hash({k: v.clone() for k, v in sd.items()}) == h
    # A transposed-then-transposed (non-contiguous) view holds the same values.
    nc = dict(sd, b=sd['b'].t().contiguous().t())
    assert not nc['b'].is_contiguous()
    assert wire.state_dict_hash(nc) == h
    assert wire.state_dict_hash({}) == _spec_hash({}) != h


@pytest.mark.parametrize('change', ['one_ulp', 'dtype', 'shape', 'name', 'drop', 'add'])
def test_hash_changes_with_any_difference(change: str) -> None:
    sd = _sd()
    other = dict(sd)
    if change == 'one_ulp':
        b = sd['b'].clone()
        b[1, 2] = torch.nextafter(b[1, 2], torch.tensor(float('inf')))
        other['b'] = b
    elif change == 'dtype':
        other['b'] = sd['b'].double()
    elif change == 'shape':
        other['b'] = sd['b'].reshape(4, 3)  # same bytes, other shape
    elif change == 'name':
        other['c'] = other.pop('b')
    elif change == 'drop':
        del other['e']
    else:
        other['z'] = torch.zeros(0)
    assert wire.state_dict_hash(other) != wire.state_dict_hash(sd)


def test_hash_refuses_non_tensors() -> None:
    with pytest.raises(TypeError):
        wire.state_dict_hash({'a': [1.0, 2.0]})  # type: ignore[dict-item]


def _golden_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        'b.weight': torch.randn(4, 3, generator=g),
        'a.bias': torch.randn(5, generator=g).to(torch.float16),
        'c.lora_A.default.weight': torch.randn(2, 6, generator=g).to(torch.bfloat16),
        'd.double': torch.randn(3, generator=g, dtype=torch.float64),
        'e.empty': torch.zeros(0, 4),
        'f.scalar': torch.tensor(1.5),
        'g.noncontig': torch.randn(3, 4, generator=g).t(),
        'h.int': torch.arange(5),
        'é.unicode': torch.ones(2),
    }


def test_hash_values_are_stable() -> None:
    # Digests of the tensor-by-tensor implementation the cloud and older devices use: a
    # faster implementation must give the very same values.
    assert wire.state_dict_hash(_golden_sd()) == (
        '914ceb834ff6966fb92fc551ce4fa7a16fdaf8212c9eb99f865a943ff2fb80da')
    assert wire.state_dict_hash({}) == (
        '3e86a5c83bea4c3a3080d2cf9a109ec7834817c3285881aa9ff1d6c7c0414db9')


def test_hash_from_flat_bytes_matches_state_dict_hash() -> None:
    sd = {k: v.contiguous() for k, v in _golden_sd().items()}
    names = sorted(sd)
    # One buffer holding every tensor's bytes back to back, sliced per tensor.
    flat = torch.cat([sd[n].reshape(-1).view(torch.uint8) for n in names])
    view = memoryview(flat.numpy())
    parts, pos = [], 0
    for n in names:
        size = sd[n].numel() * sd[n].element_size()
        parts.append((wire.tensor_hash_header(n, sd[n].dtype, sd[n].shape),
                      view[pos:pos + size]))
        pos += size
    assert wire.hash_tensor_bytes(parts) == wire.state_dict_hash(sd)
    # Out of sorted order it is another digest: the caller must keep the order.
    assert wire.hash_tensor_bytes(parts[::-1]) != wire.state_dict_hash(sd)


# --- keys ---------------------------------------------------------------------------------
def test_keys_round_trip_through_pem(tmp_path) -> None:
    priv, pub = wire.generate_keypair()
    wire.save_private_key(priv, tmp_path / 'cloud.pem')
    wire.save_public_key(pub, tmp_path / 'cloud.pub')
    assert stat.S_IMODE(os.stat(tmp_path / 'cloud.pem').st_mode) == 0o600
    assert (tmp_path / 'cloud.pem').read_bytes().startswith(b'-----BEGIN PRIVATE KEY-----')
    priv2 = wire.load_private_key(tmp_path / 'cloud.pem')
    pub2 = wire.load_public_key(tmp_path / 'cloud.pub')
    sig = wire.sign_delta(priv2, b'payload', 'robot-1', 3, 'ab' * 32, 4)
    wire.verify_delta(pub2, sig, b'payload', 'robot-1', 3, 'ab' * 32, 4)
    assert wire.public_key_fingerprint(pub) == wire.public_key_fingerprint(pub2)
    with pytest.raises(ConfigError, match='exists'):
        wire.save_private_key(priv, tmp_path / 'cloud.pem')
    wire.save_private_key(priv, tmp_path / 'cloud.pem', overwrite=True)


def test_encrypted_private_key_needs_its_password(tmp_path) -> None:
    priv, _ = wire.generate_keypair()
    wire.save_private_key(priv, tmp_path / 'k.pem', password=b'secret')
    assert wire.load_private_key(tmp_path / 'k.pem', password=b'secret')
    for pw in (None, b'wrong'):
        with pytest.raises(ConfigError, match='cannot load'):
            wire.load_private_key(tmp_path / 'k.pem', password=pw)


def test_loading_bad_or_foreign_keys_fails_clearly(tmp_path) -> None:
    (tmp_path / 'junk.pem').write_bytes(b'not a key')
    with pytest.raises(ConfigError, match='cannot load'):
        wire.load_private_key(tmp_path / 'junk.pem')
    with pytest.raises(ConfigError, match='cannot load'):
        wire.load_public_key(tmp_path / 'missing.pub')
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / 'ec.pem').write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / 'ec.pub').write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match='not Ed25519'):
        wire.load_private_key(tmp_path / 'ec.pem')
    with pytest.raises(ConfigError, match='not Ed25519'):
        wire.load_public_key(tmp_path / 'ec.pub')


# --- signatures -----------------------------------------------------------------------------
FIELDS = dict(payload=b'\x00\x01delta-bytes' * 10, device_id='robot-7', round=12,
              base_hash='ab' * 32, new_version=13, base_version=12, new_hash='cd' * 32,
              codec='sparse')


def _sign(priv, f: dict) -> bytes:
    return wire.sign_delta(priv, f['payload'], f['device_id'], f['round'], f['base_hash'],
                           f['new_version'], base_version=f['base_version'],
                           new_hash=f['new_hash'], codec=f['codec'])


def _verify(pub, sig: bytes, f: dict) -> None:
    wire.verify_delta(pub, sig, f['payload'], f['device_id'], f['round'], f['base_hash'],
                      f['new_version'], base_version=f['base_version'],
                      new_hash=f['new_hash'], codec=f['codec'])


@pytest.fixture(scope='module')
def keys():
    return wire.generate_keypair()


def test_signature_verifies(keys) -> None:
    priv, pub = keys
    sig = _sign(priv, FIELDS)
    assert len(sig) == 64
    _verify(pub, sig, FIELDS)


@pytest.mark.parametrize('field, value', [
    ('payload', FIELDS['payload'][:-1] + b'\x02'),
    ('payload', FIELDS['payload'] + b'\x00'),
    ('device_id', 'robot-8'),
    ('round', 13),
    ('base_hash', 'ab' * 31 + 'ac'),
    ('new_version', 14),
    ('base_version', 11),
    ('new_hash', 'cd' * 31 + 'ce'),
    ('codec', 'fp16'),
])
def test_tampering_any_field_breaks_the_signature(keys, field: str, value: object) -> None:
    priv, pub = keys
    sig = _sign(priv, FIELDS)
    with pytest.raises(SignatureError, match='does not verify'):
        _verify(pub, sig, dict(FIELDS, **{field: value}))


def test_tampered_signature_other_key_and_malformed_input(keys) -> None:
    priv, pub = keys
    sig = _sign(priv, FIELDS)
    for i in (0, 31, 63):
        bad = bytearray(sig)
        bad[i] ^= 1
        with pytest.raises(SignatureError):
            _verify(pub, bytes(bad), FIELDS)
    _, other_pub = wire.generate_keypair()
    with pytest.raises(SignatureError):
        _verify(other_pub, sig, FIELDS)
    for bad_sig in (sig[:-1], b'', 'text'):
        with pytest.raises(SignatureError, match='64 bytes'):
            _verify(pub, bad_sig, FIELDS)  # type: ignore[arg-type]
    for field, value in (('round', -1), ('new_version', 1 << 64), ('round', True),
                         ('device_id', 7), ('payload', 'text')):
        with pytest.raises(SignatureError):
            _sign(priv, dict(FIELDS, **{field: value}))


def test_length_prefixes_make_the_message_unambiguous() -> None:
    a = wire.delta_signing_bytes(b'p', 'dev', 1, 'h', 2, new_hash='ab', codec='c')
    b = wire.delta_signing_bytes(b'p', 'dev', 1, 'h', 2, new_hash='a', codec='bc')
    assert a != b
    # The payload enters by digest, so huge payloads sign in constant message size.
    big = wire.delta_signing_bytes(b'x' * 100_000, 'dev', 1, 'h', 2)
    assert len(big) == len(wire.delta_signing_bytes(b'', 'dev', 1, 'h', 2))
    assert hashlib.sha256(b'x' * 100_000).digest() in big


# --- chunks ---------------------------------------------------------------------------------
@pytest.mark.parametrize('size, chunk_size', [(0, 10), (1, 10), (100, 10), (101, 10),
                                               (5000, 333), (64, 1000)])
def test_chunks_reassemble_in_any_order(size: int, chunk_size: int) -> None:
    payload = os.urandom(size)
    chunks = wire.split_chunks(payload, chunk_size)
    assert len(chunks) == max(1, -(-size // chunk_size))
    assert all(len(c) <= wire.CHUNK_HEADER_SIZE + chunk_size for c in chunks)
    random.Random(size).shuffle(chunks)
    asm = wire.ChunkAssembler()
    results = [asm.add(c, now=0.0) for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == payload
    assert asm.pending == 0


def test_interleaved_messages_reassemble_separately() -> None:
    p1, p2 = os.urandom(900), os.urandom(700)
    c1, c2 = wire.split_chunks(p1, 100), wire.split_chunks(p2, 100)
    mixed = [c for pair in zip(c1, c2 + [b''] * 2, strict=True) for c in pair if c]
    random.Random(1).shuffle(mixed)
    asm = wire.ChunkAssembler()
    done = [r for c in mixed if (r := asm.add(c, now=0.0)) is not None]
    assert sorted(done, key=len) == [p2, p1]


def test_corrupted_chunk_data_fails_the_checksum_and_drops_the_message() -> None:
    payload = os.urandom(1000)
    chunks = wire.split_chunks(payload, 128)
    bad = bytearray(chunks[3])
    bad[-1] ^= 0xFF
    chunks[3] = bytes(bad)
    asm = wire.ChunkAssembler()
    for c in chunks[:-1]:
        assert asm.add(c, now=0.0) is None
    with pytest.raises(ChecksumError, match='sha256'):
        asm.add(chunks[-1], now=0.0)
    assert asm.pending == 0


def _repack(chunk: bytes, **changes: object) -> bytes:
    head, data = wire.parse_chunk(chunk)
    fields = dict(message_id=head.message_id, index=head.index, count=head.count,
                  chunk_size=head.chunk_size, total=head.total, sha256=head.sha256)
    fields.update(changes)
    raw = wire._CHUNK_STRUCT.pack(wire.CHUNK_MAGIC, wire.CHUNK_VERSION, fields['message_id'],
                                  fields['index'], fields['count'], fields['chunk_size'],
                                  fields['total'], fields['sha256'])
    return raw + data


@pytest.mark.parametrize('kind, match', [
    ('duplicate', 'duplicate'),
    ('other_digest', 'disagrees'),
    ('other_total', 'disagrees'),
])
def test_inconsistent_or_duplicate_chunks_are_refused_without_harm(kind: str,
                                                                   match: str) -> None:
    payload = os.urandom(1000)
    chunks = wire.split_chunks(payload, 100)
    asm = wire.ChunkAssembler()
    asm.add(chunks[0], now=0.0)
    if kind == 'duplicate':
        bad = chunks[0]
    elif kind == 'other_digest':
        bad = _repack(chunks[1], sha256=b'\x00' * 32)
    else:
        # A self-consistent header (1090 bytes in 11 chunks) that contradicts the first one.
        bad = _repack(chunks[1], total=1090, count=11)
    with pytest.raises(ChunkError, match=match):
        asm.add(bad, now=0.0)
    # The message still completes from the genuine chunks.
    out = [asm.add(c, now=0.0) for c in chunks[1:]]
    assert out[-1] == payload


@pytest.mark.parametrize('mangle, match', [
    (lambda c: c[:10], 'shorter'),
    (lambda c: b'XXXX' + c[4:], 'magic'),
    (lambda c: c[:4] + b'\x09' + c[5:], 'version'),
    (lambda c: c[:-1], 'carries'),
    (lambda c: c + b'\x00', 'carries'),
    (lambda c: _repack(c, index=10), 'out of range'),
    (lambda c: _repack(c, count=3), 'claims'),
    (lambda c: _repack(c, chunk_size=0), 'claims'),
])
def test_malformed_chunks_raise_chunk_error(mangle, match: str) -> None:
    chunk = wire.split_chunks(os.urandom(1000), 100)[2]
    with pytest.raises(ChunkError, match=match):
        wire.ChunkAssembler().add(mangle(chunk), now=0.0)
    with pytest.raises(ChunkError):
        wire.parse_chunk('text')  # type: ignore[arg-type]


def test_oversized_message_is_refused_on_its_first_chunk() -> None:
    chunks = wire.split_chunks(os.urandom(5000), 1000)
    asm = wire.ChunkAssembler(max_total_bytes=4096)
    with pytest.raises(PayloadTooLargeError, match='5000 bytes'):
        asm.add(chunks[0], now=0.0)
    assert asm.pending == 0


def test_missing_chunk_times_out() -> None:
    payload = os.urandom(1000)
    chunks = wire.split_chunks(payload, 100)
    asm = wire.ChunkAssembler(timeout_s=5.0)
    for c in chunks[:-1]:
        asm.add(c, now=100.0)
    assert asm.expire(now=104.0) == [] and asm.pending == 1
    gone = asm.expire(now=105.5)
    assert gone == [wire.parse_chunk(chunks[0])[0].message_id] and asm.pending == 0
    assert asm.dropped == 1
    # A late chunk starts over and cannot complete on its own.
    assert asm.add(chunks[-1], now=106.0) is None


def test_delivered_message_refuses_late_duplicates_and_pending_is_bounded() -> None:
    asm = wire.ChunkAssembler(max_pending=2)
    chunks = wire.split_chunks(b'abc', 10)
    assert asm.add(chunks[0], now=0.0) == b'abc'
    with pytest.raises(ChunkError, match='delivered'):
        asm.add(chunks[0], now=0.0)
    firsts = [wire.split_chunks(os.urandom(20), 10)[0] for _ in range(3)]
    for c in firsts:
        asm.add(c, now=0.0)
    assert asm.pending == 2 and asm.dropped == 1


def test_split_chunks_validates_arguments() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            wire.split_chunks(b'x', bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match='16 bytes'):
        wire.split_chunks(b'x', 10, message_id=b'short')
    fixed = wire.split_chunks(b'x' * 30, 10, message_id=b'm' * 16)
    assert all(wire.parse_chunk(c)[0].message_id == b'm' * 16 for c in fixed)
