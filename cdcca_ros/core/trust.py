"""Who may sign what the cloud sends a device: a root key, a signed key list, expiry.

TUF/Uptane-style trust for every signed cloud -> device record (deltas; the rollback orders
of the lead's cloud round use the same verifier), pure Python, no rclpy, no torch:

* The device holds one **root** public key (flashed once, kept offline by the operator).
* The root signs a **key list** (:class:`KeyList`): the online signing keys the cloud may
  use, each with the roles it may sign (``delta``, ``rollback``, ...), the key ids revoked,
  a version (monotonic) and an expiry. Rotating the cloud's signing key is a new key list:
  the cloud attaches the list to what it sends, the device checks it against the root and
  adopts it (persisting it), and from then on refuses the revoked keys. No re-flashing.
* Every signed record names its signing key (``key_id``: the key's fingerprint) and carries
  an expiry (unix seconds, signed with it): a record held back longer than that (a freeze)
  is refused, and so is everything while the key list itself has expired.
* :class:`TrustStore` is the device's verifier: :meth:`TrustStore.update` takes a key list
  (refusing a forged, older, conflicting, expired or malformed one with a reason),
  :meth:`TrustStore.verify` checks one record's signature, key, role and expiry. A store
  made with :meth:`TrustStore.pinned` trusts one fixed key for every role (the
  ``cloud_public_key`` set-up: no rotation).

Key list document (:meth:`KeyList.encode`, UTF-8 JSON, at most :data:`MAX_KEY_LIST_BYTES`)::

    {"signed": {"type": "cdcca-key-list", "version": 3, "expires": 1767225600,
                "keys": {"<key id>": {"public": "<64 hex digits>", "roles": ["delta"]}},
                "revoked": ["<key id>", ...]},
     "root": "<root key id>", "signature": "<128 hex digits>"}

The root signs :data:`KEY_LIST_TAG`, a NUL byte, then the canonical JSON of ``signed``
(sorted keys, no spaces, ASCII). A key id is :func:`key_id` of the raw public key: the first
16 bytes of its sha256, hex.
"""
from __future__ import annotations

import enum
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.errors import ConfigError, TrustError

KEY_LIST_TYPE = 'cdcca-key-list'
KEY_LIST_TAG = b'cdcca-key-list-v1'
MAX_KEY_LIST_BYTES = 64 * 1024
MAX_KEYS = 64
ROLE_DELTA = 'delta'
ROLE_ROLLBACK = 'rollback'
ROLES = frozenset({ROLE_DELTA, ROLE_ROLLBACK})
DEFAULT_CLOCK_SKEW_S = 300.0
_U64_MAX = (1 << 64) - 1


class TrustReason(enum.StrEnum):
    """Why a key list or a signed record was refused (the ``reason`` of :class:`TrustError`)."""

    UNKNOWN_KEY = 'unknown_key'
    REVOKED_KEY = 'revoked_key'
    WRONG_ROLE = 'wrong_role'
    BAD_SIGNATURE = 'bad_signature'
    EXPIRED = 'expired'
    KEY_LIST_EXPIRED = 'key_list_expired'
    KEY_LIST_INVALID = 'key_list_invalid'
    KEY_LIST_SIGNATURE = 'key_list_signature'
    KEY_LIST_ROLLBACK = 'key_list_rollback'
    KEY_LIST_CONFLICT = 'key_list_conflict'
    NO_KEY_LIST = 'no_key_list'


def key_id(key: Ed25519PublicKey) -> str:
    """The id of a public key: first 16 bytes of the sha256 of its raw 32 bytes, hex."""
    return hashlib.sha256(_raw(key)).hexdigest()[:32]


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(',', ':'), ensure_ascii=True,
                      allow_nan=False).encode()


def _u64(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise TrustError(TrustReason.KEY_LIST_INVALID.value,
                         f'key list {what} must be an integer in [0, 2**64), got {value!r}'[:300])
    return value


def _hex(value: Any, nbytes: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * nbytes:
        raise TrustError(TrustReason.KEY_LIST_INVALID.value,
                         f'key list {what} must be {2 * nbytes} hex digits'[:300])
    try:
        return bytes.fromhex(value)
    except ValueError as err:
        raise TrustError(TrustReason.KEY_LIST_INVALID.value,
                         f'key list {what} is not hex') from err


@dataclass(frozen=True)
class KeyEntry:
    """One signing key of a key list.

    Attributes:
        key_id: :func:`key_id` of ``public_key``.
        public_key: The Ed25519 public key.
        roles: What it may sign (:data:`ROLES`).
    """

    key_id: str
    public_key: Ed25519PublicKey
    roles: frozenset[str]


@dataclass(frozen=True)
class KeyList:
    """A root-signed list of the cloud's signing keys (see the module docstring).

    Build one with :meth:`create` (operator, with the root private key), send
    :meth:`encode`'s bytes, read them with :meth:`decode` and check them with :meth:`verify`
    (a :class:`TrustStore` does both).

    Attributes:
        version: Monotonic version; a device never goes back to a lower one.
        expires: Unix time (s) after which the list (and everything it vouches for) is
            refused.
        keys: key id -> entry.
        revoked: Key ids refused for good.
        root_id: :func:`key_id` of the root key that signed it.
        signature: The root's Ed25519 signature over :meth:`signing_bytes`.
    """

    version: int
    expires: int
    keys: Mapping[str, KeyEntry]
    revoked: frozenset[str]
    root_id: str
    signature: bytes

    def signed_part(self) -> dict[str, Any]:
        """The ``signed`` object of the document."""
        return {'type': KEY_LIST_TYPE, 'version': self.version, 'expires': self.expires,
                'keys': {kid: {'public': _raw(e.public_key).hex(), 'roles': sorted(e.roles)}
                         for kid, e in sorted(self.keys.items())},
                'revoked': sorted(self.revoked)}

    def signing_bytes(self) -> bytes:
        """What the root signs: the tag, a NUL byte, the canonical JSON of ``signed``."""
        return KEY_LIST_TAG + b'\x00' + _canonical(self.signed_part())

    def encode(self) -> bytes:
        """The document as UTF-8 JSON bytes."""
        return _canonical({'signed': self.signed_part(), 'root': self.root_id,
                           'signature': self.signature.hex()})

    @classmethod
    def create(cls, root: Ed25519PrivateKey, *, version: int, expires: int,
               keys: Iterable[tuple[Ed25519PublicKey, Iterable[str]]],
               revoked: Iterable[str] = ()) -> KeyList:
        """Sign a key list with the root private key (operator side).

        Args:
            root: The root private key.
            version: Higher than every list the devices hold.
            expires: Unix time (s) the list expires.
            keys: (public key, roles) of each signing key the cloud may use.
            revoked: Key ids refused from now on (a key listed here may not be in ``keys``).

        Raises:
            ConfigError: A bad version, expiry, role, key set or revocation.
        """
        entries: dict[str, KeyEntry] = {}
        for public, roles in keys:
            if not isinstance(public, Ed25519PublicKey):
                raise ConfigError(f'key list keys must be Ed25519 public keys, got '
                                  f'{type(public).__name__}')
            roles = frozenset(roles)
            if not roles or not roles <= ROLES:
                raise ConfigError(f'key roles must be a non-empty subset of {sorted(ROLES)}, '
                                  f'got {sorted(roles)}')
            entries[key_id(public)] = KeyEntry(key_id(public), public, roles)
        revoked = frozenset(revoked)
        if len(entries) + len(revoked) > MAX_KEYS:
            raise ConfigError(f'a key list holds at most {MAX_KEYS} keys and revocations')
        if revoked & set(entries):
            raise ConfigError(f'keys {sorted(revoked & set(entries))} are both listed and '
                              'revoked')
        for value, what in ((version, 'version'), (expires, 'expires')):
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    0 <= value <= _U64_MAX):
                raise ConfigError(f'key list {what} must be an integer in [0, 2**64), got '
                                  f'{value!r}')
        unsigned = cls(version=version, expires=expires, keys=entries, revoked=revoked,
                       root_id=key_id(root.public_key()), signature=b'')
        signature = root.sign(unsigned.signing_bytes())
        return cls(version=version, expires=expires, keys=entries, revoked=revoked,
                   root_id=unsigned.root_id, signature=signature)

    @classmethod
    def decode(cls, data: bytes) -> KeyList:
        """Parse a key list document (the signature is checked by :meth:`verify`).

        Raises:
            TrustError: ``key_list_invalid``: too large, not UTF-8 JSON, or any field of the
                wrong type, size or value.
        """
        invalid = TrustReason.KEY_LIST_INVALID.value
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TrustError(invalid, f'key list must be bytes, got {type(data).__name__}')
        if len(data) > MAX_KEY_LIST_BYTES:
            raise TrustError(invalid, f'key list of {len(data)} bytes exceeds '
                             f'{MAX_KEY_LIST_BYTES}')
        try:
            doc = json.loads(bytes(data).decode('utf-8'))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise TrustError(invalid, f'key list is not UTF-8 JSON: {err}'[:300]) from err
        if not isinstance(doc, dict) or set(doc) != {'signed', 'root', 'signature'}:
            raise TrustError(invalid, 'key list must be an object with exactly signed, root '
                             'and signature')
        signed = doc['signed']
        if not isinstance(signed, dict) or set(signed) != {'type', 'version', 'expires',
                                                           'keys', 'revoked'}:
            raise TrustError(invalid, 'key list signed part must hold exactly type, version, '
                             'expires, keys and revoked')
        if signed['type'] != KEY_LIST_TYPE:
            raise TrustError(invalid, f'key list type is {signed["type"]!r}, expected '
                             f'{KEY_LIST_TYPE!r}'[:300])
        version = _u64(signed['version'], 'version')
        expires = _u64(signed['expires'], 'expires')
        keys, revoked = signed['keys'], signed['revoked']
        if not isinstance(keys, dict) or not isinstance(revoked, list):
            raise TrustError(invalid, 'key list keys must be an object and revoked a list')
        if len(keys) + len(revoked) > MAX_KEYS:
            raise TrustError(invalid, f'key list holds over {MAX_KEYS} keys and revocations')
        entries: dict[str, KeyEntry] = {}
        for kid, entry in keys.items():
            if not isinstance(entry, dict) or set(entry) != {'public', 'roles'}:
                raise TrustError(invalid, f'key list entry {kid!r} must hold exactly public '
                                 'and roles'[:300])
            public = Ed25519PublicKey.from_public_bytes(_hex(entry['public'], 32,
                                                             f'key {kid!r}'))
            if key_id(public) != kid:
                raise TrustError(invalid, f'key list entry {kid!r} does not name its key '
                                 f'(id {key_id(public)})'[:300])
            roles = entry['roles']
            if not isinstance(roles, list) or not roles or not all(
                    isinstance(r, str) for r in roles) or not set(roles) <= ROLES:
                raise TrustError(invalid, f'key {kid} roles must be a non-empty list of '
                                 f'{sorted(ROLES)}')
            entries[kid] = KeyEntry(kid, public, frozenset(roles))
        if not all(isinstance(r, str) and len(r) == 32 for r in revoked):
            raise TrustError(invalid, 'key list revoked must list 32-digit key ids')
        if set(revoked) & set(entries):
            raise TrustError(invalid, 'key list both lists and revokes a key')
        root_id = doc['root']
        if not isinstance(root_id, str) or len(root_id) != 32:
            raise TrustError(invalid, 'key list root must be a 32-digit key id')
        signature = _hex(doc['signature'], 64, 'signature')
        return cls(version=version, expires=expires, keys=entries,
                   revoked=frozenset(revoked), root_id=root_id, signature=signature)

    def verify(self, root: Ed25519PublicKey) -> None:
        """Check the root's signature.

        Raises:
            TrustError: ``key_list_signature``: another root, or any field changed.
        """
        if self.root_id != key_id(root):
            raise TrustError(TrustReason.KEY_LIST_SIGNATURE.value,
                             f'key list v{self.version} is signed by root {self.root_id}, '
                             f'this device trusts root {key_id(root)}')
        try:
            root.verify(self.signature, self.signing_bytes())
        except InvalidSignature as err:
            raise TrustError(TrustReason.KEY_LIST_SIGNATURE.value,
                             f'key list v{self.version} signature does not verify against '
                             f'root {key_id(root)}') from err


@dataclass(frozen=True)
class Signer:
    """What the cloud signs records with: a private key, its id, and how long records live.

    Attributes:
        private_key: The Ed25519 signing key (listed in the devices' key list).
        ttl_s: Seconds a signed record stays valid (its ``expires`` is now + this).
        key_list: The root-signed key list document to attach (empty: none; devices
            trusting a pinned key need none).
    """

    private_key: Ed25519PrivateKey
    ttl_s: int = 7 * 24 * 3600
    key_list: bytes = b''

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise ConfigError(f'signer key must be Ed25519, got '
                              f'{type(self.private_key).__name__}')
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, int) or self.ttl_s < 1:
            raise ConfigError(f'ttl_s must be a positive integer, got {self.ttl_s!r}')

    @property
    def key_id(self) -> str:
        """:func:`key_id` of the public half."""
        return key_id(self.private_key.public_key())

    def expires(self, now: float | None = None) -> int:
        """The expiry of a record signed now."""
        return int(time.time() if now is None else now) + self.ttl_s

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message``."""
        return self.private_key.sign(message)

    @classmethod
    def of(cls, key: Signer | Ed25519PrivateKey) -> Signer:
        """``key`` as a Signer (a bare private key: default TTL, no key list)."""
        return key if isinstance(key, Signer) else cls(key)


class TrustStore:
    """The device's verifier of signed cloud records (see the module docstring).

    Args:
        root: The root public key; None with ``pinned`` only.
        pinned: Keys trusted directly for every role, with no key list (no rotation).
        key_list: An initial key list document (flashed with the root); optional.
        state_path: Where the adopted key list is persisted (and read back at start, checked
            against the root); None keeps it in memory.
        clock: Unix time source (seconds).
        max_clock_skew_s: Tolerance of the expiry checks for a device clock running behind
            the cloud's.

    Raises:
        ConfigError: Neither a root nor a pinned key; an initial or persisted key list that
            does not verify.
    """

    def __init__(self, root: Ed25519PublicKey | None = None, *,
                 pinned: Iterable[Ed25519PublicKey] = (), key_list: bytes | None = None,
                 state_path: str | Path | None = None,
                 clock: Callable[[], float] = time.time,
                 max_clock_skew_s: float = DEFAULT_CLOCK_SKEW_S) -> None:
        self.root = root
        self.pinned = {key_id(k): k for k in pinned}
        if root is None and not self.pinned:
            raise ConfigError('a trust store needs a root key or a pinned key')
        if not max_clock_skew_s >= 0:
            raise ConfigError(f'max_clock_skew_s must be >= 0, got {max_clock_skew_s}')
        self.clock = clock
        self.max_clock_skew_s = float(max_clock_skew_s)
        self.state_path = Path(state_path) if state_path else None
        self._list: KeyList | None = None
        self._lock = threading.Lock()
        self.refused_key_lists = 0
        for source, data in (('persisted', self._read_state()), ('initial', key_list)):
            if data:
                try:
                    self.update(data, persist=source != 'persisted', check_expiry=False)
                except TrustError as err:
                    if err.reason == TrustReason.KEY_LIST_ROLLBACK.value:
                        continue  # the persisted list is newer than the flashed one
                    raise ConfigError(f'{source} key list does not verify: {err}') from err
        self.refused_key_lists = 0

    @classmethod
    def pinned_key(cls, key: Ed25519PublicKey, **kwargs: Any) -> TrustStore:
        """A store trusting one fixed key for every role (no key list, no rotation)."""
        return cls(None, pinned=[key], **kwargs)

    def _read_state(self) -> bytes | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            return self.state_path.read_bytes()
        except OSError as err:
            raise ConfigError(f'cannot read the key list {self.state_path}: {err}') from err

    @property
    def key_list(self) -> KeyList | None:
        """The key list in force (None: none yet, or a pinned store)."""
        return self._list

    def _now(self, now: float | None) -> float:
        return float(self.clock() if now is None else now)

    def update(self, data: bytes, now: float | None = None, *, persist: bool = True,
               check_expiry: bool = True) -> bool:
        """Adopt a newer key list; True when adopted, False when it is the one in force.

        Checks, in order: it decodes, the root signed it, its version is not lower than the
        one in force (an equal version must be the identical list), it has not expired.

        Raises:
            TrustError: Refused (``reason``: ``key_list_invalid``, ``key_list_signature``,
                ``key_list_rollback``, ``key_list_conflict``, ``key_list_expired``, or
                ``unknown_key`` on a pinned store, which takes no key list). Nothing changes.
        """
        try:
            if self.root is None:
                raise TrustError(TrustReason.UNKNOWN_KEY.value,
                                 'this device trusts a pinned key, not a root: key lists are '
                                 'refused')
            new = KeyList.decode(data)
            new.verify(self.root)
            with self._lock:
                cur = self._list
                if cur is not None and new.version < cur.version:
                    raise TrustError(TrustReason.KEY_LIST_ROLLBACK.value,
                                     f'key list v{new.version} is older than v{cur.version} '
                                     'in force')
                if cur is not None and new.version == cur.version:
                    if new.signing_bytes() != cur.signing_bytes():
                        raise TrustError(TrustReason.KEY_LIST_CONFLICT.value,
                                         f'key list v{new.version} differs from the v'
                                         f'{cur.version} in force')
                    return False
                if check_expiry and self._now(now) > new.expires + self.max_clock_skew_s:
                    raise TrustError(TrustReason.KEY_LIST_EXPIRED.value,
                                     f'key list v{new.version} expired at {new.expires}')
                if persist and self.state_path is not None:
                    self.state_path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(self.state_path, new.encode())
                self._list = new
                return True
        except TrustError:
            self.refused_key_lists += 1
            raise

    def verify(self, role: str, message: bytes, signer_id: str, signature: bytes, *,
               expires: int, now: float | None = None, what: str = 'record') -> None:
        """Check one signed record.

        Args:
            role: What the record is (:data:`ROLE_DELTA`, :data:`ROLE_ROLLBACK`).
            message: The canonical bytes the signature covers (they must include
                ``signer_id`` and ``expires``).
            signer_id: :func:`key_id` of the key that signed it.
            signature: 64-byte Ed25519 signature.
            expires: Unix time (s) after which the record is refused.
            now: Unix time (default: the store's clock).
            what: Names the record in error messages.

        Raises:
            TrustError: ``unknown_key``, ``revoked_key``, ``wrong_role``, ``bad_signature``,
                ``expired``, ``key_list_expired`` or ``no_key_list``.
        """
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
            raise TrustError(TrustReason.BAD_SIGNATURE.value,
                             f'{what}: signature must be 64 bytes')
        if not isinstance(signer_id, str):
            raise TrustError(TrustReason.UNKNOWN_KEY.value, f'{what}: key id must be a str')
        key = self.pinned.get(signer_id)
        cur = self._list
        listed = key is None
        if key is None:
            if self.root is not None and cur is None:
                raise TrustError(TrustReason.NO_KEY_LIST.value,
                                 f'{what}: no key list from root {key_id(self.root)} yet')
            if cur is not None and signer_id in cur.revoked:
                raise TrustError(TrustReason.REVOKED_KEY.value,
                                 f'{what}: signing key {signer_id} is revoked (key list '
                                 f'v{cur.version})')
            entry = cur.keys.get(signer_id) if cur is not None else None
            if entry is None:
                raise TrustError(TrustReason.UNKNOWN_KEY.value,
                                 f'{what}: signing key {signer_id[:32]!r} is not trusted')
            if role not in entry.roles:
                raise TrustError(TrustReason.WRONG_ROLE.value,
                                 f'{what}: key {signer_id} may sign {sorted(entry.roles)}, '
                                 f'not {role!r}')
            key = entry.public_key
        try:
            key.verify(bytes(signature), message)
        except InvalidSignature as err:
            raise TrustError(TrustReason.BAD_SIGNATURE.value,
                             f'{what}: signature by key {signer_id} does not verify') from err
        t = self._now(now)
        if t > expires + self.max_clock_skew_s:
            raise TrustError(TrustReason.EXPIRED.value,
                             f'{what}: expired {t - expires:.0f} s ago (at {expires}); '
                             'held back or delivered too late')
        if listed and cur is not None and t > cur.expires + self.max_clock_skew_s:
            raise TrustError(TrustReason.KEY_LIST_EXPIRED.value,
                             f'{what}: key list v{cur.version} expired at {cur.expires}; '
                             'the operator must sign a new one')

    def status(self) -> dict[str, Any]:
        """For diagnostics: mode, key list version and expiry, keys, refused key lists."""
        cur = self._list
        return {'trust': 'root' if self.root is not None else 'pinned',
                'key_list_version': cur.version if cur is not None else -1,
                'key_list_expires': cur.expires if cur is not None else -1,
                'trusted_keys': ','.join(sorted(cur.keys) if cur is not None
                                         else sorted(self.pinned)),
                'key_lists_refused': self.refused_key_lists}


def load_trust(*, root_key: str = '', pinned_key: str = '', key_list: str = '',
               state_dir: str | Path | None = None,
               max_clock_skew_s: float = DEFAULT_CLOCK_SKEW_S) -> TrustStore | None:
    """The trust store a device's parameters name (PEM file paths); None when neither a root
    nor a pinned key is set (every signed record is refused).

    Raises:
        ConfigError: Both or unreadable keys, a key list file that cannot be read or does not
            verify.
    """
    from cdcca_ros.core import wire

    if root_key and pinned_key:
        raise ConfigError(f'set a trust root ({root_key}) or a pinned cloud key '
                          f'({pinned_key}), not both')
    if not root_key and not pinned_key:
        if key_list:
            raise ConfigError(f'key list {key_list} needs a trust root key')
        return None
    initial = None
    if key_list:
        try:
            initial = Path(key_list).read_bytes()
        except OSError as err:
            raise ConfigError(f'cannot read key list {key_list}: {err}') from err
    if pinned_key:
        if key_list:
            raise ConfigError('a key list needs a trust root, not a pinned key')
        return TrustStore.pinned_key(wire.load_public_key(pinned_key),
                                     max_clock_skew_s=max_clock_skew_s)
    state_path = Path(state_dir) / 'key_list.json' if state_dir else None
    return TrustStore(wire.load_public_key(root_key), key_list=initial, state_path=state_path,
                      max_clock_skew_s=max_clock_skew_s)
