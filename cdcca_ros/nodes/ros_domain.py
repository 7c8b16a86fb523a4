"""A ROS domain of one's own for tests and benches (no rclpy import: set it before any).

ROS 2 documents domain ids 0-101 as safe on Linux: a participant's DDS ports are
``7400 + 250 * domain + 10 + 2 * participant`` (discovery) and ``+ 11 + 2 * participant``
(user traffic), so above 101 they reach Linux's ephemeral range (from 32768), where the
kernel also hands out ports to any socket bound to port 0.

:func:`pick_domain` finds a domain in 1-101 (0 is everybody's default) that no other run
holds: it takes a lock file per domain (released by the kernel when the process ends), and
skips a domain whose participant ports are bound already (a graph that did not lock, e.g.
another session's). :func:`resolve_domain` honours an explicit id instead.
:func:`isolated_ros_env` sets a domain, localhost-only discovery and no static peers for a
block and restores the caller's values after it: a bench never changes its caller's
environment.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cdcca_ros.errors import ConfigError

#: Domain ids ROS 2 documents as safe on Linux.
SAFE_DOMAINS = range(0, 102)
#: Domain ids :func:`pick_domain` chooses from (0 is every ROS program's default).
PICKED_DOMAINS = range(1, 102)
#: Largest domain id whose ports fit in 16 bits with Fast DDS's default port mapping.
MAX_DOMAIN = 232
PORT_BASE, DOMAIN_GAIN, UNICAST_OFFSET, PARTICIPANT_GAIN = 7400, 250, 10, 2
#: Participants per domain whose ports :func:`domain_in_use` probes.
PROBED_PARTICIPANTS = 8
#: The variables :func:`isolated_ros_env` sets (and restores).
ROS_ENV_KEYS = ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_STATIC_PEERS')
LOCK_PREFIX = 'cdcca-ros-domain-'


def participant_ports(domain_id: int, participant: int) -> tuple[int, int]:
    """The unicast (discovery, user) UDP ports of ``participant`` in ``domain_id``."""
    port = (PORT_BASE + DOMAIN_GAIN * domain_id + UNICAST_OFFSET
            + PARTICIPANT_GAIN * participant)
    return port, port + 1


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(('0.0.0.0', port))  # noqa: S104 - the participants bind the wildcard
        except OSError:
            return False
    return True


def domain_in_use(domain_id: int, participants: int = PROBED_PARTICIPANTS) -> bool:
    """Whether a DDS participant on this machine holds a port of ``domain_id`` (the first
    ``participants`` participant ids are probed)."""
    return not all(_port_free(port) for p in range(participants)
                   for port in participant_ports(domain_id, p))


@dataclass
class DomainLease:
    """A domain id and, when it was obtained, the lock that keeps other runs off it.

    The lock lasts until :meth:`release` or the end of the process.
    """

    domain_id: int
    how: str
    lock_path: Path | None = None
    _file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def locked(self) -> bool:
        """Whether this process holds the domain's lock."""
        return self._file is not None

    def release(self) -> None:
        """Give the lock back (the domain may be picked by another run)."""
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def lock_path(domain_id: int, lock_dir: str | Path | None = None) -> Path:
    """The lock file of ``domain_id``."""
    return Path(lock_dir or tempfile.gettempdir()) / f'{LOCK_PREFIX}{domain_id}.lock'


def _try_lock(domain_id: int, lock_dir: str | Path | None) -> IO[bytes] | None:
    path = lock_path(domain_id, lock_dir)
    try:
        handle = open(path, 'ab')  # noqa: SIM115 - held for the lease's life
    except OSError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def pick_domain(candidates: range = PICKED_DOMAINS, lock_dir: str | Path | None = None,
                start: int | None = None) -> DomainLease:
    """A free domain id of ``candidates``, locked for this process.

    Candidates are tried in turn from ``start`` (default: an offset from the process id, so
    runs started together try different ids first); a domain is taken when its lock is free
    and none of its participant ports is bound.

    Raises:
        ConfigError: every candidate is locked or in use.
    """
    ids = list(candidates)
    if not ids:
        raise ConfigError('pick_domain: no candidate domain ids')
    first = (os.getpid() if start is None else start) % len(ids)
    for domain_id in ids[first:] + ids[:first]:
        handle = _try_lock(domain_id, lock_dir)
        if handle is None:
            continue
        if domain_in_use(domain_id):
            handle.close()
            continue
        return DomainLease(domain_id, 'picked', lock_path(domain_id, lock_dir), handle)
    raise ConfigError(f'no free ROS domain id in {ids[0]}..{ids[-1]}: every one is locked '
                      f'({lock_path(ids[0], lock_dir).parent}/{LOCK_PREFIX}*.lock) or has '
                      'DDS participants; set ROS_DOMAIN_ID')


def parse_domain(value: str, name: str) -> int:
    """``value`` of variable ``name`` as a domain id in 0..:data:`MAX_DOMAIN`.

    Raises:
        ConfigError: not an integer in range.
    """
    try:
        domain_id = int(value.strip())
    except ValueError as err:
        raise ConfigError(f'{name}={value!r} is not a ROS domain id (an integer)') from err
    if not 0 <= domain_id <= MAX_DOMAIN:
        raise ConfigError(f'{name}={value!r} is outside 0..{MAX_DOMAIN} (0..101 are safe)')
    return domain_id


def resolve_domain(environ: Mapping[str, str] | None = None,
                   names: tuple[str, ...] = ('CDCCA_TEST_DOMAIN_ID', 'ROS_DOMAIN_ID'),
                   lock_dir: str | Path | None = None) -> DomainLease:
    """The domain a run uses: the first of ``names`` set in ``environ``, else a picked one.

    An explicit id is honoured as given (its lock is taken too when free, so runs that pick
    stay off it).

    Raises:
        ConfigError: an explicit value is not a domain id, or no domain is free.
    """
    env = os.environ if environ is None else environ
    for name in names:
        value = env.get(name, '')
        if value.strip():
            domain_id = parse_domain(value, name)
            return DomainLease(domain_id, f'from {name}', lock_path(domain_id, lock_dir),
                               _try_lock(domain_id, lock_dir))
    return pick_domain(lock_dir=lock_dir)


def ros_isolation(domain_id: int) -> dict[str, str | None]:
    """The values of :data:`ROS_ENV_KEYS` that keep ROS traffic in ``domain_id`` on this
    machine (None: unset)."""
    return {'ROS_DOMAIN_ID': str(domain_id), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
            'ROS_STATIC_PEERS': None}


def apply_env(values: Mapping[str, str | None],
              environ: MutableMapping[str, str] | None = None) -> None:
    """Set (or unset, for None) each of ``values`` in ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value


@contextlib.contextmanager
def isolated_ros_env(domain_id: int | None = None,
                     environ: MutableMapping[str, str] | None = None
                     ) -> Iterator[int]:
    """Run a block in a ROS domain of its own, localhost-only, then restore the caller's
    ROS variables (and ``FASTDDS_DEFAULT_PROFILES_FILE``) exactly.

    Args:
        domain_id: The domain; None picks a free one (:func:`pick_domain`), held for the
            block.
        environ: Where to set them (default ``os.environ``, read by rclpy and inherited by
            child processes).

    Yields:
        The domain id.

    Raises:
        ConfigError: ``domain_id`` is outside 0..:data:`MAX_DOMAIN`, or none is free.
    """
    if domain_id is not None and not 0 <= domain_id <= MAX_DOMAIN:
        raise ConfigError(f'ROS domain id {domain_id} is outside 0..{MAX_DOMAIN} (0..101 are '
                          'safe)')
    env = os.environ if environ is None else environ
    keys = ROS_ENV_KEYS + ('FASTDDS_DEFAULT_PROFILES_FILE',)
    saved = {key: env.get(key) for key in keys}
    lease = (DomainLease(domain_id, 'given') if domain_id is not None
             else pick_domain())
    try:
        apply_env(ros_isolation(lease.domain_id), env)
        yield lease.domain_id
    finally:
        apply_env(saved, env)
        lease.release()
