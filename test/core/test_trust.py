"""Update security, TUF-style: root-signed key lists, rotation, revocation, expiry (freeze),
and every attack on the downlink refused by the device's gate with a reason, nothing changed.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cdcca_ros.core import dwc, wire
from cdcca_ros.core.trust import (
    ROLE_DELTA,
    ROLE_ROLLBACK,
    KeyList,
    Signer,
    TrustReason,
    TrustStore,
    key_id,
    load_trust,
)
from cdcca_ros.core.updates import DeltaGate, RejectReason, seal_delta
from cdcca_ros.errors import ConfigError, DeltaGateRejection, TrustError

DEVICE = 'robot-1'
NOW = 1_800_000_000  # a fixed clock for every store here
DAY = 24 * 3600


def trainable() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {'lora_A': torch.randn(4, 16, generator=g) * 0.02, 'norm': torch.ones(16)}


class Keys:
    """A root and three signing keys (the cloud's current, next and a stranger's)."""

    def __init__(self) -> None:
        self.root, self.root_pub = wire.generate_keypair()
        self.k1, self.k1_pub = wire.generate_keypair()
        self.k2, self.k2_pub = wire.generate_keypair()
        self.stranger, _ = wire.generate_keypair()

    def key_list(self, version: int, keys, *, revoked=(), expires: int = NOW + 30 * DAY,
                 root=None) -> bytes:
        return KeyList.create(root or self.root, version=version, expires=expires,
                              keys=keys, revoked=revoked).encode()


@pytest.fixture(scope='module')
def keys() -> Keys:
    return Keys()


def _store(keys: Keys, tmp_path=None, **kwargs) -> TrustStore:
    return TrustStore(keys.root_pub, clock=lambda: NOW,
                      state_path=tmp_path / 'key_list.json' if tmp_path else None, **kwargs)


def _delta(signer, base, *, version: int = 1, now: float = NOW, **fields):
    payload = dwc.get_codec('sparse').encode(
        {k: torch.full_like(v, 1e-3) for k, v in base.items()})
    args = dict(device_id=DEVICE, round=version, base_version=version - 1,
                base_hash=wire.state_dict_hash(base), new_version=version,
                new_hash='ff' * 32, codec='sparse', payload=payload)
    args.update(fields)
    return seal_delta(signer, now=now, **args)


def _gate(trust: TrustStore, base) -> DeltaGate:
    return DeltaGate(DEVICE, trust, 0, wire.state_dict_hash(base), base)


def _refused(gate: DeltaGate, env, reason: str) -> DeltaGateRejection:
    before = (gate.version, gate.base_hash, gate._pending)
    with pytest.raises(DeltaGateRejection) as err:
        gate.accept(env)
    assert err.value.reason == reason, str(err.value)
    assert (gate.version, gate.base_hash, gate._pending) == before
    return err.value


# --- key lists --------------------------------------------------------------------------------
def test_key_list_round_trips_and_verifies(keys) -> None:
    doc = KeyList.create(keys.root, version=3, expires=NOW,
                         keys=[(keys.k1_pub, [ROLE_DELTA]), (keys.k2_pub, [ROLE_DELTA,
                                                                           ROLE_ROLLBACK])],
                         revoked=[key_id(keys.stranger.public_key())])
    back = KeyList.decode(doc.encode())
    back.verify(keys.root_pub)
    assert back == doc
    assert back.keys[key_id(keys.k2_pub)].roles == {ROLE_DELTA, ROLE_ROLLBACK}
    assert json.loads(doc.encode())['signed']['version'] == 3  # readable JSON


@pytest.mark.parametrize('mangle, reason', [
    (lambda d: b'[' * 50_000, TrustReason.KEY_LIST_INVALID),        # deep nesting
    (lambda d: b'\xff' + d, TrustReason.KEY_LIST_INVALID),           # not UTF-8
    (lambda d: b'x' * 70_000, TrustReason.KEY_LIST_INVALID),        # too large
    (lambda d: d.replace(b'"version":1', b'"version":1.5'), TrustReason.KEY_LIST_INVALID),
    (lambda d: d.replace(b'"version":1', b'"version":true'), TrustReason.KEY_LIST_INVALID),
    (lambda d: d.replace(b'"version":1', b'"version":2'), TrustReason.KEY_LIST_SIGNATURE),
    (lambda d: d.replace(b'"delta"', b'"root"'), TrustReason.KEY_LIST_INVALID),
    (lambda d: d.replace(b'"delta"', b'"rollback"'), TrustReason.KEY_LIST_SIGNATURE),
    (lambda d: d[:-1], TrustReason.KEY_LIST_INVALID),
])
def test_malformed_or_forged_key_lists_are_refused(keys, mangle, reason) -> None:
    store = _store(keys)
    good = keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA])])
    with pytest.raises(TrustError) as err:
        store.update(mangle(good))
    assert err.value.reason == reason, str(err.value)
    assert store.key_list is None and store.refused_key_lists == 1


def test_key_list_signed_by_another_root_is_refused(keys) -> None:
    other_root, _ = wire.generate_keypair()
    with pytest.raises(TrustError, match='signed by root') as err:
        _store(keys).update(keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA])], root=other_root))
    assert err.value.reason == TrustReason.KEY_LIST_SIGNATURE


def test_key_list_versions_only_move_forward(keys, tmp_path) -> None:
    store = _store(keys, tmp_path)
    v2 = keys.key_list(2, [(keys.k1_pub, [ROLE_DELTA])])
    assert store.update(v2) is True and store.key_list.version == 2
    assert store.update(v2) is False  # the same list again: nothing to do
    with pytest.raises(TrustError) as err:
        store.update(keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA])]))
    assert err.value.reason == TrustReason.KEY_LIST_ROLLBACK
    with pytest.raises(TrustError) as err:  # same version, other content
        store.update(keys.key_list(2, [(keys.k2_pub, [ROLE_DELTA])]))
    assert err.value.reason == TrustReason.KEY_LIST_CONFLICT
    with pytest.raises(TrustError) as err:
        store.update(keys.key_list(3, [(keys.k2_pub, [ROLE_DELTA])], expires=NOW - DAY))
    assert err.value.reason == TrustReason.KEY_LIST_EXPIRED
    assert store.key_list.version == 2
    # Persisted: a restart comes back on v2, and a flashed older list does not win.
    again = _store(keys, tmp_path, key_list=keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA])]))
    assert again.key_list.version == 2


def test_store_arguments_and_files(keys, tmp_path) -> None:
    with pytest.raises(ConfigError, match='root key or a pinned key'):
        TrustStore()
    (tmp_path / 'key_list.json').write_bytes(b'{"garbage": 1}')
    with pytest.raises(ConfigError, match='persisted key list does not verify'):
        _store(keys, tmp_path)
    with pytest.raises(TrustError) as err:
        TrustStore.pinned_key(keys.k1_pub).update(keys.key_list(1, [(keys.k1_pub,
                                                                     [ROLE_DELTA])]))
    assert err.value.reason == TrustReason.UNKNOWN_KEY
    wire.save_public_key(keys.root_pub, tmp_path / 'root.pem')
    wire.save_public_key(keys.k1_pub, tmp_path / 'k1.pem')
    with pytest.raises(ConfigError, match='not both'):
        load_trust(root_key=str(tmp_path / 'root.pem'), pinned_key=str(tmp_path / 'k1.pem'))
    assert load_trust() is None
    assert load_trust(pinned_key=str(tmp_path / 'k1.pem')).status()['trust'] == 'pinned'
    (tmp_path / 'list.json').write_bytes(keys.key_list(4, [(keys.k1_pub, [ROLE_DELTA])]))
    store = load_trust(root_key=str(tmp_path / 'root.pem'), key_list=str(tmp_path / 'list.json'),
                       state_dir=tmp_path / 'state')
    assert store.key_list.version == 4 and (tmp_path / 'state' / 'key_list.json').is_file()


def test_verify_names_each_reason(keys) -> None:
    store = _store(keys)
    message, signer = b'record', Signer(keys.k1)
    sig = signer.sign(message)
    with pytest.raises(TrustError) as err:  # a root, but no list yet
        store.verify(ROLE_DELTA, message, signer.key_id, sig, expires=NOW + 1)
    assert err.value.reason == TrustReason.NO_KEY_LIST
    store.update(keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA])],
                               revoked=[key_id(keys.k2_pub)]))
    store.verify(ROLE_DELTA, message, signer.key_id, sig, expires=NOW + 1)
    cases = [
        (dict(role=ROLE_ROLLBACK), TrustReason.WRONG_ROLE),
        (dict(signer_id=key_id(keys.k2_pub)), TrustReason.REVOKED_KEY),
        (dict(signer_id='00' * 16), TrustReason.UNKNOWN_KEY),
        (dict(signature=bytes(64)), TrustReason.BAD_SIGNATURE),
        (dict(signature=sig[:10]), TrustReason.BAD_SIGNATURE),
        (dict(message=b'other'), TrustReason.BAD_SIGNATURE),
        (dict(expires=NOW - store.max_clock_skew_s - 1), TrustReason.EXPIRED),
        (dict(now=NOW + 31 * DAY, expires=NOW + 40 * DAY), TrustReason.KEY_LIST_EXPIRED),
    ]
    for change, reason in cases:
        args = dict(role=ROLE_DELTA, message=message, signer_id=signer.key_id, signature=sig,
                    expires=NOW + 1, now=None)
        args.update(change)
        with pytest.raises(TrustError) as err:
            store.verify(args['role'], args['message'], args['signer_id'], args['signature'],
                         expires=args['expires'], now=args['now'])
        assert err.value.reason == reason, (change, str(err.value))
    # Within the clock-skew tolerance an expiry still passes.
    store.verify(ROLE_DELTA, message, signer.key_id, sig, expires=NOW - 10)


# --- the attacks of the issue, through the device's gate ------------------------------------
def test_every_downlink_attack_is_refused_with_a_reason(keys) -> None:
    """Tampered payload, wrong key, wrong device, wrong base, replay, rollback, revoked key,
    freeze (expired), mix-and-match (header of one delta, payload of another), a key list
    forged to un-revoke a key: each refused, the gate unchanged, a good delta still taken."""
    base = trainable()
    store = _store(keys)
    gate = _gate(store, base)
    listed = Signer(keys.k1, key_list=keys.key_list(
        1, [(keys.k1_pub, [ROLE_DELTA])], revoked=[key_id(keys.k2_pub)]))
    good = _delta(listed, base)
    other = _delta(listed, base, payload=dwc.get_codec('fp16').encode(
        {k: torch.full_like(v, 2e-3) for k, v in base.items()}), codec='fp16')
    forged_list = bytearray(keys.key_list(2, [(keys.k1_pub, [ROLE_DELTA]),
                                              (keys.k2_pub, [ROLE_DELTA])]))
    # One hex digit of the root's signature changed to another hex digit (flipping a bit of
    # 'a' or 'f' gives a character that is not hex: the list was then malformed, not forged,
    # in 1 run of 8).
    at = forged_list.index(b'"signature":"') + 14
    forged_list[at] = ord('1') if forged_list[at] == ord('0') else ord('0')
    attacks = {
        'tampered_payload': (dataclasses.replace(good, payload=good.payload + b'\x00'),
                             RejectReason.BAD_SIGNATURE),
        'wrong_key': (_delta(keys.stranger, base), RejectReason.UNKNOWN_KEY),
        'wrong_device': (_delta(listed, base, device_id='robot-2'), RejectReason.WRONG_DEVICE),
        'wrong_base': (_delta(listed, base, base_hash='00' * 32), RejectReason.WRONG_BASE),
        'revoked_key': (_delta(Signer(keys.k2), base), RejectReason.REVOKED_KEY),
        'unrevoked_by_forged_list': (_delta(Signer(keys.k2, key_list=bytes(forged_list)),
                                            base), RejectReason.KEY_LIST_SIGNATURE),
        'frozen': (_delta(listed, base, now=NOW - 8 * DAY), RejectReason.EXPIRED),
        'mix_and_match': (dataclasses.replace(good, payload=other.payload, codec='fp16'),
                          RejectReason.BAD_SIGNATURE),
        'version_jump': (_delta(listed, base, new_version=(1 << 64) - 1),
                         RejectReason.VERSION_JUMP),
    }
    for name, (env, reason) in attacks.items():
        _refused(gate, env, reason.value)
        assert store.key_list is None or store.key_list.version == 1, name
    gate.accept(good)
    gate.commit(1, good.new_hash)
    assert store.key_list.version == 1  # adopted from the good delta
    # Replay and rollback after a commit.
    _refused(gate, good, RejectReason.REPLAY.value)
    second = _delta(listed, base, version=2, base_hash=good.new_hash)
    gate.accept(second)
    gate.commit(2, second.new_hash)
    _refused(gate, dataclasses.replace(good), RejectReason.ROLLBACK.value)


def test_key_rotation_without_reflashing(keys, tmp_path) -> None:
    """The device holds only the root key. The cloud signs with k1 (list v1), then rotates to
    k2 with list v2 revoking k1, attached to its next delta: the device adopts v2 from the
    delta, persists it, and from then on refuses k1 -- also after a restart, and also when an
    attacker replays the old list v1 with a k1-signed delta."""
    base = trainable()
    store = _store(keys, tmp_path)
    gate = _gate(store, base)
    v1 = keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA, ROLE_ROLLBACK])])
    first = _delta(Signer(keys.k1, key_list=v1), base)
    gate.accept(first)
    gate.commit(1, first.new_hash)
    v2 = keys.key_list(2, [(keys.k2_pub, [ROLE_DELTA, ROLE_ROLLBACK])],
                       revoked=[key_id(keys.k1_pub)])
    second = _delta(Signer(keys.k2, key_list=v2), base, version=2, base_hash=first.new_hash)
    gate.accept(second)
    gate.commit(2, second.new_hash)
    assert store.key_list.version == 2
    stale = _delta(Signer(keys.k1, key_list=v1), base, version=3, base_hash=second.new_hash)
    _refused(gate, stale, RejectReason.REVOKED_KEY.value)
    restarted = _gate(_store(keys, tmp_path), base)
    restarted._version, restarted._hash = gate.version, gate.base_hash
    _refused(restarted, stale, RejectReason.REVOKED_KEY.value)
    third = _delta(Signer(keys.k2), base, version=3, base_hash=second.new_hash)
    restarted.accept(third)  # no list attached: the persisted v2 vouches for k2


def test_expired_key_list_freezes_until_a_new_one_arrives(keys) -> None:
    base = trainable()
    now = [NOW]
    store = TrustStore(keys.root_pub, clock=lambda: now[0], max_clock_skew_s=0)
    gate = _gate(store, base)
    v1 = keys.key_list(1, [(keys.k1_pub, [ROLE_DELTA])], expires=NOW + DAY)
    gate.accept(_delta(Signer(keys.k1, key_list=v1), base))
    now[0] = NOW + 2 * DAY  # the operator forgot to renew the list
    _refused(gate, _delta(Signer(keys.k1), base, now=now[0]),
             RejectReason.KEY_LIST_EXPIRED.value)
    v2 = keys.key_list(2, [(keys.k1_pub, [ROLE_DELTA])], expires=NOW + 30 * DAY)
    gate.accept(_delta(Signer(keys.k1, key_list=v2), base, now=now[0]))


def test_pinned_gate_still_works_without_key_lists(keys) -> None:
    base = trainable()
    gate = DeltaGate(DEVICE, keys.k1_pub, 0, wire.state_dict_hash(base), base)
    gate.accept(_delta(keys.k1, base, now=None))  # the real clock
    _refused(gate, _delta(keys.k2, base, now=None), RejectReason.UNKNOWN_KEY.value)
    _refused(gate, _delta(keys.k1, base, now=NOW - 10 * 365 * DAY),
             RejectReason.EXPIRED.value)
    _refused(gate, _delta(Signer(keys.k1, key_list=keys.key_list(1, [(keys.k1_pub,
                                                                      [ROLE_DELTA])])),
                          base, now=None), RejectReason.UNKNOWN_KEY.value)


def test_signer_validates(keys) -> None:
    with pytest.raises(ConfigError):
        Signer(keys.k1_pub)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Signer(keys.k1, ttl_s=0)
    assert Signer(keys.k1, ttl_s=60).expires(NOW) == NOW + 60
    with pytest.raises(ConfigError, match='both listed and revoked'):
        KeyList.create(keys.root, version=1, expires=NOW, keys=[(keys.k1_pub, [ROLE_DELTA])],
                       revoked=[key_id(keys.k1_pub)])
    with pytest.raises(ConfigError, match='roles'):
        KeyList.create(keys.root, version=1, expires=NOW, keys=[(keys.k1_pub, ['admin'])])
