"""Zenoh configurations of the link: the router, and the device / cloud sessions.

Everything is built as a plain dict (easy to test and to print) and turned into a
``zenoh.Config`` at the last moment by :func:`to_zenoh_config`. Choices made here, and why:

- TLS with mutual authentication everywhere: the router only admits peers whose certificate
  the project's CA signed, and clients verify the router's name against its SANs.
- The router enforces access control with ``default_permission: deny``: per device (matched by
  certificate common name) it allows publishing under ``<prefix>/<device>/up/**`` and reading
  ``<prefix>/<device>/down/**`` only; the cloud gets the whole prefix. Denials are silent on the
  wire, so the link's tests check what arrives.
- Device and cloud open in *client* mode: a router routes between its clients (between two
  *peers* it forwards nothing unless gossip discovery is on, checked on 1.10), and a client
  listens on nothing. A client cannot open while the router is down, so the link retries the
  open itself; once open, Zenoh reconnects with the backoff given here and restores the
  declarations. Scouting (multicast, gossip) is off so nothing leaves the configured
  endpoints, and shared memory is off (the link crosses machines).
- Timestamping is on (the HLC stamps help ordering diagnostics and Zenoh's own recovery tools).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcca_ros.errors import ConfigError
from cdcca_ros.transport.certs import DEFAULT_CLOUD, ROUTER_NAME, Identity, common_name
from cdcca_ros.transport.keys import DEFAULT_PREFIX, LinkKeys, validate_device_id, validate_prefix

_PROTOCOLS = ('tls', 'tcp', 'quic')


def _check_endpoints(name: str, endpoints: Sequence[str], allow_plain: bool) -> list[str]:
    out = list(endpoints)
    for ep in out:
        proto = ep.split('/', 1)[0] if '/' in ep else ''
        if proto not in _PROTOCOLS:
            raise ConfigError(f'{name} endpoint {ep!r} must look like tls/HOST:PORT')
        if proto == 'tcp' and not allow_plain:
            raise ConfigError(f'{name} endpoint {ep!r} is plain TCP; use tls/HOST:PORT '
                              '(or set allow_plain=True for a test without security)')
    return out


def _base(mode: str) -> dict[str, Any]:
    return {
        'mode': mode,
        'scouting': {'multicast': {'enabled': False}, 'gossip': {'enabled': False}},
        'timestamping': {'enabled': True},
        'transport': {'shared_memory': {'enabled': False}},
    }


@dataclass
class RouterConfig:
    """A router that admits the cloud and the listed devices.

    Attributes:
        certs_dir: Directory written by :mod:`cdcca_ros.transport.certs`.
        listen: Endpoints to listen on, e.g. ``['tls/127.0.0.1:7447']``.
        devices: Device ids (certificate common names) granted their own keys.
        cloud_names: Certificate common names granted the whole prefix.
        prefix: Key prefix of the link.
        router_name: Name of the router's certificate in ``certs_dir``.
        access_control: Enforce the per-device rules (turn off only to debug).
        lease_ms: Link lease: a silent peer is dropped after this long.
        allow_plain: Accept ``tcp/`` endpoints (no TLS; tests of the protocol only).
    """

    certs_dir: str | Path
    listen: Sequence[str]
    devices: Sequence[str] = ()
    cloud_names: Sequence[str] = (DEFAULT_CLOUD,)
    prefix: str = DEFAULT_PREFIX
    router_name: str = ROUTER_NAME
    access_control: bool = True
    lease_ms: int = 10000
    allow_plain: bool = False

    def __post_init__(self) -> None:
        self.listen = _check_endpoints('router listen', self.listen, self.allow_plain)
        if not self.listen:
            raise ConfigError('router listen endpoints are empty')
        self.devices = [validate_device_id(d) for d in self.devices]
        self.cloud_names = [validate_device_id(c) for c in self.cloud_names]
        both = sorted(set(self.devices) & set(self.cloud_names))
        if both:
            raise ConfigError(f'names {both} are both devices and cloud names')
        validate_prefix(self.prefix)
        if self.lease_ms < 500:
            raise ConfigError(f'lease_ms={self.lease_ms} is too short (>= 500)')

    def to_dict(self) -> dict[str, Any]:
        """The router's Zenoh configuration as a dict."""
        ident = Identity.in_dir(self.certs_dir, self.router_name).check()
        conf = _base('router')
        conf['listen'] = {'endpoints': list(self.listen)}
        conf['connect'] = {'endpoints': []}
        conf['transport']['link'] = {
            'tls': {
                'root_ca_certificate': str(ident.ca),
                'listen_private_key': str(ident.key),
                'listen_certificate': str(ident.cert),
                'enable_mtls': True,
            },
            'tx': {'lease': self.lease_ms},
        }
        conf['access_control'] = access_control_rules(
            self.devices, self.cloud_names, self.prefix, enabled=self.access_control)
        return conf


def access_control_rules(devices: Sequence[str], cloud_names: Sequence[str],
                         prefix: str = DEFAULT_PREFIX, *, enabled: bool = True
                         ) -> dict[str, Any]:
    """The router's ``access_control`` section (see the module docstring).

    Per device: ingress ``put``/``delete`` on its ``up/**``; ingress ``declare_subscriber`` on
    its ``down/**``; egress ``put``/``delete`` on its ``down/**`` (without the egress rule the
    router would not forward the cloud's downlink to it); egress ``declare_subscriber`` on its
    ``up/**`` so its publishers learn that the cloud listens (matching status).
    """
    rules: list[dict[str, Any]] = []
    subjects: list[dict[str, Any]] = []
    policies: list[dict[str, Any]] = []
    for dev in devices:
        keys = LinkKeys.for_device(dev, prefix)
        rules += [
            {'id': f'{dev}-pub-up', 'messages': ['put', 'delete'], 'flows': ['ingress'],
             'permission': 'allow', 'key_exprs': [keys.up]},
            {'id': f'{dev}-sub-down', 'messages': ['declare_subscriber'], 'flows': ['ingress'],
             'permission': 'allow', 'key_exprs': [keys.down]},
            {'id': f'{dev}-recv-down', 'messages': ['put', 'delete'], 'flows': ['egress'],
             'permission': 'allow', 'key_exprs': [keys.down]},
            {'id': f'{dev}-see-up-subs', 'messages': ['declare_subscriber'],
             'flows': ['egress'], 'permission': 'allow', 'key_exprs': [keys.up]},
        ]
        subjects.append({'id': f'subject-{dev}', 'cert_common_names': [dev]})
        policies.append({'id': f'policy-{dev}', 'subjects': [f'subject-{dev}'],
                         'rules': [f'{dev}-pub-up', f'{dev}-sub-down', f'{dev}-recv-down',
                                   f'{dev}-see-up-subs']})
    if cloud_names:
        rules.append({
            'id': 'cloud-all',
            'messages': ['put', 'delete', 'declare_subscriber', 'query', 'reply',
                         'declare_queryable', 'liveliness_token', 'liveliness_query',
                         'declare_liveliness_subscriber'],
            'flows': ['ingress', 'egress'], 'permission': 'allow',
            'key_exprs': [f'{prefix}/**']})
        subjects.append({'id': 'subject-cloud', 'cert_common_names': list(cloud_names)})
        policies.append({'id': 'policy-cloud', 'subjects': ['subject-cloud'],
                         'rules': ['cloud-all']})
    return {'enabled': enabled, 'default_permission': 'deny', 'rules': rules,
            'subjects': subjects, 'policies': policies}


@dataclass
class SessionConfig:
    """A device's or the cloud's Zenoh session towards the router(s).

    Attributes:
        connect: Router endpoints, e.g. ``['tls/localhost:7447']`` (the host must match a SAN
            of the router's certificate).
        certs_dir: Directory written by :mod:`cdcca_ros.transport.certs`.
        name: Certificate name inside ``certs_dir`` (the device id, or the cloud name).
        retry_init_ms: First reconnection delay.
        retry_max_ms: Longest reconnection delay (the delay doubles up to this).
        open_timeout_ms: How long one attempt to open the session waits for a router.
        lease_ms: Link lease (how fast a silent partition is noticed).
        max_message_size: Largest Zenoh message accepted (bytes); the link's chunks are far
            below it.
        allow_plain: Accept ``tcp/`` endpoints and no certificates (protocol tests only).
        extra: Additional Zenoh config entries, ``{'dotted.key': value}``, applied last.
    """

    connect: Sequence[str]
    certs_dir: str | Path | None
    name: str
    retry_init_ms: int = 250
    retry_max_ms: int = 4000
    open_timeout_ms: int = 3000
    lease_ms: int = 10000
    max_message_size: int = 1 << 30
    allow_plain: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.connect = _check_endpoints('connect', self.connect, self.allow_plain)
        if not self.connect:
            raise ConfigError('connect endpoints are empty')
        validate_device_id(self.name)
        if self.certs_dir is None and not self.allow_plain:
            raise ConfigError('certs_dir is required (TLS); allow_plain=True only for tests')
        if not 10 <= self.retry_init_ms <= self.retry_max_ms:
            raise ConfigError(f'need 10 <= retry_init_ms ({self.retry_init_ms}) <= '
                              f'retry_max_ms ({self.retry_max_ms})')
        if self.open_timeout_ms < 100:
            raise ConfigError(f'open_timeout_ms={self.open_timeout_ms} is too short (>= 100)')
        if self.lease_ms < 500:
            raise ConfigError(f'lease_ms={self.lease_ms} is too short (>= 500)')
        if self.max_message_size < 1 << 16:
            raise ConfigError(f'max_message_size={self.max_message_size} is below 64 KiB')

    def to_dict(self) -> dict[str, Any]:
        """The session's Zenoh configuration as a dict."""
        conf = _base('client')
        conf['connect'] = {
            'endpoints': list(self.connect),
            # open() gives up after open_timeout_ms; the link retries it with its own backoff
            # (so it can be stopped). Once open, Zenoh reconnects by itself with this backoff.
            'timeout_ms': self.open_timeout_ms,
            'exit_on_failure': True,
            'retry': {'period_init_ms': self.retry_init_ms, 'period_max_ms': self.retry_max_ms,
                      'period_increase_factor': 2.0},
        }
        link: dict[str, Any] = {'tx': {'lease': self.lease_ms},
                                'rx': {'max_message_size': self.max_message_size}}
        if self.certs_dir is not None:
            ident = Identity.in_dir(self.certs_dir, self.name).check()
            cn = common_name(ident.cert)
            if cn != self.name:
                # The router grants keys by common name: a mismatch would be denied silently.
                raise ConfigError(f'certificate {ident.cert} is for {cn!r}, not {self.name!r}')
            link['tls'] = {
                'root_ca_certificate': str(ident.ca),
                'connect_private_key': str(ident.key),
                'connect_certificate': str(ident.cert),
                'enable_mtls': True,
                'verify_name_on_connect': True,
            }
        conf['transport']['link'] = link
        for dotted, value in self.extra.items():
            _set_dotted(conf, dotted, value)
        return conf


def _set_dotted(conf: dict[str, Any], dotted: str, value: Any) -> None:
    node = conf
    *path, last = dotted.split('/') if '/' in dotted else dotted.split('.')
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f'config key {dotted!r} crosses a non-object value')
    node[last] = value


def to_zenoh_config(conf: dict[str, Any]) -> Any:
    """Turn a config dict into a ``zenoh.Config`` (Zenoh validates every key)."""
    import zenoh  # the module is light, but keep config dicts testable without a session

    try:
        return zenoh.Config.from_json5(json.dumps(conf))
    except (zenoh.ZError, ValueError) as err:
        raise ConfigError(f'Zenoh rejects the configuration: {err}') from err
