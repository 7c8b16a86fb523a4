"""Certificates for the link's mutual TLS: one CA, the router, the cloud, one per device.

Every peer proves who it is with a certificate signed by the project's CA; the router's access
control then maps the certificate's common name (the device id) to the keys that device may
use. Keys are EC P-256, written with mode 0600; nothing is ever overwritten.

Layout of ``--out DIR``::

    ca.crt ca.key                    the certificate authority (ca.key never leaves this machine)
    router.crt router.key            the router's server certificate (SANs = --router-host)
    <cloud>.crt <cloud>.key          the cloud's client certificate (CN = cloud name)
    <device>.crt <device>.key        one client certificate per device (CN = device id)

Run ``python -m cdcca_ros.transport.certs --out DIR --devices robot1 robot2``. When ``DIR``
already holds a CA, the command reuses it and issues only the certificates asked for (new
devices, or ``--cloud`` / ``--router-host`` when given), refusing any file that exists.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdcca_ros.errors import ConfigError
from cdcca_ros.transport.keys import validate_device_id

CA_NAME = 'ca'
ROUTER_NAME = 'router'
DEFAULT_CLOUD = 'cloud'
DEFAULT_ROUTER_HOSTS = ('localhost', '127.0.0.1')
_ORG = 'cdcca_ros'


@dataclass(frozen=True)
class Identity:
    """Paths of one party's TLS material (all PEM)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, certs_dir: str | Path, name: str) -> Identity:
        """The identity ``name`` inside a directory written by this module."""
        d = Path(certs_dir)
        return cls(d / f'{CA_NAME}.crt', d / f'{name}.crt', d / f'{name}.key')

    def check(self) -> Identity:
        """Return self if every file exists, else raise :class:`ConfigError` naming the missing."""
        missing = [str(p) for p in (self.ca, self.cert, self.key) if not p.is_file()]
        if missing:
            raise ConfigError(f'TLS files missing: {", ".join(missing)}')
        return self


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: refuse to overwrite even if another process created the file meanwhile.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits we asked for


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CertificateAuthority:
    """A CA key and certificate that issues the link's leaf certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, common_name: str = 'cdcca_ros link CA', days: int = 3650
               ) -> CertificateAuthority:
        """A new self-signed CA (EC P-256)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, certs_dir: str | Path) -> CertificateAuthority:
        """Load ``ca.crt`` / ``ca.key`` from ``certs_dir``."""
        d = Path(certs_dir)
        try:
            cert = x509.load_pem_x509_certificate((d / f'{CA_NAME}.crt').read_bytes())
            key = serialization.load_pem_private_key((d / f'{CA_NAME}.key').read_bytes(), None)
        except (OSError, ValueError) as err:
            raise ConfigError(f'cannot load the CA from {d}: {err}') from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f'CA key in {d} is not an EC key')
        return cls(cert, key)

    def issue(self, common_name: str, *, hosts: Sequence[str] = (), server: bool = False,
              days: int = 825) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Issue a leaf certificate.

        Args:
            common_name: Subject CN: the device id, the cloud name or the router name.
            hosts: Subject alternative names (DNS names or IP addresses) a client verifies
                when it connects to this party (the router).
            server: Also allow TLS server use (the router); every leaf may act as a client.
            days: Validity.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False))
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def create_certificates(out: str | Path, *, devices: Sequence[str] = (),
                        cloud: str | None = None, router_hosts: Sequence[str] | None = None,
                        days: int = 825) -> list[Path]:
    """Write the CA (if new) and the requested leaf certificates into ``out``.

    With no CA in ``out``, a CA is created and the router (``router_hosts`` defaulting to
    localhost / 127.0.0.1) and cloud (``cloud`` defaulting to ``'cloud'``) certificates are
    issued along with the devices'. With an existing CA, only what is asked is issued.

    Returns:
        The files written.

    Raises:
        ConfigError: on an invalid or duplicate name, or when any target file exists
            (checked before anything is written).
    """
    out = Path(out)
    new_ca = not (out / f'{CA_NAME}.crt').exists()
    if new_ca and (out / f'{CA_NAME}.key').exists():
        raise ConfigError(f'{out / (CA_NAME + ".key")} exists without {CA_NAME}.crt; refusing')
    if new_ca:
        cloud = DEFAULT_CLOUD if cloud is None else cloud
        router_hosts = list(DEFAULT_ROUTER_HOSTS) if router_hosts is None else router_hosts
    leaves: list[tuple[str, Sequence[str], bool]] = []
    if router_hosts:
        leaves.append((ROUTER_NAME, list(router_hosts), True))
    if cloud is not None:
        leaves.append((validate_device_id(cloud), [], False))
    leaves += [(validate_device_id(d), [], False) for d in devices]
    names = [n for n, _, _ in leaves]
    reserved = [n for n in names[1 if router_hosts else 0:] if n in (CA_NAME, ROUTER_NAME)]
    if reserved:
        raise ConfigError(f'names {CA_NAME!r} and {ROUTER_NAME!r} are reserved: got {reserved}')
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f'certificate names must be unique: {dup} given more than once')
    targets = [out / f'{n}.{ext}' for n in names for ext in ('crt', 'key')]
    if new_ca:
        targets += [out / f'{CA_NAME}.crt', out / f'{CA_NAME}.key']
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise ConfigError(f'refusing to overwrite existing files: {", ".join(existing)}')

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if new_ca:
        ca = CertificateAuthority.create()
        _write_new(out / f'{CA_NAME}.key', _key_pem(ca.key), 0o600)
        _write_new(out / f'{CA_NAME}.crt', ca.cert.public_bytes(serialization.Encoding.PEM),
                   0o644)
        written += [out / f'{CA_NAME}.key', out / f'{CA_NAME}.crt']
    else:
        ca = CertificateAuthority.load(out)
    for name, hosts, server in leaves:
        cert, key = ca.issue(name, hosts=hosts, server=server, days=days)
        _write_new(out / f'{name}.key', _key_pem(key), 0o600)
        _write_new(out / f'{name}.crt', cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [out / f'{name}.key', out / f'{name}.crt']
    return written


def common_name(cert_path: str | Path) -> str:
    """The subject common name of a PEM certificate file."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise ConfigError(f'certificate {cert_path} has no common name')
    return str(attrs[0].value)


MACHINES = """which files go to which machine (never copy ca.key: it stays where you sign):
  router machine:   ca.crt  router.crt  router.key     (python -m cdcca_ros.transport.router
                                                         --certs DIR, or zenohd)
  cloud server:     ca.crt  <cloud>.crt <cloud>.key    (cloud_bridge.certs_dir)
  each robot:       ca.crt  <device>.crt <device>.key  (device_bridge.certs_dir; only its own)
  this machine:     ca.key  (to issue more: run again with --out DIR --devices NEW_ID)

e.g. for robot7:  ssh robot7 mkdir -p /etc/cdcca/certs
                  scp DIR/ca.crt DIR/robot7.crt DIR/robot7.key robot7:/etc/cdcca/certs/
"""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog='python -m cdcca_ros.transport.certs',
        description='Create a CA and the router/cloud/device certificates of the link.',
        epilog=MACHINES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='directory to write into')
    parser.add_argument('--cloud', default=None,
                        help=f'cloud certificate name (default {DEFAULT_CLOUD!r} with a new CA)')
    parser.add_argument('--devices', nargs='*', default=[], help='device ids (certificate CNs)')
    parser.add_argument('--router-host', nargs='+', default=None, dest='router_hosts',
                        help='router DNS names / IPs for its SANs '
                             f'(default {" ".join(DEFAULT_ROUTER_HOSTS)} with a new CA)')
    parser.add_argument('--days', type=int, default=825,
                        help='leaf validity in days (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        written = create_certificates(args.out, devices=args.devices, cloud=args.cloud,
                                      router_hosts=args.router_hosts, days=args.days)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
