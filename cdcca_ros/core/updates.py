"""The device-side gatekeeper for downlink deltas (pure logic, no rclpy).

The cloud seals a compressed delta into a :class:`DeltaEnvelope` (signed over every field);
the device hands it to :meth:`DeltaGate.accept`, which verifies and decodes it or raises
:class:`~cdcca_ros.errors.DeltaGateRejection` (a ``DeltaRejectedError`` with a ``reason``
code) without changing anything. The node then applies the delta on a copy
(:func:`cdcca_ros.core.dwc.apply_delta`, or its bit-identical flat form
:meth:`cdcca_ros.core.device.weights.FlatWeights.plus`), checks the result's hash against the
envelope's ``new_hash`` and calls :meth:`DeltaGate.commit`.

Who may sign a delta is the device's :class:`~cdcca_ros.core.trust.TrustStore`: a pinned key,
or the keys of a key list signed by a root key the device holds (rotation, revocation,
expiry; see :mod:`cdcca_ros.core.trust`). An envelope names its signing key (``key_id``),
carries a signed expiry (``expires``, unix seconds) and may carry the cloud's current key list
(``key_list``, root-signed on its own, so not covered by the delta's signature).

Versions move forward by at most :data:`MAX_VERSION_STEP` per delta, so no signed delta can
take the version space to its end (2**64 - 1), where no later delta or rollback could follow.

Envelope bytes (:meth:`DeltaEnvelope.encode`, version 2): magic ``b'CDEV'``, a version
byte, then device id, round, base version, base hash, new version, new hash, codec, payload,
signature, key id, expires and key list, each length-prefixed (8-byte little-endian length);
integers are 8-byte little-endian unsigned.
"""
from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cdcca_ros.core import wire
from cdcca_ros.core.trust import ROLE_DELTA, ROLE_ROLLBACK, Signer, TrustReason, TrustStore
from cdcca_ros.errors import (
    CodecError,
    DeltaGateRejection,
    SignatureError,
    SpecMismatchError,
    TrustError,
    WireError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from torch import Tensor

    from cdcca_ros.core.codecs.container import FlatDelta

ENVELOPE_MAGIC = b'CDEV'
ENVELOPE_VERSION = 2
_U64_MAX = (1 << 64) - 1
#: Largest adapter version (versions are unsigned 64-bit integers on the wire).
MAX_VERSION = _U64_MAX
#: Largest version step one delta may take (a rollback takes one).
MAX_VERSION_STEP = 1 << 20
_FIELDS = 12


class RejectReason(enum.StrEnum):
    """Why the gate refused a delta (the ``reason`` of :class:`DeltaGateRejection`)."""

    TOO_LARGE = 'too_large'
    BAD_SIGNATURE = 'bad_signature'
    WRONG_DEVICE = 'wrong_device'
    REPLAY = 'replay'
    ROLLBACK = 'rollback'
    WRONG_BASE = 'wrong_base'
    CODEC_MISMATCH = 'codec_mismatch'
    VERSION_JUMP = 'version_jump'
    UPDATE_TOO_LARGE = 'update_too_large'
    UNKNOWN_KEY = TrustReason.UNKNOWN_KEY.value
    REVOKED_KEY = TrustReason.REVOKED_KEY.value
    WRONG_ROLE = TrustReason.WRONG_ROLE.value
    EXPIRED = TrustReason.EXPIRED.value
    KEY_LIST_EXPIRED = TrustReason.KEY_LIST_EXPIRED.value
    KEY_LIST_INVALID = TrustReason.KEY_LIST_INVALID.value
    KEY_LIST_SIGNATURE = TrustReason.KEY_LIST_SIGNATURE.value
    KEY_LIST_CONFLICT = TrustReason.KEY_LIST_CONFLICT.value
    NO_KEY_LIST = TrustReason.NO_KEY_LIST.value
    UNDECODABLE = 'undecodable'
    WRONG_KEYS = 'wrong_keys'
    WRONG_SHAPE = 'wrong_shape'
    NON_FINITE = 'non_finite'
    HASH_MISMATCH = 'hash_mismatch'


@dataclass(frozen=True)
class DeltaEnvelope:
    """One signed downlink delta.

    Attributes:
        device_id: The device it is for.
        round: Cloud round that produced it.
        base_version: Model version the delta applies to.
        base_hash: :func:`~cdcca_ros.core.wire.state_dict_hash` of that base.
        new_version: Version after applying (strictly greater than ``base_version``).
        new_hash: Hash of the weights after applying (the cloud's view of the device).
        codec: Codec name of the payload (e.g. ``'sparse'``).
        payload: Codec bytes (:mod:`cdcca_ros.core.codecs`).
        signature: Ed25519 signature over all the fields above and the two below.
        key_id: :func:`~cdcca_ros.core.trust.key_id` of the signing key.
        expires: Unix time (s) after which the device refuses the delta (signed).
        key_list: The cloud's root-signed key list document (not covered by this
            signature; empty: none attached).
    """

    device_id: str
    round: int
    base_version: int
    base_hash: str
    new_version: int
    new_hash: str
    codec: str
    payload: bytes
    signature: bytes
    key_id: str = ''
    expires: int = 0
    key_list: bytes = b''

    def __post_init__(self) -> None:
        for name in ('device_id', 'base_hash', 'new_hash', 'codec', 'key_id'):
            if not isinstance(getattr(self, name), str):
                raise WireError(f'envelope {name} must be a str, got '
                                f'{type(getattr(self, name)).__name__}')
        for name in ('round', 'base_version', 'new_version', 'expires'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U64_MAX:
                raise WireError(f'envelope {name} must be an integer in [0, 2**64), got {v!r}')
        for name in ('payload', 'signature', 'key_list'):
            if not isinstance(getattr(self, name), bytes):
                raise WireError(f'envelope {name} must be bytes, got '
                                f'{type(getattr(self, name)).__name__}')

    def signing_bytes(self) -> bytes:
        """What the signature covers (:func:`~cdcca_ros.core.wire.delta_signing_bytes`).

        Raises:
            SignatureError: A field is out of range.
        """
        return wire.delta_signing_bytes(self.payload, self.device_id, self.round,
                                        self.base_hash, self.new_version,
                                        base_version=self.base_version,
                                        new_hash=self.new_hash, codec=self.codec,
                                        key_id=self.key_id, expires=self.expires)

    def verify(self, trust: TrustStore | Ed25519PublicKey, now: float | None = None) -> None:
        """Check the signature over every field against one key, or a trust store (which also
        checks the key, its role and the expiry; an attached key list is not adopted here).

        Raises:
            SignatureError: It does not verify (a :class:`~cdcca_ros.errors.TrustError`
                with a ``reason`` from a trust store).
        """
        if isinstance(trust, Ed25519PublicKey):
            wire.verify_delta(trust, self.signature, self.payload, self.device_id,
                              self.round, self.base_hash, self.new_version,
                              base_version=self.base_version, new_hash=self.new_hash,
                              codec=self.codec, key_id=self.key_id, expires=self.expires)
            return
        trust.verify(ROLE_DELTA, self.signing_bytes(), self.key_id, self.signature,
                     expires=self.expires, now=now, what='delta')

    def encode(self) -> bytes:
        """The envelope as bytes (format in the module docstring)."""
        u64 = struct.Struct('<Q').pack
        fields = [self.device_id.encode(), u64(self.round), u64(self.base_version),
                  self.base_hash.encode(), u64(self.new_version), self.new_hash.encode(),
                  self.codec.encode(), self.payload, self.signature, self.key_id.encode(),
                  u64(self.expires), self.key_list]
        return ENVELOPE_MAGIC + bytes([ENVELOPE_VERSION]) + b''.join(
            struct.pack('<Q', len(f)) + f for f in fields)

    @classmethod
    def decode(cls, data: bytes) -> DeltaEnvelope:
        """Parse :meth:`encode` output (the signature is not checked here).

        Raises:
            WireError: Wrong magic or version, truncated, trailing bytes, or bad fields.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError(f'envelope must be bytes, got {type(data).__name__}')
        data = bytes(data)
        if data[:4] != ENVELOPE_MAGIC:
            raise WireError(f'envelope magic is {data[:4]!r}, expected {ENVELOPE_MAGIC!r}')
        if len(data) < 5 or data[4] != ENVELOPE_VERSION:
            raise WireError(f'envelope version {data[4] if len(data) > 4 else None} is not '
                            f'supported (this build reads {ENVELOPE_VERSION})')
        pos = 5
        fields: list[bytes] = []
        for _ in range(_FIELDS):
            if pos + 8 > len(data):
                raise WireError(f'envelope truncated at byte {pos} of {len(data)}')
            (n,) = struct.unpack_from('<Q', data, pos)
            pos += 8
            if n > len(data) - pos:
                raise WireError(f'envelope field of {n} bytes overruns the {len(data)}-byte '
                                'envelope')
            fields.append(data[pos:pos + n])
            pos += n
        if pos != len(data):
            raise WireError(f'envelope has {len(data) - pos} trailing bytes')

        def text(b: bytes, what: str) -> str:
            try:
                return b.decode()
            except UnicodeDecodeError as err:
                raise WireError(f'envelope {what} is not UTF-8') from err

        def num(b: bytes, what: str) -> int:
            if len(b) != 8:
                raise WireError(f'envelope {what} is {len(b)} bytes, expected 8')
            return struct.unpack('<Q', b)[0]

        return cls(device_id=text(fields[0], 'device_id'), round=num(fields[1], 'round'),
                   base_version=num(fields[2], 'base_version'),
                   base_hash=text(fields[3], 'base_hash'),
                   new_version=num(fields[4], 'new_version'),
                   new_hash=text(fields[5], 'new_hash'), codec=text(fields[6], 'codec'),
                   payload=fields[7], signature=fields[8], key_id=text(fields[9], 'key_id'),
                   expires=num(fields[10], 'expires'), key_list=fields[11])


def seal_delta(signer: Signer | Ed25519PrivateKey, *, device_id: str, round: int,
               base_version: int, base_hash: str, new_version: int, new_hash: str,
               codec: str, payload: bytes, now: float | None = None) -> DeltaEnvelope:
    """Sign a payload and its routing fields into an envelope (cloud side).

    Args:
        signer: The cloud's :class:`~cdcca_ros.core.trust.Signer` (key, time to live, key
            list to attach), or a bare private key (default time to live, no key list).
        now: Unix time of signing (default: now); the delta expires ``signer.ttl_s`` later.

    Raises:
        WireError: A field has the wrong type or range.
    """
    signer = Signer.of(signer)
    expires = signer.expires(now)
    try:
        signature = signer.sign(wire.delta_signing_bytes(
            payload, device_id, round, base_hash, new_version, base_version=base_version,
            new_hash=new_hash, codec=codec, key_id=signer.key_id, expires=expires))
    except SignatureError as err:
        raise WireError(f'cannot seal delta for device {device_id!r}: {err}') from err
    return DeltaEnvelope(device_id=device_id, round=round, base_version=base_version,
                         base_hash=base_hash, new_version=new_version, new_hash=new_hash,
                         codec=codec, payload=bytes(payload), signature=signature,
                         key_id=signer.key_id, expires=expires,
                         key_list=bytes(signer.key_list))


def _shape_spec(trainable: Mapping[str, Tensor | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, v in trainable.items():
        shape = getattr(v, 'shape', v)
        out[name] = tuple(int(s) for s in shape)
    return out


def _first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """Name of the first tensor holding NaN or Inf, or None when every value is finite.

    One check over all values at once (a concatenated flat copy; the tensors are small next
    to a model), then a per-tensor walk only to name the culprit.
    """
    import torch

    from cdcca_ros.core.codecs.container import all_finite

    flats = [t.reshape(-1) for t in tensors.values()]
    if not flats or all_finite(torch.cat(flats)):
        return None
    return next(name for name, t in tensors.items() if not all_finite(t))


class DeltaGate:
    """Decides whether a device takes a delta; nothing changes until :meth:`commit`.

    Checks, in order: payload size, the attached key list (adopted when newer; an older one
    is ignored, a forged, conflicting or expired one refuses the delta), signature (every
    field) by a trusted, unrevoked key allowed to sign deltas, expiry, device id, version
    strictly newer than the current one (equal: replay, older: rollback) and at most
    :data:`MAX_VERSION_STEP` ahead of its base, base version and hash equal to the current
    ones, codec name matching the payload, decodability, names and shapes equal to the
    trainable set, every value finite.

    Args:
        device_id: This device.
        public_key: Who may sign deltas: a :class:`~cdcca_ros.core.trust.TrustStore`, or
            the cloud's one Ed25519 key (pinned: no rotation).
        current_version: Version of the weights now in use.
        current_base_hash: Their :func:`~cdcca_ros.core.wire.state_dict_hash`.
        trainable: The trainable set: name -> tensor (or shape).
        max_payload_bytes: Largest payload accepted.
    """

    def __init__(self, device_id: str, public_key: TrustStore | Ed25519PublicKey,
                 current_version: int,
                 current_base_hash: str, trainable: Mapping[str, Tensor | Sequence[int]], *,
                 max_payload_bytes: int = 64 << 20) -> None:
        from cdcca_ros.errors import ConfigError

        if not isinstance(device_id, str) or not device_id:
            raise ConfigError(f'device_id must be a non-empty str, got {device_id!r}')
        if isinstance(current_version, bool) or not isinstance(current_version, int) or (
                not 0 <= current_version <= _U64_MAX):
            raise ConfigError(f'current_version must be an integer in [0, 2**64), '
                              f'got {current_version!r}')
        if not isinstance(current_base_hash, str) or not current_base_hash:
            raise ConfigError(f'current_base_hash must be a non-empty str, '
                              f'got {current_base_hash!r}')
        if max_payload_bytes <= 0:
            raise ConfigError(f'max_payload_bytes must be positive, got {max_payload_bytes}')
        self.device_id = device_id
        self.trust = (public_key if isinstance(public_key, TrustStore)
                      else TrustStore.pinned_key(public_key))
        self.max_payload_bytes = int(max_payload_bytes)
        self._shapes = _shape_spec(trainable)
        self._version = current_version
        self._hash = current_base_hash
        self._pending: tuple[int, str] | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        """Version of the weights in use."""
        return self._version

    @property
    def base_hash(self) -> str:
        """Hash of the weights in use."""
        return self._hash

    def _reject(self, reason: RejectReason, env: DeltaEnvelope, msg: str) -> DeltaGateRejection:
        return DeltaGateRejection(
            reason.value, f'delta round {env.round} v{env.base_version}->v{env.new_version} '
            f'for device {env.device_id!r}: {msg}')

    def accept(self, envelope: DeltaEnvelope) -> dict[str, Tensor]:
        """Verify and decode a delta for this device.

        Returns:
            The decoded delta (name -> float tensor of the trainable shapes).

        Raises:
            DeltaGateRejection: Refused; ``reason`` says why. The gate is unchanged.
        """
        delta = self._accept(envelope, flat=False)
        assert isinstance(delta, dict)
        return delta

    def accept_flat(self, envelope: DeltaEnvelope) -> FlatDelta:
        """:meth:`accept`, the delta as one float32 vector over the trainable set in name
        order (a compact payload decodes straight into it: the device's fast path).

        Raises:
            DeltaGateRejection: Refused; ``reason`` says why. The gate is unchanged.
        """
        delta = self._accept(envelope, flat=True)
        assert not isinstance(delta, dict)
        return delta

    def _accept(self, envelope: DeltaEnvelope, flat: bool) -> dict[str, Tensor] | FlatDelta:
        from cdcca_ros.core import codecs

        env = envelope
        if not isinstance(env, DeltaEnvelope):
            raise DeltaGateRejection(RejectReason.UNDECODABLE.value,
                                     f'expected a DeltaEnvelope, got {type(env).__name__}')
        with self._lock:
            if len(env.payload) > self.max_payload_bytes:
                raise self._reject(RejectReason.TOO_LARGE, env,
                                   f'payload of {len(env.payload)} bytes exceeds '
                                   f'{self.max_payload_bytes}')
            if env.key_list:
                try:
                    self.trust.update(env.key_list)
                except TrustError as err:
                    if err.reason != TrustReason.KEY_LIST_ROLLBACK.value:
                        raise self._reject(RejectReason(err.reason), env, err.detail) from err
                    # An older list than the one in force: ignored, the delta is judged
                    # under the list in force.
            try:
                env.verify(self.trust)
            except TrustError as err:
                raise self._reject(RejectReason(err.reason), env, err.detail) from err
            except SignatureError as err:
                raise self._reject(RejectReason.BAD_SIGNATURE, env, str(err)) from err
            if env.device_id != self.device_id:
                raise self._reject(RejectReason.WRONG_DEVICE, env,
                                   f'this is device {self.device_id!r}')
            if env.new_version == self._version:
                raise self._reject(RejectReason.REPLAY, env,
                                   f'version {env.new_version} is already in use')
            if env.new_version < self._version:
                raise self._reject(RejectReason.ROLLBACK, env,
                                   f'version {env.new_version} is older than the current '
                                   f'{self._version}')
            if env.new_version - env.base_version > MAX_VERSION_STEP:
                raise self._reject(RejectReason.VERSION_JUMP, env,
                                   f'version {env.new_version} is more than '
                                   f'{MAX_VERSION_STEP} ahead of its base '
                                   f'{env.base_version}')
            if env.base_version != self._version or env.base_hash != self._hash:
                raise self._reject(RejectReason.WRONG_BASE, env,
                                   f'it applies to v{env.base_version} '
                                   f'{env.base_hash[:12]}, device holds v{self._version} '
                                   f'{self._hash[:12]}')
            try:
                payload_codec, self_describing = codecs.read_payload_kind(env.payload)
                if payload_codec != env.codec:
                    raise self._reject(RejectReason.CODEC_MISMATCH, env,
                                       f'envelope says {env.codec!r}, payload says '
                                       f'{payload_codec!r}')
                codec = codecs.get_codec(env.codec)
                if flat and not self_describing:
                    # Names and shapes are the spec's by construction (its digest matched).
                    flat_delta = codec.decode_flat(env.payload, self._shapes)
                else:
                    delta = codec.decode(env.payload, spec=self._shapes)
            except SpecMismatchError as err:
                # A compact payload names its tensors only by the digest of their set.
                raise self._reject(RejectReason.WRONG_KEYS, env, str(err)) from err
            except CodecError as err:
                raise self._reject(RejectReason.UNDECODABLE, env, str(err)) from err
            if flat and not self_describing:
                bad = flat_delta.first_non_finite()
                if bad is not None:
                    raise self._reject(RejectReason.NON_FINITE, env,
                                       f'{bad!r} holds NaN or Inf')
                self._pending = (env.new_version, env.new_hash)
                return flat_delta
            if set(delta) != set(self._shapes):
                missing = sorted(set(self._shapes) - set(delta))[:5]
                extra = sorted(set(delta) - set(self._shapes))[:5]
                raise self._reject(RejectReason.WRONG_KEYS, env,
                                   f'missing {missing}, unexpected {extra}')
            for name, t in delta.items():
                if tuple(t.shape) != self._shapes[name]:
                    raise self._reject(RejectReason.WRONG_SHAPE, env,
                                       f'{name!r} has shape {tuple(t.shape)}, expected '
                                       f'{self._shapes[name]}')
            bad = _first_non_finite(delta)
            if bad is not None:
                raise self._reject(RejectReason.NON_FINITE, env, f'{bad!r} holds NaN or Inf')
            self._pending = (env.new_version, env.new_hash)
            return codecs.flatten_delta(delta, self._shapes) if flat else delta

    def commit(self, new_version: int, new_hash: str) -> None:
        """Record that the node now runs ``new_version`` (after applying a delta).

        Raises:
            DeltaGateRejection: ``new_version`` is not newer (``rollback``/``replay``), or it
                is the version last accepted and ``new_hash`` differs from the envelope's
                (``hash_mismatch``: the applied weights are not what the cloud computed).
        """
        from cdcca_ros.errors import ConfigError

        if not isinstance(new_hash, str) or not new_hash:
            raise ConfigError(f'new_hash must be a non-empty str, got {new_hash!r}')
        with self._lock:
            if isinstance(new_version, bool) or not isinstance(new_version, int) or (
                    new_version <= self._version):
                reason = (RejectReason.REPLAY if new_version == self._version
                          else RejectReason.ROLLBACK)
                raise DeltaGateRejection(reason.value,
                                         f'cannot commit version {new_version!r} over '
                                         f'{self._version}')
            if self._pending is not None and self._pending[0] == new_version and (
                    self._pending[1] and self._pending[1] != new_hash):
                raise DeltaGateRejection(
                    RejectReason.HASH_MISMATCH.value,
                    f'applied weights hash {new_hash[:12]} but the cloud expects '
                    f'{self._pending[1][:12]} for version {new_version}')
            self._version = new_version
            self._hash = new_hash
            self._pending = None



# --- rollback orders ------------------------------------------------------------------------
ROLLBACK_DOMAIN = b'CDCCA-ROLLBACK-v1'


def _rollback_message(device_id: str, from_version: int, from_hash: str, to_hash: str,
                      new_version: int, reason: str, key_id: str = '', expires: int = 0
                      ) -> bytes:
    """What a rollback order's signature covers (domain-separated from deltas)."""
    fields = [device_id.encode(), struct.pack('<Q', from_version), from_hash.encode(),
              to_hash.encode(), struct.pack('<Q', new_version), reason.encode(),
              key_id.encode(), struct.pack('<Q', expires)]
    return ROLLBACK_DOMAIN + b''.join(struct.pack('<Q', len(f)) + f for f in fields)


@dataclass(frozen=True)
class RollbackEnvelope:
    """A signed order from the cloud: go back to the adapter held before the current one.

    The live audit found the version the device runs worse than the one before it. The
    device restores its previous adapter (it must hash to ``to_hash``) under the new,
    higher version ``new_version`` (versions never go back, so an old delta cannot be
    replayed over the restored weights). Signed like a delta: by a key the device trusts for
    rollback orders (:data:`~cdcca_ros.core.trust.ROLE_ROLLBACK`), with an expiry.

    Attributes:
        device_id: The device it is for.
        from_version: The version being withdrawn (the device must run it).
        from_hash: Its hash.
        to_hash: Hash of the adapter to restore (the one before ``from_version``).
        new_version: Version of the restored adapter (greater than ``from_version``).
        reason: Why, for the device's report.
        signature: Ed25519 over all the fields (key id and expiry included).
        key_id: Id of the signing key.
        expires: Unix time (s) after which the order is refused.
    """

    device_id: str
    from_version: int
    from_hash: str
    to_hash: str
    new_version: int
    reason: str
    signature: bytes
    key_id: str = ''
    expires: int = 0

    def __post_init__(self) -> None:
        for name in ('device_id', 'from_hash', 'to_hash', 'reason', 'key_id'):
            if not isinstance(getattr(self, name), str):
                raise WireError(f'rollback {name} must be a str')
        for name in ('from_version', 'new_version', 'expires'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U64_MAX:
                raise WireError(f'rollback {name} must be an integer in [0, 2**64), got {v!r}')
        if not isinstance(self.signature, bytes):
            raise WireError('rollback signature must be bytes')

    def message(self) -> bytes:
        return _rollback_message(self.device_id, self.from_version, self.from_hash,
                                 self.to_hash, self.new_version, self.reason, self.key_id,
                                 self.expires)

    def verify(self, trust: TrustStore | Ed25519PublicKey, now: float | None = None) -> None:
        """Check the signature against one pinned key, or a trust store (which also checks
        the key's role and the expiry).

        Raises:
            SignatureError: It does not verify (a :class:`~cdcca_ros.errors.TrustError`
                with a ``reason`` from a trust store).
        """
        from cryptography.exceptions import InvalidSignature

        if not isinstance(trust, TrustStore):
            if len(self.signature) != 64:
                raise SignatureError(f'rollback signature must be 64 bytes, got '
                                     f'{len(self.signature)}')
            try:
                trust.verify(self.signature, self.message())
            except InvalidSignature as err:
                raise SignatureError(f'rollback order for device {self.device_id!r} '
                                     f'v{self.from_version} does not verify') from err
            return
        trust.verify(ROLE_ROLLBACK, self.message(), self.key_id, self.signature,
                     expires=self.expires, now=now, what='rollback order')


def seal_rollback(signer: Signer | Ed25519PrivateKey, *, device_id: str, from_version: int,
                  from_hash: str, to_hash: str, new_version: int, reason: str = '',
                  now: float | None = None) -> RollbackEnvelope:
    """Sign a rollback order (cloud side), as :func:`seal_delta` signs a delta."""
    if new_version <= from_version or new_version - from_version > MAX_VERSION_STEP:
        raise WireError(f'rollback new_version {new_version} must exceed {from_version} by at '
                        f'most {MAX_VERSION_STEP}')
    signer = Signer.of(signer)
    expires = signer.expires(now)
    message = _rollback_message(device_id, from_version, from_hash, to_hash, new_version,
                                reason, signer.key_id, expires)
    return RollbackEnvelope(device_id=device_id, from_version=from_version,
                            from_hash=from_hash, to_hash=to_hash, new_version=new_version,
                            reason=reason, signature=signer.sign(message),
                            key_id=signer.key_id, expires=expires)


def check_rollback(order: RollbackEnvelope, trust: TrustStore | Ed25519PublicKey,
                   device_id: str, current_version: int, current_hash: str,
                   previous_hash: str | None) -> None:
    """Whether a device running ``current_version`` may carry out ``order``.

    Raises:
        DeltaGateRejection: ``bad_signature`` (or the trust store's reason: an unknown or
            revoked key, a key not allowed to order rollbacks, an expired order),
            ``wrong_device``, ``replay`` (the order names a version the device no longer
            runs: already carried out, or stale), ``wrong_base`` (the hashes do not match
            what the device holds and held).
    """
    def reject(reason: str, msg: str) -> DeltaGateRejection:
        return DeltaGateRejection(reason, f'rollback of v{order.from_version} for device '
                                          f'{order.device_id!r}: {msg}')

    if not isinstance(order, RollbackEnvelope):
        raise DeltaGateRejection(RejectReason.UNDECODABLE.value,
                                 f'expected a RollbackEnvelope, got {type(order).__name__}')
    try:
        order.verify(trust)
    except SignatureError as err:
        raise reject(getattr(err, 'reason', RejectReason.BAD_SIGNATURE.value), str(err)) from err
    if order.device_id != device_id:
        raise reject(RejectReason.WRONG_DEVICE.value, f'this is device {device_id!r}')
    if order.from_version != current_version or order.new_version <= current_version:
        raise reject(RejectReason.REPLAY.value, f'the device runs v{current_version}')
    if order.new_version - current_version > MAX_VERSION_STEP:
        raise reject(RejectReason.ROLLBACK.value, f'new version {order.new_version} is more '
                                                  f'than {MAX_VERSION_STEP} ahead')
    if order.from_hash != current_hash:
        raise reject(RejectReason.WRONG_BASE.value, f'the device runs {current_hash[:12]}, the '
                                                    f'order withdraws {order.from_hash[:12]}')
    if previous_hash is None or order.to_hash != previous_hash:
        raise reject(RejectReason.WRONG_BASE.value, 'the adapter to restore is not the one '
                                                    'the device held before')
