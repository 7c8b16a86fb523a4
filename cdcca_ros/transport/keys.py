"""Zenoh key expressions of the device-cloud link.

Every key names the device, so one cloud serves many devices and the router's access control
can give each device its own keys only. What a device publishes lives under
``<prefix>/<device>/up/**``; what it may read lives under ``<prefix>/<device>/down/**``:

=================================  ==============  ===========================================
key                                direction       carries
=================================  ==============  ===========================================
``<prefix>/<device>/up/data``      device -> cloud uplink frames (e.g. UtsTokens)
``<prefix>/<device>/up/ack``       device -> cloud acknowledgements of downlink messages
``<prefix>/<device>/down/data``    cloud -> device downlink frames (e.g. DwcDelta)
``<prefix>/<device>/down/ack``     cloud -> device acknowledgements of uplink messages
``<prefix>/<device>/down/version`` cloud -> device the latest model-version announcement (latched)
=================================  ==============  ===========================================
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cdcca_ros.errors import ConfigError

DEFAULT_PREFIX = 'cdcca'

# Zenoh reserves '/', '*', '$', '#', '?' in key expressions; '@' starts the admin space. A
# device id must also be a valid certificate common name and a file name, hence the
# conservative alphabet.
_PREFIX_CHUNK = re.compile(r'^[A-Za-z0-9_.-]+$')


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can be used in keys, certificates and file names.

    Raises:
        ConfigError: if it is empty, too long, or holds a character outside ``[A-Za-z0-9_.-]``
            (in particular ``/``, ``*``, ``$``, ``#``, ``?``, ``@`` or whitespace).
    """
    from cdcca_ros.core.wire import check_device_id
    from cdcca_ros.errors import WireError

    try:
        return check_device_id(device_id)
    except WireError as err:
        raise ConfigError(f'device id {device_id!r} is invalid: use 1-63 characters from '
                          '[A-Za-z0-9_.-], starting with a letter or digit') from err


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a plain key expression (chunks without wildcards)."""
    chunks = prefix.split('/') if isinstance(prefix, str) else ['']
    if not all(_PREFIX_CHUNK.fullmatch(c) for c in chunks):
        raise ConfigError(
            f'key prefix {prefix!r} is invalid: use non-empty chunks of [A-Za-z0-9_.-] '
            "separated by '/'")
    return prefix


@dataclass(frozen=True)
class LinkKeys:
    """The keys of one device (or, with ``device='*'``, the cloud's wildcard view of all)."""

    prefix: str
    device: str

    @classmethod
    def for_device(cls, device_id: str, prefix: str = DEFAULT_PREFIX) -> LinkKeys:
        """Keys of one device, after validating its id and the prefix."""
        return cls(validate_prefix(prefix), validate_device_id(device_id))

    @classmethod
    def all_devices(cls, prefix: str = DEFAULT_PREFIX) -> LinkKeys:
        """Wildcard keys matching every device (for the cloud's subscriptions)."""
        return cls(validate_prefix(prefix), '*')

    @property
    def base(self) -> str:
        return f'{self.prefix}/{self.device}'

    @property
    def up(self) -> str:
        """Everything the device publishes (for access-control rules and subscriptions)."""
        return f'{self.base}/up/**'

    @property
    def down(self) -> str:
        """Everything the device reads (for access-control rules and subscriptions)."""
        return f'{self.base}/down/**'

    @property
    def up_data(self) -> str:
        return f'{self.base}/up/data'

    @property
    def up_ack(self) -> str:
        return f'{self.base}/up/ack'

    @property
    def down_data(self) -> str:
        return f'{self.base}/down/data'

    @property
    def down_ack(self) -> str:
        return f'{self.base}/down/ack'

    @property
    def down_version(self) -> str:
        return f'{self.base}/down/version'


def parse_key(key: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, str]:
    """Split a concrete key into ``(device, direction, channel)``.

    Example: ``'cdcca/robot1/up/data'`` -> ``('robot1', 'up', 'data')``.

    Raises:
        ConfigError: if the key is not one of the link's keys under ``prefix``.
    """
    head = prefix + '/'
    rest = key[len(head):].split('/') if key.startswith(head) else []
    if len(rest) != 3 or rest[1] not in ('up', 'down'):
        raise ConfigError(f'key {key!r} is not a link key under prefix {prefix!r}')
    device, direction, channel = rest
    validate_device_id(device)
    return device, direction, channel
